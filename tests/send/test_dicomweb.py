"""DICOMweb destinations: STOW-RS to Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) with
HTTP basic auth, and how each kind of answer becomes done, retried or dead-lettered.

Orthanc 1.10's DICOMweb plugin never answers a partial failure (a refused instance is either
reported as stored or fails the whole request with 400), so the per-instance reading of a
Store Instances Response (``FailedSOPSequence``, ``WarningReason``) is checked against a small
HTTP server of the test's own that answers what PS3.18 10.5.3 describes.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom import dcmread

from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import ConfigError
from dicom_node.config.destinations import (
    DestinationType,
    DicomwebDestination,
    DimseDestination,
)
from dicom_node.config.sections import HttpAuth
from dicom_node.config.settings import parse_settings
from dicom_node.send.delivery import Delivery
from dicom_node.send.senders import sender_for
from dicom_node.store.database import Database
from tests.conftest import NodeProcess, free_port, require_tool, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.orthanc import DicomwebOrthanc
from tests.send.test_delivery import queue

pytestmark = pytest.mark.peers

USER, PASSWORD = "node", "s3cret-pw"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomwebOrthanc]:
    """One Orthanc with DICOMweb and basic auth for the module (its shutdown takes seconds)."""
    server = DicomwebOrthanc(tmp_path_factory.mktemp("orthanc"), users={USER: PASSWORD}).start()
    yield server
    server.stop()


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, Path]:
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text(PASSWORD + "\n")  # the trailing newline is not part of the password
    bad.write_text("not-the-password\n")
    return {"good": good, "bad": bad}


def dicomweb(url: str, password_file: Path | None = None, **kw: Any) -> DicomwebDestination:
    auth = None if password_file is None else HttpAuth(USER, password_file)
    return DicomwebDestination(name="cloud", url=url, auth=auth, **kw)


# -- the sender against Orthanc -------------------------------------------------------------


def test_stow_rs_stores_each_instance_and_echo_needs_the_credentials(
    tmp_path: Path, orthanc: DicomwebOrthanc, secrets: dict[str, Path]
) -> None:
    files = write_files(ct_series(n_slices=3), tmp_path / "ct")
    sender = sender_for(dicomweb(orthanc.dicomweb_url, secrets["good"]))
    assert sender.echo()
    outcome = sender.send(files)
    assert outcome.answered
    assert [(r.path, r.ok, r.detail) for r in outcome.results] == [
        (p, True, "HTTP 200") for p in files
    ]
    sent = {str(dcmread(p).SOPInstanceUID) for p in files}
    assert sent <= set(orthanc.sop_instance_uids())
    assert not sender_for(dicomweb(orthanc.dicomweb_url, secrets["bad"])).echo()
    assert not sender_for(dicomweb(orthanc.dicomweb_url)).echo()  # no credentials at all


def test_wrong_password_is_permanent_with_a_readable_reason(
    tmp_path: Path, orthanc: DicomwebOrthanc, secrets: dict[str, Path]
) -> None:
    files = write_files(ct_series(n_slices=2), tmp_path / "ct")
    outcome = sender_for(dicomweb(orthanc.dicomweb_url, secrets["bad"])).send(files)
    assert outcome.answered
    for result in outcome.results:
        assert not result.ok and result.permanent
        assert result.detail == (
            "HTTP 401 Unauthorized: check auth (username and password_file, or token_file)"
        )


def test_a_wrong_path_is_permanent_and_no_server_is_retried(
    tmp_path: Path, orthanc: DicomwebOrthanc, secrets: dict[str, Path]
) -> None:
    files = write_files(ct_series(n_slices=1), tmp_path / "ct")
    [wrong] = (
        sender_for(dicomweb(orthanc.url + "/no-such-root", secrets["good"])).send(files).results
    )
    assert wrong.permanent and wrong.detail.startswith("HTTP 404 Not Found: check the destination")
    outcome = sender_for(dicomweb(f"http://127.0.0.1:{free_port()}/dicom-web")).send(files)
    [down] = outcome.results
    assert not outcome.answered
    assert (down.ok, down.permanent, down.detail) == (False, False, "no connection (peer down?)")


# -- per-instance answers, from a STOW-RS server of the test's own ----------------------------


class CannedStow:
    """An HTTP server that answers every POST with ``status`` and a DICOM JSON ``body``."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) to serve HTTPS with."""
        self.status = 200
        self.body: dict[str, Any] = {}
        self.posts = 0
        self.authorization: list[str | None] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers["Content-Length"]))
                canned.posts += 1
                canned.authorization.append(self.headers.get("Authorization"))
                payload = json.dumps(canned.body).encode()
                self.send_response(canned.status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canned() -> Iterator[CannedStow]:
    server = CannedStow()
    yield server
    server.stop()


def _item(uid: str, tag: str, code: int) -> dict[str, Any]:
    return {"00081155": {"vr": "UI", "Value": [uid]}, tag: {"vr": "US", "Value": [code]}}


def test_a_partial_failure_retries_only_what_failed(tmp_path: Path, canned: CannedStow) -> None:
    files = write_files(ct_series(n_slices=4), tmp_path / "ct")
    uids = [str(dcmread(p).SOPInstanceUID) for p in files]
    canned.status = 202
    canned.body = {
        "00081199": {"vr": "SQ", "Value": [_item(uids[0], "00081196", 0xB000)]},  # warning
        "00081198": {
            "vr": "SQ",
            "Value": [
                _item(uids[1], "00081197", 0xA700),  # out of resources: retry
                _item(uids[2], "00081197", 0xC000),  # cannot understand: permanent
            ],
        },
    }
    settings = parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {"pacs": {"type": "dicomweb", "url": canned.url}},
            "send": {"initial_backoff_s": 600, "max_backoff_s": 600, "echo_interval_s": 0},
        }
    )
    db = Database(stage_settings(settings).layout.database_path)
    delivery = Delivery(
        stage_settings(settings).delivery, db, AuditLog(stage_settings(settings).layout.audit_path)
    )
    queue(db, files)
    assert delivery.tick() == 2  # the warned one and the one not mentioned (stored)
    sends = {s["sop_instance_uid"]: s for s in db.sends()}
    by_file = [sends[f"1.2.3.9.{i}"] for i in range(4)]
    assert [(s["state"], s["attempts"]) for s in by_file] == [
        ("done", 1),
        ("pending", 1),
        ("failed", 1),
        ("done", 1),
    ]
    assert by_file[1]["last_error"] == "HTTP 202: failure reason 0xA700"
    assert by_file[2]["last_error"] == "HTTP 202: failure reason 0xC000"
    assert canned.posts == 1


@pytest.mark.parametrize(
    ("status", "permanent"), [(503, False), (429, False), (408, False), (400, True), (403, True)]
)
def test_http_statuses_retried_or_permanent(
    tmp_path: Path, canned: CannedStow, status: int, permanent: bool
) -> None:
    canned.status = status
    files = write_files(ct_series(n_slices=1), tmp_path / "ct")
    [result] = sender_for(dicomweb(canned.url)).send(files).results
    assert not result.ok
    assert result.permanent is permanent
    assert result.detail.startswith(f"HTTP {status} ")
    assert canned.posts == 1  # dicomweb-client's own retrying is off: delivery's backoff rules


def test_a_bearer_token_is_read_from_its_file_at_each_send(
    tmp_path: Path, canned: CannedStow
) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    dest = DicomwebDestination(name="cloud", url=canned.url, auth=HttpAuth(token_file=token))
    files = write_files(ct_series(n_slices=1), tmp_path / "ct")
    sender = sender_for(dest)
    assert sender.send(files).results[0].ok
    token.write_text("rotated-token\n")
    assert sender.send(files).results[0].ok
    assert canned.authorization == ["Bearer first-token", "Bearer rotated-token"]
    token.unlink()
    [result] = sender.send(files).results
    assert (result.ok, result.permanent) == (False, False)
    assert result.detail == "cannot read the credentials file: No such file or directory"


def test_tls_is_verified_by_default(tmp_path: Path) -> None:
    """HTTPS with a certificate no system CA signed: refused (and retried) unless ``ca_file``
    names it or ``verify_tls`` is false."""
    subprocess.run(
        [
            require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", "server.key", "-out", "server.crt", "-days", "2", "-subj", "/CN=stow",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    server = CannedStow(tls=(tmp_path / "server.crt", tmp_path / "server.key"))
    try:
        files = write_files(ct_series(n_slices=1), tmp_path / "ct")
        [refused] = sender_for(dicomweb(server.url)).send(files).results
        assert (refused.ok, refused.permanent) == (False, False)
        assert refused.detail.startswith("TLS failed")
        assert server.posts == 0
        trusted = dicomweb(server.url, ca_file=tmp_path / "server.crt")
        assert sender_for(trusted).send(files).results[0].ok
        assert sender_for(dicomweb(server.url, verify_tls=False)).send(files).results[0].ok
        assert server.posts == 2
    finally:
        server.stop()


def test_a_server_that_does_not_answer_times_out(tmp_path: Path) -> None:
    """Accepts the connection and never answers: the send ends at timeout_s, to be retried."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        files = write_files(ct_series(n_slices=1), tmp_path / "ct")
        [result] = sender_for(dicomweb(url, timeout_s=0.5)).send(files).results
        assert (result.ok, result.permanent) == (False, False)
        assert result.detail == "no response within timeout_s (0.5 s)"


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        (
            {"type": "dicomweb"},
            "destinations.cloud.url: missing; a dicomweb destination needs the base URL",
        ),
        ({"type": "dicomweb", "url": "pacs.example"}, "must be an http:// or https:// URL"),
        (
            {"type": "dicomweb", "url": "http://x", "ae_title": "A"},
            "ae_title: applies to dimse destinations only",
        ),
        (
            {"type": "dicomweb", "url": "http://x", "auth": {"username": "u"}},
            "password_file: missing; username goes with password_file",
        ),
        ({"type": "dicomweb", "url": "http://x", "verify_tls": "false"}, "must be true or false"),
        (
            {"type": "dicomweb", "url": "https://u:pw@x/dw"},
            "put them in auth: {username, password_file}",
        ),
        ({"type": "stow"}, "destinations.cloud.type: must be one of dimse, dicomweb, got 'stow'"),
        ({"type": "dimse", "url": "http://x"}, "url: applies to dicomweb destinations only"),
        ({"ae_title": "A", "host": "h"}, "destinations.cloud.port: missing"),
    ],
)
def test_destination_config_errors_say_what_to_do(
    tmp_path: Path, dest: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_settings({"storage_dir": str(tmp_path), "destinations": {"cloud": dest}})
    assert message in str(info.value)


def test_destination_config(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    settings = parse_settings(
        {
            "destinations": {
                "cloud": {
                    "type": "dicomweb",
                    "url": "https://pacs.example/dicom-web/",
                    "auth": {"username": "node", "password_file": "pw"},
                    "connect_timeout_s": 3,
                    "outputs": ["seg"],
                },
                "pacs": {"ae_title": "PACS", "host": "h", "port": 104},
            },
            "send": {"timeout_s": 12},
        },
        base=tmp_path,
    )
    cloud, pacs = settings.destinations["cloud"], settings.destinations["pacs"]
    assert isinstance(cloud, DicomwebDestination) and isinstance(pacs, DimseDestination)
    assert cloud.type is DestinationType.DICOMWEB and cloud.url == "https://pacs.example/dicom-web"
    assert cloud.auth == HttpAuth("node", tmp_path / "pw") and cloud.verify_tls
    assert (cloud.connect_timeout_s, cloud.timeout_s) == (3.0, 12.0)  # send.timeout_s: default
    assert pacs.type is DestinationType.DIMSE and pacs.address == "PACS@h:104"
    with pytest.raises(ValidationError, match="a dimse destination needs ae_title, host and port"):
        DimseDestination(name="x", host="h")  # type: ignore[call-arg]


# -- a node delivering by STOW-RS -----------------------------------------------------------


def test_a_node_route_delivers_seg_and_sr_by_stow_rs(
    tmp_path: Path,
    orthanc: DicomwebOrthanc,
    secrets: dict[str, Path],
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    """One route, three DICOMweb destinations: right password (delivered), wrong password
    (dead-lettered at once with the reason), no server (retried with backoff)."""
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"
    user = {"username": USER}
    node = node_factory(
        random_package,
        free_port(),
        destinations={
            "cloud": {
                "type": "dicomweb",
                "url": orthanc.dicomweb_url,
                "auth": {**user, "password_file": str(secrets["good"])},
            },
            "wrongpw": {
                "type": "dicomweb",
                "url": orthanc.dicomweb_url,
                "auth": {**user, "password_file": str(secrets["bad"])},
            },
            "nowhere": {"type": "dicomweb", "url": nowhere, "connect_timeout_s": 1},
        },
        routes=[
            {
                "name": "chest",
                "match": {"Modality": ["CT"]},
                "model": str(random_package),
                "send_to": ["cloud", "wrongpw", "nowhere"],
            }
        ],
        send={"max_attempts": 50, "initial_backoff_s": 0.2, "max_backoff_s": 0.5},
    ).start()
    ct = ct_series(n_slices=3)
    assert storescu(node.port, write_files(ct, tmp_path / "ct")).returncode == 0

    def settled() -> dict[str, Any] | None:
        dests = node.status()["destinations"]
        cloud, wrong = dests.get("cloud", {}), dests.get("wrongpw", {})
        return dests if cloud.get("done") == 2 and wrong.get("failed") == 2 else None

    dests = wait_for(settled, 120, "cloud delivered, wrongpw dead-lettered")
    assert dests["wrongpw"]["last_error"] == (
        "HTTP 401 Unauthorized: check auth (username and password_file, or token_file)"
    )
    db = Database(node.storage / "node.sqlite3")

    def retried() -> bool:
        tries = [s["attempts"] for s in db.sends() if s["destination"] == "nowhere"]
        return len(tries) == 2 and min(tries) >= 2

    wait_for(retried, 60, "two attempts at the unreachable URL")
    node.stop()
    sends = db.sends()
    db.close()
    delivered = {s["sop_instance_uid"] for s in sends if s["destination"] == "cloud"}
    at_orthanc = orthanc.sop_instance_uids()
    assert {at_orthanc[uid] for uid in delivered} == {"SEG", "SR"}  # the node's very UIDs
    study_uids = {
        str(dcmread(s["path"], stop_before_pixels=True).StudyInstanceUID)
        for s in sends
        if s["destination"] == "cloud"
    }
    assert study_uids == {ct[0].StudyInstanceUID}
    unreachable = [s for s in sends if s["destination"] == "nowhere"]
    assert {s["state"] for s in unreachable} == {"pending"}  # waiting to be retried
    assert min(s["attempts"] for s in unreachable) >= 2
    assert {s["last_error"] for s in unreachable} == {"no connection (peer down?)"}
    assert {s["attempts"] for s in sends if s["destination"] == "wrongpw"} == {1}
    log = node.log.read_text()
    assert PASSWORD not in log and "not-the-password" not in log
