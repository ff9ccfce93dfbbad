"""The instance index: every received instance and its spool file (table ``instances``).

:class:`InstanceIndex` is what the receiver needs; :class:`SqlInstanceIndex` keeps the index
in the node's database (SQLite or PostgreSQL, :mod:`dicom_node.store.connection`).
Indexing an instance notes its arrival for assembly
(:func:`dicom_node.store.series.note_arrival`) in the same transaction, so the index and the
assembly state never disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.store.connection import Store
from dicom_node.store.series import note_arrival, series_purged


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: Path


@dataclass(frozen=True)
class IndexedInstance:
    """Who sent an indexed instance, and when (``time.time()``)."""

    association_id: str
    received_at: float


class InstanceIndex(Protocol):
    """The receiver's view of the state: what is on disk, by series, and which association
    sent it (:meth:`~dicom_node.store.series.SqlSeriesStore.association_released`)."""

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
        durable: bool = True,
    ) -> bool: ...
    def indexed_instance(self, sop_instance_uid: str) -> IndexedInstance | None: ...
    def association_released(self, association_id: str, now: float | None = None) -> int: ...
    def series_instances(self, series_uid: str) -> list[InstanceRecord]: ...
    def forget_instances(self, series_uid: str) -> list[InstanceRecord]: ...


class SqlInstanceIndex(Store):
    """:class:`InstanceIndex` in the node's database."""

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
        durable: bool = True,
    ) -> bool:
        """Index a durably written instance and mark its series as receiving.

        ``durable=False``: the commit need not be flushed now (SQLite; see
        :meth:`~dicom_node.store.connection.Store._tx`): the receiver holds the instance's
        durable record in its journal until the file system is flushed.

        Returns True when the instance is new, False when it replaced an earlier copy (a resend
        of the same SOP Instance UID). See :func:`~dicom_node.store.series.note_arrival` for
        what it does to the series, its pending jobs and the study's cases.
        """
        now = time.time() if now is None else now
        with self._tx(durable) as c:
            existed = c.execute(
                "SELECT 1 AS one FROM instances WHERE sop_instance_uid = ?" + self._for_update,
                (sop_instance_uid,),
            ).fetchone()
            c.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, "
                "path, received_at, association_id) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                "sop_class_uid = excluded.sop_class_uid, study_uid = excluded.study_uid, "
                "series_uid = excluded.series_uid, path = excluded.path, "
                "received_at = excluded.received_at, association_id = excluded.association_id",
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
            note_arrival(
                c,
                series_uid=series_uid,
                study_uid=study_uid,
                patient_id=patient_id,
                attributes=attributes,
                association_id=association_id,
                late_policy=late_policy,
                now=now,
                for_update=self._for_update,
            )
        return existed is None

    def indexed_instance(self, sop_instance_uid: str) -> IndexedInstance | None:
        """The index entry of ``sop_instance_uid``: which association sent it, and when."""
        rows = self._query(
            "SELECT association_id, received_at FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        if not rows:
            return None
        return IndexedInstance(str(rows[0]["association_id"]), float(rows[0]["received_at"]))

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

    def forget_instances(self, series_uid: str) -> list[InstanceRecord]:
        """Remove a series' instances from the index and return them (files go next)."""
        with self._tx() as c:
            rows = c.execute(
                "SELECT sop_instance_uid, study_uid, series_uid, path FROM instances "
                "WHERE series_uid = ?",
                (series_uid,),
            ).fetchall()
            c.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            series_purged(c, series_uid)
        return [
            InstanceRecord(r["sop_instance_uid"], r["study_uid"], r["series_uid"], Path(r["path"]))
            for r in rows
        ]
