"""Assembly and the job queue: series, study-level cases, jobs with owned leases.

Tables: ``series`` (assembly state of each series, with its routing attributes), ``cases``
(one per study and study-level route: waiting, queued or failed), ``jobs`` (one run of a
series or a case, leased to one worker at a time) and ``case_inputs`` (which series filled
which role of a job; a series-level job has the one role ``image``).

:class:`CaseStore` is what the assembler and the workers need; :class:`SqlCaseStore` keeps
it in the node's database (SQLite or PostgreSQL, :mod:`dicom_node.store.connection`). On
PostgreSQL every transaction that reads a row and then changes it depending on what it read
locks the row with ``FOR UPDATE``; a worker's claim takes the oldest job no other transaction
holds (``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import enum
import json
import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dicom_node.store.connection import Store, Transaction
from dicom_node.store.sends import SendState, queue_sends


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; not yet complete
    QUEUED = "queued"  # complete; jobs created, or an input of a study-level case
    UNROUTED = "unrouted"  # complete; no route matched
    IGNORED = "ignored"  # kept, not processed (late instances with policy "ignore")


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # more instances arrived before it ran; a new job replaces it


class CaseState(enum.StrEnum):
    WAITING = "waiting"  # collecting the study's series for its roles
    QUEUED = "queued"  # a job was made (its state is the job's)
    FAILED = "failed"  # a required role had no series at study_timeout_s (see ``error``)


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str  # the reference role's series
    route: str
    attempts: int
    inputs: dict[str, str] = field(default_factory=dict)  # role -> series instance UID
    owner: str = ""
    case_id: int | None = None


@dataclass(frozen=True)
class Case:
    id: int
    study_uid: str
    route: str
    state: CaseState
    waiting_since: float


@dataclass(frozen=True)
class SeriesSummary:
    """What role selection looks at for one series of a study."""

    series_uid: str
    state: SeriesState
    attributes: dict[str, str]
    instances: int
    last_received_at: float


class CaseStore(Protocol):
    """The assembler's and the workers' view of the state."""

    def association_released(self, association_id: str, now: float | None = None) -> int: ...
    def complete_series(
        self, stable_after_s: float, release_grace_s: float, now: float | None = None
    ) -> list[tuple[str, dict[str, str]]]: ...
    def queue_series(
        self,
        series_uid: str,
        routes: list[str],
        now: float | None = None,
        *,
        in_case: bool = False,
    ) -> None: ...
    def open_case(self, study_uid: str, route: str, now: float | None = None) -> None: ...
    def waiting_cases(self) -> list[Case]: ...
    def study_series(self, study_uid: str) -> list[SeriesSummary]: ...
    def queue_case(
        self, case_id: int, inputs: Mapping[str, str], reference: str, now: float | None = None
    ) -> int | None: ...
    def settle_case(self, case_id: int, now: float | None = None) -> bool: ...
    def last_run(self, case_id: int) -> tuple[dict[str, str], float] | None: ...
    def fail_case(self, case_id: int, reason: str, now: float | None = None) -> bool: ...
    def recover_after_restart(self) -> int: ...
    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> Job | None: ...
    def renew_lease(
        self, job_id: int, owner: str, lease_s: float, now: float | None = None
    ) -> bool: ...
    def finish_job(
        self,
        job_id: int,
        owner: str,
        outputs: Sequence[tuple[str, Path, str]],
        destinations: Mapping[str, Collection[str]],
        now: float | None = None,
    ) -> bool: ...
    def fail_job(
        self, job_id: int, owner: str, error: str, *, retry: bool, now: float | None = None
    ) -> bool: ...
    def job_state(self, job_id: int) -> JobState | None: ...
    def series_info(self, series_uid: str) -> dict[str, Any] | None: ...
    def job_series_info(self, job_id: int) -> dict[str, Any]: ...


def merge_attributes(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """A series' routing attributes: the union over its instances.

    A value no instance had yet is taken; a value that differs between instances keeps every
    distinct component, joined by ``\\`` (a selector matches any component), so a series is
    routed on all of its instances rather than on whichever arrived first.
    """
    out = dict(old)
    for key, value in new.items():
        if not value.strip():
            continue
        have = out.get(key, "")
        if not have.strip():
            out[key] = value
            continue
        parts = have.split("\\")
        extra = [p for p in value.split("\\") if p not in parts]
        if extra:
            out[key] = "\\".join(parts + extra)
    return out


def note_arrival(
    c: Transaction,
    *,
    series_uid: str,
    study_uid: str,
    patient_id: str,
    attributes: Mapping[str, str],
    association_id: str,
    late_policy: str,
    now: float,
    for_update: str = "",
) -> None:
    """An instance of ``series_uid`` was indexed (inside ``c``'s open transaction).

    The series goes (back) to receiving, its routing attributes merged. Pending jobs that use
    the series are superseded: the assembler makes a new one once it is quiet again. With the
    ``ignore`` late policy an instance of a series that already ran is kept but the series is
    marked ignored (nothing runs again).

    The study's cases that are no longer waiting: one whose job has not started yet goes back
    to waiting (its pending job superseded), whatever the policy; one that ran (or failed at
    its timeout) goes back to waiting with ``reprocess`` (a new timeout window starts) and
    stays as it is with ``ignore``.

    The series row is inserted if it is new, else read with ``for_update`` (the store's
    ``_for_update``) before its attributes are merged, so two receivers indexing instances of
    one series at the same moment both get their attributes in (on PostgreSQL the second
    waits for the first's commit; on SQLite transactions never overlap).
    """
    new = c.execute(
        "INSERT INTO series (series_uid, study_uid, patient_id, attributes, state, "
        "last_received_at, last_association, released_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL) "
        "ON CONFLICT (series_uid) DO NOTHING RETURNING series_uid",
        (
            series_uid,
            study_uid,
            patient_id,
            json.dumps(merge_attributes({}, attributes)),
            SeriesState.RECEIVING,
            now,
            association_id,
        ),
    ).fetchone()
    state = SeriesState.RECEIVING
    if new is None:
        row = c.execute(
            "SELECT attributes FROM series WHERE series_uid = ?" + for_update, (series_uid,)
        ).fetchone()
        ran = c.execute(
            "SELECT 1 AS one FROM case_inputs ci JOIN jobs j ON j.id = ci.job_id "
            "WHERE ci.series_uid = ? AND j.state IN (?, ?, ?)",
            (series_uid, JobState.RUNNING, JobState.DONE, JobState.FAILED),
        ).fetchone()
        if ran is not None and late_policy == "ignore":
            state = SeriesState.IGNORED
        merged = merge_attributes(json.loads(row["attributes"]), attributes)
        c.execute(
            "UPDATE series SET state = ?, attributes = ?, last_received_at = ?, "
            "last_association = ?, released_at = NULL WHERE series_uid = ?",
            (state, json.dumps(merged), now, association_id, series_uid),
        )
    # Locks in one order everywhere: series, then the study's cases, then jobs. Every case of
    # the study is locked, waiting ones too, so a case being queued at this moment is seen
    # with its new job once that commits.
    cases = []
    if state is not SeriesState.IGNORED:
        cases = c.execute(
            "SELECT id, state FROM cases WHERE study_uid = ? ORDER BY id" + for_update,
            (study_uid,),
        ).fetchall()
    c.execute(
        "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ? AND id IN "
        "(SELECT job_id FROM case_inputs WHERE series_uid = ?)",
        (JobState.SUPERSEDED, now, JobState.PENDING, series_uid),
    )
    for case in cases:
        if case["state"] == CaseState.WAITING:
            continue
        superseded = c.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE case_id = ? AND state = ?",
            (JobState.SUPERSEDED, now, case["id"], JobState.PENDING),
        ).rowcount
        if superseded or late_policy == "reprocess":
            c.execute(
                "UPDATE cases SET state = ?, waiting_since = ?, updated_at = ?, error = NULL "
                "WHERE id = ?",
                (CaseState.WAITING, now, now, case["id"]),
            )


def series_purged(c: Transaction, series_uid: str) -> None:
    """Retention removed the series' instances (inside ``c``'s open transaction)."""
    c.execute(
        "UPDATE series SET state = ? WHERE series_uid = ? AND state = ?",
        (SeriesState.IGNORED, series_uid, SeriesState.QUEUED),
    )


def owner_is_gone(owner: str) -> bool:
    """Whether lease ``owner`` (``host:pid:thread``, as
    :func:`dicom_node.work.worker.default_owner` writes it) was a process of this host
    that no longer runs, or this very process (at start, before it claimed anything)."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


# Jobs that use a series s (as any role): the series-level job of s and every case run it fed.
_USES = "SELECT ci.job_id FROM case_inputs ci WHERE ci.series_uid = s.series_uid"


class SqlCaseStore(Store):
    """:class:`CaseStore` in the node's database."""

    # -- assemble --------------------------------------------------------------------------

    def association_released(self, association_id: str, now: float | None = None) -> int:
        """Note that ``association_id`` ended; return how many receiving series it touched."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE series SET released_at = ? WHERE last_association = ? AND state = ?",
                (now, association_id, SeriesState.RECEIVING),
            )
            return cur.rowcount

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

    def queue_series(
        self,
        series_uid: str,
        routes: list[str],
        now: float | None = None,
        *,
        in_case: bool = False,
    ) -> None:
        """Create one pending job per series-level route and mark the series complete.

        The series becomes queued when it has jobs or may fill a role of a study-level case
        (``in_case``), else unrouted.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            state = c.execute(
                "SELECT state FROM series WHERE series_uid = ?" + self._for_update,
                (series_uid,),
            ).fetchone()
            if state is None or state["state"] != SeriesState.RECEIVING:
                return
            for route in routes:
                job = c.execute(
                    "INSERT INTO jobs (series_uid, route, state, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (series_uid, route, JobState.PENDING, now, now),
                ).fetchone()
                c.execute(
                    "INSERT INTO case_inputs (job_id, role, series_uid, position) "
                    "VALUES (?, 'image', ?, 0)",
                    (job["id"], series_uid),
                )
            queued = routes or in_case
            c.execute(
                "UPDATE series SET state = ? WHERE series_uid = ?",
                (SeriesState.QUEUED if queued else SeriesState.UNROUTED, series_uid),
            )

    def open_case(self, study_uid: str, route: str, now: float | None = None) -> None:
        """Start waiting for the roles of study-level ``route`` in ``study_uid`` (once)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute(
                "INSERT INTO cases (study_uid, route, state, waiting_since, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (study_uid, route) DO NOTHING",
                (study_uid, route, CaseState.WAITING, now, now),
            )

    def waiting_cases(self) -> list[Case]:
        rows = self._query(
            "SELECT id, study_uid, route, state, waiting_since FROM cases WHERE state = ? "
            "ORDER BY id",
            (CaseState.WAITING,),
        )
        return [
            Case(r["id"], r["study_uid"], r["route"], CaseState(r["state"]), r["waiting_since"])
            for r in rows
        ]

    def study_series(self, study_uid: str) -> list[SeriesSummary]:
        """Every series of ``study_uid`` with its state, attributes and instance count."""
        rows = self._query(
            "SELECT s.series_uid, s.state, s.attributes, s.last_received_at, "
            "(SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS n "
            "FROM series s WHERE s.study_uid = ? ORDER BY s.series_uid",
            (study_uid,),
        )
        return [
            SeriesSummary(
                r["series_uid"],
                SeriesState(r["state"]),
                json.loads(r["attributes"]),
                int(r["n"]),
                float(r["last_received_at"]),
            )
            for r in rows
        ]

    def queue_case(
        self, case_id: int, inputs: Mapping[str, str], reference: str, now: float | None = None
    ) -> int | None:
        """Make the pending job of a waiting case; ``inputs``: role -> series UID.

        ``reference`` is the role whose series becomes ``Job.series_uid``. Returns the job id,
        or None when the case is no longer waiting.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            case = c.execute(
                "SELECT route, state FROM cases WHERE id = ?" + self._for_update, (case_id,)
            ).fetchone()
            if case is None or case["state"] != CaseState.WAITING:
                return None
            job_id = int(
                c.execute(
                    "INSERT INTO jobs (series_uid, route, state, created_at, updated_at, "
                    "case_id) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (inputs[reference], case["route"], JobState.PENDING, now, now, case_id),
                ).fetchone()["id"]
            )
            for position, (role, series_uid) in enumerate(inputs.items()):
                c.execute(
                    "INSERT INTO case_inputs (job_id, role, series_uid, position) "
                    "VALUES (?, ?, ?, ?)",
                    (job_id, role, series_uid, position),
                )
            c.execute(
                "UPDATE cases SET state = ?, updated_at = ?, error = NULL WHERE id = ?",
                (CaseState.QUEUED, now, case_id),
            )
            return job_id

    def settle_case(self, case_id: int, now: float | None = None) -> bool:
        """Queue a waiting case again without a new job: its last run had the same inputs,
        none of them changed (a late series that fills no role does not re-run a case)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE cases SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (CaseState.QUEUED, now, case_id, CaseState.WAITING),
            )
            return cur.rowcount == 1

    def last_run(self, case_id: int) -> tuple[dict[str, str], float] | None:
        """The inputs and creation time of the case's latest job that ran (done or failed)."""
        rows = self._query(
            "SELECT id, created_at FROM jobs WHERE case_id = ? AND state IN (?, ?) "
            "ORDER BY id DESC LIMIT 1",
            (case_id, JobState.DONE, JobState.FAILED),
        )
        if not rows:
            return None
        return self.job_inputs(rows[0]["id"]), float(rows[0]["created_at"])

    def fail_case(self, case_id: int, reason: str, now: float | None = None) -> bool:
        """A waiting case cannot run (a required role is missing): failed, with ``reason``."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE cases SET state = ?, updated_at = ?, error = ? WHERE id = ? AND state = ?",
                (CaseState.FAILED, now, reason[:500], case_id, CaseState.WAITING),
            )
            return cur.rowcount == 1

    # -- work ------------------------------------------------------------------------------

    def recover_after_restart(self) -> int:
        """Return jobs that were running when the node died to the queue; return how many.

        Called at start, before this process claims any job. On SQLite the node is the
        database's only process (its ``storage_dir`` lock), so every running job was its own.
        On PostgreSQL other processes and hosts run jobs too: only jobs whose lease owner was
        a process of this host that is gone (or had this process's id) are returned; the
        lease of any other job expires by itself if its worker died.
        """
        with self._tx() as c:
            if self.backend == "sqlite":
                cur = c.execute(
                    "UPDATE jobs SET state = ?, lease_until = NULL, owner = NULL WHERE state = ?",
                    (JobState.PENDING, JobState.RUNNING),
                )
                return cur.rowcount
            rows = c.execute(
                "SELECT id, owner FROM jobs WHERE state = ? ORDER BY id" + self._for_update,
                (JobState.RUNNING,),
            ).fetchall()
            recovered = 0
            for row in rows:
                if owner_is_gone(row["owner"] or ""):
                    recovered += c.execute(
                        "UPDATE jobs SET state = ?, lease_until = NULL, owner = NULL "
                        "WHERE id = ? AND state = ?",
                        (JobState.PENDING, row["id"], JobState.RUNNING),
                    ).rowcount
            return recovered

    def claim_job(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        """Lease the oldest pending job (or one whose lease expired) to ``owner``.

        On PostgreSQL a job that another worker's claim holds at this moment is passed over
        (``SKIP LOCKED``), so concurrent claims never get the same job and never wait.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute(
                "SELECT id, series_uid, route, attempts, case_id FROM jobs "
                "WHERE state = ? OR (state = ? AND lease_until < ?) ORDER BY id LIMIT 1"
                + self._skip_locked,
                (JobState.PENDING, JobState.RUNNING, now),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state = ?, lease_until = ?, owner = ?, attempts = attempts + 1, "
                "updated_at = ? WHERE id = ?",
                (JobState.RUNNING, now + lease_s, owner, now, row["id"]),
            )
            inputs = {
                r["role"]: r["series_uid"]
                for r in c.execute(
                    "SELECT role, series_uid FROM case_inputs WHERE job_id = ? "
                    "ORDER BY position, role",
                    (row["id"],),
                )
            }
        return Job(
            row["id"],
            row["series_uid"],
            row["route"],
            row["attempts"] + 1,
            inputs or {"image": row["series_uid"]},
            owner,
            row["case_id"],
        )

    def renew_lease(
        self, job_id: int, owner: str, lease_s: float, now: float | None = None
    ) -> bool:
        """Extend ``owner``'s lease of a running job; False when it is no longer theirs."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND state = ?",
                (now + lease_s, job_id, owner, JobState.RUNNING),
            )
            return cur.rowcount == 1

    def finish_job(
        self,
        job_id: int,
        owner: str,
        outputs: Sequence[tuple[str, Path, str]],
        destinations: Mapping[str, Collection[str]],
        now: float | None = None,
    ) -> bool:
        """Mark a job done and queue each output for the destinations that take its kind.

        ``outputs`` are ``(kind, path, sop_uid)`` (kind: ``seg``, ``sr``, ``overlay``);
        ``destinations`` maps each destination name to the output kinds it asked for
        (``destinations.<name>.outputs``), so a destination gets only those.

        Returns False (and changes nothing) when ``owner`` no longer holds the job's lease:
        it was superseded by late instances while it ran, or its lease expired and another
        worker took it. Its outputs then stay unsent; the job that replaced it sends its own.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute(
                "SELECT state, owner FROM jobs WHERE id = ?" + self._for_update, (job_id,)
            ).fetchone()
            if row is None or row["state"] != JobState.RUNNING or row["owner"] != owner:
                return False
            c.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, updated_at = ?, error = NULL "
                "WHERE id = ?",
                (JobState.DONE, now, job_id),
            )
            queue_sends(c, job_id, outputs, destinations, now)
            return True

    def fail_job(
        self, job_id: int, owner: str, error: str, *, retry: bool, now: float | None = None
    ) -> bool:
        """Record ``owner``'s failed attempt: back to pending when ``retry``, else failed.

        Returns False (and changes nothing) when ``owner`` no longer holds the lease, so a
        stale worker's late failure never resets the run that replaced it.
        """
        now = time.time() if now is None else now
        state = JobState.PENDING if retry else JobState.FAILED
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, owner = NULL, updated_at = ?, "
                "error = ? WHERE id = ? AND state = ? AND owner = ?",
                (state, now, error[:500], job_id, JobState.RUNNING, owner),
            )
            return cur.rowcount == 1

    def job_state(self, job_id: int) -> JobState | None:
        rows = self._query("SELECT state FROM jobs WHERE id = ?", (job_id,))
        return JobState(rows[0]["state"]) if rows else None

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

    # -- retention -------------------------------------------------------------------------

    def finished_series(self) -> list[str]:
        """Queued series whose jobs all finished and whose results were all delivered.

        A series counts with every job it fed (as any role), and not while a case of its
        study waits to run (again).
        """
        rows = self._query(
            f"""SELECT s.series_uid FROM series s WHERE s.state = ?
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id IN ({_USES})
                               AND j.state IN (?, ?))
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.id IN ({_USES}) AND j.state = ?)
               AND NOT EXISTS (SELECT 1 FROM sends x WHERE x.job_id IN ({_USES})
                               AND x.state != ?)
               AND NOT EXISTS (SELECT 1 FROM cases k WHERE k.study_uid = s.study_uid
                               AND k.state = ?)""",
            (
                SeriesState.QUEUED,
                JobState.PENDING,
                JobState.RUNNING,
                JobState.DONE,
                SendState.DONE,
                CaseState.WAITING,
            ),
        )
        return [r["series_uid"] for r in rows]

    def series_older_than(self, cutoff: float) -> list[str]:
        """Series last touched before ``cutoff`` with no job to run and no result to send."""
        rows = self._query(
            f"""SELECT s.series_uid FROM series s WHERE s.last_received_at < ? AND s.state != ?
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id IN ({_USES})
                               AND j.state IN (?, ?))
               AND NOT EXISTS (SELECT 1 FROM sends x WHERE x.job_id IN ({_USES})
                               AND x.state = ?)
               AND NOT EXISTS (SELECT 1 FROM cases k WHERE k.study_uid = s.study_uid
                               AND k.state = ?)""",
            (
                cutoff,
                SeriesState.RECEIVING,
                JobState.PENDING,
                JobState.RUNNING,
                SendState.PENDING,
                CaseState.WAITING,
            ),
        )
        return [r["series_uid"] for r in rows]

    def series_job_ids(self, series_uid: str) -> list[int]:
        rows = self._query(
            "SELECT DISTINCT job_id FROM case_inputs WHERE series_uid = ? ORDER BY job_id",
            (series_uid,),
        )
        return [r["job_id"] for r in rows]

    # -- status ----------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM jobs ORDER BY id")]

    def cases(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM cases ORDER BY id")]

    def job_inputs(self, job_id: int) -> dict[str, str]:
        rows = self._query(
            "SELECT role, series_uid FROM case_inputs WHERE job_id = ? ORDER BY position, role",
            (job_id,),
        )
        return {r["role"]: r["series_uid"] for r in rows}

    def case_status(self) -> dict[str, Any]:
        def counts(table: str) -> dict[str, int]:
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            return {r["state"]: r["n"] for r in rows}

        failed_jobs = self._query(
            "SELECT id, series_uid, route, attempts, error FROM jobs WHERE state = ? "
            "ORDER BY id DESC LIMIT 20",
            (JobState.FAILED,),
        )
        failed_cases = self._query(
            "SELECT id, route, waiting_since, updated_at, error FROM cases WHERE state = ? "
            "ORDER BY id DESC LIMIT 20",
            (CaseState.FAILED,),
        )
        return {
            "series": counts("series"),
            "cases": counts("cases"),
            "jobs": counts("jobs"),
            "failed_jobs": [dict(r) for r in failed_jobs],
            "failed_cases": [dict(r) for r in failed_cases],
        }
