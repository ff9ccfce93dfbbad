"""The audit trail: who sent which patient's study, what was made from it, where it went.

An append-only JSON-lines file under ``storage_dir`` (PS3.15 A.5 vocabulary, coding scheme
DCM). This is the only place that names patients: operational logs never do. The trail proves
itself three ways:

- each record carries a sequence number and the SHA-256 of the previous record, so editing,
  removing or reordering a line breaks the chain;
- each record carries an HMAC-SHA256 under a key kept outside the log (``audit.key_file``), so
  a rewrite that recomputes every later hash is detected by anyone holding the key;
- the chain head (last sequence number and hash) is kept in the node database, so removing
  records from the end is detected.

Each record is written whole or not at all: one ``write`` of one line, fsynced; a failed or
short write is cut back to the previous end of file and raises
:class:`~dicom_node.errors.AuditWriteError`, so the caller refuses the access it would have
recorded. A torn record left by a crash is set aside at the next start into
``audit.jsonl.torn-<time>``, and that is itself audited.
"""

from __future__ import annotations

import datetime as dt
import enum
import errno
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from dicom_node.errors import AuditWriteError, StartupError

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
#: Name of the chain head in the database table ``audit_head``.
HEAD = "head"
KEY_BYTES = 32


class AuditEvent(enum.Enum):
    """Event ID (PS3.15 A.5.3): (code value in DCM, code meaning)."""

    APPLICATION_ACTIVITY = ("110100", "Application Activity")
    AUDIT_LOG_USED = ("110101", "Audit Log Used")
    INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
    STUDY_DELETED = ("110105", "DICOM Study Deleted")
    SECURITY_ALERT = ("110113", "Security Alert")
    USER_AUTHENTICATION = ("110114", "User Authentication")


class AuditEventType(enum.Enum):
    """Event Type Code (PS3.15 A.5.3, CID 400-ish DCM codes)."""

    APPLICATION_START = ("110120", "Application Start")
    APPLICATION_STOP = ("110121", "Application Stop")
    LOGIN = ("110122", "Login")
    LOGOUT = ("110123", "Logout")
    NODE_AUTHENTICATION = ("110126", "Node Authentication")


class AuditAction(enum.Enum):
    """Event Action Code (RFC 3881 / PS3.15 A.5.1)."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class AuditOutcome(enum.IntEnum):
    """Event Outcome Indicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class Participants:
    """Who took part: the calling and called AE titles and the peer's network address."""

    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""


def _digest(prev: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


def _mac(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of a record's hash (the hash already covers ``prev``, ``seq`` and the body)."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _write(fd: int, data: bytes) -> int:
    """One ``write`` to the log (a seam for the tests that simulate a full disk)."""
    return os.write(fd, data)


class HeadStore(Protocol):
    """Where the chain head and export positions are kept (the node :class:`Database`)."""

    def audit_mark(self, name: str) -> tuple[int, str] | None: ...

    def set_audit_mark(self, name: str, seq: int, digest: str) -> None: ...


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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
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


class AuditLog:
    """Append events to the hash-chained, keyed audit file; safe to call from any thread.

    Parameters
    ----------
    path
        The JSON-lines file (``<storage_dir>/audit.jsonl``).
    key_file
        The HMAC key (``audit.key_file``; default ``audit.key`` beside the log), created with
        mode 0600 at first start.
    head
        Where the chain head is kept (the node database); None keeps no head.

    Raises
    ------
    StartupError
        When the key file is missing although the log holds keyed records, or unreadable.
    """

    def __init__(
        self, path: Path, key_file: Path | None = None, head: HeadStore | None = None
    ) -> None:
        self.path = path
        self.key_file = key_file or path.parent / "audit.key"
        self._lock = threading.Lock()
        self._head = head
        self._dirty = False
        #: Set after each record is written; the syslog exporter waits on it.
        self.appended = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        scan = _scan(path)
        if scan.keyed and not self.key_file.exists():
            raise StartupError(
                f"audit.key_file: {self.key_file} is missing but {path} holds keyed records; "
                "restore the key file (a new key would make the trail unverifiable)"
            )
        key = load_key(self.key_file, create=True)
        assert key is not None
        self._key = key
        self._seq, self._prev = scan.seq, scan.prev
        alerts: list[dict[str, Any]] = []
        if scan.torn:
            alerts.append(self._set_aside(scan))
        stored = head.audit_mark(HEAD) if head is not None else None
        if stored is not None and stored[0] > self._seq:
            # Records were removed from the end: keep the numbering of the head, so that the
            # gap stays visible in the log itself, and say so.
            log.error("audit.truncated", log_seq=self._seq, head_seq=stored[0])
            alerts.append(
                {
                    "reason": "audit log ends before the chain head in the database",
                    "log_seq": self._seq,
                    "head_seq": stored[0],
                }
            )
            self._seq = stored[0]
        for details in alerts:
            self.record(
                AuditEvent.SECURITY_ALERT,
                AuditAction.EXECUTE,
                AuditOutcome.SERIOUS_FAILURE,
                Participants(),
                **details,
            )

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

    def security_alert(self, who: Participants, reason: str) -> None:
        """Security Alert (110113), Node Authentication, minor failure: a peer refused or an
        association aborted; ``reason`` says which check, without patient data."""
        self.record(
            AuditEvent.SECURITY_ALERT,
            AuditAction.EXECUTE,
            AuditOutcome.MINOR_FAILURE,
            who,
            event_type=AuditEventType.NODE_AUTHENTICATION,
            reason=reason,
        )

    def record(
        self,
        event: AuditEvent,
        action: AuditAction,
        outcome: AuditOutcome,
        who: Participants,
        *,
        event_type: AuditEventType | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        **details: Any,
    ) -> None:
        """Append one event, whole, and fsync it before returning.

        Raises
        ------
        AuditWriteError
            When the record cannot be written (full disk, I/O error). Nothing of it stays in
            the log; the caller must not let the recorded access happen.
        """
        body: dict[str, Any] = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event_id": {"code": event.value[0], "scheme": "DCM", "meaning": event.value[1]},
            "action": action.value,
            "outcome": int(outcome),
            "calling_ae": who.calling_ae,
            "called_ae": who.called_ae,
            "peer_address": who.peer_address,
            "patient_id": patient_id,
            "study_uid": study_uid,
        }
        if event_type is not None:
            body["event_type"] = {
                "code": event_type.value[0],
                "scheme": "DCM",
                "meaning": event_type.value[1],
            }
        if details:
            body["details"] = details
        with self._lock:
            if self._dirty:
                self._repair()
            body["seq"] = self._seq + 1
            body["prev"] = self._prev
            digest = _digest(self._prev, body)
            line = json.dumps({**body, "hash": digest, "hmac": _mac(self._key, digest)})
            self._append((line + "\n").encode())
            self._seq, self._prev = body["seq"], digest
            if self._head is not None:  # under the lock: the head never goes backwards
                try:
                    self._head.set_audit_mark(HEAD, body["seq"], digest)
                except Exception as exc:  # noqa: BLE001 - the record is written; the head lags
                    log.warning("audit.head_not_saved", error=type(exc).__name__)
        self.appended.set()

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


def read_events(path: Path) -> list[dict[str, Any]]:
    """All intact events of the audit file, oldest first."""
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    return events


class Check(enum.StrEnum):
    """The check of ``audit verify`` that a line failed."""

    JSON = "json"
    HASH = "hash"
    CHAIN = "chain"
    HMAC = "hmac"
    SEQUENCE = "sequence"
    HEAD = "head"
    TORN = "torn"


@dataclass(frozen=True)
class Problem:
    """One failed check: where (line, sequence number) and why."""

    line: int | None
    seq: int | None
    check: Check
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "log"
        if self.seq is not None:
            where += f" (seq {self.seq})"
        return f"{where}: {self.check}: {self.message}"


@dataclass
class Report:
    """What ``audit verify`` found."""

    records: int = 0
    keyed: int = 0
    unkeyed: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    path: Path,
    key: bytes | None = None,
    head: tuple[int, str] | None = None,
    *,
    check_head: bool = False,
) -> Report:
    """Check every record of the audit log (PS3.15 A.5 events, hash chain, HMAC, head).

    Parameters
    ----------
    path
        The audit log.
    key
        The HMAC key; None checks the chain only and says so.
    head
        ``(seq, hash)`` of the chain head from the node database.
    check_head
        Report a missing ``head`` as a problem (the database was given).
    """
    report = Report()
    if not path.exists():
        report.problems.append(Problem(None, None, Check.JSON, f"{path}: no audit log"))
        return report
    data = path.read_bytes()
    lines = data.split(b"\n")
    prev, seq, found_head = GENESIS, 0, False
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        report.records += 1
        if lineno == len(lines):  # no newline after it: cut while being written
            report.problems.append(
                Problem(
                    lineno,
                    None,
                    Check.TORN,
                    f"incomplete last record ({len(raw)} bytes, no end of line): a crash or a "
                    "full disk while writing; the node sets it aside at its next start",
                )
            )
            break
        try:
            record = json.loads(raw)
            stored = str(record.pop("hash"))
            mac = record.pop("hmac", None)
        except (ValueError, KeyError, TypeError, AttributeError):
            report.problems.append(
                Problem(lineno, None, Check.JSON, "not a complete audit record (not JSON)")
            )
            continue
        expected = seq + 1
        seq = int(record.get("seq", expected))
        if seq != expected:
            report.problems.append(
                Problem(
                    lineno,
                    seq,
                    Check.SEQUENCE,
                    f"sequence gap: expected {expected}, found {seq} (records removed)",
                )
            )
        if record.get("prev") != prev:
            report.problems.append(
                Problem(
                    lineno,
                    seq,
                    Check.CHAIN,
                    "does not follow the previous record (removed, inserted or reordered)",
                )
            )
        if _digest(record.get("prev", ""), record) != stored:
            report.problems.append(
                Problem(lineno, seq, Check.HASH, "content does not match its hash (edited)")
            )
        if mac is None:
            report.unkeyed += 1
            if report.keyed:
                report.problems.append(
                    Problem(lineno, seq, Check.HMAC, "no HMAC after keyed records (inserted)")
                )
        else:
            report.keyed += 1
            if key is not None and not hmac.compare_digest(str(mac), _mac(key, stored)):
                report.problems.append(
                    Problem(
                        lineno,
                        seq,
                        Check.HMAC,
                        "HMAC does not match: written without the node's key (rewritten)",
                    )
                )
        if head is not None and seq == head[0]:
            found_head = True
            if stored != head[1]:
                report.problems.append(
                    Problem(
                        lineno,
                        seq,
                        Check.HEAD,
                        "differs from the chain head kept in the database (rewritten)",
                    )
                )
        prev = stored
    if head is not None and not found_head:
        report.problems.append(
            Problem(
                None,
                head[0],
                Check.HEAD,
                f"the log ends at seq {seq} but the database's chain head is seq {head[0]}: "
                "records removed from the end",
            )
        )
    elif head is None and check_head and report.keyed:
        report.problems.append(
            Problem(None, None, Check.HEAD, "no chain head in the database for a keyed log")
        )
    if report.unkeyed:
        report.notes.append(
            f"{report.unkeyed} unkeyed record(s) (written before HMAC keys): chain checked, "
            "authorship not provable"
        )
    if key is None and report.keyed:
        report.notes.append("no key: HMACs not checked")
    return report
