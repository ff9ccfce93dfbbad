"""Where the audit records are kept: the chain store behind :class:`~dicom_node.audit.log.AuditLog`.

Both stores seal a record the same way (sequence number, SHA-256 of the previous record, SHA-256
of this one, HMAC-SHA256 under ``audit.key_file``) and keep the same canonical JSON line:

- :class:`FileChain`: ``<storage_dir>/audit.jsonl``, one line a record, the chain head kept in
  the node database (``audit_head``, name ``head``) after each record. One process writes it
  (the SQLite default).
- :class:`DatabaseChain`: the table ``audit_records (seq, record)`` with the head in
  ``audit_head``, each record appended in one transaction that locks the head row, so several
  processes on several hosts write one chain against one PostgreSQL database, with no gap and
  no fork.

A failed append raises :class:`~dicom_node.common.errors.AuditWriteError` and leaves nothing of the
record behind, in either store.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from dicom_node.common.errors import AuditWriteError, StartupError

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
#: Name of the chain head in the database table ``audit_head``.
HEAD = "head"
#: Name of the row of ``audit_head`` that identifies the key a database chain is written with.
KEY_ID = "key"
KEY_BYTES = 32
#: Records read from the database at a time (verify, export, syslog).
PAGE = 1000


def _digest(prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


def _mac(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of a record's hash (the hash already covers ``prev``, ``seq`` and the body)."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A name of the key that does not reveal it (HMAC of a fixed text)."""
    return hmac.new(key, b"dicom-node audit key id", hashlib.sha256).hexdigest()


def seal(body: dict[str, Any], seq: int, prev: str, key: bytes) -> tuple[str, str]:
    """Number and chain ``body`` (in place); return its hash and its line (no end of line)."""
    body["seq"] = seq
    body["prev"] = prev
    digest = _digest(prev, body)
    return digest, json.dumps({**body, "hash": digest, "hmac": _mac(key, digest)})


def _write(fd: int, data: bytes) -> int:
    """One ``write`` to the log (a seam for the tests that simulate a full disk)."""
    return os.write(fd, data)


def load_key(path: Path, *, create: bool) -> bytes | None:
    """The HMAC key in ``path`` (hex); created with mode 0600 when missing and ``create``.

    Raises
    ------
    StartupError
        When the file exists but cannot be read or holds no key of at least 32 bytes.
    """
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside it, then linked: a process that starts at the same time sees either
        # no key or the whole key, and the first link wins.
        partial = path.with_name(f".{path.name}.new-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(partial, path)
        except FileExistsError:
            pass  # another process made it first: use that one
        finally:
            partial.unlink()
        return load_key(path, create=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"audit.key_file: cannot read {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise StartupError(
            f"audit.key_file: {path} holds no audit key ({KEY_BYTES * 2} or more hex digits); "
            "restore the node's key file"
        )
    return key


class HeadStore(Protocol):
    """Where the chain head and export positions are kept (the node :class:`Database`)."""

    def audit_mark(self, name: str) -> tuple[int, str] | None: ...

    def set_audit_mark(self, name: str, seq: int, digest: str) -> None: ...


class ChainReader(Protocol):
    """Reads a chain forward, record by record, from where it last stopped."""

    def pending(self, after: int) -> list[dict[str, Any]]:
        """Whole records not yet returned by this reader whose ``seq`` is above ``after``."""
        ...


class AuditChain(Protocol):
    """A chain store: appends sealed records, reads them back."""

    #: Where the chain is, for messages (a file path or ``database``).
    location: str

    def startup_alerts(self) -> list[dict[str, Any]]:
        """What the chain found wrong when it was opened (each becomes a Security Alert)."""
        ...

    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        """Seal and store one record whole, durably; return it (with seq, prev, hash, hmac).

        Raises
        ------
        AuditWriteError
            When the record cannot be stored; nothing of it stays.
        """
        ...

    def reader(self) -> ChainReader: ...

    def take_lease(self, name: str, owner: str, now: int, until: int) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``until`` (epoch seconds).

        The syslog exporter sends only while it holds its repository's lease.
        """
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease ``name`` back when ``owner`` holds it (an exporter that stops)."""
        ...


# -- the file ------------------------------------------------------------------------------


@dataclass
class _Scan:
    """What the start-up scan of the log found: the chain end and a torn tail, if any."""

    seq: int = 0
    prev: str = GENESIS
    keyed: int = 0
    intact_bytes: int = 0
    torn: bytes = b""


def _scan(path: Path) -> _Scan:
    scan = _Scan()
    if not path.exists():
        return scan
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    scan.intact_bytes, scan.torn = end, data[end:]
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            digest = str(record["hash"])
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line: `audit verify` reports it; the chain goes on after it
        scan.seq = int(record.get("seq", scan.seq + 1))
        scan.prev = digest
        scan.keyed += "hmac" in record
    return scan


class FileChain:
    """The JSON-lines file (``<storage_dir>/audit.jsonl``); one process appends.

    Each record is one ``write`` of one line, fsynced; a failed or short write is cut back to
    the previous end of file. A torn record left by a crash is set aside at open into
    ``audit.jsonl.torn-<time>``. The head is stored in ``head`` after each record.

    Raises
    ------
    StartupError
        When the key file is missing although the log holds keyed records, or unreadable.
    """

    def __init__(
        self, path: Path, key_file: Path | None = None, head: HeadStore | None = None
    ) -> None:
        self.path = path
        self.location = str(path)
        self.key_file = key_file or path.parent / "audit.key"
        self._lock = threading.Lock()
        self._head = head
        self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        scan = _scan(path)
        if scan.keyed and not self.key_file.exists():
            raise StartupError(
                f"audit.key_file: {self.key_file} is missing but {path} holds keyed records; "
                "restore the key file (a new key would make the trail unverifiable)"
            )
        key = load_key(self.key_file, create=True)
        assert key is not None
        self.key = key
        self._seq, self._prev = scan.seq, scan.prev
        self._alerts: list[dict[str, Any]] = []
        if scan.torn:
            self._alerts.append(self._set_aside(scan))
        stored = head.audit_mark(HEAD) if head is not None else None
        if stored is not None and stored[0] > self._seq:
            # Records were removed from the end: keep the numbering of the head, so that the
            # gap stays visible in the log itself, and say so.
            log.error("audit.truncated", log_seq=self._seq, head_seq=stored[0])
            self._alerts.append(
                {
                    "reason": "audit log ends before the chain head in the database",
                    "log_seq": self._seq,
                    "head_seq": stored[0],
                }
            )
            self._seq = stored[0]

    def startup_alerts(self) -> list[dict[str, Any]]:
        alerts, self._alerts = self._alerts, []
        return alerts

    def _set_aside(self, scan: _Scan) -> dict[str, Any]:
        """Move a torn tail (a record cut by a crash) to ``<log>.torn-<time>``; cut it off."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        torn_path = self.path.with_name(f"{self.path.name}.torn-{stamp}")
        torn_path.write_bytes(scan.torn)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scan.intact_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("audit.torn_record_set_aside", file=torn_path.name, bytes=len(scan.torn))
        return {
            "reason": "torn audit record set aside",
            "torn_file": torn_path.name,
            "torn_bytes": len(scan.torn),
        }

    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._dirty:
                self._repair()
            digest, line = seal(body, self._seq + 1, self._prev, self.key)
            self._append((line + "\n").encode())
            self._seq, self._prev = body["seq"], digest
            if self._head is not None:  # under the lock: the head never goes backwards
                try:
                    self._head.set_audit_mark(HEAD, body["seq"], digest)
                except Exception as exc:  # noqa: BLE001 - the record is written; the head lags
                    log.warning("audit.head_not_saved", error=type(exc).__name__)
        return json.loads(line)  # type: ignore[no-any-return]

    def _append(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditWriteError(f"cannot open the audit log: {exc.strerror}") from exc
        try:
            start = os.fstat(fd).st_size
            try:
                written = _write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, "short write to the audit log")
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    self._dirty = True  # cut it back before the next record
                log.error("audit.write_failed", error=exc.strerror)
                raise AuditWriteError(f"cannot write the audit log: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _repair(self) -> None:
        """Set aside what a failed write left after the last whole record."""
        scan = _scan(self.path)
        if scan.torn:
            try:
                self._set_aside(scan)
            except OSError as exc:
                raise AuditWriteError(f"cannot repair the audit log: {exc.strerror}") from exc
        self._dirty = False

    def reader(self) -> FileReader:
        return FileReader(self.path)

    def take_lease(self, name: str, owner: str, now: int, until: int) -> bool:
        return True  # one process writes and exports a file chain

    def release_lease(self, name: str, owner: str) -> None:
        return None


class FileReader:
    """Reads the audit file forward from the byte offset where it last stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._seq = 0  # implied numbering of records written before sequence numbers

    def pending(self, after: int) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        out = []
        for line in data[:end].splitlines():
            self._offset += len(line) + 1
            try:
                record = json.loads(line)
            except ValueError:
                continue  # damaged: `audit verify` reports it
            self._seq = int(record.get("seq", self._seq + 1))
            record.setdefault("seq", self._seq)
            if self._seq > after:
                out.append(record)
        return out


# -- the database --------------------------------------------------------------------------


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
