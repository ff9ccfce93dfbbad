"""Export of the audit trail to a real rsyslog on loopback (IHE ATNA, RFC 5424/5425/5426)."""

from __future__ import annotations

import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.app.node import stage_settings
from dicom_node.audit.export import BOM, SyslogExporter, audit_message, syslog_message
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import ConfigError
from dicom_node.config.sections import SyslogSettings
from dicom_node.config.settings import parse_settings
from dicom_node.store.database import Database
from tests.conftest import free_port, require_tool, wait_for
from tests.factories import record_transfers


def test_the_payload_is_a_dicom_audit_message(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    record_transfers(log, 1)
    [record] = read_events(log.path)
    root = ET.fromstring(audit_message(record, "DICOMNODE"))
    assert root.tag == "AuditMessage"
    event = root.find("EventIdentification")
    assert event is not None and event.get("EventActionCode") == "C"
    assert event.get("EventOutcomeIndicator") == "0"
    event_id = event.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    requestor, node = root.findall("ActiveParticipant")
    assert (requestor.get("UserID"), requestor.get("UserIsRequestor")) == ("MODALITY", "true")
    assert requestor.get("NetworkAccessPointID") == "127.0.0.1"
    assert (node.get("UserID"), node.get("UserIsRequestor")) == ("DICOMNODE", "false")
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "DICOMNODE"
    patient, study = root.findall("ParticipantObjectIdentification")
    assert (patient.get("ParticipantObjectID"), patient.get("ParticipantObjectTypeCode")) == (
        "P0",
        "1",
    )
    assert study.get("ParticipantObjectID") == "1.2.3.0"
    id_type = study.find("ParticipantObjectIDTypeCode")
    assert id_type is not None and id_type.get("csd-code") == "110180"

    message = syslog_message(record, "DICOMNODE", "host")
    assert message.startswith(b"<85>1 ") and BOM + b"<AuditMessage>" in message
    assert f'seq="1" hash="{record["hash"]}" hmac="{record["hmac"]}"'.encode() in message


def test_audit_syslog_config(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    settings = parse_settings(
        {
            "audit": {
                "key_file": "keys/audit.key",
                "syslog": {"host": "arr", "port": 6514, "ca_file": "ca.pem"},
            }
        },
        base=tmp_path,
    )
    assert stage_settings(settings).layout.audit_key_file == tmp_path / "keys/audit.key"
    assert settings.audit.syslog == SyslogSettings("arr", 6514, "tls", tmp_path / "ca.pem")
    assert (
        stage_settings(parse_settings({})).layout.audit_key_file == Path.cwd() / "var" / "audit.key"
    )
    with pytest.raises(ConfigError, match="audit.syslog.ca_file: missing"):
        parse_settings({"audit": {"syslog": {"host": "arr", "port": 6514}}})
    with pytest.raises(ConfigError, match="audit.syslog.transport"):
        parse_settings({"audit": {"syslog": {"host": "a", "port": 514, "transport": "relp"}}})


class RSyslog:
    """rsyslogd on loopback with its own config: one input, everything written raw to a file."""

    def __init__(self, folder: Path, transport: str, port: int) -> None:
        self.folder, self.port, self.transport = folder, port, transport
        self.received = folder / "received.log"
        self.process: subprocess.Popen[bytes] | None = None
        if transport == "tls":
            pki(folder)
            driver = (
                f'DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{folder}/ca.crt" '
                f'DefaultNetstreamDriverCertFile="{folder}/server.crt" '
                f'DefaultNetstreamDriverKeyFile="{folder}/server.key"'
            )
            module = (
                'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                'StreamDriver.AuthMode="anon")'
            )
            inp = f'input(type="imtcp" port="{port}" address="127.0.0.1")'
        elif transport == "tcp":
            driver, module = "", 'module(load="imtcp")'
            inp = f'input(type="imtcp" port="{port}" address="127.0.0.1")'
        else:
            driver, module = "", 'module(load="imudp")'
            inp = f'input(type="imudp" port="{port}" address="127.0.0.1")'
        self.config = folder / "rsyslog.conf"
        self.config.write_text(
            f'global(workDirectory="{folder}" maxMessageSize="64k" {driver})\n'
            f"{module}\n{inp}\n"
            'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            f'action(type="omfile" file="{self.received}" template="raw")\n'
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [require_tool("rsyslogd"), "-n", "-f", str(self.config), "-i", f"{self.folder}/pid"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def sequence_numbers(self) -> list[int]:
        if not self.received.exists():
            return []
        text = self.received.read_text(encoding="utf-8", errors="replace")
        return [int(n) for n in re.findall(r'\[dicomnode@32473 seq="(\d+)"', text)]


def pki(folder: Path) -> None:
    """A CA and the repository's certificate for 127.0.0.1, made with openssl."""
    openssl = require_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=audit-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[AuditLog, Database]]:
    db = Database(tmp_path / "node.sqlite3")
    yield AuditLog(tmp_path / "audit.jsonl", head=db), db
    db.close()


@pytest.mark.peers
@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_repository_that_is_down_gets_every_record_later(
    tmp_path: Path, parts: tuple[AuditLog, Database], transport: str
) -> None:
    log, db = parts
    port = free_port()
    repository = RSyslog(tmp_path, transport, port)
    settings = SyslogSettings(
        "127.0.0.1", port, transport, tmp_path / "ca.crt" if transport == "tls" else None
    )
    exporter = SyslogExporter(settings, log, db, "DICOMNODE", retry_s=0.2, max_retry_s=0.5)
    exporter.start()
    try:
        record_transfers(log, 5)  # the repository is down
        wait_for(lambda: len(exporter._retry) == 5, 10, "the exporter to try and fail")
        assert exporter.position == 0
        repository.start()
        wait_for(lambda: repository.sequence_numbers() == [1, 2, 3, 4, 5], 20, "delivery")
        record_transfers(log, 3)
        wait_for(lambda: len(repository.sequence_numbers()) == 8, 10, "live delivery")

        repository.stop()  # down again, for a while
        record_transfers(log, 4)
        wait_for(lambda: exporter._retry, 10, "the exporter to see the repository gone")
        repository.start()
        wait_for(lambda: len(repository.sequence_numbers()) >= 12, 20, "delivery after restart")
        assert repository.sequence_numbers() == list(range(1, 13))  # none lost, in order
        assert exporter.position == 12
    finally:
        exporter.stop()
        repository.stop()


@pytest.mark.peers
def test_udp_delivery(tmp_path: Path, parts: tuple[AuditLog, Database]) -> None:
    log, db = parts
    port = free_port()
    repository = RSyslog(tmp_path, "udp", port)
    repository.start()
    exporter = SyslogExporter(SyslogSettings("127.0.0.1", port, "udp"), log, db, "DICOMNODE")
    try:
        bound = f":{port:04X} "
        wait_for(lambda: bound in Path("/proc/net/udp").read_text(), 10, "rsyslogd to listen")
        exporter.start()
        record_transfers(log, 3)
        wait_for(lambda: repository.sequence_numbers() == [1, 2, 3], 10, "UDP delivery")
    finally:
        exporter.stop()
        repository.stop()


@pytest.mark.peers
def test_a_node_exports_its_trail_and_keeps_the_head(
    tmp_path: Path, database_url: str | None
) -> None:
    """SQLite: the node's trail is audit.jsonl; PostgreSQL: the database chain."""
    from dicom_node.app.node import Node
    from dicom_node.audit.chain import HEAD
    from dicom_node.audit.keys import load_key
    from dicom_node.audit.verify import verify, verify_database
    from dicom_node.store.database import open_database

    port = free_port()
    repository = RSyslog(tmp_path, "tcp", port)
    repository.start()
    settings = parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "device": "cpu",
            "database": database_url,
            "audit": {
                "key_file": str(tmp_path / "keys" / "audit.key"),
                "syslog": {"host": "127.0.0.1", "port": port, "transport": "tcp"},
            },
        }
    )
    node = Node(settings)
    try:
        node.start()
        node.stop()
        wait_for(lambda: repository.sequence_numbers() == [1, 2], 20, "start and stop exported")
    finally:
        repository.stop()
    db = open_database(settings.database, stage_settings(settings).layout.database_path)
    try:
        head = db.audit_mark(HEAD)
        assert head is not None and head[0] == 2
        key = load_key(tmp_path / "keys" / "audit.key", create=False)
        assert not (settings.storage_dir / "audit.key").exists()
        if database_url is None:
            assert verify(stage_settings(settings).layout.audit_path, key, head, check_head=True).ok
        else:
            assert not stage_settings(settings).layout.audit_path.exists()
            assert verify_database(db, key).ok
    finally:
        db.close()


@pytest.mark.peers
def test_processes_of_one_database_chain_export_each_record_once(
    tmp_path: Path, postgres_url: str
) -> None:
    """Two processes' worth of chain, database and exporter (one PostgreSQL chain): only the
    lease holder sends; when it stops, the other goes on from the stored position."""
    from dicom_node.audit.database_chain import DatabaseChain
    from dicom_node.store.database import open_database

    settings = parse_settings({"storage_dir": str(tmp_path / "var"), "database": postgres_url})
    settings.storage_dir.mkdir(parents=True)
    port = free_port()
    repository = RSyslog(tmp_path, "tcp", port)
    repository.start()
    syslog = SyslogSettings("127.0.0.1", port, "tcp")
    dbs = [
        open_database(settings.database, stage_settings(settings).layout.database_path),
        open_database(settings.database, stage_settings(settings).layout.database_path),
    ]
    logs = [
        AuditLog(chain=DatabaseChain(db, stage_settings(settings).layout.audit_key_file))
        for db in dbs
    ]
    exporters = [
        SyslogExporter(syslog, log, db, "DICOMNODE", retry_s=0.2, max_retry_s=0.5)
        for log, db in zip(logs, dbs, strict=True)
    ]
    try:
        for exporter in exporters:
            exporter.start()
        for _ in range(3):
            record_transfers(logs[0], 2)
            record_transfers(logs[1], 2)
        wait_for(lambda: len(repository.sequence_numbers()) >= 12, 20, "delivery")
        assert repository.sequence_numbers() == list(range(1, 13))  # once each, in order
        holder = next(e for e in exporters if e._lease_until)
        other = exporters[1 - exporters.index(holder)]
        assert not other._lease_until
        holder.stop()  # gives the lease back
        record_transfers(logs[0], 3)
        wait_for(lambda: len(repository.sequence_numbers()) >= 15, 20, "delivery by the other")
        assert repository.sequence_numbers() == list(range(1, 16))
        assert other.position == 15
        time.sleep(1.5)  # more than an exporter's idle wait: nothing is sent twice later
        assert repository.sequence_numbers() == list(range(1, 16))
    finally:
        for exporter in exporters:
            exporter.stop()
        repository.stop()
        for db in dbs:
            db.close()
