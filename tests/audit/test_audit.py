"""The audit trail: PS3.15 vocabulary, hash chain, HMAC, chain head, torn records."""

from __future__ import annotations

import errno
import json
import stat
from pathlib import Path

import pytest

import dicom_node.audit.file_chain as file_chain
from dicom_node.app.cli import main
from dicom_node.audit.chain import HEAD, digest
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.keys import load_key
from dicom_node.audit.log import AuditLog
from dicom_node.audit.verify import Check, verify
from dicom_node.common.errors import AuditWriteError, StartupError
from dicom_node.store.database import Database
from tests.factories import record_transfers


def fill(log: AuditLog, n: int = 2) -> AuditLog:
    return record_transfers(log, n, instances=3)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "node.sqlite3")


def key_of(path: Path) -> bytes:
    key = load_key(path.parent / "audit.key", create=False)
    assert key is not None
    return key


def checks(path: Path, db: Database | None = None) -> list[tuple[int | None, Check]]:
    head = db.audit_mark(HEAD) if db is not None else None
    report = verify(path, key_of(path), head, check_head=db is not None)
    return [(p.line, p.check) for p in report.problems]


def test_events_carry_dicom_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path))
    events = read_events(path)
    assert events[0]["event_id"] == {
        "code": "110104",
        "scheme": "DCM",
        "meaning": "DICOM Instances Transferred",
    }
    assert events[0]["action"] == "C" and events[0]["outcome"] == 0
    assert events[0]["patient_id"] == "P0" and events[0]["calling_ae"] == "MODALITY"
    assert events[0]["details"] == {"instances": 3}
    assert [e["seq"] for e in events] == [1, 2]
    report = verify(path, key_of(path))
    assert (report.records, report.keyed, report.problems) == (2, 2, [])


def test_the_key_file_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path))
    key_file = tmp_path / "audit.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_of(path)
    fill(AuditLog(path))  # a restart reuses the key
    assert key_of(path) == key and checks(path) == []
    key_file.unlink()
    with pytest.raises(StartupError, match="missing but"):
        AuditLog(path)


def test_chain_and_head_continue_across_restarts(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path, head=db))
    fill(AuditLog(path, head=db))  # a new AuditLog object, as after a restart
    assert db.audit_mark(HEAD) == (4, read_events(path)[-1]["hash"])
    assert checks(path, db) == []


def test_edit_removal_and_reorder_name_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path), 4)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["patient_id"] = "P9"
    path.write_text("\n".join([lines[0], json.dumps(edited), *lines[2:]]) + "\n")
    assert (2, Check.HASH) in checks(path)

    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    assert (2, Check.SEQUENCE) in checks(path) and (2, Check.CHAIN) in checks(path)

    path.write_text("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n")
    assert (2, Check.SEQUENCE) in checks(path) and (3, Check.CHAIN) in checks(path)


def test_the_last_five_lines_removed_are_detected(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path, head=db), 12)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-5]) + "\n")
    report = verify(path, key_of(path), db.audit_mark(HEAD), check_head=True)
    [problem] = report.problems
    assert problem.check is Check.HEAD and problem.seq == 12
    assert "records removed from the end" in str(problem)
    # Without the head (the old verify) the cut log looked intact:
    assert verify(path, key_of(path)).ok

    # At the next start the node notices, audits it, and the gap stays visible in the log.
    AuditLog(path, head=db)
    alert = read_events(path)[-1]
    assert alert["event_id"]["meaning"] == "Security Alert"
    assert alert["details"]["head_seq"] == 12 and alert["seq"] == 13
    assert (8, Check.SEQUENCE) in checks(path, db)


def test_a_rewrite_with_recomputed_hashes_is_detected(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path, head=db), 6)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[2]["patient_id"] = "SOMEONE-ELSE"
    prev = records[1]["hash"]
    for record in records[2:]:  # the attacker recomputes every later hash, without the key
        record.pop("hash")
        record["prev"] = prev
        body = {k: v for k, v in record.items() if k != "hmac"}
        record["hash"] = prev = digest(prev, body)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    found = checks(path, db)
    assert [(line, check) for line, check in found if check is Check.HMAC] == [
        (n, Check.HMAC) for n in range(3, 7)
    ]
    assert (6, Check.HEAD) in found
    # Stripping the HMACs instead does not help either.
    for record in records:
        record.pop("hmac")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (6, Check.HEAD) in checks(path, db)


def test_a_torn_record_is_set_aside_and_the_chain_goes_on(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "audit.jsonl"
    fill(AuditLog(path, head=db), 3)
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    path.write_bytes(whole + last[: len(last) // 2])  # killed half-way through a record
    assert checks(path, db)[-1] == (4, Check.TORN)

    log = fill(AuditLog(path, head=db), 1)
    [torn] = list(tmp_path.glob("audit.jsonl.torn-*"))
    assert torn.read_bytes() == last[: len(last) // 2]
    events = read_events(path)
    assert events[3]["event_id"]["meaning"] == "Security Alert"
    assert events[3]["details"]["torn_file"] == torn.name
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert checks(path, db) == [] and log.path == path


def test_a_full_disk_leaves_no_torn_record(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = fill(AuditLog(path, head=db), 2)
    before = path.read_bytes()

    def half_then_full(fd: int, data: bytes) -> int:
        file_chain.os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_chain, "_write", half_then_full)
    with pytest.raises(AuditWriteError, match="No space left"):
        fill(log, 1)
    assert path.read_bytes() == before and db.audit_mark(HEAD) is not None
    assert db.audit_mark(HEAD) == (2, read_events(path)[-1]["hash"])
    monkeypatch.undo()
    fill(log, 1)  # space is back: the chain goes on
    assert checks(path, db) == [] and read_events(path)[-1]["seq"] == 3


def test_an_old_unkeyed_log_still_verifies(tmp_path: Path, db: Database) -> None:
    path = tmp_path / "audit.jsonl"
    prev, lines = "0" * 64, []
    for i in range(2):  # the format before HMACs: no seq, no hmac
        body = {"time": f"2026-01-0{i + 1}T00:00:00.000+00:00", "action": "C", "prev": prev}
        prev = digest(prev, body)
        lines.append(json.dumps({**body, "hash": prev}, sort_keys=True))
    path.write_text("\n".join(lines) + "\n")
    fill(AuditLog(path, head=db), 2)
    report = verify(path, key_of(path), db.audit_mark(HEAD), check_head=True)
    assert report.ok and (report.unkeyed, report.keyed) == (2, 2)
    assert "unkeyed" in report.notes[0]
    assert [e.get("seq") for e in read_events(path)] == [None, None, 3, 4]


def test_cli_verify_names_the_lines_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"storage_dir: {tmp_path / 'var'}\n")
    var = tmp_path / "var"
    var.mkdir()
    db = Database(var / "node.sqlite3")
    fill(AuditLog(var / "audit.jsonl", head=db), 8)
    db.close()
    assert main(["audit", "verify", "--config", str(config)]) == 0
    assert "8 record(s), 8 keyed, chain intact, head at seq 8" in capsys.readouterr().out
    lines = (var / "audit.jsonl").read_text().splitlines()
    (var / "audit.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    assert main(["audit", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "line 4: torn: incomplete last record" in out
    assert "log (seq 8): head: the log ends at seq 3" in out


def test_records_from_many_threads_keep_one_chain_and_head(tmp_path: Path, db: Database) -> None:
    import threading

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, head=db)
    threads = [threading.Thread(target=fill, args=(log, 25)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert db.audit_mark(HEAD) == (200, read_events(path)[-1]["hash"])
    assert checks(path, db) == []
