"""What the console shows beside the database rows: the audit chain's state and the model
packages, each read through a small seam the node hands in."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.audit.chain import HEAD
from dicom_node.audit.database_chain import ChainDatabase
from dicom_node.audit.keys import load_key
from dicom_node.audit.verify import Report, verify, verify_database

__all__ = ["ChainCheck", "ChainState", "PackageInfo"]


@dataclass(frozen=True)
class PackageInfo:
    """A model package a route runs: what the console lists under "Model packages"."""

    route: str
    name: str
    version: str
    dims: int
    structures: tuple[str, ...]
    path: Path


@dataclass(frozen=True)
class ChainState:
    """The audit chain as ``audit verify`` saw it at ``checked_at`` (epoch seconds)."""

    ok: bool
    records: int
    #: Every record up to this sequence number passed every check.
    verified_up_to: int
    head_seq: int | None
    problems: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())
    checked_at: float = 0.0


def state_of(report: Report, head: tuple[int, str] | None, now: float) -> ChainState:
    """The :class:`ChainState` of one ``audit verify`` report."""
    head_seq = head[0] if head is not None else None
    bad = [p.seq for p in report.problems if p.seq is not None]
    if report.ok:
        up_to = head_seq if head_seq is not None else report.records
    else:
        up_to = max(0, min(bad) - 1) if bad else 0
    return ChainState(
        ok=report.ok,
        records=report.records,
        verified_up_to=up_to,
        head_seq=head_seq,
        problems=tuple(str(p) for p in report.problems[:10]),
        notes=tuple(report.notes),
        checked_at=now,
    )


class ChainCheck:
    """Runs ``audit verify``'s checks on the node's chain, at most every ``max_age_s``.

    Parameters
    ----------
    db
        The node database (its ``audit_head``; the chain itself with PostgreSQL).
    key_file
        The chain's HMAC key.
    audit_path
        The file chain (SQLite), or None for the database chain (PostgreSQL).
    """

    def __init__(
        self,
        db: ChainDatabase,
        key_file: Path,
        audit_path: Path | None,
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.key_file = key_file
        self.audit_path = audit_path
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: ChainState | None = None

    def state(self) -> ChainState:
        with self._lock:
            now = self._clock()
            if self._state is None or now - self._state.checked_at >= self.max_age_s:
                self._state = self._check(now)
            return self._state

    def _check(self, now: float) -> ChainState:
        key = load_key(self.key_file, create=False)
        head = self.db.audit_mark(HEAD)
        if self.audit_path is None:
            report = verify_database(self.db, key)
        else:
            report = verify(self.audit_path, key, head, check_head=True)
        return state_of(report, head, now)
