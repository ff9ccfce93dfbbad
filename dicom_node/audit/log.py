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

Where the records are kept is a seam (:class:`~dicom_node.audit.chain.AuditChain`): the
JSON-lines file ``<storage_dir>/audit.jsonl`` with SQLite (:class:`FileChain`), the table
``audit_records`` with PostgreSQL (:class:`DatabaseChain`, one chain for every process and
host). Each record is stored whole or not at all; when it cannot be,
:class:`~dicom_node.common.errors.AuditWriteError` is raised and the caller refuses the access it
would have recorded. The vocabulary of the events is in :mod:`dicom_node.audit.events`;
``audit verify``'s checks are in :mod:`dicom_node.audit.verify`, ``audit export``'s file in
:mod:`dicom_node.audit.archive`, the syslog export in :mod:`dicom_node.audit.export`.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any, Protocol

from dicom_node.audit.chain import AuditChain, HeadStore
from dicom_node.audit.database_chain import ChainDatabase, DatabaseChain
from dicom_node.audit.events import (
    AuditAction,
    AuditEvent,
    AuditEventType,
    AuditOutcome,
    Participants,
)
from dicom_node.audit.file_chain import FileChain


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


class NodeDatabase(ChainDatabase, Protocol):
    """What :func:`open_audit_log` needs of the node database: the chain's, and its backend."""

    #: ``sqlite`` or ``postgresql``.
    backend: str


def open_audit_log(db: NodeDatabase, audit_path: Path, key_file: Path) -> AuditLog:
    """The node's audit log on the chain its database calls for.

    PostgreSQL: :class:`DatabaseChain` (one chain for every process and host of the node);
    SQLite: :class:`FileChain` (``audit_path``, ``<storage_dir>/audit.jsonl``; the head in the
    database).

    Parameters
    ----------
    db
        The node database.
    audit_path
        The JSON-lines file of a file chain (not used with PostgreSQL).
    key_file
        The HMAC key (``audit.key_file``; default ``<storage_dir>/audit.key``).
    """
    if db.backend == "postgresql":
        return AuditLog(chain=DatabaseChain(db, key_file))
    return AuditLog(audit_path, key_file, head=db)
