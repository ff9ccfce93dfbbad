"""The audit chain in the node database: the table ``audit_records``, the head in ``audit_head``.

Each record is appended in one transaction that locks the head row, so several processes on
several hosts write one chain against one PostgreSQL database, with no gap and no fork. A
failed append leaves nothing of the record behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import structlog

from dicom_node.audit.chain import GENESIS, HEAD, HeadStore, seal
from dicom_node.audit.keys import key_id, load_key
from dicom_node.common.errors import AuditWriteError, StartupError

log = structlog.get_logger(__name__)

#: Name of the row of ``audit_head`` that identifies the key a database chain is written with.
KEY_ID = "key"
#: Records read from the database at a time (verify, export, syslog).
PAGE = 1000


class ChainDatabase(HeadStore, Protocol):
    """What :class:`DatabaseChain` needs of the node database (the store contract)."""

    _for_update: str

    def _tx(self) -> AbstractContextManager[Any]: ...

    def _query(self, sql: str, params: tuple[Any, ...] = ...) -> list[Any]: ...


def records_after(db: ChainDatabase, after: int, limit: int | None = None) -> list[tuple[int, str]]:
    """``(seq, record line)`` of the stored records above ``after``, in order, at most
    ``limit`` (default :data:`PAGE`)."""
    rows = db._query(
        "SELECT seq, record FROM audit_records WHERE seq > ? ORDER BY seq LIMIT ?",
        (after, limit or PAGE),
    )
    return [(int(row["seq"]), str(row["record"])) for row in rows]


def all_records(db: ChainDatabase, upto: int | None = None) -> Iterator[tuple[int, str]]:
    """Every stored record (``upto`` a sequence number, when given), page by page."""
    after = 0
    while True:
        page = records_after(db, after)
        for seq, line in page:
            if upto is not None and seq > upto:
                return
            yield seq, line
        if len(page) < PAGE:
            return
        after = page[-1][0]


def _connection_lost(exc: BaseException) -> bool:
    """The database connection broke (PostgreSQL restarted, a session was ended)."""
    if not type(exc).__module__.startswith("psycopg"):
        return False
    import psycopg

    return isinstance(exc, psycopg.OperationalError)


def _describe(exc: BaseException) -> str:
    """First line of a database error, without parameters (never the record itself)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class DatabaseChain:
    """The chain in the node database: table ``audit_records``, head in ``audit_head``.

    Each append is one transaction: lock the head row (``SELECT ... FOR UPDATE`` on
    PostgreSQL; SQLite's write transaction locks the whole database), seal the record after
    it, insert it and move the head. Appends of every process are so serialised on the head
    row: one chain, numbered 1, 2, 3, ... with no gap and no fork, and the head always matches
    the last record (they commit together).

    Every process that writes one chain needs the same key (``audit.key_file``, copied to every
    host). The key is named in ``audit_head`` (row ``key``: an HMAC of a fixed text, never the
    key), and a process with another key refuses to start.

    Parameters
    ----------
    db
        The node database (SQLite or PostgreSQL).
    key_file
        The HMAC key; created at first start when the chain is empty.

    Raises
    ------
    StartupError
        When the key file is missing although the chain holds records, or holds another key
        than the one the chain is written with.
    """

    location = "database"

    def __init__(self, db: ChainDatabase, key_file: Path) -> None:
        self.db = db
        self.key_file = key_file
        try:
            self.key = self._key()
            self._alerts = self._check_head()
        except StartupError:
            raise
        except Exception as exc:  # noqa: BLE001 - a database error: the node cannot start
            raise StartupError(
                f"cannot open the audit chain in the database ({_describe(exc)}); check that "
                "the node's database role may write audit_head and audit_records"
            ) from exc

    def _key(self) -> bytes:
        """The key of ``key_file``, checked against the one the chain is written with."""
        db, key_file = self.db, self.key_file
        has_records = bool(db._query("SELECT seq FROM audit_records LIMIT 1"))
        if has_records and not key_file.exists():
            raise StartupError(
                f"audit.key_file: {key_file} is missing but the database's audit chain holds "
                "records; copy the key file from a host of this node (every process that "
                "writes one chain needs the same key)"
            )
        key = load_key(key_file, create=True)
        assert key is not None
        with db._tx() as c:
            c.execute(
                "INSERT INTO audit_head (name, seq, hash) VALUES (?, 0, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (KEY_ID, key_id(key)),
            )
            row = c.execute("SELECT hash FROM audit_head WHERE name = ?", (KEY_ID,)).fetchone()
        if str(row["hash"]) != key_id(key):
            raise StartupError(
                f"audit.key_file: {key_file} holds another key than the one the database's "
                "audit chain is written with; copy the key file from the host that wrote the "
                "chain first (every process that writes one chain needs the same key)"
            )
        return key

    def _locked_head(self, c: Any) -> Any:
        """The head row, created for a new chain (or a removed head) and locked until ``c``
        ends; of two racing creations one waits for the other, then does nothing."""
        c.execute(
            "INSERT INTO audit_head (name, seq, hash) VALUES (?, 0, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (HEAD, GENESIS),
        )
        return c.execute(
            "SELECT seq, hash FROM audit_head WHERE name = ?" + self.db._for_update, (HEAD,)
        ).fetchone()

    def _check_head(self) -> list[dict[str, Any]]:
        """Compare the head with the last record; create the head of a new chain."""
        alerts: list[dict[str, Any]] = []
        with self.db._tx() as c:
            head = self._locked_head(c)
            last = c.execute(
                "SELECT seq, record FROM audit_records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            head_seq, last_seq = int(head["seq"]), int(last["seq"]) if last else 0
            if last_seq > head_seq:  # the head was moved back: continue after the last record
                try:
                    digest = str(json.loads(last["record"])["hash"])
                except (ValueError, KeyError, TypeError):
                    digest = GENESIS  # a damaged record: `audit verify` names it
                c.execute(
                    "UPDATE audit_head SET seq = ?, hash = ? WHERE name = ?",
                    (last_seq, digest, HEAD),
                )
                alerts.append(
                    {
                        "reason": "audit chain head in the database is behind its last record",
                        "records_seq": last_seq,
                        "head_seq": head_seq,
                    }
                )
        if last_seq < head_seq:
            # Records were removed from the end: numbering goes on after the head, so the gap
            # stays visible in the chain itself.
            log.error("audit.truncated", records_seq=last_seq, head_seq=head_seq)
            alerts.append(
                {
                    "reason": "audit chain ends before its head in the database",
                    "records_seq": last_seq,
                    "head_seq": head_seq,
                }
            )
        elif alerts:
            log.error("audit.head_behind", records_seq=last_seq, head_seq=head_seq)
        return alerts

    def startup_alerts(self) -> list[dict[str, Any]]:
        alerts, self._alerts = self._alerts, []
        return alerts

    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            try:
                line = self._append(body)
            except Exception as exc:
                if not _connection_lost(exc):
                    raise
                # A pooled connection that died with a database restart: once more on a
                # fresh one. Safe: the record is sealed again after the head as it is now.
                line = self._append(body)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the record is not stored
            log.error("audit.write_failed", error=type(exc).__name__)
            raise AuditWriteError(
                f"cannot write the audit trail to the database ({_describe(exc)})"
            ) from exc
        return json.loads(line)  # type: ignore[no-any-return]

    def _append(self, body: dict[str, Any]) -> str:
        """One transaction: lock the head, seal the record after it, store it, move the head."""
        with self.db._tx() as c:
            head = self._locked_head(c)
            digest, line = seal(body, int(head["seq"]) + 1, str(head["hash"]), self.key)
            c.execute("INSERT INTO audit_records (seq, record) VALUES (?, ?)", (body["seq"], line))
            c.execute(
                "UPDATE audit_head SET seq = ?, hash = ? WHERE name = ?",
                (body["seq"], digest, HEAD),
            )
        return line

    def head(self) -> tuple[int, str] | None:
        return self.db.audit_mark(HEAD)

    def records(self) -> Iterator[tuple[int, str]]:
        """Every record as ``(seq, line)``, oldest first."""
        return all_records(self.db)

    def events(self) -> list[dict[str, Any]]:
        """Every record, decoded, oldest first (damaged ones left out)."""
        out = []
        for _, line in self.records():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def reader(self) -> DatabaseReader:
        return DatabaseReader(self.db)

    def take_lease(self, name: str, owner: str, now: int, until: int) -> bool:
        """The lease is the row ``name`` of ``audit_head``, ``hash`` = ``"<until> <owner>"``.

        Taken when free, expired or already ``owner``'s, in one transaction under the row lock.
        """
        with self.db._tx() as c:
            c.execute(
                "INSERT INTO audit_head (name, seq, hash) VALUES (?, 0, '0 -') "
                "ON CONFLICT (name) DO NOTHING",
                (name,),
            )
            row = c.execute(
                "SELECT hash FROM audit_head WHERE name = ?" + self.db._for_update, (name,)
            ).fetchone()
            end, _, holder = str(row["hash"]).partition(" ")
            if holder != owner and end.isdigit() and int(end) > now:
                return False
            c.execute("UPDATE audit_head SET hash = ? WHERE name = ?", (f"{until} {owner}", name))
        return True

    def release_lease(self, name: str, owner: str) -> None:
        with self.db._tx() as c:
            row = c.execute(
                "SELECT hash FROM audit_head WHERE name = ?" + self.db._for_update, (name,)
            ).fetchone()
            if row is not None and str(row["hash"]).partition(" ")[2] == owner:
                c.execute("UPDATE audit_head SET hash = '0 -' WHERE name = ?", (name,))


class DatabaseReader:
    """Reads ``audit_records`` forward from the last sequence number it returned.

    Records become visible in sequence order (an append takes the head lock only after the
    previous one committed), so reading ``seq > last`` never skips one.
    """

    def __init__(self, db: ChainDatabase) -> None:
        self.db = db
        self._last: int | None = None

    def pending(self, after: int) -> list[dict[str, Any]]:
        start = after if self._last is None else max(after, self._last)
        out = []
        for seq, line in records_after(self.db, start):
            self._last = seq
            try:
                record = json.loads(line)
            except ValueError:
                continue  # damaged: `audit verify` reports it
            record.setdefault("seq", seq)
            out.append(record)
        return out
