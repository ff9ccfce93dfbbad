"""What the web console reads: recent jobs with their timings, a job's inputs and outputs,
the running jobs (the workers), and the patient of a job (for the audit trail).

Read-only queries; the console (:mod:`dicom_node.console`) takes them through
:class:`Overview`. Rows carry internal ids and UIDs only, never patient names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from dicom_node.store.connection import Store
from dicom_node.store.sends import SendState
from dicom_node.store.states import JobState

__all__ = ["Overview", "SqlOverview"]

_RECENT_JOBS = """
SELECT j.id, j.route, j.state, j.attempts, j.created_at, j.updated_at, j.error, j.case_id,
    j.series_uid, s.study_uid,
    (SELECT MIN(i.received_at) FROM case_inputs ci JOIN instances i
        ON i.series_uid = ci.series_uid WHERE ci.job_id = j.id) AS first_received_at,
    (SELECT COUNT(*) FROM case_inputs ci JOIN instances i
        ON i.series_uid = ci.series_uid WHERE ci.job_id = j.id) AS instances,
    (SELECT COUNT(*) FROM sends x WHERE x.job_id = j.id AND x.state = ?) AS sends_done,
    (SELECT COUNT(*) FROM sends x WHERE x.job_id = j.id) AS sends,
    (SELECT MAX(x.updated_at) FROM sends x WHERE x.job_id = j.id AND x.state = ?)
        AS delivered_at
FROM jobs j LEFT JOIN series s ON s.series_uid = j.series_uid
"""


class Overview(Protocol):
    """The console's read-only view of the node database (and its ``status`` counts)."""

    def status(self, now: float | None = None) -> dict[str, Any]: ...
    def recent_jobs(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def job_overview(self, job_id: int) -> dict[str, Any] | None: ...
    def job_input_files(self, job_id: int) -> dict[str, Path]: ...
    def running_jobs(self) -> list[dict[str, Any]]: ...
    def failed_sends(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def job_series_info(self, job_id: int) -> dict[str, Any]: ...


class SqlOverview(Store):
    """:class:`Overview`'s queries in the node's database (SQLite or PostgreSQL)."""

    def recent_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest ``limit`` jobs (newest first) with their timings (epoch seconds).

        Each row: ``id``, ``route``, ``state``, ``attempts``, ``error``, ``series_uid``,
        ``study_uid``, ``first_received_at`` (first instance of its inputs), ``created_at``
        (queued), ``updated_at`` (last change: done or failed), ``delivered_at`` (last send
        done), ``instances``, ``sends`` and ``sends_done``.
        """
        rows = self._query(
            _RECENT_JOBS + " ORDER BY j.id DESC LIMIT ?", (SendState.DONE, SendState.DONE, limit)
        )
        return [dict(r) for r in rows]

    def job_overview(self, job_id: int) -> dict[str, Any] | None:
        """One job as :meth:`recent_jobs` gives it, with its ``inputs`` (role -> series) and
        ``outputs`` (its sends: destination, state, attempts, last error); None: no such job."""
        rows = self._query(
            _RECENT_JOBS + " WHERE j.id = ?", (SendState.DONE, SendState.DONE, job_id)
        )
        if not rows:
            return None
        job = dict(rows[0])
        job["inputs"] = {
            r["role"]: r["series_uid"]
            for r in self._query(
                "SELECT role, series_uid FROM case_inputs WHERE job_id = ? ORDER BY position",
                (job_id,),
            )
        }
        job["outputs"] = [
            dict(r)
            for r in self._query(
                "SELECT id, destination, sop_instance_uid, state, attempts, last_error, "
                "updated_at FROM sends WHERE job_id = ? ORDER BY id",
                (job_id,),
            )
        ]
        return job

    def job_input_files(self, job_id: int) -> dict[str, Path]:
        """SOP Instance UID -> spool file of every instance of the job's input series."""
        rows = self._query(
            "SELECT i.sop_instance_uid, i.path FROM case_inputs ci JOIN instances i "
            "ON i.series_uid = ci.series_uid WHERE ci.job_id = ?",
            (job_id,),
        )
        return {r["sop_instance_uid"]: Path(r["path"]) for r in rows}

    def running_jobs(self) -> list[dict[str, Any]]:
        """Jobs a worker holds now: id, route, owner (``host:pid:thread``), lease end."""
        rows = self._query(
            "SELECT id, route, owner, lease_until, updated_at FROM jobs WHERE state = ? "
            "ORDER BY id",
            (JobState.RUNNING,),
        )
        return [dict(r) for r in rows]

    def failed_sends(self, limit: int = 50) -> list[dict[str, Any]]:
        """Dead-lettered sends, newest first: id, job, destination, attempts, reason."""
        rows = self._query(
            "SELECT id, job_id, destination, attempts, last_error, updated_at FROM sends "
            "WHERE state = ? ORDER BY updated_at DESC, id DESC LIMIT ?",
            (SendState.FAILED, limit),
        )
        return [dict(r) for r in rows]
