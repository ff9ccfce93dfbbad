"""Study-level cases: one per study and study-level route, and which series fed which job.

Tables ``cases`` (one per study and study-level route: waiting, queued or failed) and
``case_inputs`` (which series filled which role of a job; a series-level job has the one
role ``image``).

:class:`CaseStore` is what the assembler needs (series and cases); :class:`SqlCaseStore`
keeps the cases in the node's database (SQLite or PostgreSQL,
:mod:`dicom_node.store.connection`), :class:`~dicom_node.store.series.SqlSeriesStore` the
series. On PostgreSQL every transaction that reads a row and then changes it depending on
what it read locks the row with ``FOR UPDATE``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dicom_node.store.connection import Store
from dicom_node.store.series import SeriesSummary
from dicom_node.store.states import CaseState, JobState

__all__ = ["Case", "CaseState", "CaseStore", "SqlCaseStore"]


@dataclass(frozen=True)
class Case:
    id: int
    study_uid: str
    route: str
    state: CaseState
    waiting_since: float


class CaseStore(Protocol):
    """The assembler's view of the state: complete series, their jobs, study-level cases."""

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
    def series_info(self, series_uid: str) -> dict[str, Any] | None: ...
    def open_case(self, study_uid: str, route: str, now: float | None = None) -> None: ...
    def waiting_cases(self) -> list[Case]: ...
    def study_series(self, study_uid: str) -> list[SeriesSummary]: ...
    def queue_case(
        self, case_id: int, inputs: Mapping[str, str], reference: str, now: float | None = None
    ) -> int | None: ...
    def settle_case(self, case_id: int, now: float | None = None) -> bool: ...
    def last_run(self, case_id: int) -> tuple[dict[str, str], float] | None: ...
    def fail_case(self, case_id: int, reason: str, now: float | None = None) -> bool: ...


class SqlCaseStore(Store):
    """The cases of :class:`CaseStore` in the node's database, and the inputs of each job."""

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
            return bool(cur.rowcount == 1)

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
            return bool(cur.rowcount == 1)

    def cases(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM cases ORDER BY id")]

    def job_inputs(self, job_id: int) -> dict[str, str]:
        rows = self._query(
            "SELECT role, series_uid FROM case_inputs WHERE job_id = ? ORDER BY position, role",
            (job_id,),
        )
        return {r["role"]: r["series_uid"] for r in rows}
