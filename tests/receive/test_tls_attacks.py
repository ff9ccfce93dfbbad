"""TLS under attack: each bad handshake refused cleanly, audited, and the node still serves.

A plain-TCP peer, a client certificate from another CA, an expired certificate, TLS 1.0 and
1.1, and a handshake that stalls. After each, a C-ECHO over TLS with a good certificate must
succeed; while a handshake stalls, others must still get in (the handshake is off the accept
loop).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.app.node import stage_settings
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import parse_settings
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database
from tests.conftest import free_port, require_tool, wait_for
from tests.receive.raw import associate_rq
from tests.receive.test_tls import certificate


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    certificate(folder, "ca", None)
    certificate(folder, "node", "ca")
    certificate(folder, "modality", "ca")
    certificate(folder, "otherca", None)
    certificate(folder, "stranger", "otherca")
    # Expired: signed by the right CA, valid until yesterday.
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "expired.key", "-out",
            "expired.csr", "-subj", "/CN=expired", cwd=folder)  # fmt: skip
    openssl("x509", "-req", "-in", "expired.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "expired.crt", "-days", "-1", cwd=folder)  # fmt: skip
    return folder


@pytest.fixture
def receiver(tmp_path: Path, pki: Path) -> Iterator[Receiver]:
    settings = parse_settings(
        {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "tls": {
                "cert_file": str(pki / "node.crt"),
                "key_file": str(pki / "node.key"),
                "ca_file": str(pki / "ca.crt"),
                "handshake_timeout_s": 1.0,
            },
        }
    )
    settings.storage_dir.mkdir(parents=True)
    stages = stage_settings(settings)
    db = Database(stages.layout.database_path)
    receiver = Receiver(stages.receiver, db, AuditLog(stages.layout.audit_path))
    receiver.start()
    yield receiver
    receiver.stop()
    db.close()


def client_context(pki: Path, name: str | None, version: ssl.TLSVersion | None = None) -> Any:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    context.check_hostname = False
    if name is not None:
        context.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    if version is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = version
    return context


def tls_echo(port: int, pki: Path, timeout_s: float = 10) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="DICOMNODE",
        tls_args=(client_context(pki, "modality"), None),
    )
    assert assoc.is_established, "C-ECHO over TLS with a good certificate"
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def alerts(receiver: Receiver) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        events = [
            e
            for e in read_events(receiver.audit.path)
            if e["event_id"]["meaning"] == "Security Alert"
        ]
        return events or None

    return list(wait_for(found, 10, "a Security Alert"))


def handshake(port: int, context: ssl.SSLContext) -> bytes:
    """Try a handshake and a read; return what came back (b'' when refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(associate_rq())
                return tls.recv(6)
        except (ssl.SSLError, OSError):
            return b""


def test_a_good_certificate_gets_in(receiver: Receiver, pki: Path) -> None:
    assert tls_echo(receiver.settings.port, pki) == 0


def test_a_plain_tcp_peer_is_refused_and_audited(receiver: Receiver, pki: Path) -> None:
    with socket.create_connection(("127.0.0.1", receiver.settings.port), timeout=5) as sock:
        sock.sendall(associate_rq())
        try:
            answer = sock.recv(6)
        except OSError:
            answer = b""
    assert answer[:1] not in (b"\x02",), "no A-ASSOCIATE-AC in clear text"
    [alert] = alerts(receiver)
    assert alert["details"]["reason"].startswith("TLS handshake failed")
    assert alert["peer_address"].startswith("127.0.0.1:")
    assert tls_echo(receiver.settings.port, pki) == 0


@pytest.mark.parametrize(
    ("client", "reason"),
    [("stranger", "TLS"), ("expired", "expired"), (None, "TLS")],
    ids=["another-ca", "expired", "no-certificate"],
)
def test_a_bad_client_certificate_is_refused_and_audited(
    receiver: Receiver, pki: Path, client: str | None, reason: str
) -> None:
    assert handshake(receiver.settings.port, client_context(pki, client)) == b""
    [alert] = alerts(receiver)
    assert reason in alert["details"]["reason"], alert["details"]["reason"]
    assert tls_echo(receiver.settings.port, pki) == 0


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused_and_audited(
    receiver: Receiver, pki: Path, version: ssl.TLSVersion
) -> None:
    assert handshake(receiver.settings.port, client_context(pki, "modality", version)) == b""
    [alert] = alerts(receiver)
    assert alert["details"]["reason"].startswith("TLS handshake failed")
    assert tls_echo(receiver.settings.port, pki) == 0


def test_a_stalled_handshake_blocks_no_one_and_is_cut(receiver: Receiver, pki: Path) -> None:
    stalled = [socket.create_connection(("127.0.0.1", receiver.settings.port)) for _ in range(3)]
    try:
        stalled[0].sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        started = time.monotonic()
        assert tls_echo(receiver.settings.port, pki, timeout_s=5) == 0
        assert time.monotonic() - started < 3, "others are served while handshakes stall"
        found = wait_for(lambda: len(alerts(receiver)) >= 3 and alerts(receiver), 10, "3 alerts")
        assert all(a["details"]["reason"] == "TLS handshake timed out" for a in found)
        for sock in stalled:  # the node closed them
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in stalled:
            sock.close()
