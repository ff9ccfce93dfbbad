"""The console's server: HTTPS with the node's TLS files, a clear error for a port in use."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dicom_node.app.node import listen_error
from dicom_node.console.server import ConsoleServer
from tests.receive.test_tls import certificate

pytestmark = pytest.mark.peers  # openssl


def hello_app() -> Starlette:
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse("hello"))])


def test_https_with_the_node_certificate(tmp_path: Path) -> None:
    certificate(tmp_path, "ca", None)
    certificate(tmp_path, "node", "ca")
    server = ConsoleServer(
        hello_app(), "127.0.0.1", 0, tmp_path / "node.crt", tmp_path / "node.key"
    )
    server.start()
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        context.check_hostname = False  # the test certificate names CN=node only
        response = httpx.get(f"https://127.0.0.1:{server.port}/", verify=context)
        assert response.status_code == 200 and response.text == "hello"
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not answered
            httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a certificate of another CA is refused
            httpx.get(f"https://127.0.0.1:{server.port}/", verify=ssl.create_default_context())
    finally:
        server.stop()


def test_a_port_in_use_fails_the_start_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = ConsoleServer(hello_app(), "127.0.0.1", port)
        with pytest.raises(OSError) as raised:
            server.start()
    error = listen_error("console.port", "127.0.0.1", port, raised.value)
    assert str(error).startswith(f"console.port: cannot listen on 127.0.0.1:{port}")
    assert "another program" in str(error)
