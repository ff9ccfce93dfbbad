"""What a power cut may lose after Success (the spool file's rename, the index commit, both
unflushed until the journal segment is retired) is rebuilt from the journal at start."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog
from dicom_node.common.status import StoreStatus
from dicom_node.config.settings import parse_settings
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database
from dicom_node.store.files import instance_path
from dicom_node.store.journal import SUFFIX
from tests.conftest import free_port
from tests.receive.peers import ct_instance, store_association


def receiver(tmp_path: Path) -> tuple[Receiver, Database]:
    settings = parse_settings(
        {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "node"),
        },
        base=tmp_path,
    )
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    stages = stage_settings(settings)
    db = Database(stages.layout.database_path)
    return Receiver(stages.receiver, db, AuditLog(stages.layout.audit_path)), db


def crash(node: Receiver) -> None:
    """Stop serving as a killed process would: the journal is neither retired nor closed."""
    assert node.server is not None
    node.server.shutdown()
    journal = node.journal
    with journal._lock:
        journal._stopping = True
        for segment in [journal._active, journal._spare, *journal._retiring]:
            if segment is not None:
                fcntl.flock(segment.fd, fcntl.LOCK_UN)  # a dead process holds no lock


def receive(node: Receiver, count: int) -> list[Any]:
    node.journal.max_age_s = 3600.0  # nothing retired: the records stay the durable copy
    sent = [ct_instance(pixel_bytes=8192) for _ in range(count)]
    assoc = store_association(node.settings.port)
    for ds in sent:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()
    return sent


def spool_file(node: Receiver, ds: Any) -> Path:
    return instance_path(
        node.settings.spool_dir,
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )


def test_lost_files_and_index_entries_are_rebuilt_at_start(tmp_path: Path) -> None:
    node, db = receiver(tmp_path)
    node.start()
    sent = receive(node, 3)
    crash(node)
    # The power cut: the first instance's rename and index commit never reached the disk, the
    # second's file is torn, the third survived whole.
    lost, torn, whole = sent
    spool_file(node, lost).unlink()
    with db._tx() as c:
        c.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (lost.SOPInstanceUID,))
    torn_path = spool_file(node, torn)
    torn_path.write_bytes(torn_path.read_bytes()[:1000])
    whole_before = spool_file(node, whole).stat().st_mtime_ns
    db.close()

    again, db = receiver(tmp_path)
    assert again.recover() == 1  # one index entry made; the torn file rewritten
    for ds in sent:
        path = spool_file(again, ds)
        assert dcmread(path).PixelData == ds.PixelData
        assert db.indexed_instance(str(ds.SOPInstanceUID)) is not None
    assert spool_file(again, whole).stat().st_mtime_ns == whole_before  # left alone
    assert list((tmp_path / "node" / "journal").glob(f"*{SUFFIX}")) == []
    assert again.recover() == 0  # nothing twice
    db.close()


def test_a_refused_instance_is_not_indexed_at_start(tmp_path: Path) -> None:
    node, db = receiver(tmp_path)
    node.start()
    real = db.record_instance

    def busy(**kwargs: Any) -> bool:
        raise RuntimeError("database is locked")

    db.record_instance = busy  # type: ignore[method-assign]
    node.journal.max_age_s = 3600.0
    ds = ct_instance(pixel_bytes=4096)
    assoc = store_association(node.settings.port)
    assert assoc.send_c_store(ds).Status == StoreStatus.OUT_OF_RESOURCES
    assoc.release()
    db.record_instance = real  # type: ignore[method-assign]
    crash(node)
    db.close()
    again, db = receiver(tmp_path)
    assert again.recover() == 0
    assert db.indexed_instance(str(ds.SOPInstanceUID)) is None
    db.close()
