"""The receive journal: a record is durable once appended, read back after a kill, torn tails
are dropped (and logged), cancelled records are skipped, live segments are left alone."""

from __future__ import annotations

import fcntl
import os
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from dicom_node.store.journal import (
    HEADER,
    SUFFIX,
    Journal,
    JournalError,
    JournalRecord,
    file_checksum,
)
from tests.conftest import wait_for


def received(tmp_path: Path, name: str, size: int) -> tuple[Path, int, int]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    crc, length = file_checksum(path)
    return path, crc, length


def append(journal: Journal, tmp_path: Path, sop: str, size: int = 5000) -> Any:
    src, crc, length = received(tmp_path, f"{sop}.in", size)
    return journal.append({"sop": sop}, src, crc, length)


def recovered(folder: Path) -> list[JournalRecord]:
    out: list[JournalRecord] = []
    Journal(folder).recover(out.append)
    return out


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SUFFIX}"))


def test_file_checksum_is_zlib_crc32(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(tmp_path / "f") == (zlib.crc32(data), len(data))


def test_records_of_a_killed_writer_are_read_back_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder)
    journal.open()
    sizes = {"1.1": 10, "1.2": 200_000, "1.3": 0, "1.4": 3 * 1024 * 1024}
    for sop, size in sizes.items():
        append(journal, tmp_path, sop, size)
    # No close(): as after kill -9 (another Journal reads the folder; flock is per open file,
    # so release the writer's locks as its death would).
    for segment in journal._retiring + [s for s in (journal._active, journal._spare) if s]:
        fcntl.flock(segment.fd, fcntl.LOCK_UN)
    journal._stopping = True
    order: list[str] = []

    def apply(record: JournalRecord) -> None:
        sop = record.meta["sop"]
        order.append(sop)
        target = tmp_path / "out" / f"{sop}.dcm"
        assert not record.matches(target)
        record.write_to(target)
        assert target.read_bytes() == (tmp_path / f"{sop}.in").read_bytes()
        assert record.matches(target)

    Journal(folder).recover(apply)
    assert order == list(sizes)
    assert segments(folder) == []  # recovered segments are removed
    assert recovered(folder) == []


def test_a_torn_tail_is_dropped_and_logged(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, max_age_s=3600)
    journal.open()
    append(journal, tmp_path, "2.1", 4096)
    ticket = append(journal, tmp_path, "2.2", 4096)
    segment = ticket.segment
    # A power cut in the middle of the second record's data: flip a byte of it.
    data_at = ticket.offset + HEADER.size + 20
    byte = os.pread(segment.fd, 1, data_at)
    os.pwrite(segment.fd, bytes([byte[0] ^ 0xFF]), data_at)
    fcntl.flock(segment.fd, fcntl.LOCK_UN)
    journal._stopping = True
    with capture_logs() as logs:
        records = recovered(folder)
    assert [r.meta["sop"] for r in records] == ["2.1"]
    torn = [e for e in logs if e["event"] == "journal.torn_tail_dropped"]
    assert torn and torn[0]["offset"] == ticket.offset and torn[0]["bytes"] > 4096


def test_a_cancelled_record_is_not_recovered_and_later_ones_are(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, max_age_s=3600)
    journal.open()
    append(journal, tmp_path, "3.1").cancel()
    ticket = append(journal, tmp_path, "3.2")
    fcntl.flock(ticket.segment.fd, fcntl.LOCK_UN)
    journal._stopping = True
    assert [r.meta["sop"] for r in recovered(folder)] == ["3.2"]


def test_a_segment_another_live_process_writes_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    live = Journal(folder, max_age_s=3600)
    live.open()
    ticket = append(live, tmp_path, "4.1")
    out: list[JournalRecord] = []
    report = Journal(folder).recover(out.append)
    assert out == [] and report.busy >= 1
    ticket.done()
    live.close()
    assert segments(folder) == []


def test_applied_segments_are_retired_once_old(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, max_age_s=0.2)
    journal.open()
    ticket = append(journal, tmp_path, "5.1")
    written = ticket.segment.path
    time.sleep(0.6)
    assert written.exists()  # not applied yet: kept
    ticket.done()
    wait_for(lambda: not written.exists(), 5, "the applied segment to be retired")
    journal.close()
    assert segments(folder) == []  # the spare goes too


def test_a_record_larger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, segment_bytes=64 * 1024, max_age_s=3600)
    journal.open()
    small = append(journal, tmp_path, "6.1", 1000)
    big = append(journal, tmp_path, "6.2", 200_000)
    assert big.segment is not small.segment
    for ticket in (small, big):
        fcntl.flock(ticket.segment.fd, fcntl.LOCK_UN)
    journal._stopping = True
    assert [r.meta["sop"] for r in recovered(folder)] == ["6.1", "6.2"]


def test_a_record_that_cannot_be_applied_keeps_its_segment(tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, max_age_s=3600)
    journal.open()
    ticket = append(journal, tmp_path, "7.1")
    fcntl.flock(ticket.segment.fd, fcntl.LOCK_UN)
    journal._stopping = True

    def down(record: JournalRecord) -> None:
        raise RuntimeError("database is down")

    with pytest.raises(JournalError, match="fix the cause"):
        Journal(folder).recover(down)
    assert [r.meta["sop"] for r in recovered(folder)] == ["7.1"]


def test_a_segment_removed_while_waiting_for_its_lock_is_not_recovered_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two processes start at once: one recovers and removes a segment the other had opened.
    folder = tmp_path / "journal"
    journal = Journal(folder, max_age_s=3600)
    journal.open()
    ticket = append(journal, tmp_path, "8.1")
    fcntl.flock(ticket.segment.fd, fcntl.LOCK_UN)
    journal._stopping = True
    real_flock = fcntl.flock

    def flock_after_removal(fd: int, op: int) -> None:
        for path in segments(folder):
            path.unlink()
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    out: list[JournalRecord] = []
    report = Journal(folder).recover(out.append)
    assert out == [] and report.segments == 0
