"""The node's index and queues in one embedded SQLite database (WAL, synchronous=FULL).

Tables: ``instances`` (every received instance and its spool file), ``series`` (assembly state),
``jobs`` (segmentation jobs with leases) and ``sends`` (one row per result and destination,
with retries). Every state change is one transaction, so a node killed at any instant restarts
into a consistent state.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
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


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; not yet complete
    QUEUED = "queued"  # complete; jobs created
    UNROUTED = "unrouted"  # complete; no route matched
    IGNORED = "ignored"  # kept, not processed (late instances with policy "ignore")


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # more instances arrived before it ran; a new job replaces it


class SendState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    route: str
    attempts: int


@dataclass(frozen=True)
class Send:
    id: int
    job_id: int
    destination: str
    path: Path
    sop_instance_uid: str
    attempts: int


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: Path


class Database:
    """Thread-safe access to the node database (one connection guarded by a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    # -- audit anchors (dicom_node.audit) ---------------------------------------------------

    def audit_mark(self, name: str) -> tuple[int, str] | None:
        """``(seq, hash)`` stored under ``name`` in ``audit_head``, or None."""
        rows = self._query("SELECT seq, hash FROM audit_head WHERE name = ?", (name,))
        return (int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else None

    def set_audit_mark(self, name: str, seq: int, digest: str) -> None:
        """Store ``(seq, digest)`` under ``name`` (the chain head or an export position)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO audit_head (name, seq, hash) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (name, seq, digest),
            )

    # -- receive ---------------------------------------------------------------------------

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_uid: str,
        series_uid: str,
        patient_id: str,
        attributes: dict[str, str],
        path: Path,
        association_id: str,
        late_policy: str,
        now: float | None = None,
    ) -> bool:
        """Index a durably written instance and mark its series as receiving.

        Returns True when the instance is new, False when it replaced an earlier copy (a resend
        of the same SOP Instance UID). Pending jobs of the series are superseded: the assembler
        makes a new one that includes this instance once the series is quiet again. With the
        ``ignore`` late policy, an instance for a series that already ran is kept but does not
        trigger reprocessing.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            existed = c.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    sop_instance_uid,
                    sop_class_uid,
                    study_uid,
                    series_uid,
                    str(path),
                    now,
                    association_id,
                ),
            )
            row = c.execute(
                "SELECT state FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            ran = c.execute(
                "SELECT 1 FROM jobs WHERE series_uid = ? AND state IN (?, ?, ?)",
                (series_uid, JobState.RUNNING, JobState.DONE, JobState.FAILED),
            ).fetchone()
            state = SeriesState.RECEIVING
            if row is not None and ran is not None and late_policy == "ignore":
                state = SeriesState.IGNORED
            c.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE series_uid = ? AND state = ?",
                (JobState.SUPERSEDED, now, series_uid, JobState.PENDING),
            )
            c.execute(
                """INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, NULL)
                   ON CONFLICT(series_uid) DO UPDATE SET state = excluded.state,
                   last_received_at = excluded.last_received_at,
                   last_association = excluded.last_association, released_at = NULL""",
                (
                    series_uid,
                    study_uid,
                    patient_id,
                    json.dumps(attributes),
                    state,
                    now,
                    association_id,
                ),
            )
        return existed is None

    def association_released(self, association_id: str, now: float | None = None) -> int:
        """Note that ``association_id`` ended; return how many receiving series it touched."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE series SET released_at = ? WHERE last_association = ? AND state = ?",
                (now, association_id, SeriesState.RECEIVING),
            )
            return cur.rowcount

    # -- assemble --------------------------------------------------------------------------

    def complete_series(
        self, stable_after_s: float, release_grace_s: float, now: float | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Series whose sending is over: quiet for ``stable_after_s``, or released + grace."""
        now = time.time() if now is None else now
        rows = self._query(
            """SELECT series_uid, attributes FROM series WHERE state = ? AND
               (last_received_at <= ? OR (released_at IS NOT NULL AND released_at <= ?))""",
            (SeriesState.RECEIVING, now - stable_after_s, now - release_grace_s),
        )
        return [(r["series_uid"], json.loads(r["attributes"])) for r in rows]

    def queue_series(self, series_uid: str, routes: list[str], now: float | None = None) -> None:
        """Create one pending job per route and mark the series queued (or unrouted)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            state = c.execute(
                "SELECT state FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if state is None or state["state"] != SeriesState.RECEIVING:
                return
            for route in routes:
                c.execute(
                    "INSERT INTO jobs (series_uid, route, state, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (series_uid, route, JobState.PENDING, now, now),
                )
            c.execute(
                "UPDATE series SET state = ? WHERE series_uid = ?",
                (SeriesState.QUEUED if routes else SeriesState.UNROUTED, series_uid),
            )

    # -- work ------------------------------------------------------------------------------

    def recover_after_restart(self) -> int:
        """Return jobs that were running when the node died to the queue; return how many."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL WHERE state = ?",
                (JobState.PENDING, JobState.RUNNING),
            )
            return cur.rowcount

    def claim_job(self, lease_s: float, now: float | None = None) -> Job | None:
        """Lease the oldest pending job (or one whose lease expired) to the caller."""
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute(
                """SELECT id, series_uid, route, attempts FROM jobs
                   WHERE state = ? OR (state = ? AND lease_until < ?) ORDER BY id LIMIT 1""",
                (JobState.PENDING, JobState.RUNNING, now),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state = ?, lease_until = ?, attempts = attempts + 1, "
                "updated_at = ? WHERE id = ?",
                (JobState.RUNNING, now + lease_s, now, row["id"]),
            )
            return Job(row["id"], row["series_uid"], row["route"], row["attempts"] + 1)

    def series_instances(self, series_uid: str) -> list[InstanceRecord]:
        rows = self._query(
            "SELECT sop_instance_uid, study_uid, series_uid, path FROM instances "
            "WHERE series_uid = ? ORDER BY sop_instance_uid",
            (series_uid,),
        )
        return [
            InstanceRecord(r["sop_instance_uid"], r["study_uid"], r["series_uid"], Path(r["path"]))
            for r in rows
        ]

    def series_info(self, series_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return dict(rows[0]) if rows else None

    def job_series_info(self, job_id: int) -> dict[str, Any]:
        """The series row (patient and study, for the audit trail) of job ``job_id``."""
        rows = self._query(
            "SELECT s.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid WHERE j.id = ?",
            (job_id,),
        )
        return dict(rows[0]) if rows else {}

    def finish_job(
        self,
        job_id: int,
        outputs: Sequence[tuple[str, Path, str]],
        destinations: Mapping[str, Collection[str]],
        now: float | None = None,
    ) -> bool:
        """Mark a job done and queue each output for the destinations that take its kind.

        ``outputs`` are ``(kind, path, sop_uid)`` (kind: ``seg``, ``sr``, ``overlay``);
        ``destinations`` maps each destination name to the output kinds it asked for
        (``destinations.<name>.outputs``), so a destination gets only those.

        Returns False (and changes nothing) when the job is no longer running, e.g. because
        it was superseded by late instances while it ran; its outputs then stay unsent and the
        newer job sends its own.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.RUNNING:
                return False
            c.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, updated_at = ?, error = NULL "
                "WHERE id = ?",
                (JobState.DONE, now, job_id),
            )
            for kind, path, sop_uid in outputs:
                for dest, kinds in destinations.items():
                    if kind not in kinds:
                        continue
                    c.execute(
                        "INSERT OR IGNORE INTO sends (job_id, destination, path, "
                        "sop_instance_uid, state, next_attempt_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (job_id, dest, str(path), sop_uid, SendState.PENDING, now, now),
                    )
            return True

    def fail_job(
        self, job_id: int, error: str, *, retry: bool, now: float | None = None
    ) -> JobState:
        """Record a failed attempt: back to pending when ``retry``, else failed for good."""
        now = time.time() if now is None else now
        state = JobState.PENDING if retry else JobState.FAILED
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, updated_at = ?, error = ? "
                "WHERE id = ? AND state = ?",
                (state, now, error[:500], job_id, JobState.RUNNING),
            )
        return state

    # -- send ------------------------------------------------------------------------------

    def due_sends(
        self, now: float | None = None, limit: int = 64, destination: str | None = None
    ) -> list[Send]:
        """Pending sends whose next attempt is due, of ``destination`` (None: any)."""
        now = time.time() if now is None else now
        where = "" if destination is None else " AND destination = ?"
        rows = self._query(
            "SELECT id, job_id, destination, path, sop_instance_uid, attempts FROM sends "
            f"WHERE state = ? AND next_attempt_at <= ?{where} ORDER BY destination, id LIMIT ?",
            (SendState.PENDING, now, *(() if destination is None else (destination,)), limit),
        )
        return [
            Send(
                r["id"],
                r["job_id"],
                r["destination"],
                Path(r["path"]),
                r["sop_instance_uid"],
                r["attempts"],
            )
            for r in rows
        ]

    def send_done(self, send_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, updated_at = ?, "
                "last_error = NULL WHERE id = ?",
                (SendState.DONE, now, send_id),
            )

    def send_failed(
        self,
        send_id: int,
        error: str,
        *,
        next_attempt_at: float | None,
        now: float | None = None,
    ) -> SendState:
        """Record a failed attempt; ``next_attempt_at`` None means give up (dead letter)."""
        now = time.time() if now is None else now
        state = SendState.FAILED if next_attempt_at is None else SendState.PENDING
        with self._tx() as c:
            c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "updated_at = ?, last_error = ? WHERE id = ?",
                (state, next_attempt_at or now, now, error[:500], send_id),
            )
        return state

    def retry_failed_sends(self, destination: str | None = None) -> int:
        """Put dead-lettered sends back in the queue (``dicom-node retry``)."""
        with self._tx() as c:
            sql = "UPDATE sends SET state = ?, attempts = 0, next_attempt_at = 0 WHERE state = ?"
            params: tuple[Any, ...] = (SendState.PENDING, SendState.FAILED)
            if destination is not None:
                sql += " AND destination = ?"
                params += (destination,)
            return c.execute(sql, params).rowcount

    def waiting_destinations(self, now: float | None = None) -> dict[str, float]:
        """Destinations with sends waiting for their backoff: name -> earliest next attempt.

        Only pending sends not yet due count; these are the destinations worth a C-ECHO.
        """
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT destination, MIN(next_attempt_at) AS next_at FROM sends "
            "WHERE state = ? AND next_attempt_at > ? GROUP BY destination",
            (SendState.PENDING, now),
        )
        return {r["destination"]: float(r["next_at"]) for r in rows}

    def sends_due_now(self, destination: str | None = None, now: float | None = None) -> int:
        """Make pending sends that wait for their backoff due at once; return how many.

        Called when a destination answers again (a send or a C-ECHO to it succeeded) and by
        ``dicom-node retry --now``. Dead-lettered sends are left alone (see
        :meth:`retry_failed_sends`). ``destination`` None means every destination.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            sql = (
                "UPDATE sends SET next_attempt_at = ?, updated_at = ? "
                "WHERE state = ? AND next_attempt_at > ?"
            )
            params: tuple[Any, ...] = (now, now, SendState.PENDING, now)
            if destination is not None:
                sql += " AND destination = ?"
                params += (destination,)
            return c.execute(sql, params).rowcount

    # -- retention -------------------------------------------------------------------------

    def finished_series(self) -> list[str]:
        """Queued series whose jobs all finished and whose results were all delivered."""
        rows = self._query(
            """SELECT s.series_uid FROM series s WHERE s.state = ?
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid
                               AND j.state IN (?, ?))
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state = ?)
               AND NOT EXISTS (SELECT 1 FROM sends x JOIN jobs j ON x.job_id = j.id
                               WHERE j.series_uid = s.series_uid AND x.state != ?)""",
            (SeriesState.QUEUED, JobState.PENDING, JobState.RUNNING, JobState.DONE, SendState.DONE),
        )
        return [r["series_uid"] for r in rows]

    def series_older_than(self, cutoff: float) -> list[str]:
        """Series last touched before ``cutoff`` with no job to run and no result to send."""
        rows = self._query(
            """SELECT s.series_uid FROM series s WHERE s.last_received_at < ? AND s.state != ?
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid
                               AND j.state IN (?, ?))
               AND NOT EXISTS (SELECT 1 FROM sends x JOIN jobs j ON x.job_id = j.id
                               WHERE j.series_uid = s.series_uid AND x.state = ?)""",
            (cutoff, SeriesState.RECEIVING, JobState.PENDING, JobState.RUNNING, SendState.PENDING),
        )
        return [r["series_uid"] for r in rows]

    def series_job_ids(self, series_uid: str) -> list[int]:
        rows = self._query("SELECT id FROM jobs WHERE series_uid = ? ORDER BY id", (series_uid,))
        return [r["id"] for r in rows]

    def forget_instances(self, series_uid: str) -> list[InstanceRecord]:
        """Remove a series' instances from the index and return them (files go next)."""
        with self._tx() as c:
            rows = c.execute(
                "SELECT sop_instance_uid, study_uid, series_uid, path FROM instances "
                "WHERE series_uid = ?",
                (series_uid,),
            ).fetchall()
            c.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            c.execute(
                "UPDATE series SET state = ? WHERE series_uid = ? AND state = ?",
                (SeriesState.IGNORED, series_uid, SeriesState.QUEUED),
            )
        return [
            InstanceRecord(r["sop_instance_uid"], r["study_uid"], r["series_uid"], Path(r["path"]))
            for r in rows
        ]

    # -- status ----------------------------------------------------------------------------

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Counts per state, failed jobs and sends, per destination: what ``status`` shows.

        Per destination: counts of its sends by state, ``next_attempt_at`` (epoch seconds)
        and ``next_attempt_in_s`` of its earliest pending send, and ``last_error`` (with
        ``last_error_at``) of the most recently failed send not yet delivered.
        """
        now = time.time() if now is None else now

        def counts(table: str) -> dict[str, int]:
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            return {r["state"]: r["n"] for r in rows}

        failed_jobs = self._query(
            "SELECT id, series_uid, route, attempts, error FROM jobs WHERE state = ? "
            "ORDER BY id DESC LIMIT 20",
            (JobState.FAILED,),
        )
        per_dest = self._query(
            "SELECT destination, state, COUNT(*) AS n, MIN(next_attempt_at) AS next_at "
            "FROM sends GROUP BY destination, state"
        )
        destinations: dict[str, dict[str, Any]] = {}
        for r in per_dest:
            d = destinations.setdefault(r["destination"], {})
            d[r["state"]] = r["n"]
            if r["state"] == SendState.PENDING:
                d["next_attempt_at"] = float(r["next_at"])
                d["next_attempt_in_s"] = round(max(0.0, float(r["next_at"]) - now), 1)
        # The most recent error of sends not yet delivered (waiting or dead-lettered); SQLite
        # takes the bare column last_error from the row that has MAX(updated_at).
        errors = self._query(
            "SELECT destination, last_error, MAX(updated_at) AS at FROM sends "
            "WHERE state != ? AND last_error IS NOT NULL GROUP BY destination",
            (SendState.DONE,),
        )
        for r in errors:
            d = destinations.setdefault(r["destination"], {})
            d["last_error"] = r["last_error"]
            d["last_error_at"] = float(r["at"])
        return {
            "instances": self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"],
            "series": counts("series"),
            "jobs": counts("jobs"),
            "sends": counts("sends"),
            "failed_jobs": [dict(r) for r in failed_jobs],
            "destinations": destinations,
        }

    def jobs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM jobs ORDER BY id")]

    def sends(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM sends ORDER BY id")]
