"""The receiver: a Verification and Storage SCP that stores each instance durably.

Handlers stay thin: pynetdicom has written the data set as received into
``<storage_dir>/incoming``; the handler reads its header, validates it, appends it to the
receive journal (one ``fdatasync``: the durable record, :mod:`dicom_node.store.journal`),
renames the file into the spool and indexes it (no flush of their own: the journal's record
stands for them until its segment is retired), and only then answers Success.
Nothing heavy runs on an association thread; pixel data is not decoded here. Every bad input
gets a failure status and the node keeps serving.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
import uuid
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from prometheus_client import Histogram
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.utils import make_target

from dicom_node.audit.events import (
    AuditAction,
    AuditEvent,
    AuditEventType,
    AuditOutcome,
    Participants,
)
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import AuditWriteError, ConfigError
from dicom_node.common.metrics import NodeMetrics
from dicom_node.common.status import StoreStatus
from dicom_node.common.syntaxes import ACCEPTED
from dicom_node.common.tls import HANDSHAKE_TIMEOUT_S, server_context
from dicom_node.common.uids import is_valid_uid
from dicom_node.config.sections import ROUTING_KEYWORDS, LatePolicy, Limits, TLSSettings
from dicom_node.receive import incoming
from dicom_node.receive import limits as net_limits
from dicom_node.receive.access import AccessControl
from dicom_node.receive.limits import (
    REJECT_LOCAL_LIMIT,
    Admission,
    LimitedRequestHandler,
    LimitedServer,
)
from dicom_node.store.files import SHARED_STALE_TEMP_S, instance_path, rename_quickly
from dicom_node.store.instances import InstanceIndex
from dicom_node.store.journal import Journal, JournalError, JournalRecord, file_checksum

log = structlog.get_logger(__name__)

#: Error Comment (0000,0902) is a Long String (LO): at most 64 characters.
ERROR_COMMENT_MAX_CHARS = 64

#: Values longer than this are not read into memory when a received instance is checked.
DEFER_BYTES = 64 * 1024

#: Maximum PDU length the node receives (A-ASSOCIATE-AC Maximum Length Received), in bytes.
MAX_PDU_BYTES = 1024 * 1024

#: Seconds the node waits for a DIMSE message (a C-STORE's data set) once one has begun.
DIMSE_TIMEOUT_S = 60.0


class Refusal(NamedTuple):
    """A C-STORE failure the receiver answers: its status and Error Comment (0000,0902)."""

    status: StoreStatus
    #: The Error Comment; ``{...}`` fields are filled in (never with patient data).
    comment: str
    #: When it is answered (for docs/conformance.md).
    when: str

    def reason(self, **values: object) -> str:
        """The Error Comment with its fields filled in."""
        return self.comment.format(**values)


#: Every failure status the receiver answers a C-STORE with, and why (docs/conformance.md is
#: generated from it: ``dicom-node conformance``).
REFUSALS: dict[str, Refusal] = {
    "disk_low": Refusal(
        StoreStatus.OUT_OF_RESOURCES,
        net_limits.DISK_LOW_COMMENT,
        "free space of storage_dir below limits.min_free_disk_bytes",
    ),
    "too_large": Refusal(
        StoreStatus.OUT_OF_RESOURCES,
        "instance larger than max_instance_bytes",
        "the data set is larger than limits.max_instance_bytes",
    ),
    "audit": Refusal(
        StoreStatus.OUT_OF_RESOURCES,
        "cannot write the audit trail",
        "the audit record of the transfer cannot be written (no record, no access)",
    ),
    "write": Refusal(
        StoreStatus.OUT_OF_RESOURCES,
        "cannot write the instance to disk",
        "the instance cannot be made durable (journal write or flush, rename: I/O error)",
    ),
    "index": Refusal(
        StoreStatus.OUT_OF_RESOURCES,
        "cannot index the instance now",
        "the database does not take the instance (e.g. busy); the sender may retry",
    ),
    "sop_instance": Refusal(
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "SOP Instance UID differs from the C-STORE request",
        "SOP Instance UID (0008,0018) is not the request's Affected SOP Instance UID",
    ),
    "sop_class": Refusal(
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "SOP Class UID differs from the C-STORE request",
        "SOP Class UID (0008,0016) is not the request's Affected SOP Class UID",
    ),
    "invalid_uid": Refusal(
        StoreStatus.CANNOT_UNDERSTAND,
        "missing or invalid {keyword}",
        "SOP Class, SOP Instance, Study or Series Instance UID missing or not a valid UID",
    ),
    "truncated": Refusal(
        StoreStatus.CANNOT_UNDERSTAND,
        "pixel data truncated ({length} of {expected} bytes)",
        "native Pixel Data shorter than Rows x Columns x Frames x Samples x Bits Allocated",
    ),
    "undecodable": Refusal(
        StoreStatus.CANNOT_UNDERSTAND,
        "dataset cannot be decoded",
        "the data set cannot be parsed",
    ),
}


def supported_contexts() -> list[tuple[UID, tuple[UID, ...]]]:
    """The presentation contexts the node accepts as SCP: (abstract syntax, transfer syntaxes).

    Verification with pynetdicom's default syntaxes, and every storage SOP class pynetdicom
    knows with :data:`~dicom_node.common.syntaxes.ACCEPTED`.
    """
    out = [(UID(Verification), tuple(UID(ts) for ts in DEFAULT_TRANSFER_SYNTAXES))]
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            out.append((UID(cx.abstract_syntax), ACCEPTED))
    return out


#: The steps of the C-STORE handler, timed for each instance in the histogram
#: ``dicom_node_receive_step_seconds{step=...}`` (:class:`~dicom_node.common.metrics.NodeMetrics`).
#: A refused instance ends its laps early; ``audit`` runs once per study and association.
RECEIVE_STEPS: dict[str, str] = {
    "limits": "free-space and size checks",
    "header": "header read (dcmread; values over 64 KiB stay on disk)",
    "validate": "UIDs, SOP match, pixel data length, routing attributes",
    "audit": "audit record (first instance of a study on an association)",
    "journal": "append to the receive journal and its fdatasync (the one flush per instance)",
    "rename": "rename into the spool (no flush: the journal record stands for it)",
    "index": "index transaction, its commit included (not flushed on SQLite: the journal)",
    "total": "the whole handler",
}


class _Laps:
    """Times the steps of one C-STORE handler into a histogram labelled by step."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._start = self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        """The step ``step`` (a key of :data:`RECEIVE_STEPS`) ends now."""
        now = time.perf_counter()
        self._histogram.labels(step).observe(now - self._last)
        self._last = now

    def end(self) -> None:
        self._histogram.labels("total").observe(time.perf_counter() - self._start)


@dataclass(frozen=True, kw_only=True)
class ReceiverSettings:
    """What the receiver reads of the configuration, and the folders it writes in.

    Built from the node's settings and storage layout by :mod:`dicom_node.app.node`.
    """

    ae_title: str
    port: int
    #: ``<storage_dir>``: its free space is checked against ``limits.min_free_disk_bytes``.
    storage_dir: Path
    #: Where received instances are kept (``StorageLayout.spool_dir``).
    spool_dir: Path
    #: Where data sets are written while they arrive (``StorageLayout.incoming_dir``).
    incoming_dir: Path
    #: The receive journal's segments (``StorageLayout.journal_dir``); default
    #: ``<storage_dir>/journal``.
    journal_dir: Path | None = None
    bind_address: str
    called_ae_titles: tuple[str, ...]
    allowed_callers: tuple[str, ...]
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    tls: TLSSettings | None
    limits: Limits
    late_instances: LatePolicy
    #: Several processes share ``storage_dir`` (PostgreSQL): at start only temp files older
    #: than :data:`~dicom_node.store.files.SHARED_STALE_TEMP_S` are removed.
    shared_storage: bool


class RejectedInstance(Exception):
    """An instance the receiver refuses; carries the status to answer with."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Association:
    id: str
    who: Participants
    studies: Counter[tuple[str, str]] = field(default_factory=Counter)  # (patient, study) -> n
    #: A Security Alert for a database failure was recorded (once per association).
    database_alerted: bool = False


def _participants(event: Event, called: str) -> Participants:
    requestor = event.assoc.requestor
    return Participants(
        calling_ae=str(requestor.ae_title).strip(),
        called_ae=called,
        peer_address=f"{requestor.address}:{requestor.port}",
    )


def _echo_only(event: Event) -> bool:
    """The association proposed Verification (C-ECHO) only."""
    primitive = event.assoc.requestor.primitive
    contexts = getattr(primitive, "presentation_context_definition_list", None) or []
    return bool(contexts) and all(cx.abstract_syntax == Verification for cx in contexts)


def routing_attributes(ds: Dataset) -> dict[str, str]:
    """The values of :data:`ROUTING_KEYWORDS` present in ``ds``, multi-values joined by '\\'."""
    out = {}
    for keyword in ROUTING_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            out[keyword] = "\\".join(str(v) for v in value)
        else:
            out[keyword] = str(value)
    return out


def check_instance(ds: Dataset, request: Any) -> None:
    """Validate a received dataset against its C-STORE request; raise RejectedInstance.

    Checks that the UIDs that become paths are valid, that the dataset's SOP Class and
    Instance UIDs match the request, and that native pixel data is not truncated.
    """
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(keyword)
        if not is_valid_uid(value):
            refusal = REFUSALS["invalid_uid"]
            raise RejectedInstance(refusal.status, refusal.reason(keyword=keyword))
    if ds.SOPInstanceUID != request.AffectedSOPInstanceUID:
        raise RejectedInstance(REFUSALS["sop_instance"].status, REFUSALS["sop_instance"].comment)
    if ds.SOPClassUID != request.AffectedSOPClassUID:
        raise RejectedInstance(REFUSALS["sop_class"].status, REFUSALS["sop_class"].comment)
    if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = expected_pixel_bytes(ds)
        length = pixel_data_bytes(ds)
        if expected is not None and length < expected:
            refusal = REFUSALS["truncated"]
            raise RejectedInstance(refusal.status, refusal.reason(length=length, expected=expected))


def pixel_data_bytes(ds: Dataset) -> int:
    """Length of Pixel Data (7FE0,0010) without reading it when its read was deferred."""
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None:
        return int(elem.length)
    return len(ds.PixelData)


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native (uncompressed) Pixel Data (7FE0,0010) that ``ds`` describes.

    From Rows (0028,0010), Columns (0028,0011), Number of Frames (0028,0008), Samples per
    Pixel (0028,0002), Bits Allocated (0028,0100) and Photometric Interpretation (0028,0004),
    by :func:`pydicom.pixels.utils.get_expected_length`: 1-bit data is packed (the bits of all
    frames together, rounded up to whole bytes); YBR_FULL_422 and YBR_PARTIAL_422 hold two
    samples per pixel (4:2:2, two thirds of RGB). The padding byte of odd lengths is not
    counted: longer data is accepted. None when the attributes do not tell (missing, or Bits
    Allocated not a multiple of 8 other than 1).
    """
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        return None
    if min(rows, cols, frames, samples) < 1 or (bits != 1 and bits % 8):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "YBR_PARTIAL_422" and samples == 3 and bits == 8:
        return rows * cols * frames * 2  # retired, native 4:2:2 like YBR_FULL_422
    if bits != 1 and photometric != "YBR_FULL_422":
        # What get_expected_length computes here, without building a Dataset (a tenth of the
        # time: this runs for every received instance).
        return rows * cols * frames * samples * (bits // 8)
    header = Dataset()
    header.Rows, header.Columns, header.NumberOfFrames = rows, cols, frames
    header.SamplesPerPixel, header.BitsAllocated = samples, bits
    header.PhotometricInterpretation = photometric
    return int(get_expected_length(header, unit="bytes"))


def refusal(status: StoreStatus, reason: str) -> Dataset:
    """A C-STORE response status dataset: Status (0000,0900) and Error Comment (0000,0902).

    The comment (LO, at most 64 characters, no patient data) tells the sender why.
    """
    rsp = Dataset()
    rsp.Status = int(status)
    rsp.ErrorComment = reason[:ERROR_COMMENT_MAX_CHARS]
    return rsp


class Receiver:
    """Owns the listening AE: C-ECHO, C-STORE into the spool and index, association audit.

    Parameters
    ----------
    settings
        What it listens as and on, its limits and its folders.
    db
        The instance index (and the release of each association).
    audit
        Where associations, transfers and refusals are recorded.
    on_release
        Set when an association that stored instances is released (wakes the assembler).
    metrics
        The node's counters (default: a registry of its own).
    """

    #: The server it listens with (a subclass: several receiver processes on one port).
    server_class: type[LimitedServer] = LimitedServer

    def __init__(
        self,
        settings: ReceiverSettings,
        db: InstanceIndex,
        audit: AuditLog,
        on_release: threading.Event | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self.db = db
        self.audit = audit
        self.on_release = on_release
        # Keyed by the Association itself, weakly: an association whose DUL thread died of a
        # malformed PDU never fires EVT_CONN_CLOSE, and its entry must go with it (an id()
        # key would also be reused by a later association and hand it a stale state).
        self._assocs: weakref.WeakKeyDictionary[Any, _Association] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.server: LimitedServer | None = None
        self.admission = Admission(settings.limits, settings.allowed_callers)
        self.access = AccessControl(
            audit, ae_title=settings.ae_title, allowed_networks=settings.allowed_networks
        )
        self._fsyncs = self._fsync_pool()
        self.journal = Journal(settings.journal_dir or settings.storage_dir / "journal")

    def _fsync_pool(self) -> ThreadPoolExecutor:
        """Threads for the checksums of received files, started when a handler starts so that
        they overlap its header read and checks (zlib releases the GIL); made on demand."""
        return ThreadPoolExecutor(
            max_workers=self.settings.limits.max_associations, thread_name_prefix="checksum"
        )

    def _ae(self) -> AE:
        limits = self.settings.limits
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        # Idle before the A-ASSOCIATE-RQ (ACSE) and between PDUs (network); reads inside a PDU
        # are bounded by limits.BoundedSocket.
        ae.network_timeout = limits.idle_timeout_s
        ae.acse_timeout = limits.idle_timeout_s
        ae.dimse_timeout = DIMSE_TIMEOUT_S
        # Connections are bounded by LimitedServer and associations by Admission; pynetdicom's
        # own count (every open connection) must never be the tighter one.
        ae.maximum_associations = limits.max_connections + 1
        for abstract_syntax, syntaxes in supported_contexts():
            ae.add_supported_context(abstract_syntax, list(syntaxes))
        if self.settings.allowed_callers:
            ae.require_calling_aet = list(self.settings.allowed_callers)
        # A-ASSOCIATE-RJ (rejected-permanent, service-user, "called AE title not recognized")
        # unless the Called AE Title is ae_title; _on_requested admits called_ae_titles.
        ae.require_called_aet = True
        return ae

    @property
    def called_ae_titles(self) -> tuple[str, ...]:
        """The Called AE Titles the node answers to: ``ae_title`` and ``called_ae_titles``."""
        return (self.settings.ae_title, *self.settings.called_ae_titles)

    def start(self) -> LimitedServer:
        """Start listening on ``bind_address:port`` in background threads.

        Incoming data sets are written to a file in ``<storage_dir>/incoming`` as they arrive
        (``pynetdicom._config.STORE_RECV_CHUNKED_DATASET``, :mod:`dicom_node.receive.incoming`),
        never held in memory; what a killed process left there is removed first.
        """
        _config.STORE_RECV_CHUNKED_DATASET = True
        stale = incoming.clean(
            self.settings.incoming_dir,
            SHARED_STALE_TEMP_S if self.settings.shared_storage else 0.0,
        )
        if stale:
            log.info("receiver.stale_incoming_removed", files=stale)
        self.recover()
        self.journal.open()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_close),
            *self.access.handlers(),
        ]
        ae = self._ae()
        incoming.register(ae, self.settings.incoming_dir)
        tls = self.settings.tls
        server = ae.make_server(
            (self.settings.bind_address, self.settings.port),
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
            server_class=self.server_class,
            request_handler=LimitedRequestHandler,
            limits=self.settings.limits,
            admission=self.admission,
            storage_dir=self.settings.storage_dir,
            on_refused=None if tls is None else self.access.refuse_connection,
            handshake_timeout_s=HANDSHAKE_TIMEOUT_S if tls is None else tls.handshake_timeout_s,
        )
        assert isinstance(server, LimitedServer)
        thread = threading.Thread(
            target=make_target(server.serve_forever), name="AcceptorServer", daemon=True
        )
        thread.start()
        ae._servers.append(server)
        self.server = server
        self.access.watch_crashes(server, on_dropped=self._dropped)
        log.info("receiver.listening", port=self.settings.port, ae_title=self.settings.ae_title)
        return server

    def _ssl_context(self) -> ssl.SSLContext | None:
        """TLS 1.2+ with the node's certificate; mutual TLS when ``tls.ca_file`` is set."""
        tls = self.settings.tls
        if tls is None:
            return None
        try:
            return server_context(tls)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls: cannot load the certificate, key or CA: {exc}") from exc

    def recover(self) -> int:
        """Re-apply what a killed process left in the journal; return how many instances.

        Every complete record (an instance answered Success, or being answered) gets its spool
        file rewritten from the record when it is missing or differs, and an index entry when
        it has none (then its association is released: it died with the process). A record
        whose instance was indexed since from a later association is left alone.

        Raises
        ------
        JournalError
            When a record cannot be re-applied (the segment stays for the next start).
        """
        released: set[str] = set()
        indexed = 0

        def apply(record: JournalRecord) -> None:
            nonlocal indexed
            meta = record.meta
            path = instance_path(
                self.settings.spool_dir, meta["study"], meta["series"], meta["sop"]
            )
            entry = self.db.indexed_instance(meta["sop"])
            if entry is not None and entry.association_id == meta["association"]:
                if not record.matches(path):
                    record.write_to(path)
                return
            if entry is not None and entry.received_at >= meta["at"]:
                return  # a later copy of the same instance is indexed
            record.write_to(path)
            self.db.record_instance(
                sop_instance_uid=meta["sop"],
                sop_class_uid=meta["sop_class"],
                study_uid=meta["study"],
                series_uid=meta["series"],
                patient_id=meta["patient"],
                attributes=meta["attributes"],
                path=path,
                association_id=meta["association"],
                late_policy=self.settings.late_instances,
                now=meta["at"],
            )
            released.add(meta["association"])
            indexed += 1

        self.journal.recover(apply)
        for association_id in released:
            self.db.association_released(association_id)
        if indexed:
            log.info("receiver.journal_reindexed", instances=indexed)
        return indexed

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
            self.access.unwatch_crashes()
        self.journal.close()
        # Its threads end when their fsyncs do; a later start() gets a fresh pool.
        self._fsyncs.shutdown(wait=False)
        self._fsyncs = self._fsync_pool()

    # -- handlers ------------------------------------------------------------------------------

    def _assoc(self, event: Event) -> _Association:
        key = event.assoc
        with self._lock:
            state = self._assocs.get(key)
            if state is None:
                state = _Association(
                    uuid.uuid4().hex[:12], _participants(event, self.settings.ae_title)
                )
                self._assocs[key] = state
            return state

    def _dropped(self, assoc: Any) -> None:
        """Forget the state of an association pynetdicom dropped without any event."""
        with self._lock:
            self._assocs.pop(assoc, None)

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_requested(self, event: Event) -> None:
        """Screen the request, then answer as the Called AE Title if in ``called_ae_titles``.

        :class:`AccessControl` refuses invalid AE titles (PS3.8 rules, from the raw PDU) and
        peers outside ``allowed_networks``. pynetdicom then compares the request's Called AE
        Title with the acceptor's title (``require_called_aet``) and rejects any other,
        before any data is exchanged.
        """
        if self.access.screen(event):
            self.metrics.associations.labels("rejected").inc()
            return
        primitive = event.assoc.requestor.primitive
        called = str(getattr(primitive, "called_ae_title", "")).strip()
        if called and called in self.settings.called_ae_titles:
            event.assoc.acceptor.ae_title = called
        echo_only = _echo_only(event)
        calling = str(getattr(primitive, "calling_ae_title", "")).strip()
        reason = self.admission.admit(
            event.assoc, str(event.assoc.requestor.address), calling, echo_only
        )
        if reason is not None:
            # A-ASSOCIATE-RJ rejected-transient, service-provider, local-limit-exceeded; kill()
            # waits (at most acse_timeout) for the RJ to go out and the peer to close.
            event.assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
            self._record_rejection(event, f"local limit exceeded: {reason}")
            event.assoc.kill()

    def _rejection_reason(self, event: Event) -> str:
        """Which check refused the association, for the audit trail and the log."""
        primitive = event.assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "")).strip()
        called = str(getattr(primitive, "called_ae_title", "")).strip()
        if self.settings.allowed_callers and calling not in self.settings.allowed_callers:
            return "calling AE title not in allowed_callers"
        if called not in self.called_ae_titles:
            return (
                f"called AE title not recognized: {called!r} is neither ae_title nor in "
                "called_ae_titles"
            )
        return "association refused (too many associations or user identity)"

    def _on_accepted(self, event: Event) -> None:
        state = self._assoc(event)
        self.metrics.associations.labels("accepted").inc()
        try:
            self.audit.record(
                AuditEvent.USER_AUTHENTICATION,
                AuditAction.EXECUTE,
                AuditOutcome.SUCCESS,
                state.who,
                event_type=AuditEventType.LOGIN,
                association_id=state.id,
            )
        except AuditWriteError:
            if _echo_only(event):
                # Verification moves no data: C-ECHO still tells a peer the node is up while
                # its audit trail (the database, with PostgreSQL) cannot be written.
                log.error("association.echo_unaudited", association_id=state.id)
                return
            # No access without its audit record (docs/security.md): A-ABORT before any DIMSE.
            log.error("association.aborted_unaudited", association_id=state.id)
            event.assoc.abort()
            return
        log.info("association.accepted", association_id=state.id, calling_ae=state.who.calling_ae)

    def _on_rejected(self, event: Event) -> None:
        self._record_rejection(event, self._rejection_reason(event))

    def _record_rejection(self, event: Event, reason: str) -> None:
        """Audit (Security Alert) and log a refused association; ``reason`` has no PHI."""
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip()
        who = _participants(event, called or self.settings.ae_title)
        self.access.forget(event)  # audited here, not again as an abort
        self.metrics.associations.labels("rejected").inc()
        try:
            self.audit.security_alert(who, reason)
        except AuditWriteError:  # refused all the same; the log keeps what the trail cannot
            log.error("association.rejected_unaudited", peer=who.peer_address, reason=reason)
            return
        log.warning(
            "association.rejected",
            calling_ae=who.calling_ae,
            called_ae=who.called_ae,
            peer=who.peer_address,
            reason=reason,
        )

    def _on_store(self, event: Event) -> int | Dataset:
        laps = _Laps(self.metrics.receive_step_seconds)
        try:
            return self._store(event, laps)
        finally:
            laps.end()

    def _store(self, event: Event, laps: _Laps) -> int | Dataset:
        """Check, keep (fsync, rename into the spool), index, and answer; see RECEIVE_STEPS.

        The data set is already on disk: pynetdicom wrote it to ``<storage_dir>/incoming``
        while it arrived (:mod:`dicom_node.receive.incoming`); it is renamed into the spool, not
        copied, and pynetdicom's later removal of that path finds nothing (it ignores OSError).
        """
        state = self._assoc(event)
        limits = self.settings.limits
        src = Path(event.dataset_path)
        dropped = net_limits.dropped_reason(event.assoc, src)
        if dropped is not None:  # read and dropped while it arrived (receive/limits.py)
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, dropped)
        if net_limits.free_disk_bytes(self.settings.storage_dir) < limits.min_free_disk_bytes:
            log.warning("store.disk_low", association_id=state.id)
            return self._refuse_for("disk_low")
        size = src.stat().st_size
        if size > limits.max_instance_bytes:
            log.warning("store.too_large", association_id=state.id, bytes=size)
            return self._refuse_for("too_large")
        # The file is complete (pynetdicom flushed each fragment). Its checksum (for the
        # journal record) runs beside the checks below; a refused file is not waited for.
        checksum = self._fsyncs.submit(file_checksum, src)
        laps.lap("limits")
        try:
            # Header and short values only: long values (pixel data) stay on disk.
            ds = dcmread(src, defer_size=DEFER_BYTES)
            laps.lap("header")
            check_instance(ds, event.request)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
            patient_id = str(ds.get("PatientID", ""))
            attributes = routing_attributes(ds)
        except RejectedInstance as exc:
            log.warning(
                "store.refused",
                association_id=state.id,
                reason=exc.reason,
                status=f"0x{exc.status:04X}",
            )
            return self._refuse(exc.status, exc.reason)
        except Exception as exc:  # noqa: BLE001 - network input: any decode failure is a refusal
            log.warning("store.undecodable", association_id=state.id, error=type(exc).__name__)
            return self._refuse_for("undecodable")
        laps.lap("validate")
        with self._lock:
            first = (patient_id, study_uid) not in state.studies
        if first:
            # Audited before the instance is kept and before the first Success of a study on
            # this association; no record, no access: refused. The count follows at close.
            try:
                self._audit_received(state, patient_id, study_uid, phase="receiving")
            except AuditWriteError:
                return self._refuse_for("audit")
            laps.lap("audit")
        path = instance_path(self.settings.spool_dir, study_uid, series_uid, sop_uid)
        received_at = time.time()
        meta = {
            "sop": sop_uid,
            "sop_class": str(ds.SOPClassUID),
            "study": study_uid,
            "series": series_uid,
            "patient": patient_id,
            "attributes": attributes,
            "association": state.id,
            "at": received_at,
        }
        try:
            # Durable before it is indexed: one fdatasync of the journal record; the spool
            # file and the index entry are rebuilt from it at start if a crash loses them.
            ticket = self.journal.append(meta, src, *checksum.result())
            laps.lap("journal")
        except (OSError, JournalError) as exc:
            log.error("store.write_failed", association_id=state.id, error=str(exc))
            return self._refuse_for("write")
        try:
            rename_quickly(src, path)
            laps.lap("rename")
        except OSError as exc:
            ticket.cancel()
            log.error("store.write_failed", association_id=state.id, error=exc.strerror)
            return self._refuse_for("write")
        try:
            self.db.record_instance(
                sop_instance_uid=sop_uid,
                sop_class_uid=str(ds.SOPClassUID),
                study_uid=study_uid,
                series_uid=series_uid,
                patient_id=patient_id,
                attributes=attributes,
                path=path,
                association_id=state.id,
                late_policy=self.settings.late_instances,
                now=received_at,
                durable=False,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. database busy: refuse, keep serving
            # Waited at most limits.database_timeout_s for a connection (PostgreSQL down).
            ticket.cancel()
            log.error("store.index_failed", association_id=state.id, error=type(exc).__name__)
            self._alert_database_failure(state, exc)
            return self._refuse_for("index")
        ticket.done()
        laps.lap("index")
        with self._lock:
            state.studies[(patient_id, study_uid)] += 1
        self.metrics.instances_received.inc()
        return int(StoreStatus.SUCCESS)

    def _alert_database_failure(self, state: _Association, exc: Exception) -> None:
        """A Security Alert, once per association, for C-STOREs refused because the database
        failed; when the audit trail cannot be written either, the refusal stands alone
        (no record, no access) and the log says so."""
        if state.database_alerted:
            return
        state.database_alerted = True
        try:
            self.audit.security_alert(
                state.who,
                f"C-STORE refused: the node database failed ({type(exc).__name__})",
            )
        except AuditWriteError:
            log.error("store.database_alert_unaudited", association_id=state.id)

    def _audit_received(
        self,
        state: _Association,
        patient_id: str,
        study_uid: str,
        *,
        phase: str,
        instances: int | None = None,
    ) -> None:
        """DICOM Instances Transferred (110104), action Create: instances of a study received."""
        self.audit.record(
            AuditEvent.INSTANCES_TRANSFERRED,
            AuditAction.CREATE,
            AuditOutcome.SUCCESS,
            state.who,
            patient_id=patient_id,
            study_uid=study_uid,
            association_id=state.id,
            phase=phase,
            instances=instances,
        )

    def _refuse_for(self, key: str) -> Dataset:
        """The C-STORE response of the refusal ``REFUSALS[key]``."""
        refused = REFUSALS[key]
        return self._refuse(refused.status, refused.comment)

    def _refuse(self, status: StoreStatus, reason: str) -> Dataset:
        """The C-STORE response: ``status`` with Error Comment (0000,0902) saying why."""
        self.metrics.instances_refused.labels(f"0x{status:04X}").inc()
        return refusal(status, reason)

    def _on_close(self, event: Event) -> None:
        with self._lock:
            state = self._assocs.pop(event.assoc, None)
        if state is None:
            return
        for (patient_id, study_uid), count in state.studies.items():
            try:
                self._audit_received(
                    state, patient_id, study_uid, phase="association closed", instances=count
                )
            except AuditWriteError:  # the transfer is on record ("receiving"); go on
                log.error("association.close_unaudited", association_id=state.id)
        if state.studies:
            self.db.association_released(state.id)
            if self.on_release is not None:
                self.on_release.set()
        log.info(
            "association.closed",
            association_id=state.id,
            instances=sum(state.studies.values()),
            studies=len(state.studies),
        )
