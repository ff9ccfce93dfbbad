"""Several processes append to one audit file (the node's receiver processes): one chain."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from dicom_node.audit.chain import HEAD
from dicom_node.audit.keys import load_key
from dicom_node.audit.log import AuditLog
from dicom_node.audit.verify import verify
from dicom_node.store.database import Database
from tests.factories import record_transfers

WRITERS = 3
RECORDS = 40


def append_records(folder: str) -> None:
    """One writer process: its own database connection and chain, the shared file."""
    path = Path(folder)
    db = Database(path / "node.sqlite3")
    try:
        record_transfers(AuditLog(path / "audit.jsonl", head=db), RECORDS)
    finally:
        db.close()


def test_concurrent_writer_processes_keep_one_valid_chain(tmp_path: Path) -> None:
    db = Database(tmp_path / "node.sqlite3")
    AuditLog(tmp_path / "audit.jsonl", head=db)  # the key and the file exist before
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=append_records, args=(str(tmp_path),)) for _ in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, WRITERS * RECORDS + 1))
    head = db.audit_mark(HEAD)
    assert head is not None and head[0] == WRITERS * RECORDS
    report = verify(
        tmp_path / "audit.jsonl",
        load_key(tmp_path / "audit.key", create=False),
        head,
        check_head=True,
    )
    assert report.ok, report.problems
    assert report.records == WRITERS * RECORDS
    db.close()


def test_a_record_torn_by_another_process_is_set_aside_at_the_next_append(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "node.sqlite3")
    log = record_transfers(AuditLog(tmp_path / "audit.jsonl", head=db), 2)
    other = AuditLog(tmp_path / "audit.jsonl", head=db)  # a second process, opened now
    with (tmp_path / "audit.jsonl").open("ab") as fh:  # a writer killed mid-record
        fh.write(b'{"seq": 3, "tim')
    record_transfers(other, 1)
    record_transfers(log, 1)
    assert list(tmp_path.glob("audit.jsonl.torn-*"))
    report = verify(tmp_path / "audit.jsonl", load_key(tmp_path / "audit.key", create=False))
    assert report.ok, report.problems
    assert report.records == 4
    db.close()
