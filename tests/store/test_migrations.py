"""Schema versions: a storage_dir written by the unversioned node opens and finishes its work."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import DicomNodeError
from dicom_node.config.settings import parse_settings
from dicom_node.send.delivery import Delivery
from dicom_node.store.database import Database
from dicom_node.store.schema import SCHEMA_VERSION
from dicom_node.work.worker import Worker
from tests.conftest import StoreSCP
from tests.factories import ct_series, write_files

#: The schema of the node before schema versions (user_version 0), frozen here on purpose:
#: dicom_node.store.schema.SCHEMA_V0 must keep creating exactly this.
PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    association_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    attributes TEXT NOT NULL,
    state TEXT NOT NULL,
    last_received_at REAL NOT NULL,
    last_association TEXT NOT NULL,
    released_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT,
    UNIQUE (job_id, destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS sends_state ON sends(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS audit_head (
    name TEXT PRIMARY KEY,  -- 'head': last record written; 'export:<host>:<port>': last sent
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


def columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def test_the_frozen_schema_is_what_version_0_creates(tmp_path: Path) -> None:
    from dicom_node.store.schema import SCHEMA_V0

    assert SCHEMA_V0 == PREVIOUS_SCHEMA


@pytest.mark.peers
def test_a_storage_dir_of_the_previous_version_opens_and_its_queue_completes(
    tmp_path: Path, random_package: Path, storescp: StoreSCP
) -> None:
    settings = parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {
                "pacs": {"ae_title": storescp.ae_title, "host": "127.0.0.1", "port": storescp.port}
            },
            "routes": [
                {
                    "name": "r",
                    "match": {"Modality": ["CT"]},
                    "model": str(random_package),
                    "send_to": ["pacs"],
                }
            ],
            "send": {"initial_backoff_s": 0.1, "timeout_s": 10},
        }
    )
    ct = ct_series(n_slices=3)
    series_uid, study_uid = ct[0].SeriesInstanceUID, ct[0].StudyInstanceUID
    inputs = write_files(ct, stage_settings(settings).layout.spool_dir / study_uid / series_uid)
    earlier_result = write_files(
        ct_series(n_slices=1), stage_settings(settings).layout.outbox_dir / "1"
    )[0]
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    # What the previous node left: a delivered-to-be job 1 whose result waits in the sends
    # table, a pending job 2, and the audit chain's head.
    with sqlite3.connect(stage_settings(settings).layout.database_path) as old:
        old.executescript(PREVIOUS_SCHEMA)
        for ds, path in zip(ct, inputs, strict=True):
            old.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, 1.0, 'a')",
                (ds.SOPInstanceUID, ds.SOPClassUID, study_uid, series_uid, str(path)),
            )
        old.execute(
            "INSERT INTO series VALUES (?, ?, 'P', ?, 'queued', 1.0, 'a', 1.0)",
            (series_uid, study_uid, '{"Modality": "CT"}'),
        )
        old.execute(
            "INSERT INTO jobs (series_uid, route, state, attempts, created_at, updated_at) "
            "VALUES (?, 'r', 'done', 1, 1.0, 1.0)",
            (series_uid,),
        )
        old.execute(
            "INSERT INTO jobs (series_uid, route, state, attempts, created_at, updated_at) "
            "VALUES (?, 'r', 'pending', 0, 2.0, 2.0)",
            (series_uid,),
        )
        old.execute(
            "INSERT INTO sends (job_id, destination, path, sop_instance_uid, state, attempts, "
            "next_attempt_at, updated_at, last_error) "
            "VALUES (1, 'pacs', ?, '2.25.77', 'pending', 3, 0, 1.0, 'connection refused')",
            (str(earlier_result),),
        )
        old.execute("INSERT INTO audit_head VALUES ('head', 41, 'cafe')")
    assert "owner" not in columns(stage_settings(settings).layout.database_path, "jobs")

    db = Database(stage_settings(settings).layout.database_path)
    assert db.migrated == list(range(1, SCHEMA_VERSION + 1))
    assert "owner" in columns(stage_settings(settings).layout.database_path, "jobs")
    assert db.audit_mark("head") == (41, "cafe")
    assert db.job_inputs(2) == {"image": series_uid}  # the old job's series as role "image"
    assert [s.id for s in db.due_sends()] == [1]

    audit = AuditLog(stage_settings(settings).layout.audit_path)
    worker = Worker(stage_settings(settings).worker, db, audit, torch.device("cpu"))
    assert worker.run_once("w1") is True
    assert [j["state"] for j in db.jobs()] == ["done", "done"]
    Delivery(stage_settings(settings).delivery, db, audit).tick()
    assert db.status()["sends"] == {"done": 3}  # the old send + the new job's SEG and SR
    assert len(storescp.files()) == 3
    db.close()

    reopened = Database(stage_settings(settings).layout.database_path)
    assert reopened.migrated == []  # current: nothing to do
    reopened.close()


def test_a_new_database_is_created_at_the_current_version(tmp_path: Path) -> None:
    db = Database(tmp_path / "node.sqlite3")
    db.close()
    with sqlite3.connect(tmp_path / "node.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_database_of_a_newer_node_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "node.sqlite3") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DicomNodeError, match="newer than this dicom-node knows"):
        Database(tmp_path / "node.sqlite3")


def test_version_2_keeps_the_order_of_a_jobs_inputs_and_adds_send_leases(tmp_path: Path) -> None:
    from dicom_node.store.schema import MIGRATIONS, SCHEMA_V0

    path = tmp_path / "node.sqlite3"
    with sqlite3.connect(path) as v1:
        v1.executescript(SCHEMA_V0)
        for statement in MIGRATIONS[0].for_backend("sqlite"):
            v1.execute(statement)
        v1.execute("PRAGMA user_version = 1")
        v1.execute(
            "INSERT INTO jobs (series_uid, route, state, created_at, updated_at, case_id) "
            "VALUES ('2.25.2', 'r', 'pending', 1.0, 1.0, 1)"
        )
        for role, series in (("t2", "2.25.2"), ("flair", "2.25.3"), ("t1", "2.25.1")):
            v1.execute("INSERT INTO case_inputs VALUES (1, ?, ?)", (role, series))
    db = Database(path)
    assert 2 in db.migrated
    assert list(db.job_inputs(1)) == ["t2", "flair", "t1"]  # the order they were written in
    db.close()
    assert {"owner", "lease_until"} <= set(columns(path, "sends"))
    assert columns(path, "audit_records") == ["seq", "record"]


# -- PostgreSQL ------------------------------------------------------------------------------


def test_a_new_postgresql_database_is_created_at_the_current_version(postgres_url: str) -> None:
    import psycopg

    db = Database(postgres_url)
    assert db.backend == "postgresql" and db.migrated == list(range(1, SCHEMA_VERSION + 1))
    db.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        types = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, data_type || "
                "CASE WHEN is_identity = 'YES' THEN ' identity' ELSE '' END "
                "FROM information_schema.columns WHERE table_schema = 'public'"
            ).fetchall()
        )
    assert types["jobs.id"] == "bigint identity" and types["sends.id"] == "bigint identity"
    assert types["instances.received_at"] == "double precision"
    assert types["case_inputs.position"] == "bigint"
    assert types["audit_records.seq"] == "bigint" and types["audit_records.record"] == "text"
    assert types["sends.lease_until"] == "double precision" and types["sends.owner"] == "text"
    reopened = Database(postgres_url)
    assert reopened.migrated == []
    reopened.close()


def test_nodes_starting_together_migrate_a_postgresql_database_once(postgres_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def open_and_close(_: int) -> list[int]:
        db = Database(postgres_url)
        db.close()
        return db.migrated

    with ThreadPoolExecutor(4) as pool:
        applied = list(pool.map(open_and_close, range(4)))
    assert sorted(v for versions in applied for v in versions) == list(range(1, SCHEMA_VERSION + 1))


def test_a_postgresql_database_of_a_newer_node_is_refused(postgres_url: str) -> None:
    import psycopg

    Database(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(DicomNodeError, match="newer than this dicom-node knows"):
        Database(postgres_url)


def test_an_unreachable_postgresql_names_it_without_the_password() -> None:
    from tests.conftest import free_port

    url = f"postgresql://node:s3cret@127.0.0.1:{free_port()}/state"
    with pytest.raises(DicomNodeError) as exc:
        Database(url)
    assert "cannot connect" in str(exc.value) and "s3cret" not in str(exc.value)
    assert f"postgresql://node:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in str(exc.value)
