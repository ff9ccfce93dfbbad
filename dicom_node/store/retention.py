"""What retention may purge: series whose work is over, by policy.

:class:`RetentionStore` is what retention needs: the queries below, the series row (for the
audit trail), and the index's :meth:`~dicom_node.store.instances.SqlInstanceIndex.forget_instances`.
A series counts with every job it fed (as any role, through ``case_inputs``), and never
while a job for it may still run, a result still waits to be sent, or a case of its study
waits to run (again).
"""

from __future__ import annotations

from typing import Any, Protocol

from dicom_node.store.connection import Store
from dicom_node.store.instances import InstanceRecord
from dicom_node.store.sends import SendState
from dicom_node.store.states import CaseState, JobState, SeriesState

__all__ = ["RetentionStore", "SqlRetentionQueries"]


class RetentionStore(Protocol):
    """Retention's view of the state: series due for purging, their jobs and instances."""

    def finished_series(self) -> list[str]: ...
    def series_older_than(self, cutoff: float) -> list[str]: ...
    def series_job_ids(self, series_uid: str) -> list[int]: ...
    def series_info(self, series_uid: str) -> dict[str, Any] | None: ...
    def forget_instances(self, series_uid: str) -> list[InstanceRecord]: ...


# Jobs that use a series s (as any role): the series-level job of s and every case run it fed.
_USES = "SELECT ci.job_id FROM case_inputs ci WHERE ci.series_uid = s.series_uid"


class SqlRetentionQueries(Store):
    """The queries of :class:`RetentionStore` in the node's database."""

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
