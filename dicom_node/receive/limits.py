"""Bounds on what one peer can hold: connection slots, time, memory and disk.

pynetdicom reads each PDU with blocking ``recv()`` calls on a socket without a timeout, counts
every open connection (even one that never sent an A-ASSOCIATE-RQ) against
``AE.maximum_associations``, and ends an association on its ACSE or network timeout only once
the DUL thread comes back from ``recv()``. So a peer that sends part of a PDU and then nothing,
or drips it, holds a slot for ever. This module bounds every read and every slot:

- :class:`BoundedSocket` reads a PDU under a deadline: at most ``idle_timeout_s`` between two
  reads, and after the first ``idle_timeout_s`` at least ``min_bytes_per_s``. A DIMSE message
  (a C-STORE's command and data set) is held to the same rate over its whole transfer,
  whatever its PDU sizes and the gaps between them: a peer that sends one small complete PDU
  every few seconds is cut too. A PDU longer than the node's maximum PDU length, a data set
  past ``max_instance_bytes``, or a message below the rate ends the connection (A-ABORT, then
  close). A data set that starts below the free-disk watermark, or whose disk falls below
  half of it while it arrives, is read and dropped (:func:`dropped_reason`): its C-STORE is
  then refused with 0xA700, the association goes on.
- :class:`LimitedServer` closes a new connection at once beyond ``max_connections`` open
  connections or ``max_associations_per_peer`` from one host, and frees each slot the moment
  the association thread ends.
- :class:`Admission` decides, at the A-ASSOCIATE-RQ, whether an association fits: at most
  ``max_associations`` in all, of which ``reserved_associations`` only for C-ECHO-only
  associations and ``allowed_callers``; at most ``max_associations_per_peer`` per calling AE
  title. A refusal is an A-ASSOCIATE-RJ (rejected-transient, service-provider (presentation),
  local-limit-exceeded: PS3.8 9.3.4).

See docs/security.md, "Connections and memory".
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.common.tls import HANDSHAKE_TIMEOUT_S, handshake_failure
from dicom_node.config.sections import Limits
from dicom_node.receive import reactor
from dicom_node.store.files import free_disk_bytes

log = structlog.get_logger(__name__)

#: A-ASSOCIATE-RJ: Result rejected-transient (2), Source service-provider (presentation) (3),
#: Reason local-limit-exceeded (2); PS3.8 9.3.4.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

#: Slack over the negotiated maximum PDU length for the PDU header and for an A-ASSOCIATE-RQ,
#: whose length the maximum does not bound.
PDU_SLACK_BYTES = 64 * 1024


#: A data set still arriving has the free disk space checked again after this many bytes, so
#: each connection writes at most this plus one PDU (about 2 MiB) past the last check.
DISK_CHECK_BYTES = 1024 * 1024


class PeerLimitExceeded(OSError):
    """A peer passed one of the :class:`~dicom_node.config.sections.Limits`; its connection ends."""


#: The Error Comment of a C-STORE refused for the free-disk watermark (0xA700).
DISK_LOW_COMMENT = "node storage below its free-space mark"


def _in_progress_file(assoc: Association) -> Any:
    """The temp file of the data set being received on ``assoc``, or None."""
    message = getattr(assoc.dimse, "message", None)
    return getattr(message, "_data_set_file", None)


def dropped_reason(assoc: Association, path: Path) -> str | None:
    """Why the data set received into ``path`` on ``assoc`` was dropped, or None (kept).

    A data set dropped while it arrived is no instance: its file holds at most the last
    fragment. The C-STORE handler asks once per data set (the answer is forgotten).
    """
    sock = assoc.dul.socket
    dropped = getattr(sock, "dropped", None)
    if not dropped:
        return None
    reason: str | None = dropped.pop(Path(path), None)
    return reason


def discard_partial_data_sets(assoc: Association) -> int:
    """Remove the temp files of data sets ``assoc`` left unfinished or unserved; how many."""
    paths: list[Path] = []
    message = getattr(assoc.dimse, "message", None)
    fh = getattr(message, "_data_set_file", None)
    if fh is not None:
        with contextlib.suppress(OSError):
            fh.close()
        paths.append(Path(fh.name))
    while True:
        try:
            _, primitive = assoc.dimse.msg_queue.get(block=False)
        except Exception:  # noqa: BLE001 - queue.Empty: nothing left
            break
        path = getattr(primitive, "_dataset_path", None)
        if isinstance(path, Path):
            paths.append(path)
    removed = 0
    for path in paths:
        if path.exists():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class BoundedSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose reads end under the node's :class:`Limits`.

    Set ``limits``, ``max_pdu_bytes`` and ``storage_dir`` after construction (see
    :meth:`LimitedRequestHandler._create_association`).
    """

    limits: Limits
    max_pdu_bytes: int
    storage_dir: Path
    #: (the data set's file, its size) at the last free-space check
    _disk_checked: tuple[Any, int] | None = None
    #: The DIMSE message being received (pynetdicom's ``dimse.message``), when it started
    #: (monotonic seconds) and the bytes read since.
    _message: Any = None
    _message_start: float = 0.0
    _message_bytes: int = 0
    #: The file of the data set being dropped, and the bytes of it already dropped.
    _dropping: Any = None
    _dropped_bytes: int = 0
    #: Files of data sets dropped while they arrived -> why (see :func:`dropped_reason`).
    dropped: dict[Path, str] | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` or fewer (peer closed); raise :class:`PeerLimitExceeded` or
        :class:`TimeoutError` when the peer passes a limit (the DUL then closes the connection).
        """
        if nr_bytes > self.max_pdu_bytes:
            self._abort(f"PDU of {nr_bytes} bytes announced; the maximum is {self.max_pdu_bytes}")
        self._track_message()
        self._check_incoming_data_set()
        try:
            out = self._bounded_recv(nr_bytes)
        except OSError:
            self._wake_acceptor()
            raise
        if self._message is not None:
            self._message_bytes += len(out)
        if len(out) < nr_bytes:
            self._wake_acceptor()  # the peer closed
        return out

    @property
    def ready(self) -> bool:
        """Whether data waits to be read (pynetdicom's reactor asks about every millisecond).

        While nothing waits and a DIMSE message is part-way, the message must still be on
        pace (:meth:`_message_deadline`); one that is not is cut here: A-ABORT and close (the
        reactor then sees the connection closed), so gaps between PDUs count too.
        """
        if super().ready:
            return True
        if self._track_message() and time.monotonic() > self._message_deadline(0):
            log.warning(
                "connection.too_slow",
                peer=self._peer(),
                received=self._message_bytes,
                within="message",
            )
            self._send_abort()
            self.close()
        return False

    def _track_message(self) -> bool:
        """Follow pynetdicom's message in progress; True while one is part-way."""
        message = getattr(self.assoc.dimse, "message", None)
        if message is not self._message:
            self._message = message
            self._message_start = time.monotonic()
            self._message_bytes = 0
        return message is not None

    def _message_deadline(self, more_bytes: int) -> float:
        """When the message in progress must have had ``more_bytes`` more bytes read: its
        start + ``idle_timeout_s`` + its bytes / ``min_bytes_per_s`` (infinite without one)."""
        if self._message is None:
            return float("inf")
        limits = self.limits
        done = self._message_bytes + more_bytes
        return self._message_start + limits.idle_timeout_s + done / limits.min_bytes_per_s

    def _bounded_recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        limits = self.limits
        start = time.monotonic()
        out = bytearray()
        while len(out) < nr_bytes:
            # The peer must have sent len(out) bytes by start + idle + len(out) / rate (and
            # the message so far on the same pace since it began), and never wait more than
            # idle_timeout_s between two reads.
            deadline = min(
                start + limits.idle_timeout_s + len(out) / limits.min_bytes_per_s,
                self._message_deadline(len(out)),
            )
            wait = min(limits.idle_timeout_s, deadline - time.monotonic())
            if wait <= 0:
                log.warning("connection.too_slow", peer=self._peer(), received=len(out))
                raise TimeoutError("peer below limits.min_bytes_per_s")
            sock.settimeout(wait)
            try:
                chunk = sock.recv(min(65536, nr_bytes - len(out)))
            except TimeoutError:
                log.warning("connection.stalled", peer=self._peer(), received=len(out))
                raise
            if not chunk:
                break
            out.extend(chunk)
        return out

    def _wake_acceptor(self) -> None:
        """Before an A-ASSOCIATE-RQ, end the association thread's wait for it at once.

        pynetdicom's acceptor waits ``acse_timeout`` for the request even after the connection
        is gone; a None on its queue is what it reads as "timed out", and it then closes.
        """
        assoc = self.assoc
        if assoc.is_acceptor and assoc.requestor.primitive is None:
            assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]

    def _check_incoming_data_set(self) -> None:
        """Bound the data set being received: size (A-ABORT) and free disk (read and drop).

        Runs before every read; the free space is asked for when a data set starts and then
        after each further :data:`DISK_CHECK_BYTES` of it (not for each read: two
        ``statvfs`` per read were a tenth of the DUL thread's time per instance).
        """
        fh = _in_progress_file(self.assoc)
        if fh is None or fh.closed:
            return
        size = os.fstat(fh.fileno()).st_size
        if fh is self._dropping:
            # Read and dropped: the file keeps at most the fragment written since the last read.
            self._dropped_bytes += size
            fh.seek(0)
            fh.truncate()
            size = 0
        else:
            self._dropping, self._dropped_bytes = None, 0
        total = self._dropped_bytes + size
        if total > self.limits.max_instance_bytes:
            self._abort(f"data set passed limits.max_instance_bytes ({total} bytes received)")
        if self._dropping is not None:
            return
        checked = self._disk_checked
        starting = checked is None or checked[0] is not fh
        if checked is not None and not starting and size - checked[1] < DISK_CHECK_BYTES:
            return
        self._disk_checked = (fh, size)
        # A data set that starts below the watermark would be refused (0xA700) when it ends:
        # it is read and dropped from the start. One that started above it is dropped only
        # below half of it, the floor that keeps the disk from filling up. The file is in
        # <storage_dir>/incoming (receive.incoming): both are one file system unless incoming
        # is a mount of its own, and then both are watched.
        mark = self.limits.min_free_disk_bytes
        floor = mark if starting else mark // 2
        for folder in (Path(fh.name).parent, self.storage_dir):
            if free_disk_bytes(folder) < floor:
                self._drop(fh, "starts below" if starting else "fell below half of")
                return

    def _drop(self, fh: Any, where: str) -> None:
        """Read the rest of the data set in ``fh`` without keeping it; its C-STORE is refused."""
        log.warning(
            "store.disk_low",
            peer=self._peer(),
            reason=f"free disk space {where} limits.min_free_disk_bytes: data set dropped",
        )
        self._dropping, self._dropped_bytes = fh, 0
        if self.dropped is None:
            self.dropped = {}
        self.dropped[Path(fh.name)] = DISK_LOW_COMMENT
        fh.seek(0)
        fh.truncate()

    def _abort(self, reason: str) -> None:
        """Send an A-ABORT (service-provider, reason not specified) and raise."""
        log.warning("connection.limit_exceeded", peer=self._peer(), reason=reason)
        self._send_abort()
        raise PeerLimitExceeded(reason)

    def _send_abort(self) -> None:
        """Send an A-ABORT (service-provider, reason not specified), at most 1 s."""
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = 0x00
        with contextlib.suppress(OSError):
            assert self.socket is not None
            self.socket.settimeout(1.0)
            self.socket.sendall(pdu.encode())

    def _peer(self) -> str:
        info = self.assoc.requestor.address_info
        return f"{info.address}:{info.port}" if info is not None else "?"


class _ContextList(list[Any]):
    """The server's presentation contexts, copied cheaply for each new association.

    pynetdicom deep-copies every supported context for each connection (171 of them: about
    60 ms of CPU), which lets a burst of bare connections starve the node. Each association
    only needs its own context objects and transfer syntax lists; the UIDs are immutable.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for cx in self:
            clone = copy.copy(cx)
            clone._transfer_syntax = list(cx._transfer_syntax)
            out.append(clone)
        return out


@dataclass
class _Admitted:
    host: str
    calling_ae: str
    reserved: bool


class Admission:
    """Counts admitted associations and decides whether a new one fits the limits."""

    def __init__(self, limits: Limits, known_callers: tuple[str, ...] = ()) -> None:
        self.limits = limits
        self.known_callers = frozenset(known_callers)
        self._lock = threading.Lock()
        self._admitted: dict[int, _Admitted] = {}

    def admit(self, assoc: Association, host: str, calling_ae: str, echo_only: bool) -> str | None:
        """Admit ``assoc``; return None, or why it does not fit (no patient data).

        C-ECHO-only associations and ``allowed_callers`` may use the reserved share; others
        only ``max_associations - reserved_associations``.
        """
        limits = self.limits
        privileged = echo_only or calling_ae in self.known_callers
        with self._lock:
            total = len(self._admitted)
            same_ae = sum(1 for a in self._admitted.values() if a.calling_ae == calling_ae)
            ceiling = limits.max_associations - (0 if privileged else limits.reserved_associations)
            if total >= ceiling:
                return f"too many associations ({total} of {ceiling} for this kind of caller)"
            if same_ae >= limits.max_associations_per_peer and not echo_only:
                return f"too many associations from this calling AE title ({same_ae})"
            self._admitted[id(assoc)] = _Admitted(host, calling_ae, reserved=privileged)
            return None

    def release(self, assoc: Association) -> None:
        """Forget ``assoc`` (its thread has ended); its slot is free at once."""
        with self._lock:
            self._admitted.pop(id(assoc), None)

    @property
    def admitted(self) -> int:
        with self._lock:
            return len(self._admitted)


class LimitedRequestHandler(RequestHandler):
    """Gives each association a :class:`BoundedSocket` and holds its slot until it ends."""

    server: LimitedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        # A thin subclass over the socket pynetdicom built (same state, bounded reads).
        sock.__class__ = BoundedSocket
        bounded: BoundedSocket = sock  # type: ignore[assignment]
        bounded.limits = self.server.limits
        bounded.max_pdu_bytes = int(self.ae.maximum_pdu_size or 0) + PDU_SLACK_BYTES
        bounded.storage_dir = self.server.storage_dir
        # Its two reactor threads wait for work instead of polling every 1 ms (issue 19).
        reactor.make_event_driven(assoc)
        return assoc

    def handle(self) -> None:
        """Run the association to its end, then free its slot and its temp files."""
        assoc = self._create_association()
        from pynetdicom import evt

        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        try:
            assoc.start()
            assoc.join()
        finally:
            self.server.admission.release(assoc)
            reactor.release(assoc)
            if discard_partial_data_sets(assoc):
                log.info("connection.partial_data_set_discarded", peer=self.client_address[0])


class LimitedServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` that bounds open connections, in all and per host.

    Construct through :meth:`pynetdicom.ae.ApplicationEntity.make_server` with
    ``server_class=LimitedServer, request_handler=LimitedRequestHandler`` and the keywords of
    :meth:`__init__` (``limits``, ``admission``, ``storage_dir``; with TLS ``on_refused`` and
    ``handshake_timeout_s``), which ``make_server`` hands on.
    """

    # The association threads outlive shutdown(); never wait for them there.
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops the handshakes of a burst of connections.
    request_queue_size = 128
    limits: Limits
    admission: Admission
    storage_dir: Path
    #: Seconds a peer has to complete the TLS handshake (``tls.handshake_timeout_s``).
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    #: Called with the peer's ``"address:port"`` and the reason when a handshake fails.
    on_refused: Callable[[str, str], None] | None = None

    def __init__(
        self,
        *args: Any,
        limits: Limits,
        admission: Admission,
        storage_dir: Path,
        on_refused: Callable[[str, str], None] | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        """Bind and listen (:class:`ThreadedAssociationServer`) under these bounds.

        Parameters
        ----------
        *args, **kwargs
            What :meth:`pynetdicom.ae.ApplicationEntity.make_server` passes on.
        limits
            The bounds this server and its sockets enforce.
        admission
            Counts the admitted associations (released when each one ends).
        storage_dir
            The folder whose free space bounds a data set still arriving.
        on_refused, handshake_timeout_s
            See the class attributes.
        """
        self.limits = limits
        self.admission = admission
        self.storage_dir = storage_dir
        self.on_refused = on_refused
        self.handshake_timeout_s = handshake_timeout_s
        self._conn_lock = threading.Lock()
        self._per_host: dict[str, int] = {}
        super().__init__(*args, **kwargs)
        self.contexts = _ContextList(self.contexts)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot for ``client_address``'s host, or refuse (closed at once)."""
        host = str(client_address[0])
        with self._conn_lock:
            total = sum(self._per_host.values())
            mine = self._per_host.get(host, 0)
            if total >= self.limits.max_connections:
                reason = "limits.max_connections reached"
            elif mine >= self.limits.max_associations_per_peer:
                reason = "limits.max_associations_per_peer reached for this host"
            else:
                self._per_host[host] = mine + 1
                return True
        log.warning("connection.refused", peer=host, reason=reason)
        return False

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; its TLS handshake happens on the connection's own thread.

        pynetdicom wraps the socket and shakes hands here, on the one thread that accepts, with
        no timeout: a peer that connects and never says hello would stop every accept.
        """
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.limits.idle_timeout_s)
        return client, address

    def _free(self, host: str) -> None:
        with self._conn_lock:
            left = self._per_host.get(host, 0) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)

    @property
    def open_connections(self) -> int:
        """Connections holding a slot now."""
        with self._conn_lock:
            return sum(self._per_host.values())

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection on its own thread; its slot is freed when it ends.

        With TLS the handshake comes first, bounded by ``handshake_timeout_s``; a handshake
        that fails or stalls (plain TCP, another CA, an expired certificate, TLS below 1.2) is
        reported to ``on_refused`` (the receiver audits it) and the connection closed.
        """
        connection = request
        try:
            if self.ssl_context is not None:
                try:
                    request.settimeout(self.handshake_timeout_s)
                    connection = self.ssl_context.wrap_socket(request, server_side=True)
                    connection.settimeout(self.limits.idle_timeout_s)
                except (OSError, ValueError) as exc:
                    if self.on_refused is not None:
                        peer = f"{client_address[0]}:{client_address[1]}"
                        self.on_refused(peer, handshake_failure(exc))
                    return
            super().process_request_thread(connection, client_address)
        finally:
            for sock in {id(request): request, id(connection): connection}.values():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
            self._free(str(client_address[0]))
