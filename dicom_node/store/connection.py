"""What the stores' SQL runs on: one connection base, SQLite or PostgreSQL behind it.

The stores (:mod:`~dicom_node.store.instances`, :mod:`~dicom_node.store.cases`,
:mod:`~dicom_node.store.sends` and :class:`~dicom_node.store.database.Database`) write their
SQL once, with ``?`` placeholders, and run it through :class:`Store`:

- ``self._tx()``: one transaction (a context manager yielding a :class:`Transaction` whose
  ``execute(sql, params)`` returns a cursor with ``fetchone()``, ``fetchall()`` and
  ``rowcount``; rows are addressed by column name). It commits when the block ends and rolls
  back when it raises.
- ``self._query(sql, params)``: one read outside a transaction; a list of rows.
- ``self._for_update`` / ``self._skip_locked``: appended to a ``SELECT`` that reads what the
  transaction then changes: ``" FOR UPDATE"`` / ``" FOR UPDATE SKIP LOCKED"`` on PostgreSQL
  (READ COMMITTED: the row stays as read until the commit; a claim passes over rows another
  transaction holds instead of waiting for them), ``""`` on SQLite, where ``BEGIN IMMEDIATE``
  makes every transaction the only writer.

The backend is chosen by what the store is opened on: a path is SQLite
(:class:`~dicom_node.store.sqlite.SqliteConnection`), a ``postgresql://`` URL is PostgreSQL
(:class:`~dicom_node.store.postgres.PostgresConnection`). Portable SQL: new ids with
``RETURNING id``, upserts with ``ON CONFLICT``, no ``rowid``, no SQLite bare columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

#: URL schemes of a PostgreSQL database (``database:`` in the config).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Transaction(Protocol):
    """An open transaction: ``execute(sql, params)`` with ``?`` placeholders; a cursor."""

    def execute(self, sql: str, params: Any = (), /) -> Any: ...


class Connection(Protocol):
    """One backend: what :class:`Store` delegates to."""

    #: ``"sqlite"`` or ``"postgresql"``.
    backend: str
    for_update: str
    skip_locked: str
    #: Schema versions applied when it was opened (empty when it was current).
    migrated: list[int]
    #: Where the database is, safe to log (a URL without its password).
    location: str

    def tx(self, durable: bool = True) -> AbstractContextManager[Transaction]: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...
    def close(self) -> None: ...


def connect(where: Path | str, timeout_s: float | None = None) -> Connection:
    """Open (and migrate) the database at ``where``: a path (SQLite) or a PostgreSQL URL.

    ``timeout_s``: PostgreSQL only, how long a transaction waits for a connection
    (``limits.database_timeout_s``; default that of
    :class:`~dicom_node.store.postgres.PostgresConnection`).
    """
    if isinstance(where, str) and where.startswith(POSTGRES_SCHEMES):
        from dicom_node.store.postgres import PostgresConnection

        return PostgresConnection(where, timeout_s=timeout_s)
    from dicom_node.store.sqlite import SqliteConnection

    return SqliteConnection(Path(where))


class Store:
    """Base of the stores: the backend's connection and the transaction helpers."""

    def __init__(self, where: Path | str, timeout_s: float | None = None) -> None:
        self._connection = connect(where, timeout_s)
        self.backend = self._connection.backend
        self._for_update = self._connection.for_update
        self._skip_locked = self._connection.skip_locked
        self.migrated = self._connection.migrated
        self.location = self._connection.location

    def close(self) -> None:
        self._connection.close()

    def _tx(self, durable: bool = True) -> AbstractContextManager[Transaction]:
        """One transaction; ``durable=False``: its commit need not be flushed to disk at once
        (SQLite ``synchronous=NORMAL``: kept by a killed process, lost only by a crash of the
        machine) because the caller holds a durable record of it elsewhere (the receive
        journal, :mod:`dicom_node.store.journal`). PostgreSQL commits stay synchronous."""
        return self._connection.tx(durable)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._connection.query(sql, params)
