"""The node's state in one embedded SQLite database, split by stage.

- :mod:`dicom_node.store.instances`: the instance index (:class:`InstanceIndex`).
- :mod:`dicom_node.store.cases`: assembly of series and study-level cases, and the job queue
  with owned leases (:class:`CaseStore`).
- :mod:`dicom_node.store.sends`: the send queue with persisted retries (:class:`SendStore`).
- :mod:`dicom_node.store.schema`: the schema version (``PRAGMA user_version``) and migrations.

:class:`Database` is the one SQLite implementation of all three, sharing one connection and
one lock (WAL, synchronous=FULL), plus the audit trail's anchors (``audit_head``) and
``status``. Stages may be typed against the Protocol they use, so another backend can take
one stage's place later without touching the others.
"""

from __future__ import annotations

import time
from typing import Any

from dicom_node.store.cases import (
    Case,
    CaseState,
    CaseStore,
    Job,
    JobState,
    SeriesState,
    SqliteCaseStore,
)
from dicom_node.store.instances import InstanceIndex, InstanceRecord, SqliteInstanceIndex
from dicom_node.store.sends import Send, SendState, SendStore, SqliteSendStore

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
]


class Database(SqliteInstanceIndex, SqliteCaseStore, SqliteSendStore):
    """Thread-safe access to the node database (one connection guarded by a lock)."""

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
