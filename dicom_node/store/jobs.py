"""The job queue: one run of a series or a case, leased to one worker at a time.

Table ``jobs``. A worker claims the oldest pending job (or one whose lease ran out) for
``job_lease_s`` as its owner (``host:pid:thread``), renews the lease while it runs, and
records the outcome as that owner: :meth:`SqlJobStore.finish_job` marks the job done and
queues its sends (:func:`~dicom_node.store.sends.queue_sends`) in one transaction. On
PostgreSQL a claim takes the oldest job no other transaction holds (``FOR UPDATE SKIP
LOCKED``); every transaction that reads a row and then changes it depending on what it read
locks the row with ``FOR UPDATE``.

:class:`JobQueue` is what the workers need; :class:`SqlJobStore` keeps the jobs in the node's
database.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dicom_node.store.connection import Store
from dicom_node.store.instances import InstanceRecord
from dicom_node.store.sends import queue_sends
from dicom_node.store.states import JobState

__all__ = ["Job", "JobQueue", "JobState", "SqlJobStore", "owner_is_gone"]


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str  # the reference role's series
    route: str
    attempts: int
    inputs: dict[str, str] = field(default_factory=dict)  # role -> series instance UID
    owner: str = ""
    case_id: int | None = None


class JobQueue(Protocol):
    """The workers' view of the state: jobs with leases, and the instances of their series."""

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
    def series_instances(self, series_uid: str) -> list[InstanceRecord]: ...


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


class SqlJobStore(Store):
    """The jobs of :class:`JobQueue` in the node's database."""

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
                return int(cur.rowcount)
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
            return bool(cur.rowcount == 1)

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
            return bool(cur.rowcount == 1)

    def job_state(self, job_id: int) -> JobState | None:
        rows = self._query("SELECT state FROM jobs WHERE id = ?", (job_id,))
        return JobState(rows[0]["state"]) if rows else None

    def job_series_info(self, job_id: int) -> dict[str, Any]:
        """The series row (patient and study, for the audit trail) of job ``job_id``."""
        rows = self._query(
            "SELECT s.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid WHERE j.id = ?",
            (job_id,),
        )
        return dict(rows[0]) if rows else {}

    def jobs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM jobs ORDER BY id")]
