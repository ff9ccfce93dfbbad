"""No access without its audit record: a full disk under the audit log refuses, never Success.

Real associations on loopback; the audit log's write is made to fail as on a full disk
(ENOSPC), after half the record reached the file; and on PostgreSQL, where the trail is the
database chain, its table is taken away under the running receiver.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, StoragePresentationContexts

import dicom_node.audit.file_chain as file_chain
from dicom_node.app.node import stage_settings
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.log import AuditLog
from dicom_node.audit.verify import verify
from dicom_node.common.status import StoreStatus
from dicom_node.config.settings import parse_settings
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database
from tests.conftest import free_port, wait_for
from tests.factories import ct_series


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    settings = parse_settings(
        {"ae_title": "DICOMNODE", "port": free_port(), "storage_dir": str(tmp_path / "node")},
        base=tmp_path,
    )
    settings.storage_dir.mkdir(parents=True)
    stages = stage_settings(settings)
    db = Database(stages.layout.database_path)
    node = Receiver(stages.receiver, db, AuditLog(stages.layout.audit_path, head=db))
    node.start()
    try:
        yield node
    finally:
        node.stop()
        db.close()


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_enospc(fd: int, data: bytes) -> int:
        file_chain.os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_chain, "_write", half_then_enospc)


def associate(port: int) -> object:
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE")


def test_an_unaudited_association_is_aborted(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_disk(monkeypatch)
    assoc = associate(receiver.settings.port)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.02)
    assert assoc.is_aborted  # type: ignore[attr-defined]
    assert list(receiver.settings.spool_dir.rglob("*.dcm")) == []
    assert read_events(receiver.audit.path) == []
    assert receiver.audit.path.read_bytes() == b""  # nothing torn left behind


def test_an_unaudited_c_store_is_refused_with_out_of_resources(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = ct_series(3, 16, 16)
    assoc = associate(receiver.settings.port)
    assert assoc.is_established  # type: ignore[attr-defined]
    # The node audits an association just after accepting it: the disk fills once that record
    # is written (under load the A-ASSOCIATE-AC can arrive first; CI saw it abort unaudited).
    wait_for(
        lambda: read_events(receiver.audit.path),
        10,
        "the association's audit record",
    )
    full_disk(monkeypatch)
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in series]  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    assert statuses == [StoreStatus.OUT_OF_RESOURCES] * 3
    assert list(receiver.settings.spool_dir.rglob("*.dcm")) == []
    monkeypatch.undo()
    events = read_events(receiver.audit.path)
    assert [e["event_id"]["meaning"] for e in events] == ["User Authentication"]
    assert verify(receiver.audit.path).ok

    # Space is back: the next association is audited and stored.
    assoc = associate(receiver.settings.port)
    assert assoc.send_c_store(series[0]).Status == StoreStatus.SUCCESS  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert verify(receiver.audit.path).ok


@pytest.fixture
def database_receiver(tmp_path: Path, postgres_url: str) -> Iterator[Receiver]:
    """A receiver on PostgreSQL: its audit trail is the database chain."""
    from dicom_node.audit.database_chain import DatabaseChain
    from dicom_node.audit.log import open_audit_log
    from dicom_node.store.database import open_database

    settings = parse_settings(
        {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "storage_dir": str(tmp_path / "node"),
            "database": postgres_url,
        },
        base=tmp_path,
    )
    settings.storage_dir.mkdir(parents=True)
    stages = stage_settings(settings)
    db = open_database(settings.database, stages.layout.database_path)
    audit = open_audit_log(
        db, audit_path=stages.layout.audit_path, key_file=stages.layout.audit_key_file
    )
    assert isinstance(audit.chain, DatabaseChain)
    node = Receiver(stages.receiver, db, audit)
    node.start()
    try:
        yield node
    finally:
        node.stop()
        db.close()


def audit_table(receiver: Receiver, present: bool) -> None:
    """Take the table of the database chain away (every append then fails), or put it back."""
    old, new = ("audit_records_away", "audit_records")[:: 1 if present else -1]
    with receiver.db._tx() as c:  # type: ignore[attr-defined]
        c.execute(f"ALTER TABLE {old} RENAME TO {new}")


def database_events(receiver: Receiver) -> list[str]:
    from dicom_node.audit.database_chain import DatabaseChain

    chain = receiver.audit.chain
    assert isinstance(chain, DatabaseChain)
    return [e["event_id"]["meaning"] for e in chain.events()]


def test_the_database_chain_refuses_what_it_cannot_record(database_receiver: Receiver) -> None:
    from dicom_node.audit.keys import load_key
    from dicom_node.audit.verify import verify_database

    receiver = database_receiver
    audit_table(receiver, present=False)
    assoc = associate(receiver.settings.port)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.02)
    assert assoc.is_aborted  # type: ignore[attr-defined]
    audit_table(receiver, present=True)
    assert database_events(receiver) == []

    series = ct_series(3, 16, 16)
    assoc = associate(receiver.settings.port)
    assert assoc.is_established  # type: ignore[attr-defined]
    # The A-ASSOCIATE-AC goes out before the node's handler writes the association's record:
    # wait for it, then take the table away.
    wait_for(
        lambda: database_events(receiver) == ["User Authentication"],
        10,
        "the association's User Authentication record",
    )
    audit_table(receiver, present=False)  # the table goes after the association was audited
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in series]  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
        audit_table(receiver, present=True)
    assert statuses == [StoreStatus.OUT_OF_RESOURCES] * 3
    assert list(receiver.settings.spool_dir.rglob("*.dcm")) == []
    assert database_events(receiver) == ["User Authentication"]
    key = load_key(receiver.settings.storage_dir / "audit.key", create=False)
    assert verify_database(receiver.db, key).ok  # type: ignore[arg-type]
