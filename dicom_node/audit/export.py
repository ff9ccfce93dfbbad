"""Export of the audit trail to a site's audit repository (IHE ATNA).

Each record of the audit log becomes one RFC 5424 syslog message whose payload is the DICOM
audit message XML of PS3.15 A.5 (``AuditMessage``), sent over TLS (RFC 5425, octet-counting
framing), plain TCP (RFC 6587 octet counting) or UDP (RFC 5426). The structured data of each
message carries the record's sequence number, hash and HMAC, so the repository holds a copy of
the chain anchors too.

The chain itself is the spool (the file or the database table, read through its
:class:`~dicom_node.audit.chain.ChainReader`): a thread sends every record after the last one
the repository took, and keeps that position in the node database (``audit_head``, name
``export:<host>:<port>``). When several processes append to one database chain, each may run
an exporter; only the one holding the lease ``lease:<host>:<port>`` sends.

A repository that is down gets every record once it is back, in
order; with TCP or TLS a record is counted as sent when the kernel took it and the connection
was still open (RFC 5425 has no acknowledgements: a repository host that dies without closing
its connections can lose what was in flight). UDP gives no delivery guarantee at all.
"""

from __future__ import annotations

import datetime as dt
import os
import select
import socket
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import structlog

from dicom_node.audit.chain import HeadStore
from dicom_node.audit.log import AuditLog
from dicom_node.common.tls import client_context
from dicom_node.config.sections import SyslogSettings

log = structlog.get_logger(__name__)

#: PRI of RFC 5424: facility 10 (security/authorization), severity 5 (notice), as ATNA asks.
PRI = 10 * 8 + 5
APP_NAME = "dicom-node"
#: MSGID of IHE ITI TF-2a 3.20.7: the payload is an audit message of the DICOM/RFC 3881 schema.
MSGID = "IHE+RFC-3881"
#: Private enterprise number for structured data; 32473 is the example number of RFC 5612.
SD_ID = "dicomnode@32473"
BOM = b"\xef\xbb\xbf"
#: Lease on a repository's export when several processes append to one chain (seconds).
LEASE_S = 30.0


def _code(parent: ET.Element, tag: str, code: dict[str, str] | None) -> None:
    if code:
        ET.SubElement(
            parent,
            tag,
            {
                "csd-code": code["code"],
                "codeSystemName": code.get("scheme", "DCM"),
                "originalText": code["meaning"],
            },
        )


def audit_message(record: dict[str, Any], source_id: str) -> bytes:
    """The DICOM audit message XML (PS3.15 A.5.1) of one audit-log record.

    Parameters
    ----------
    record
        One record of the audit log (:class:`~dicom_node.audit.log.AuditLog`).
    source_id
        Audit Source ID (A.5.1 AuditSourceIdentification): the node's AE title.

    Returns
    -------
    bytes
        ``<AuditMessage>`` with EventIdentification, an ActiveParticipant per AE title and
        peer, AuditSourceIdentification, and ParticipantObjectIdentification for the patient
        (Patient Number, RFC 3881) and the study (Study Instance UID, DCM 110180).
    """
    root = ET.Element("AuditMessage")
    event = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": str(record.get("action", "E")),
            "EventDateTime": str(record.get("time", "")),
            "EventOutcomeIndicator": str(record.get("outcome", 0)),
        },
    )
    _code(event, "EventID", record.get("event_id"))
    _code(event, "EventTypeCode", record.get("event_type"))
    peer = str(record.get("peer_address") or "")
    host = peer.rsplit(":", 1)[0] if peer else ""
    if record.get("calling_ae") or host:
        requestor = ET.SubElement(
            root,
            "ActiveParticipant",
            {"UserID": str(record.get("calling_ae") or host), "UserIsRequestor": "true"},
        )
        if host:
            requestor.set("NetworkAccessPointID", host)
            requestor.set("NetworkAccessPointTypeCode", "2")  # IP address
        _code(requestor, "RoleIDCode", {"code": "110153", "meaning": "Source Role ID"})
    node = ET.SubElement(
        root,
        "ActiveParticipant",
        {"UserID": str(record.get("called_ae") or source_id), "UserIsRequestor": "false"},
    )
    _code(node, "RoleIDCode", {"code": "110152", "meaning": "Destination Role ID"})
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    # Audit Source Type 4: application server process (A.5.1, RFC 3881 5.4.2).
    ET.SubElement(
        source,
        "AuditSourceTypeCode",
        {"csd-code": "4", "codeSystemName": "DCM", "originalText": "Application Server"},
    )
    if record.get("patient_id"):
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": str(record["patient_id"]),
                "ParticipantObjectTypeCode": "1",  # person
                "ParticipantObjectTypeCodeRole": "1",  # patient
            },
        )
        _code(
            patient,
            "ParticipantObjectIDTypeCode",
            {"code": "2", "scheme": "RFC-3881", "meaning": "Patient Number"},
        )
    if record.get("study_uid"):
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": str(record["study_uid"]),
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        _code(
            study,
            "ParticipantObjectIDTypeCode",
            {"code": "110180", "meaning": "Study Instance UID"},
        )
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return xml


def syslog_message(record: dict[str, Any], source_id: str, hostname: str) -> bytes:
    """One RFC 5424 message: header, structured data with the chain anchors, BOM + XML."""
    anchors = " ".join(
        f'{name}="{record[name]}"' for name in ("seq", "hash", "hmac") if name in record
    )
    header = (
        f"<{PRI}>1 {record.get('time') or dt.datetime.now(dt.UTC).isoformat()} "
        f"{hostname or '-'} {APP_NAME} {os.getpid()} {MSGID} [{SD_ID} {anchors}] "
    )
    return header.encode("utf-8") + BOM + audit_message(record, source_id)


class _Connection:
    """One connection to the repository; ``send`` raises OSError when it is gone."""

    def __init__(self, settings: SyslogSettings, timeout_s: float) -> None:
        self.settings = settings
        self.sock: socket.socket
        if settings.transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.connect((settings.host, settings.port))
            return
        sock = socket.create_connection((settings.host, settings.port), timeout=timeout_s)
        if settings.transport == "tls":
            context = client_context(settings, check_hostname=True, system_cas=True)
            sock = context.wrap_socket(sock, server_hostname=settings.host)
        self.sock = sock

    def send(self, message: bytes) -> None:
        if self.settings.transport == "udp":
            self.sock.send(message)
            return
        # The repository never writes on this connection: readable means it was closed.
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:
            raise ConnectionResetError("the audit repository closed the connection")
        self.sock.sendall(f"{len(message)} ".encode() + message)  # RFC 5425 4.3 framing

    def close(self) -> None:
        self.sock.close()


class SyslogExporter:
    """Send every audit record to the repository, from the log, never losing one.

    Parameters
    ----------
    settings
        ``audit.syslog``.
    audit
        The node's audit log (its chain is the spool; ``appended`` wakes the exporter, which
        also looks every second for records of other processes).
    marks
        Where the export position is kept (the node database).
    source_id
        Audit Source ID of the messages (the node's AE title).
    """

    def __init__(
        self,
        settings: SyslogSettings,
        audit: AuditLog,
        marks: HeadStore,
        source_id: str,
        *,
        retry_s: float = 2.0,
        max_retry_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.marks = marks
        self.source_id = source_id
        self.name = f"export:{settings.host}:{settings.port}"
        self.lease_name = f"lease:{settings.host}:{settings.port}"
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.hostname = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: _Connection | None = None
        self._reader = audit.chain.reader()
        self._retry: list[dict[str, Any]] = []  # read from the chain, not yet taken
        self._owner = f"{self.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease_until = 0.0  # of a shared chain: this exporter sends until then

    @property
    def position(self) -> int:
        """Sequence number of the last record the repository took."""
        mark = self.marks.audit_mark(self.name)
        return mark[0] if mark else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-export", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is pending (for up to ``timeout_s``), then stop."""
        self._stop.set()
        self.audit.appended.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._conn is not None:
            self._conn.close()
        if self._lease_until:
            try:
                self.audit.chain.release_lease(self.lease_name, self._owner)
            except Exception as exc:  # noqa: BLE001 - the lease then ends by itself
                log.warning("audit.export_lease_kept", error=type(exc).__name__)
            self._lease_until = 0.0

    def send_pending(self) -> int:
        """Send every record after the export position; return how many were sent.

        Raises
        ------
        OSError
            When the repository cannot be reached; the position stays at the last record sent.

        Sends nothing while another process holds this repository's lease (a chain that
        several processes append to).
        """
        if not self._hold_lease():
            return 0  # another process of the node exports to this repository
        after = self.position
        sent = 0
        pending = self._reader.pending(after)
        records = self._retry + pending
        self._retry = []
        for i, record in enumerate(records):
            try:
                if self._conn is None:
                    self._conn = _Connection(self.settings, timeout_s=10.0)
                self._conn.send(syslog_message(record, self.source_id, self.hostname))
            except OSError:
                self._retry = records[i:]
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                raise
            self.marks.set_audit_mark(self.name, int(record["seq"]), str(record["hash"]))
            sent += 1
        return sent

    def _hold_lease(self, now: float | None = None) -> bool:
        """Take or renew the lease on this repository's export.

        Only its holder sends, so several processes that append to one chain never send a
        record twice at once; a holder that dies is replaced after the lease
        (:meth:`~dicom_node.audit.database_chain.DatabaseChain.take_lease`; a file chain has one
        writer and always grants it).
        """
        now = time.time() if now is None else now
        if now < self._lease_until - LEASE_S / 2:
            return True
        held = self.audit.chain.take_lease(
            self.lease_name, self._owner, int(now), int(now + LEASE_S)
        )
        if held and self._lease_until <= now:  # (re)gained: read again from the position
            self._reader = self.audit.chain.reader()
            self._retry = []
        self._lease_until = now + LEASE_S if held else 0.0
        return held

    def _run(self) -> None:
        delay = self.retry_s
        while True:
            stopping = self._stop.is_set()
            self.audit.appended.clear()
            try:
                sent = self.send_pending()
                delay = self.retry_s
                if sent:
                    log.info("audit.exported", records=sent, position=self.position)
            except Exception as exc:  # noqa: BLE001 - repository or database away: retry later
                error = exc.strerror or str(exc) if isinstance(exc, OSError) else None
                log.warning(
                    "audit.export_failed",
                    repository=self.name,
                    error=error or type(exc).__name__,
                    retry_in_s=delay,
                )
                if stopping or self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.max_retry_s)
                continue
            if stopping:
                return
            if not sent:  # else more may be pending (a database chain is read page by page)
                self.audit.appended.wait(1.0)
