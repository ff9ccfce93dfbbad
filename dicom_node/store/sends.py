"""The send queue: one row per (job, destination, output), with persisted retries.

:class:`SendStore` is what delivery needs; :class:`SqliteSendStore` keeps it in the node's
SQLite database. Sends are queued by :func:`queue_sends` inside the transaction that marks
their job done (:meth:`dicom_node.store.cases.SqliteCaseStore.finish_job`).
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dicom_node.store.sqlite import SqliteConnection


class SendState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Send:
    id: int
    job_id: int
    destination: str
    path: Path
    sop_instance_uid: str
    attempts: int


class SendStore(Protocol):
    """Delivery's view of the state: due sends, their outcomes, catching up, dead letters."""

    def due_sends(
        self, now: float | None = None, limit: int = 64, destination: str | None = None
    ) -> list[Send]: ...
    def send_done(self, send_id: int, now: float | None = None) -> None: ...
    def send_failed(
        self, send_id: int, error: str, *, next_attempt_at: float | None, now: float | None = None
    ) -> SendState: ...
    def retry_failed_sends(self, destination: str | None = None) -> int: ...
    def waiting_destinations(self, now: float | None = None) -> dict[str, float]: ...
    def sends_due_now(self, destination: str | None = None, now: float | None = None) -> int: ...


def queue_sends(
    c: sqlite3.Connection,
    job_id: int,
    outputs: Sequence[tuple[str, Path, str]],
    destinations: Mapping[str, Collection[str]],
    now: float,
) -> None:
    """Queue each ``(kind, path, sop_uid)`` for the destinations that take its kind (in ``c``'s
    open transaction)."""
    for kind, path, sop_uid in outputs:
        for dest, kinds in destinations.items():
            if kind not in kinds:
                continue
            c.execute(
                "INSERT OR IGNORE INTO sends (job_id, destination, path, "
                "sop_instance_uid, state, next_attempt_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, dest, str(path), sop_uid, SendState.PENDING, now, now),
            )


class SqliteSendStore(SqliteConnection):
    """:class:`SendStore` in the node's SQLite database (table ``sends``)."""

    def due_sends(
        self, now: float | None = None, limit: int = 64, destination: str | None = None
    ) -> list[Send]:
        """Pending sends whose next attempt is due, of ``destination`` (None: any)."""
        now = time.time() if now is None else now
        where = "" if destination is None else " AND destination = ?"
        rows = self._query(
            "SELECT id, job_id, destination, path, sop_instance_uid, attempts FROM sends "
            f"WHERE state = ? AND next_attempt_at <= ?{where} ORDER BY destination, id LIMIT ?",
            (SendState.PENDING, now, *(() if destination is None else (destination,)), limit),
        )
        return [
            Send(
                r["id"],
                r["job_id"],
                r["destination"],
                Path(r["path"]),
                r["sop_instance_uid"],
                r["attempts"],
            )
            for r in rows
        ]

    def send_done(self, send_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, updated_at = ?, "
                "last_error = NULL WHERE id = ?",
                (SendState.DONE, now, send_id),
            )

    def send_failed(
        self,
        send_id: int,
        error: str,
        *,
        next_attempt_at: float | None,
        now: float | None = None,
    ) -> SendState:
        """Record a failed attempt; ``next_attempt_at`` None means give up (dead letter)."""
        now = time.time() if now is None else now
        state = SendState.FAILED if next_attempt_at is None else SendState.PENDING
        with self._tx() as c:
            c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "updated_at = ?, last_error = ? WHERE id = ?",
                (state, next_attempt_at or now, now, error[:500], send_id),
            )
        return state

    def retry_failed_sends(self, destination: str | None = None) -> int:
        """Put dead-lettered sends back in the queue (``dicom-node retry``)."""
        with self._tx() as c:
            sql = "UPDATE sends SET state = ?, attempts = 0, next_attempt_at = 0 WHERE state = ?"
            params: tuple[Any, ...] = (SendState.PENDING, SendState.FAILED)
            if destination is not None:
                sql += " AND destination = ?"
                params += (destination,)
            return c.execute(sql, params).rowcount

    def waiting_destinations(self, now: float | None = None) -> dict[str, float]:
        """Destinations with sends waiting for their backoff: name -> earliest next attempt.

        Only pending sends not yet due count; these are the destinations worth a C-ECHO.
        """
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT destination, MIN(next_attempt_at) AS next_at FROM sends "
            "WHERE state = ? AND next_attempt_at > ? GROUP BY destination",
            (SendState.PENDING, now),
        )
        return {r["destination"]: float(r["next_at"]) for r in rows}

    def sends_due_now(self, destination: str | None = None, now: float | None = None) -> int:
        """Make pending sends that wait for their backoff due at once; return how many.

        Called when a destination answers again (a send or a C-ECHO to it succeeded) and by
        ``dicom-node retry --now``. Dead-lettered sends are left alone (see
        :meth:`retry_failed_sends`). ``destination`` None means every destination.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            sql = (
                "UPDATE sends SET next_attempt_at = ?, updated_at = ? "
                "WHERE state = ? AND next_attempt_at > ?"
            )
            params: tuple[Any, ...] = (now, now, SendState.PENDING, now)
            if destination is not None:
                sql += " AND destination = ?"
                params += (destination,)
            return c.execute(sql, params).rowcount

    def sends(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM sends ORDER BY id")]

    def send_status(self, now: float) -> dict[str, Any]:
        """Sends by state, and per destination: counts, next attempt, latest error."""
        counts = self._query("SELECT state, COUNT(*) AS n FROM sends GROUP BY state")
        per_dest = self._query(
            "SELECT destination, state, COUNT(*) AS n, MIN(next_attempt_at) AS next_at "
            "FROM sends GROUP BY destination, state"
        )
        destinations: dict[str, dict[str, Any]] = {}
        for r in per_dest:
            d = destinations.setdefault(r["destination"], {})
            d[r["state"]] = r["n"]
            if r["state"] == SendState.PENDING:
                d["next_attempt_at"] = float(r["next_at"])
                d["next_attempt_in_s"] = round(max(0.0, float(r["next_at"]) - now), 1)
        # The most recent error of sends not yet delivered (waiting or dead-lettered); SQLite
        # takes the bare column last_error from the row that has MAX(updated_at).
        errors = self._query(
            "SELECT destination, last_error, MAX(updated_at) AS at FROM sends "
            "WHERE state != ? AND last_error IS NOT NULL GROUP BY destination",
            (SendState.DONE,),
        )
        for r in errors:
            d = destinations.setdefault(r["destination"], {})
            d["last_error"] = r["last_error"]
            d["last_error_at"] = float(r["at"])
        return {"sends": {r["state"]: r["n"] for r in counts}, "destinations": destinations}
