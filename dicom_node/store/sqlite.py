"""SQLite, the embedded default: one connection that the stores share (WAL, synchronous=FULL,
one lock; the receiver's index commits with ``synchronous=NORMAL``, see ``tx``).

Every state change is one transaction (``BEGIN IMMEDIATE``, so it is the only writer from its
start: a read-then-write needs no row locks, and ``FOR UPDATE`` is left out). A node killed at
any instant restarts into a consistent state. Opening migrates the schema
(:mod:`dicom_node.store.schema`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicom_node.store.schema import migrate


class SqliteConnection:
    """The SQLite backend of :class:`~dicom_node.store.connection.Store`."""

    backend = "sqlite"
    for_update = ""
    skip_locked = ""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.location = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self.migrated = migrate(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; ``durable=False`` commits without flushing the WAL (it is flushed
        with the next durable commit, a checkpoint, or the receive journal's ``syncfs``)."""
        with self._lock:
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))
