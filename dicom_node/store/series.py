"""Assembly state: each series, its routing attributes, and when its sending is over.

Table ``series`` (assembly state of each series, with its routing attributes). Indexing an
instance notes its arrival here (:func:`note_arrival`, inside the index's transaction); the
assembler reads which series are complete (:meth:`SqlSeriesStore.complete_series`), queues
their series-level jobs (:meth:`SqlSeriesStore.queue_series`, one transaction with the jobs
and their ``case_inputs``) and reads a study's series for its cases
(:meth:`SqlSeriesStore.study_series`). On PostgreSQL every transaction that reads a row and
then changes it depending on what it read locks the row with ``FOR UPDATE``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicom_node.store.connection import Store, Transaction
from dicom_node.store.states import CaseState, JobState, SeriesState

__all__ = [
    "SeriesState",
    "SeriesSummary",
    "SqlSeriesStore",
    "merge_attributes",
    "note_arrival",
    "series_purged",
]


@dataclass(frozen=True)
class SeriesSummary:
    """What role selection looks at for one series of a study."""

    series_uid: str
    state: SeriesState
    attributes: dict[str, str]
    instances: int
    last_received_at: float


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


class SqlSeriesStore(Store):
    """The series part of :class:`~dicom_node.store.cases.CaseStore` in the node's database."""

    def association_released(self, association_id: str, now: float | None = None) -> int:
        """Note that ``association_id`` ended; return how many receiving series it touched."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE series SET released_at = ? WHERE last_association = ? AND state = ?",
                (now, association_id, SeriesState.RECEIVING),
            )
            return int(cur.rowcount)

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

    def series_info(self, series_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return dict(rows[0]) if rows else None
