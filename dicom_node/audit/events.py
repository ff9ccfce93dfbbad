"""The vocabulary of audit events: PS3.15 A.5 (coding scheme DCM) and RFC 3881.

What :meth:`~dicom_node.audit.log.AuditLog.record` takes: the event, its type, the action, the
outcome, and who took part.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
