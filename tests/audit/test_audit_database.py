"""The audit chain in the database (``audit_records``): one chain for every process and host.

Each test runs on both backends (``database_url``: SQLite, and a real PostgreSQL); the test of
several processes appending at once runs on PostgreSQL, where the node uses this chain.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_node.app.cli import main
from dicom_node.app.node import stage_settings
from dicom_node.audit.chain import HEAD, digest
from dicom_node.audit.database_chain import DatabaseChain
from dicom_node.audit.events import AuditAction, AuditEvent, AuditOutcome, Participants
from dicom_node.audit.file_chain import FileChain, read_events
from dicom_node.audit.keys import load_key
from dicom_node.audit.log import AuditLog, open_audit_log
from dicom_node.audit.verify import Check, verify, verify_database
from dicom_node.common.errors import AuditWriteError, StartupError
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.store.database import Database, open_database
from dicom_node.store.files import StorageLayout

WHO = Participants("MODALITY", "DICOMNODE", "127.0.0.1:5000")


def fill(log: AuditLog, n: int, tag: str = "P") -> AuditLog:
    for i in range(n):
        log.record(
            AuditEvent.INSTANCES_TRANSFERRED,
            AuditAction.CREATE,
            AuditOutcome.SUCCESS,
            WHO,
            patient_id=f"{tag}{i}",
            study_uid="1.2.3",
        )
    return log


def layout(settings: Settings) -> StorageLayout:
    """Where the node of ``settings`` keeps its files."""
    return stage_settings(settings).layout


def node_settings(tmp_path: Path, database_url: str | None) -> Settings:
    return parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "database": database_url,
            "audit": {"key_file": str(tmp_path / "keys" / "audit.key")},
        }
    )


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return node_settings(tmp_path, database_url)


@pytest.fixture
def db(settings: Settings) -> Any:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(settings.database, layout(settings).database_path)
    yield database
    database.close()


def chain_log(db: Database, settings: Settings) -> AuditLog:
    return AuditLog(chain=DatabaseChain(db, layout(settings).audit_key_file))


def stored(db: Database) -> list[dict[str, Any]]:
    return [json.loads(r["record"]) for r in db._query("SELECT record FROM audit_records")]


def execute(db: Database, sql: str, params: tuple[Any, ...] = ()) -> None:
    with db._tx() as c:
        c.execute(sql, params)


def problems(db: Database, settings: Settings) -> list[tuple[int | None, Check]]:
    key = load_key(layout(settings).audit_key_file, create=False)
    return [(p.seq, p.check) for p in verify_database(db, key).problems]


def test_records_are_rows_of_one_verifiable_chain(db: Database, settings: Settings) -> None:
    log = fill(chain_log(db, settings), 5)
    records = sorted(stored(db), key=lambda r: r["seq"])
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == "0" * 64
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:], strict=False))
    assert db.audit_mark(HEAD) == (5, records[-1]["hash"])
    assert records[2]["patient_id"] == "P2" and "hmac" in records[2]
    assert problems(db, settings) == []
    assert log.path is None and not layout(settings).audit_path.exists()  # no file beside it

    # A restart (a new chain object, as another process would open) goes on from the head.
    fill(chain_log(db, settings), 2)
    assert problems(db, settings) == [] and db.audit_mark(HEAD)[0] == 7  # type: ignore[index]


def test_the_node_picks_the_chain_by_backend(db: Database, settings: Settings) -> None:
    log = open_audit_log(
        db,
        audit_path=layout(settings).audit_path,
        key_file=layout(settings).audit_key_file,
    )
    fill(log, 1)
    if settings.database is None:  # SQLite: the file, head in the database, as before
        assert (
            isinstance(log.chain, FileChain) and len(read_events(layout(settings).audit_path)) == 1
        )
        assert stored(db) == []
    else:
        assert isinstance(log.chain, DatabaseChain) and len(stored(db)) == 1
        assert not layout(settings).audit_path.exists()


def test_an_edited_record_is_named_by_its_seq(db: Database, settings: Settings) -> None:
    fill(chain_log(db, settings), 6)
    [row] = db._query("SELECT record FROM audit_records WHERE seq = ?", (3,))
    record = json.loads(row["record"])
    record["patient_id"] = "SOMEONE-ELSE"
    execute(db, "UPDATE audit_records SET record = ? WHERE seq = ?", (json.dumps(record), 3))
    assert problems(db, settings) == [(3, Check.HASH)]
    key = load_key(layout(settings).audit_key_file, create=False)
    [problem] = verify_database(db, key).problems
    assert str(problem) == "seq 3: hash: content does not match its hash (edited)"


def test_a_record_deleted_in_the_middle_is_a_gap(db: Database, settings: Settings) -> None:
    fill(chain_log(db, settings), 6)
    execute(db, "DELETE FROM audit_records WHERE seq = ?", (3,))
    assert problems(db, settings) == [(4, Check.SEQUENCE), (4, Check.CHAIN)]


def test_the_last_records_deleted_are_found_by_the_head(db: Database, settings: Settings) -> None:
    fill(chain_log(db, settings), 12)
    execute(db, "DELETE FROM audit_records WHERE seq > ?", (7,))
    key = load_key(layout(settings).audit_key_file, create=False)
    [problem] = verify_database(db, key).problems
    assert problem.check is Check.HEAD and problem.seq == 12
    assert "records removed from the end" in str(problem) and str(problem).startswith("seq 12")

    # The next process to open the chain says so, and numbering goes on after the head.
    log = chain_log(db, settings)
    alert = max(stored(db), key=lambda r: r["seq"])
    assert alert["seq"] == 13 and alert["event_id"]["meaning"] == "Security Alert"
    assert alert["details"] == {
        "reason": "audit chain ends before its head in the database",
        "records_seq": 7,
        "head_seq": 12,
    }
    # Seq 13 follows the head (the hash of the lost seq 12), so both name the cut.
    assert problems(db, settings) == [(13, Check.SEQUENCE), (13, Check.CHAIN)]
    fill(log, 1)
    assert problems(db, settings) == [(13, Check.SEQUENCE), (13, Check.CHAIN)]


def test_a_rewrite_without_the_key_fails_every_hmac(db: Database, settings: Settings) -> None:
    fill(chain_log(db, settings), 6)
    records = sorted(stored(db), key=lambda r: r["seq"])
    records[2]["patient_id"] = "SOMEONE-ELSE"
    prev = records[1]["hash"]
    for record in records[2:]:  # every later hash recomputed, without the key
        record.pop("hash")
        record["prev"] = prev
        body = {k: v for k, v in record.items() if k != "hmac"}
        record["hash"] = prev = digest(prev, body)
        execute(
            db,
            "UPDATE audit_records SET record = ? WHERE seq = ?",
            (json.dumps(record), record["seq"]),
        )
    assert (6, Check.HEAD) in problems(db, settings)  # the head still has the old hash
    # The attacker can write the database, so moves the head too: the HMACs still tell.
    execute(db, "UPDATE audit_head SET hash = ? WHERE name = ?", (prev, HEAD))
    assert problems(db, settings) == [(n, Check.HMAC) for n in range(3, 7)]


def test_a_head_moved_back_is_found_and_repaired(db: Database, settings: Settings) -> None:
    fill(chain_log(db, settings), 6)
    [row] = db._query("SELECT record FROM audit_records WHERE seq = ?", (3,))
    execute(
        db,
        "UPDATE audit_head SET seq = ?, hash = ? WHERE name = ?",
        (3, json.loads(row["record"])["hash"], HEAD),
    )
    assert problems(db, settings) == [(4, Check.HEAD)]
    chain_log(db, settings)  # opening it moves the head to the last record and says so
    alert = max(stored(db), key=lambda r: r["seq"])
    assert alert["seq"] == 7 and alert["details"]["head_seq"] == 3
    assert problems(db, settings) == []  # the chain goes on from its last record


def test_every_writer_needs_the_same_key(db: Database, settings: Settings, tmp_path: Path) -> None:
    fill(chain_log(db, settings), 1)
    load_key(tmp_path / "other-host.key", create=True)  # a host that made its own key
    with pytest.raises(StartupError, match="another key"):
        DatabaseChain(db, tmp_path / "other-host.key")
    layout(settings).audit_key_file.rename(tmp_path / "away.key")
    with pytest.raises(StartupError, match="copy the key file"):
        DatabaseChain(db, layout(settings).audit_key_file)


def test_a_record_that_cannot_be_stored_raises_and_leaves_nothing(
    db: Database, settings: Settings
) -> None:
    log = fill(chain_log(db, settings), 2)
    head = db.audit_mark(HEAD)
    execute(db, "ALTER TABLE audit_records RENAME TO audit_records_away")
    with pytest.raises(AuditWriteError, match="cannot write the audit trail to the database"):
        fill(log, 1)
    execute(db, "ALTER TABLE audit_records_away RENAME TO audit_records")
    assert db.audit_mark(HEAD) == head and len(stored(db)) == 2  # the head did not move
    fill(log, 1)
    assert problems(db, settings) == [] and db.audit_mark(HEAD)[0] == 3  # type: ignore[index]


def test_many_threads_keep_one_chain(db: Database, settings: Settings) -> None:
    log = chain_log(db, settings)
    threads = [threading.Thread(target=fill, args=(log, 20, f"T{t}-")) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r["seq"] for r in stored(db)) == list(range(1, 121))
    assert problems(db, settings) == []


def test_verify_while_records_are_appended(db: Database, settings: Settings) -> None:
    log = fill(chain_log(db, settings), 1)
    stop = threading.Event()

    def append() -> None:
        while not stop.is_set():
            fill(log, 1)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        # On a loaded machine the writer may not run before the verifies: let it start first.
        deadline = time.monotonic() + 60
        while len(stored(db)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        reports = [verify_database(db, log.chain.key) for _ in range(5)]  # type: ignore[attr-defined]
    finally:
        stop.set()
        writer.join()
    assert [r.problems for r in reports] == [[]] * 5  # records appended meanwhile are no problem
    assert reports[-1].records > 1


def _append_from_a_process(
    tmp_path: str, url: str, n: int, tag: str, start: Any, done: Any
) -> None:
    settings = node_settings(Path(tmp_path), url)
    database = open_database(settings.database, layout(settings).database_path)
    try:
        log = open_audit_log(
            database,
            audit_path=layout(settings).audit_path,
            key_file=layout(settings).audit_key_file,
        )
        start.wait(60)
        fill(log, n, tag)
        done.put((tag, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        done.put((tag, repr(exc)))
    finally:
        database.close()


def test_processes_appending_at_once_write_one_chain(tmp_path: Path, postgres_url: str) -> None:
    settings = node_settings(tmp_path, postgres_url)
    settings.storage_dir.mkdir(parents=True)
    database = open_database(settings.database, layout(settings).database_path)
    open_audit_log(
        database,
        audit_path=layout(settings).audit_path,
        key_file=layout(settings).audit_key_file,
    )  # creates the key and the head, as a first host would
    processes, per_process = 4, 40
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(
            target=_append_from_a_process,
            args=(str(tmp_path), postgres_url, per_process, f"W{i}-", start, done),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(180)
    assert [worker.exitcode for worker in workers] == [0] * processes
    results = [done.get(timeout=10) for _ in workers]
    assert [error for _, error in results] == [None] * processes
    records = stored(database)
    total = processes * per_process
    assert sorted(r["seq"] for r in records) == list(range(1, total + 1))  # no gap, no twin
    tags = sorted(r["patient_id"] for r in records)
    assert tags == sorted(f"W{i}-{j}" for i in range(processes) for j in range(per_process))
    assert database.audit_mark(HEAD) == (total, max(records, key=lambda r: r["seq"])["hash"])
    key = load_key(layout(settings).audit_key_file, create=False)
    report = verify_database(database, key)
    assert report.ok and report.records == total
    database.close()


def test_cli_verify_export_and_verify_file(
    tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    lines = [
        f"storage_dir: {settings.storage_dir}",
        f"audit: {{key_file: {layout(settings).audit_key_file}}}",
    ]
    if settings.database is not None:
        lines.append(f"database: {settings.database}")
    config.write_text("\n".join(lines) + "\n")
    settings.storage_dir.mkdir(parents=True)
    database = open_database(settings.database, layout(settings).database_path)
    fill(
        open_audit_log(
            database,
            audit_path=layout(settings).audit_path,
            key_file=layout(settings).audit_key_file,
        ),
        8,
    )
    database.close()

    assert main(["audit", "verify", "--config", str(config)]) == 0
    assert "8 record(s), 8 keyed, chain intact, head at seq 8" in capsys.readouterr().out

    out = tmp_path / "export" / "audit-export.jsonl"
    out.parent.mkdir()
    assert main(["audit", "export", "--config", str(config), str(out)]) == 0
    assert "8 record(s), seq 1..8" in capsys.readouterr().out
    exported = out.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in exported] == list(range(1, 9))
    key = load_key(layout(settings).audit_key_file, create=False)
    assert verify(out, key).ok
    assert main(["audit", "verify", "--config", str(config), "--file", str(out)]) == 0
    assert f"{out}: 8 record(s), 8 keyed, chain intact" in capsys.readouterr().out
    # An auditor's copy: the file and the key are enough, no node config.
    missing = tmp_path / "no-such-config.yaml"
    key_file = str(layout(settings).audit_key_file)
    assert main(["audit", "verify", "--config", str(missing), "--file", str(out)]) == 2
    assert "cannot read the config file" in capsys.readouterr().err
    argv = ["audit", "verify", "--config", str(missing), "--file", str(out), "--key", key_file]
    assert main(argv) == 0
    assert "8 record(s), 8 keyed, chain intact" in capsys.readouterr().out
    assert main(["audit", "export", "--config", str(config), str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err

    # An export edited afterwards fails its own verification, by line.
    record = json.loads(exported[4])
    record["study_uid"] = "9.9.9"
    out.write_text("\n".join([*exported[:4], json.dumps(record), *exported[5:]]) + "\n")
    assert main(["audit", "verify", "--config", str(config), "--file", str(out)]) == 1
    assert "line 5 (seq 5): hash: content does not match" in capsys.readouterr().out


def test_cli_verify_names_database_records_by_seq(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = node_settings(tmp_path, postgres_url)
    settings.storage_dir.mkdir(parents=True)
    config = tmp_path / "node.yaml"
    config.write_text(
        f"storage_dir: {settings.storage_dir}\ndatabase: {postgres_url}\n"
        f"audit: {{key_file: {layout(settings).audit_key_file}}}\n"
    )
    database = open_database(settings.database, layout(settings).database_path)
    fill(
        open_audit_log(
            database,
            audit_path=layout(settings).audit_path,
            key_file=layout(settings).audit_key_file,
        ),
        5,
    )
    execute(database, "DELETE FROM audit_records WHERE seq IN (?, ?)", (2, 5))
    database.close()
    assert main(["audit", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "seq 3: sequence: sequence gap: expected 2, found 3 (records removed)" in out
    assert "seq 5: head: the chain ends at seq 4 but the database's chain head is seq 5" in out
    assert "database audit chain: 3 record(s), 3 keyed, 3 problem(s), head at seq 5" in out


def test_a_database_that_is_down_refuses_the_record(
    tmp_path: Path, postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    import dicom_node.store.postgres as postgres

    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_S", 2)  # the pool waits 6 s, not 30 s
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    settings = node_settings(tmp_path, url)
    settings.storage_dir.mkdir(parents=True)
    database = open_database(settings.database, layout(settings).database_path)
    log = fill(
        open_audit_log(
            database,
            audit_path=layout(settings).audit_path,
            key_file=layout(settings).audit_key_file,
        ),
        2,
    )

    def connections(allowed: bool) -> None:
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {allowed}')
            if not allowed:  # and every session of the node is cut
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    connections(allowed=False)
    try:
        with pytest.raises(AuditWriteError, match="cannot write the audit trail to the database"):
            fill(log, 1)
    finally:
        connections(allowed=True)
    fill(log, 1)  # the database is back: the chain goes on, nothing of the failed record
    key = load_key(layout(settings).audit_key_file, create=False)
    report = verify_database(database, key)
    assert report.ok and report.records == 3
    database.close()


def test_a_chain_that_cannot_be_opened_stops_the_start(db: Database, settings: Settings) -> None:
    execute(db, "ALTER TABLE audit_head RENAME TO audit_head_away")
    try:
        with pytest.raises(StartupError, match="cannot open the audit chain in the database"):
            chain_log(db, settings)
    finally:
        execute(db, "ALTER TABLE audit_head_away RENAME TO audit_head")


def test_the_chain_is_read_page_by_page(
    db: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dicom_node.audit.database_chain as database_chain
    from dicom_node.audit.archive import export_chain

    log = fill(chain_log(db, settings), 10)
    monkeypatch.setattr(database_chain, "PAGE", 3)
    reader = log.chain.reader()
    assert [r["seq"] for r in reader.pending(0)] == [1, 2, 3]
    assert [r["seq"] for r in reader.pending(0)] == [4, 5, 6]  # from where it stopped
    assert [r["seq"] for r in reader.pending(7)] == [8, 9, 10]  # or from a later position
    assert reader.pending(0) == []
    key = load_key(layout(settings).audit_key_file, create=False)
    report = verify_database(db, key)
    assert report.ok and report.records == 10
    if settings.database is not None:  # the node's chain: export it, every page
        exported = export_chain(
            tmp_path / "export.jsonl",
            layout(settings).audit_path,
            lambda: open_database(settings.database, layout(settings).database_path),
        )
        assert (exported.records, exported.first, exported.last) == (10, 1, 10)
        assert verify(tmp_path / "export.jsonl", key).ok
