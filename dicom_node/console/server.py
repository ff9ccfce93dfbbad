"""The console's HTTP(S) server: uvicorn in a thread of the node, on a socket bound at start."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import structlog
import uvicorn
from starlette.types import ASGIApp

log = structlog.get_logger(__name__)

__all__ = ["ConsoleServer"]

START_TIMEOUT_S = 10.0


class ConsoleServer:
    """Serves ``app`` on ``host:port``, over TLS with ``cert_file``/``key_file`` when given.

    The socket is bound in :meth:`start`, so a port in use fails the node's start (an
    :class:`OSError` the caller turns into a one-line error) instead of a thread's log.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.https = cert_file is not None
        self.config = uvicorn.Config(
            app,
            log_config=None,  # the node's logging; no access log (paths carry ids only anyway)
            access_log=False,
            lifespan="off",
            server_header=False,
            ssl_certfile=str(cert_file) if cert_file is not None else None,
            ssl_keyfile=str(key_file) if key_file is not None else None,
            timeout_keep_alive=5,
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        log.info(
            "console.started",
            url=f"{'https' if self.https else 'http'}://{self.host}:{self.port}/",
        )

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
