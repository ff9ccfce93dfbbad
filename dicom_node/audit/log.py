"""The audit trail: who sent which patient's study, what was made from it, where it went.

Events in the PS3.15 A.5 vocabulary (coding scheme DCM), appended to a hash-chained, keyed
chain. This is the only place that names patients: operational logs never do. The trail proves
itself three ways:

- each record carries a sequence number and the SHA-256 of the previous record, so editing,
  removing or reordering a record breaks the chain;
- each record carries an HMAC-SHA256 under a key kept outside the chain (``audit.key_file``),
  so a rewrite that recomputes every later hash is detected by anyone holding the key;
- the chain head (last sequence number and hash) is kept in the node database, so removing
  records from the end is detected.

Where the records are kept is a seam (:mod:`dicom_node.audit.chain`): the JSON-lines file
``<storage_dir>/audit.jsonl`` with SQLite (:class:`FileChain`), the table ``audit_records``
with PostgreSQL (:class:`DatabaseChain`, one chain for every process and host). Each record is
stored whole or not at all; when it cannot be, :class:`~dicom_node.common.errors.AuditWriteError` is
raised and the caller refuses the access it would have recorded. ``audit verify``'s checks are
in :mod:`dicom_node.audit.verify`.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.audit.chain import (
    GENESIS,
    HEAD,
    KEY_BYTES,
    AuditChain,
    DatabaseChain,
    FileChain,
    HeadStore,
    _digest,
    _mac,
    all_records,
    load_key,
)
from dicom_node.audit.verify import Check, Problem, Report, decode, verify, verify_database
from dicom_node.common.errors import DicomNodeError

if TYPE_CHECKING:
    from dicom_node.store.database import Database

__all__ = [
    "GENESIS",
    "HEAD",
    "KEY_BYTES",
    "AuditAction",
    "AuditChain",
    "AuditEvent",
    "AuditEventType",
    "AuditLog",
    "AuditOutcome",
    "Check",
    "DatabaseChain",
    "Exported",
    "FileChain",
    "HeadStore",
    "Participants",
    "Problem",
    "Report",
    "_digest",
    "_mac",
    "export_chain",
    "load_key",
    "open_audit_log",
    "read_events",
    "verify",
    "verify_database",
]


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


class AuditLog:
    """Append events to the audit chain; safe to call from any thread.

    Parameters
    ----------
    path
        The JSON-lines file (``<storage_dir>/audit.jsonl``) of a :class:`FileChain`; not
        used when ``chain`` is given.
    key_file
        The HMAC key of that file (``audit.key_file``; default ``audit.key`` beside the log),
        created with mode 0600 at first start.
    head
        Where that file's chain head is kept (the node database); None keeps no head.
    chain
        The chain store to append to (e.g. a :class:`DatabaseChain`), instead of the file.

    Raises
    ------
    StartupError
        When the key file is missing although the chain holds keyed records, or unreadable.
    """

    def __init__(
        self,
        path: Path | None = None,
        key_file: Path | None = None,
        head: HeadStore | None = None,
        *,
        chain: AuditChain | None = None,
    ) -> None:
        if chain is None:
            if path is None:
                raise TypeError("AuditLog needs the path of its file or a chain")
            chain = FileChain(path, key_file, head)
        self.chain = chain
        #: Set after each record is written; the syslog exporter waits on it.
        self.appended = threading.Event()
        for details in chain.startup_alerts():
            self.record(
                AuditEvent.SECURITY_ALERT,
                AuditAction.EXECUTE,
                AuditOutcome.SERIOUS_FAILURE,
                Participants(),
                **details,
            )

    @property
    def path(self) -> Path | None:
        """The audit file, or None when the chain is in the database."""
        return self.chain.path if isinstance(self.chain, FileChain) else None

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
        """Append one event, whole and durably, before returning.

        Raises
        ------
        AuditWriteError
            When the record cannot be written (full disk, I/O error, database down). Nothing
            of it stays; the caller must not let the recorded access happen.
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
        self.chain.append(body)
        self.appended.set()


def open_audit_log(db: Database, *, audit_path: Path, key_file: Path) -> AuditLog:
    """The node's audit log on the chain its database calls for, keyed with ``key_file``.

    PostgreSQL: :class:`DatabaseChain` (one chain for every process and host of the node);
    SQLite: :class:`FileChain` (``audit_path``, ``<storage_dir>/audit.jsonl``, the head in the
    database).
    """
    if db.backend == "postgresql":
        return AuditLog(chain=DatabaseChain(db, key_file))
    return AuditLog(audit_path, key_file, head=db)


@dataclass(frozen=True)
class Exported:
    """What ``audit export`` wrote: how many records, their sequence numbers, the last hash."""

    records: int
    first: int
    last: int
    last_hash: str
    source: str


def export_chain(database: str | None, audit_path: Path, path: Path) -> Exported:
    """Write the audit chain the config uses, up to its head now, to the new file ``path``.

    The chain is in the PostgreSQL ``database`` when that is set, else in the file
    ``audit_path`` (``<storage_dir>/audit.jsonl``).

    One record a line, exactly as stored (the format of ``audit.jsonl``), so the file verifies
    with ``audit verify --file`` and the key. Written to a hidden file beside ``path``, fsynced
    and linked to ``path`` when complete; an existing ``path`` is never overwritten.

    Raises
    ------
    DicomNodeError
        When ``path`` exists, or its folder does not.
    """
    if path.exists():
        raise DicomNodeError(f"{path} exists; name a new file (an export never overwrites)")
    if not path.parent.is_dir():
        raise DicomNodeError(f"{path.parent} is not a folder; create it or name another file")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    first = last = count = 0
    last_hash = ""
    try:
        with partial.open("x", encoding="utf-8") as out:
            lines, source, close = _chain_lines(database, audit_path)
            try:
                for line in lines:
                    out.write(line + "\n")
                    count += 1
                    try:
                        record = json.loads(line)
                        last, last_hash = int(record.get("seq", last + 1)), str(record["hash"])
                    except (ValueError, KeyError, TypeError):
                        last += 1  # damaged: copied as it is; `audit verify --file` names it
                    first = first or last
            finally:
                close()
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            raise DicomNodeError(
                f"{path} exists; name a new file (an export never overwrites)"
            ) from None
    finally:
        partial.unlink(missing_ok=True)
    return Exported(count, first, last, last_hash, source)


def _chain_lines(
    database: str | None, audit_path: Path
) -> tuple[Iterator[str], str, Callable[[], None]]:
    """The stored records of the config's chain (up to its head now), where, and a closer."""
    if database is not None:
        from dicom_node.store.database import Database

        db = Database(database)
        head = db.audit_mark(HEAD)
        lines = (line for _, line in all_records(db, upto=head[0] if head else 0))
        return lines, "database audit chain", db.close
    path = audit_path
    if not path.exists():
        raise DicomNodeError(f"{path}: no audit log (the node has not run yet?)")
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    return (line for line in whole.splitlines() if line.strip()), str(path), lambda: None


def read_events(path: Path) -> list[dict[str, Any]]:
    """All intact events of the audit file, oldest first."""
    if not path.exists():
        return []
    return decode(path.read_text(encoding="utf-8", errors="replace").splitlines())
