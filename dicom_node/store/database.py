"""The node's state in one database, SQLite (the embedded default) or PostgreSQL, split by
stage.

- :mod:`dicom_node.store.instances`: the instance index (:class:`InstanceIndex`).
- :mod:`dicom_node.store.cases`: assembly of series and study-level cases, and the job queue
  with owned leases (:class:`CaseStore`).
- :mod:`dicom_node.store.sends`: the send queue with persisted retries and leased claims
  (:class:`SendStore`).
- :mod:`dicom_node.store.schema`: the schema version and migrations, on both backends.
- :mod:`dicom_node.store.connection`: the connection base the stores' SQL runs on;
  :mod:`dicom_node.store.sqlite` and :mod:`dicom_node.store.postgres` are its backends.

:class:`Database` implements all three on one backend, plus the audit trail's anchors
(``audit_head``) and ``status``. ``Database(path)`` opens SQLite, ``Database(url)``
PostgreSQL; :func:`open_database` takes the one the settings name (``database:``). Stages may
be typed against the Protocol they use.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dicom_node.store.cases import (
    Case,
    CaseState,
    CaseStore,
    Job,
    JobState,
    SeriesState,
    SqlCaseStore,
)
from dicom_node.store.instances import InstanceIndex, InstanceRecord, SqlInstanceIndex
from dicom_node.store.sends import Send, SendState, SendStore, SqlSendStore

if TYPE_CHECKING:
    from dicom_node.config.settings import Settings

__all__ = [
    "Case",
    "CaseState",
    "CaseStore",
    "Database",
    "InstanceIndex",
    "InstanceRecord",
    "Job",
    "JobState",
    "Send",
    "SendState",
    "SendStore",
    "SeriesState",
    "open_database",
]


def open_database(settings: Settings) -> Database:
    """The node's database: PostgreSQL at ``settings.database`` when set, else SQLite at
    ``<storage_dir>/node.sqlite3``; opened and migrated."""
    return Database(settings.database or settings.database_path)


class Database(SqlInstanceIndex, SqlCaseStore, SqlSendStore):
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

    # -- status ----------------------------------------------------------------------------

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Counts per state, failed jobs and cases, sends per destination: ``status``.

        Per destination: counts of its sends by state, ``next_attempt_at`` (epoch seconds)
        and ``next_attempt_in_s`` of its earliest pending send, and ``last_error`` (with
        ``last_error_at``) of the most recently failed send not yet delivered.
        """
        now = time.time() if now is None else now
        return {
            "instances": self.instance_count(),
            **self.case_status(),
            **self.send_status(now),
        }
