"""The node's state in one database, SQLite (the embedded default) or PostgreSQL, split by
stage.

- :mod:`dicom_node.store.instances`: the instance index (:class:`InstanceIndex`, the
  receiver's view).
- :mod:`dicom_node.store.series`: assembly state of each series (note of each arrival,
  complete series, a study's series).
- :mod:`dicom_node.store.cases`: study-level cases and the inputs of each job
  (:class:`CaseStore`, the assembler's view, with the series).
- :mod:`dicom_node.store.jobs`: the job queue with owned leases (:class:`JobQueue`, the
  workers' view).
- :mod:`dicom_node.store.sends`: the send queue with persisted retries and leased claims
  (:class:`SendStore`, delivery's view).
- :mod:`dicom_node.store.retention`: what retention may purge (:class:`RetentionStore`).
- :mod:`dicom_node.store.status`: counts for ``status`` and the metrics.
- :mod:`dicom_node.store.states`: the states of series, cases and jobs.
- :mod:`dicom_node.store.schema`: the schema version and migrations, on both backends.
- :mod:`dicom_node.store.connection`: the connection base the stores' SQL runs on;
  :mod:`dicom_node.store.sqlite` and :mod:`dicom_node.store.postgres` are its backends.

:class:`Database` implements them all on one backend, plus the audit trail's anchors
(``audit_head``). ``Database(path)`` opens SQLite, ``Database(url)`` PostgreSQL;
:func:`open_database` takes the PostgreSQL URL when there is one, else the SQLite file. Each
stage is typed against the Protocol it uses.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.store.cases import Case, CaseState, CaseStore, SqlCaseStore
from dicom_node.store.instances import InstanceIndex, InstanceRecord, SqlInstanceIndex
from dicom_node.store.jobs import Job, JobQueue, SqlJobStore
from dicom_node.store.overview import SqlOverview
from dicom_node.store.retention import RetentionStore, SqlRetentionQueries
from dicom_node.store.sends import Send, SendState, SendStore, SqlSendStore
from dicom_node.store.series import SeriesSummary, SqlSeriesStore
from dicom_node.store.states import JobState, SeriesState
from dicom_node.store.status import SqlStatus

__all__ = [
    "Case",
    "CaseState",
    "CaseStore",
    "Database",
    "InstanceIndex",
    "InstanceRecord",
    "Job",
    "JobQueue",
    "JobState",
    "RetentionStore",
    "Send",
    "SendState",
    "SendStore",
    "SeriesState",
    "SeriesSummary",
    "open_database",
]


def open_database(url: str | None, sqlite_path: Path, timeout_s: float | None = None) -> Database:
    """The node's database, opened and migrated: PostgreSQL at ``url`` (the ``database:``
    setting) when it is set, else SQLite at ``sqlite_path``
    (:attr:`~dicom_node.store.files.StorageLayout.database_path`). ``timeout_s``
    (``limits.database_timeout_s``): how long a PostgreSQL transaction waits for a
    connection."""
    return Database(url or sqlite_path, timeout_s)


class Database(
    SqlInstanceIndex,
    SqlSeriesStore,
    SqlCaseStore,
    SqlJobStore,
    SqlSendStore,
    SqlRetentionQueries,
    SqlStatus,
    SqlOverview,
):
    """Thread-safe access to the node database (``backend``: ``sqlite`` or ``postgresql``).

    SQLite: one connection guarded by a lock. PostgreSQL: a pool of connections, one per
    transaction.
    """

    # -- audit anchors (dicom_node.audit.log) ---------------------------------------------------

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
