"""Access control at association time: AE titles by the PS3.8 rules, peer networks, alerts.

pynetdicom decodes the Called and Calling AE Title fields of an A-ASSOCIATE-RQ with
:meth:`str.strip`, which also removes tabs, newlines and CR LF: ``MODALITY`` followed by a tab
would be admitted as ``MODALITY``. Here the raw 16-byte fields are read from the PDU as
received (``EVT_DATA_RECV``) and judged by the rules of PS3.8 Table 9-11 and the AE value
representation of PS3.5 Table 6.2-1: leading and trailing spaces (20H) are not significant;
any other control character, a backslash or a byte outside ASCII makes the title invalid, and
the association is refused.

Every refusal or abort of an association, whoever decided it (this module, pynetdicom's own
checks, a malformed PDU, the peer), is recorded once per connection in the audit trail as a
Security Alert (DCM 110113) with the peer's address.
"""

from __future__ import annotations

import enum
import ipaddress
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.audit.events import Participants
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import AuditWriteError

log = structlog.get_logger(__name__)

#: PDU type of an A-ASSOCIATE-RQ (PS3.8 Table 9-11).
A_ASSOCIATE_RQ_TYPE = 0x01
#: Byte ranges of the Called and Calling AE Title fields in an A-ASSOCIATE-RQ PDU.
CALLED_AE_FIELD = slice(10, 26)
CALLING_AE_FIELD = slice(26, 42)


class RejectDiagnostic(enum.IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. with Source 1, service-user (PS3.8 Table 9-21)."""

    NO_REASON_GIVEN = 0x01
    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07


#: Result 1: rejected-permanent; Source 1: DICOM UL service-user (PS3.8 Table 9-21).
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01


def ae_title_problem(field: bytes) -> str | None:
    """Why a raw AE title field is not a valid AE title, or None when it is one.

    Parameters
    ----------
    field : bytes
        The 16 bytes of a Called or Calling AE Title field as received (PS3.8 Table 9-11).

    Returns
    -------
    str or None
        A short reason (no value quoted), or None for a valid title. Leading and trailing
        spaces are not significant; a title of only spaces is invalid; a control character
        (including TAB, LF, CR, NUL), a backslash or a non-ASCII byte is invalid (PS3.5 AE).
    """
    title = field.strip(b" ")
    if not title:
        return "empty (only spaces)"
    if any(byte < 0x20 or byte > 0x7E for byte in title):
        return "contains a control character or a non-ASCII byte"
    if b"\\" in title:
        return "contains a backslash"
    return None


def printable(field: bytes) -> str:
    """A raw AE title for the audit trail: spaces trimmed, other bytes escaped (``\\t``)."""
    return field.strip(b" ").decode("latin-1").encode("unicode_escape").decode("ascii")


#: The attribute of a pynetdicom Association that holds its :class:`_Connection`.
_STATE_ATTR = "_dicom_node_access"


@dataclass
class _Connection:
    """What access control knows about one connection."""

    calling: bytes = b""
    called: bytes = b""
    problem: str | None = None
    diagnostic: RejectDiagnostic = RejectDiagnostic.NO_REASON_GIVEN
    alerted: bool = False


class AccessControl:
    """Judges association requests and records every refusal and abort as a Security Alert.

    Parameters
    ----------
    audit : AuditLog
        Where Security Alerts go.
    ae_title : str
        The node's AE title: the called AE of an alert for a connection refused before any
        association (TLS).
    allowed_networks : tuple of IPv4Network or IPv6Network
        Peer addresses or networks allowed to associate (``allowed_networks``; empty: any).
    """

    def __init__(
        self,
        audit: AuditLog,
        *,
        ae_title: str,
        allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
    ) -> None:
        self.audit = audit
        self.ae_title = ae_title
        self.allowed_networks = allowed_networks
        self._lock = threading.Lock()
        self._hooks: tuple[Any, Any] | None = None

    def handlers(self) -> list[tuple[Any, Any]]:
        """The pynetdicom notification handlers this object needs (bound at server start)."""
        return [
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_FSM_TRANSITION, self._on_transition),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]

    def _conn(self, event: Event) -> _Connection:
        return self._state(event.assoc)

    def _state(self, assoc: Association) -> _Connection:
        """This connection's state, kept on its Association (it goes when the association does)."""
        with self._lock:
            conn = getattr(assoc, _STATE_ATTR, None)
            if conn is None:
                conn = _Connection()
                setattr(assoc, _STATE_ATTR, conn)
            return conn

    # -- the request -----------------------------------------------------------------------

    def _on_data(self, event: Event) -> None:
        """Read the raw AE title fields of an A-ASSOCIATE-RQ before pynetdicom decodes them."""
        data: bytes = event.data
        if not data or data[0] != A_ASSOCIATE_RQ_TYPE:
            return
        conn = self._conn(event)
        if len(data) < CALLING_AE_FIELD.stop:
            conn.problem = "A-ASSOCIATE-RQ too short"
            return
        conn.called, conn.calling = data[CALLED_AE_FIELD], data[CALLING_AE_FIELD]
        calling_problem = ae_title_problem(conn.calling)
        called_problem = ae_title_problem(conn.called)
        if calling_problem is not None:
            conn.problem = f"invalid calling AE title: {calling_problem}"
            conn.diagnostic = RejectDiagnostic.CALLING_AE_NOT_RECOGNIZED
        elif called_problem is not None:
            conn.problem = f"invalid called AE title: {called_problem}"
            conn.diagnostic = RejectDiagnostic.CALLED_AE_NOT_RECOGNIZED

    def peer_allowed(self, address: str) -> bool:
        """Whether ``address`` is in ``allowed_networks`` (always, when that list is empty)."""
        if not self.allowed_networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allowed_networks)

    def screen(self, event: Event) -> bool:
        """Refuse the request of ``event`` (EVT_REQUESTED) when it fails a check.

        Sends A-ASSOCIATE-RJ (rejected-permanent, service-user) and records a Security
        Alert. Returns True when the association was refused.
        """
        conn = self._conn(event)
        reason, diagnostic = conn.problem, conn.diagnostic
        if reason is None and not self.peer_allowed(str(event.assoc.requestor.address)):
            reason, diagnostic = "peer address not in allowed_networks", RejectDiagnostic(3)
        if reason is None:
            return False
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, int(diagnostic))
        self.alert(event, reason)
        event.assoc.kill()
        return True

    # -- refusals and aborts ---------------------------------------------------------------

    def alert(self, event: Event, reason: str) -> None:
        """Record one Security Alert (DCM 110113) for this connection, with the peer's address.

        Later calls for the same connection do nothing: one refusal or abort, one alert.
        """
        self._alert(event.assoc, reason)

    def _alert(self, assoc: Association, reason: str) -> None:
        conn = self._state(assoc)
        with self._lock:
            if conn.alerted:
                return
            conn.alerted = True
        requestor = assoc.requestor
        who = Participants(
            calling_ae=printable(conn.calling),
            called_ae=printable(conn.called),
            peer_address=f"{requestor.address}:{requestor.port}",
        )
        try:
            self.audit.security_alert(who, reason)
        except AuditWriteError:  # e.g. the database chain's server down: refused all the same
            log.error("association.refused_unaudited", peer=who.peer_address, reason=reason)
            return
        log.warning("association.refused", peer=who.peer_address, reason=reason)

    def refuse_connection(self, peer_address: str, reason: str) -> None:
        """Record a Security Alert for a connection refused before any association (TLS)."""
        self.audit.security_alert(
            Participants(called_ae=self.ae_title, peer_address=peer_address), reason
        )
        log.warning("connection.refused", peer=peer_address, reason=reason)

    def _on_transition(self, event: Event) -> None:
        """Alert on aborts: an invalid PDU, an A-ABORT either way, a connection lost."""
        fsm_event, action, state = event.fsm_event, event.action, event.current_state
        reason = None
        if fsm_event == "Evt19":
            problem = self._conn(event).problem
            reason = f"{problem} (aborted)" if problem else "invalid or unrecognised PDU"
        elif fsm_event == "Evt16" and state != "Sta13":
            reason = "aborted by the peer (A-ABORT)"
        elif fsm_event == "Evt15":
            reason = "aborted by the node (A-ABORT)"
        elif action == "AA-4":
            reason = "connection closed by the peer without release"
        elif fsm_event == "Evt18" and state == "Sta2":
            reason = "no A-ASSOCIATE-RQ in time"
        if reason is not None:
            self.alert(event, reason)
        if state == "Sta2" and fsm_event in ("Evt17", "Evt19"):
            # No A-ASSOCIATE-RQ will reach the association thread, which waits for one up to
            # acse_timeout holding a slot: wake it now (None reads as "nothing came").
            # pynetdicom's queue is typed for PDU primitives only; its reader treats None as
            # "nothing came" (the same as a timeout), which is what this needs.
            to_user: queue.Queue[Any] = event.assoc.dul.to_user_queue
            to_user.put(None)

    def _on_close(self, event: Event) -> None:
        """A connection that ends with a known problem and no alert yet gets its alert now."""
        conn = self._conn(event)
        if conn.problem is not None:
            self.alert(event, conn.problem)

    def watch_crashes(
        self,
        server: ThreadedAssociationServer,
        on_dropped: Callable[[Association], None] | None = None,
    ) -> None:
        """Alert when a DUL thread of ``server`` dies of an exception (a malformed P-DATA).

        pynetdicom then drops the association without A-ABORT and without any event
        (``EVT_ABORTED``, ``EVT_CONN_CLOSE``): the only trace is the uncaught exception, which
        this hook sees before handing it on to the previous hook (the structured logger).
        ``on_dropped`` is then called with the association, so that whoever keeps state for
        it can let it go.
        """
        previous = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            thread = args.thread
            assoc = getattr(thread, "assoc", None)
            ours = isinstance(assoc, Association) and getattr(assoc, "_server", None) is server
            if isinstance(thread, DULServiceProvider) and isinstance(assoc, Association) and ours:
                kind = args.exc_type.__name__
                self._alert(assoc, f"malformed PDU ({kind}); association dropped")
                if on_dropped is not None:
                    on_dropped(assoc)
            previous(args)

        self._hooks = (previous, hook)
        threading.excepthook = hook

    def unwatch_crashes(self) -> None:
        """Undo :meth:`watch_crashes` (when no later hook was installed over it)."""
        if self._hooks is not None and threading.excepthook is self._hooks[1]:
            threading.excepthook = self._hooks[0]
        self._hooks = None

    def forget(self, event: Event) -> None:
        """Mark this connection's refusal as recorded elsewhere (pynetdicom's own rejections)."""
        self._conn(event).alerted = True
