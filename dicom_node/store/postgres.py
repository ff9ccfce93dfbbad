"""PostgreSQL, for several node processes or hosts on one state: a pool of connections.

Chosen by ``database: postgresql://...`` in the config. The stores' SQL is the same as on
SQLite; here ``?`` placeholders become psycopg's ``%s`` (a literal ``%`` is doubled first),
rows are dicts, and each transaction runs at READ COMMITTED on one pooled connection (a
read-then-write locks what it reads with ``FOR UPDATE``; claims use ``FOR UPDATE SKIP
LOCKED``, so two workers never get the same job and never wait for each other). Opening
migrates the schema under an advisory lock (:func:`dicom_node.store.schema.migrate_postgres`),
so two processes that start together do not both migrate.

The URL's password, when it has one, never appears in logs or errors
(:attr:`PostgresConnection.location`); keep it out of the URL with libpq's ``~/.pgpass``,
``PGPASSFILE`` or ``PGPASSWORD``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from dicom_node.common.errors import DicomNodeError
from dicom_node.config.checks import redact_url
from dicom_node.store.schema import migrate_postgres

#: Seconds to wait for the server (first connection; and, times 3, for a free pooled one
#: unless the node's ``limits.database_timeout_s`` says otherwise).
CONNECT_TIMEOUT_S = 10
#: Connections one process keeps at most (receiver threads, workers, senders, scheduler).
POOL_SIZE = 12


@functools.lru_cache(maxsize=1024)
def to_psycopg(sql: str) -> str:
    """``sql`` with ``?`` placeholders in psycopg's ``%s`` style (literal ``%`` doubled).

    Every ``?`` is a placeholder: the stores' SQL has none inside its string literals (values
    always travel as parameters).
    """
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresTransaction:
    """One open transaction on a pooled connection (``?`` placeholders, dict rows)."""

    def __init__(self, conn: psycopg.Connection[DictRow]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = (), /) -> psycopg.Cursor[DictRow]:
        return self._conn.execute(to_psycopg(sql), tuple(params))


class PostgresConnection:
    """The PostgreSQL backend of :class:`~dicom_node.store.connection.Store`."""

    backend = "postgresql"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self, url: str, pool_size: int = POOL_SIZE, timeout_s: float | None = None
    ) -> None:
        """Connect (and migrate) at once; then a pool of at most ``pool_size`` connections.

        ``timeout_s`` bounds each wait for a pooled connection (default 3 x
        :data:`CONNECT_TIMEOUT_S`): with the server down, a transaction fails after it.
        """
        self.location = redact_url(url)
        try:
            with psycopg.connect(
                url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="dicom-node",
            ) as conn:
                self.migrated = migrate_postgres(conn)
        except psycopg.OperationalError as exc:
            raise DicomNodeError(
                f"database {self.location}: cannot connect ({_first_line(exc)}); check that "
                "PostgreSQL runs there, the database and role exist, and the password is in "
                "~/.pgpass or PGPASSWORD"
            ) from None
        self._pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": "dicom-node"},
            timeout=CONNECT_TIMEOUT_S * 3 if timeout_s is None else timeout_s,
            # A pooled connection is checked as it is handed out, so after a restart of the
            # server the next transaction gets a new one instead of failing on the old.
            check=ConnectionPool.check_connection,
            open=True,
            name="dicom-node",
        )

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def tx(self, durable: bool = True) -> Iterator[PostgresTransaction]:
        # Always a synchronous commit: the server (and its disk) is not this host's, and the
        # receive journal of this host is replayed only when this node restarts.
        with self._connection() as conn, conn.transaction():
            yield PostgresTransaction(conn)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[DictRow]:
        with self._connection() as conn:
            return conn.execute(to_psycopg(sql), tuple(params)).fetchall()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[DictRow]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise DicomNodeError(
                f"database {self.location}: no connection within {self._pool.timeout:g} s "
                "(the server is down or out of connections)"
            ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
