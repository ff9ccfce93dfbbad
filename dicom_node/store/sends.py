"""The send queue: one row per (job, destination, output), with persisted retries.

:class:`SendStore` is what delivery needs; :class:`SqlSendStore` keeps it in the node's
database (SQLite or PostgreSQL). Sends are queued by :func:`queue_sends` inside the
transaction that marks their job done (:meth:`dicom_node.store.jobs.SqlJobStore.finish_job`).

A sender claims the sends it is about to send (:meth:`SqlSendStore.claim_sends`): they are
leased to it (``owner``, ``lease_until``) as a job is to a worker, so two sender processes
never send the same row at once; the lease ends with the outcome (``send_done``,
``send_failed``, which only the owner may record) or runs out, and then any sender may take
the send again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dicom_node.store.connection import Store, Transaction


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
    """Delivery's view of the state: due sends, their outcomes, catching up, dead letters,
    and the series of a send's job (for the audit trail)."""

    def due_sends(
        self, now: float | None = None, limit: int = 64, destination: str | None = None
    ) -> list[Send]: ...
    def claim_sends(
        self, destination: str, owner: str, lease_s: float, limit: int, now: float | None = None
    ) -> list[Send]: ...
    def send_done(
        self, send_id: int, now: float | None = None, *, owner: str | None = None
    ) -> bool: ...
    def send_failed(
        self,
        send_id: int,
        error: str,
        *,
        next_attempt_at: float | None,
        now: float | None = None,
        owner: str | None = None,
    ) -> SendState | None: ...
    def retry_failed_sends(self, destination: str | None = None) -> int: ...
    def dead_letter_unconfigured(
        self, configured: Collection[str], now: float | None = None
    ) -> int: ...
    def waiting_destinations(self, now: float | None = None) -> dict[str, float]: ...
    def sends_due_now(self, destination: str | None = None, now: float | None = None) -> int: ...
    def job_series_info(self, job_id: int) -> dict[str, Any]: ...


def queue_sends(
    c: Transaction,
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
                "INSERT INTO sends (job_id, destination, path, sop_instance_uid, state, "
                "next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id, destination, sop_instance_uid) DO NOTHING",
                (job_id, dest, str(path), sop_uid, SendState.PENDING, now, now),
            )


_SEND_COLUMNS = "id, job_id, destination, path, sop_instance_uid, attempts"


def _send(r: Any) -> Send:
    return Send(
        r["id"],
        r["job_id"],
        r["destination"],
        Path(r["path"]),
        r["sop_instance_uid"],
        r["attempts"],
    )


class SqlSendStore(Store):
    """:class:`SendStore` in the node's database (table ``sends``)."""

    def due_sends(
        self, now: float | None = None, limit: int = 64, destination: str | None = None
    ) -> list[Send]:
        """Pending sends whose next attempt is due, of ``destination`` (None: any)."""
        now = time.time() if now is None else now
        where = "" if destination is None else " AND destination = ?"
        rows = self._query(
            f"SELECT {_SEND_COLUMNS} FROM sends "
            f"WHERE state = ? AND next_attempt_at <= ?{where} ORDER BY destination, id LIMIT ?",
            (SendState.PENDING, now, *(() if destination is None else (destination,)), limit),
        )
        return [_send(r) for r in rows]

    def claim_sends(
        self, destination: str, owner: str, lease_s: float, limit: int, now: float | None = None
    ) -> list[Send]:
        """Lease up to ``limit`` due sends of ``destination`` to ``owner`` for ``lease_s``.

        Due: pending, next attempt reached, and not leased (or the lease ran out). Oldest
        first. On PostgreSQL sends that another sender's claim holds at this moment are passed
        over (``SKIP LOCKED``). The outcome is recorded with ``owner``
        (:meth:`send_done`, :meth:`send_failed`).
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            rows = c.execute(
                f"SELECT {_SEND_COLUMNS} FROM sends WHERE state = ? AND destination = ? "
                "AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?) "
                "ORDER BY id LIMIT ?" + self._skip_locked,
                (SendState.PENDING, destination, now, now, limit),
            ).fetchall()
            for r in rows:
                c.execute(
                    "UPDATE sends SET owner = ?, lease_until = ? WHERE id = ?",
                    (owner, now + lease_s, r["id"]),
                )
        return [_send(r) for r in rows]

    def send_done(
        self, send_id: int, now: float | None = None, *, owner: str | None = None
    ) -> bool:
        """Record a delivered send; with ``owner``, only while it holds the send's lease.

        Returns False (and changes nothing) when ``owner`` lost the lease.
        """
        now = time.time() if now is None else now
        mine, params = _owned_by(owner)
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, updated_at = ?, "
                f"last_error = NULL, owner = NULL, lease_until = NULL WHERE id = ?{mine}",
                (SendState.DONE, now, send_id, *params),
            )
            return bool(cur.rowcount == 1)

    def send_failed(
        self,
        send_id: int,
        error: str,
        *,
        next_attempt_at: float | None,
        now: float | None = None,
        owner: str | None = None,
    ) -> SendState | None:
        """Record a failed attempt; ``next_attempt_at`` None means give up (dead letter).

        Returns the send's new state, or None (and changes nothing) when ``owner`` was given
        and no longer holds the send's lease.
        """
        now = time.time() if now is None else now
        state = SendState.FAILED if next_attempt_at is None else SendState.PENDING
        mine, params = _owned_by(owner)
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sends SET state = ?, attempts = attempts + 1, next_attempt_at = ?, "
                "updated_at = ?, last_error = ?, owner = NULL, lease_until = NULL "
                f"WHERE id = ?{mine}",
                (state, next_attempt_at or now, now, error[:500], send_id, *params),
            )
            if cur.rowcount != 1 and owner is not None:
                return None
        return state

    def dead_letter_unconfigured(
        self, configured: Collection[str], now: float | None = None
    ) -> int:
        """Dead-letter the pending sends whose destination is not in ``configured``; how many.

        Even those waiting for their backoff (no thread of this process would ever serve
        them), but not those another sender holds a live lease on: on PostgreSQL a process
        whose config has that destination may be sending them right now.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            names = [
                r["destination"]
                for r in c.execute(
                    "SELECT DISTINCT destination FROM sends WHERE state = ?", (SendState.PENDING,)
                ).fetchall()
                if r["destination"] not in configured
            ]
            dropped = 0
            for name in sorted(names):
                dropped += c.execute(
                    "UPDATE sends SET state = ?, attempts = attempts + 1, updated_at = ?, "
                    "last_error = ?, owner = NULL, lease_until = NULL WHERE state = ? "
                    "AND destination = ? AND (lease_until IS NULL OR lease_until < ?)",
                    (
                        SendState.FAILED,
                        now,
                        f"destination {name!r} is not configured",
                        SendState.PENDING,
                        name,
                        now,
                    ),
                ).rowcount
        return dropped

    def retry_failed_sends(self, destination: str | None = None) -> int:
        """Put dead-lettered sends back in the queue (``dicom-node retry``)."""
        with self._tx() as c:
            sql = (
                "UPDATE sends SET state = ?, attempts = 0, next_attempt_at = 0, owner = NULL, "
                "lease_until = NULL WHERE state = ?"
            )
            params: tuple[Any, ...] = (SendState.PENDING, SendState.FAILED)
            if destination is not None:
                sql += " AND destination = ?"
                params += (destination,)
            return int(c.execute(sql, params).rowcount)

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
            return int(c.execute(sql, params).rowcount)

    def sends(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM sends ORDER BY id")]


def _owned_by(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The extra ``WHERE`` of an outcome that only ``owner``'s lease may record."""
    if owner is None:
        return "", ()
    return " AND owner = ? AND state = ?", (owner, SendState.PENDING)
