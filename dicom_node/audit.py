"""The audit trail: who sent which patient's study, what was made from it, where it went.

An append-only JSON-lines file under ``storage_dir``. Each record carries the SHA-256 of the
previous record, so editing, removing or reordering any line breaks the chain and
``dicom-node audit verify`` says where. Event names and codes are the DICOM audit vocabulary
(PS3.15 Annex A.5, coding scheme DCM). This is the only place that names patients: operational
logs never do.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


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


class AuditLog:
    """Append events to the hash-chained audit file; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = self._last_hash()

    def _last_hash(self) -> str:
        if not self.path.exists():
            return GENESIS
        last = GENESIS
        with self.path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    try:
                        last = json.loads(line)["hash"]
                    except (ValueError, KeyError):
                        # A torn last line (killed mid-write) is left for `audit verify`
                        # to report; the chain continues from the last intact record.
                        continue
        return str(last)

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
        """Append one event and fsync it before returning."""
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
            body["prev"] = self._prev
            digest = _digest(self._prev, body)
            line = json.dumps({**body, "hash": digest}, sort_keys=True) + "\n"
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._prev = digest


def read_events(path: Path) -> list[dict[str, Any]]:
    """All intact events of the audit file, oldest first."""
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                events.append(json.loads(line))
    return events


def verify(path: Path) -> tuple[int, list[str]]:
    """Check the hash chain; return (number of records, list of problems with line numbers)."""
    problems: list[str] = []
    prev = GENESIS
    n = 0
    if not path.exists():
        return 0, [f"{path}: no audit log"]
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        n += 1
        try:
            record = json.loads(line)
            stored = record.pop("hash")
        except (ValueError, KeyError):
            problems.append(f"line {lineno}: not a complete audit record")
            continue
        if record.get("prev") != prev:
            problems.append(
                f"line {lineno}: does not follow the previous record (removed or reordered)"
            )
        if _digest(record.get("prev", ""), record) != stored:
            problems.append(f"line {lineno}: content does not match its hash (edited)")
        prev = stored
    return n, problems
