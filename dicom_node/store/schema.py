"""The database schema: its version in ``PRAGMA user_version`` and the ordered migrations.

Version 0 is the schema of the nodes that had no version (``user_version`` 0): the tables
``instances``, ``series``, ``jobs``, ``sends`` and ``audit_head`` as they were created then. A
new database is created as version 0 and then migrated like an old one, so every node runs
exactly the same steps. Each migration runs in one transaction together with the new
``user_version``: a node killed during a migration reopens at the version before it.

A migration is only ever appended; a shipped one is never edited (databases out there have
run it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node.errors import DicomNodeError

#: The schema of the unversioned nodes (version 0). Frozen: do not edit, add a migration.
SCHEMA_V0 = """
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


@dataclass(frozen=True)
class Only:
    """A statement of a migration that runs on one backend only (``sqlite``, ``postgresql``)."""

    backend: str
    sql: str


@dataclass(frozen=True)
class Migration:
    """One step from ``version - 1`` to ``version``: SQL statements run in one transaction."""

    version: int
    purpose: str
    statements: Sequence[str | Only]

    def for_backend(self, backend: str) -> list[str]:
        """The statements that run on ``backend``, in order."""
        return [
            s if isinstance(s, str) else s.sql
            for s in self.statements
            if isinstance(s, str) or s.backend == backend
        ]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "study-level cases, the series that filled each role of a job, lease owners",
        (
            "ALTER TABLE jobs ADD COLUMN owner TEXT",
            "ALTER TABLE jobs ADD COLUMN case_id INTEGER",
            """CREATE TABLE cases (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                study_uid TEXT NOT NULL,
                route TEXT NOT NULL,
                state TEXT NOT NULL,
                waiting_since REAL NOT NULL,
                updated_at REAL NOT NULL,
                error TEXT,
                UNIQUE (study_uid, route)
            )""",
            "CREATE INDEX cases_state ON cases(state)",
            """CREATE TABLE case_inputs (
                job_id INTEGER NOT NULL,
                role TEXT NOT NULL,
                series_uid TEXT NOT NULL,
                PRIMARY KEY (job_id, role)
            )""",
            "CREATE INDEX case_inputs_series ON case_inputs(series_uid)",
            "CREATE INDEX series_study ON series(study_uid)",
            # Every job of a version-0 node ran one series as the implicit role "image".
            "INSERT INTO case_inputs (job_id, role, series_uid) "
            "SELECT id, 'image', series_uid FROM jobs",
        ),
    ),
    Migration(
        2,
        "the order of a job's inputs, leased sends, the audit chain in the database",
        (
            # case_inputs were read back in rowid order; PostgreSQL has no rowid.
            "ALTER TABLE case_inputs ADD COLUMN position INTEGER NOT NULL DEFAULT 0",
            Only("sqlite", "UPDATE case_inputs SET position = rowid"),
            # A send is leased to one sender (claim_sends), as a job is to one worker.
            "ALTER TABLE sends ADD COLUMN owner TEXT",
            "ALTER TABLE sends ADD COLUMN lease_until REAL",
            # The audit chain's records when the database holds it (one canonical JSON line
            # each, without its newline, as the file chain writes it).
            "CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, record TEXT NOT NULL)",
        ),
    ),
)

#: The version this code writes.
SCHEMA_VERSION = MIGRATIONS[-1].version


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Bring the database on ``conn`` (autocommit mode) to :data:`SCHEMA_VERSION`.

    Returns the versions applied (empty when it was current).

    Raises
    ------
    DicomNodeError
        When the database was written by a newer dicom-node (its version is unknown here).
    """
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise DicomNodeError(
            f"the database has schema version {version}, newer than this dicom-node knows "
            f"({SCHEMA_VERSION}); run the dicom-node version that wrote it, or a newer one"
        )
    if version == 0:
        conn.executescript(SCHEMA_V0)  # a new database; no-op on an unversioned one
    applied = []
    for step in MIGRATIONS:
        if step.version <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) >= step.version:  # another process migrated meanwhile
                conn.execute("ROLLBACK")
                continue
            for statement in step.for_backend("sqlite"):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(step.version)}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(step.version)
    return applied
