"""DIMSE destinations: C-STORE files over one association, C-ECHO a peer (the SCU side).

Presentation contexts: for each SOP class of the files, one context with the little-endian
uncompressed syntaxes (Explicit, Implicit VR), and one context of its own for each other
transfer syntax a file has (JPEG-LS, JPEG 2000, JPEG, RLE, big endian, deflated). An acceptor
picks one syntax per context, so a file's own syntax in a context of its own is the only way
it can be accepted as it is; each file then goes in the context of its own syntax (pynetdicom
converts only between Explicit and Implicit VR Little Endian, never decompresses). A file no
accepted context fits fails on its own, with the syntaxes the peer accepted for its SOP class.

Timeouts (pynetdicom's AE): ``connect_timeout_s`` bounds the TCP connection
(``connection_timeout``) and the association negotiation (``acse_timeout``); ``timeout_s``
bounds each DIMSE response (``dimse_timeout``) and any silence on the association
(``network_timeout``). A destination that accepts the connection and never answers therefore
costs at most those seconds, and only its own delivery thread waits.

When no association comes about, :func:`association_failure` says why in words: the
A-ASSOCIATE-RJ's result, source and reason, the peer's abort, no answer in time, or why the
TCP connection failed (refused, timed out, unknown host, TLS handshake).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.common.status import STORED
from dicom_node.common.tls import client_context
from dicom_node.config.destinations import DimseDestination
from dicom_node.config.sections import TLSSettings
from dicom_node.send.senders.interface import SendOutcome, StoreResult

#: Upper bound of one probing C-ECHO's response, in seconds.
ECHO_TIMEOUT_S = 5.0

#: Most presentation contexts one association may propose (PS3.8: odd IDs 1 to 255).
MAX_CONTEXTS = 128

#: Proposed together in one context per SOP class; pynetdicom converts between them.
LITTLE_ENDIAN: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# A-ASSOCIATE-RJ (PS3.8 9.3.4) in words: result, source, and the reason per source.
_RESULT = {1: "permanently", 2: "transiently (try again later)"}
_SOURCE = {
    1: "the peer (service user)",
    2: "the peer's DICOM stack (service provider, ACSE)",
    3: "the peer's DICOM stack (service provider, presentation)",
}
_REASON = {
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognised: the peer does not accept our AE title",
        7: "called AE title not recognised: the peer is not known by that AE title",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}


@dataclass(frozen=True)
class EchoResult:
    """A C-ECHO's outcome: the response ``status`` (0 is success), or None and ``detail``.

    ``detail`` says in words why there is no status (no association, no response); empty
    when the peer answered.
    """

    status: int | None
    detail: str = ""


@dataclass
class _Watch:
    """What an association request met: did TCP connect, what did the peer answer first."""

    connected: bool = False
    answer: object | None = None
    #: An A-ASSOCIATE-RJ PDU as received (its primitive), for when ACSE never saw it.
    rejected: A_ASSOCIATE | None = None
    started: float = field(default_factory=time.monotonic)

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_ACSE_RECV, self._received),
            (evt.EVT_PDU_RECV, self._pdu),
        ]

    def _pdu(self, event: Any) -> None:
        # A peer that rejects and closes at once (DCMTK storescp --refuse) can have its
        # A-ASSOCIATE-RJ decoded by the DUL thread but never handed to ACSE, when pynetdicom
        # sees the closed connection first: keep the rejection from the PDU itself.
        if self.answer is None and isinstance(event.pdu, A_ASSOCIATE_RJ):
            self.rejected = event.pdu.to_primitive()

    def _opened(self, event: Any) -> None:
        self.connected = True

    def _received(self, event: Any) -> None:
        if self.answer is None:
            self.answer = event.primitive


def _rejection(rj: A_ASSOCIATE) -> str:
    source = int(rj.result_source or 0)
    reason = _REASON.get(source, {}).get(int(rj.diagnostic or 0), f"reason {rj.diagnostic}")
    result = _RESULT.get(int(rj.result or 0), f"(result {rj.result})")
    return f"association rejected {result} by {_SOURCE.get(source, f'source {source}')}: {reason}"


def _connect_failure(host: str, port: int, timeout_s: float, tls: bool) -> str:
    """Why a TCP connection to ``host:port`` fails, found by trying one (pynetdicom logs it
    only)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        return f"connection refused: nothing listens on {host}:{port}"
    except TimeoutError:
        return (
            f"no connection within {timeout_s:g} s: {host}:{port} does not answer "
            "(host down, or a firewall drops the connection)"
        )
    except socket.gaierror:
        return f"cannot resolve host {host!r}"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    if tls:
        return (
            f"TLS handshake with {host}:{port} failed "
            "(check the TLS settings, and that the peer speaks TLS on that port)"
        )
    return f"the connection to {host}:{port} failed"


def association_failure(
    assoc: Association, watch: _Watch, host: str, port: int, *, tls: bool, probe: bool = True
) -> str:
    """Why ``assoc`` (requested with ``watch``'s handlers) was not established, in words.

    When TCP did not connect, ``probe`` tries one connection to say why (refused, timed out,
    unknown host, TLS handshake); without it the answer is only "no connection".
    """
    answer = watch.answer if watch.answer is not None else watch.rejected
    if not watch.connected:
        if not probe:
            return f"no connection to {host}:{port}"
        return _connect_failure(host, port, assoc.connection_timeout or 10.0, tls)
    if isinstance(answer, A_ASSOCIATE):
        if answer.result in (1, 2):
            return _rejection(answer)
        return "the peer accepted none of the proposed presentation contexts"
    if isinstance(answer, A_ABORT):
        return "the peer aborted the association request (A-ABORT)"
    if isinstance(answer, A_P_ABORT):
        return "the association request was aborted (A-P-ABORT)"
    timeout_s = assoc.acse_timeout or 0.0
    if time.monotonic() - watch.started >= timeout_s - 0.1:
        return f"no answer to the association request within {timeout_s:g} s"
    return "the peer closed the connection without answering the association request"


def _ae(calling_ae: str, connect_timeout_s: float, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = connect_timeout_s
    ae.acse_timeout = connect_timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def _associate(
    ae: AE, host: str, port: int, called_ae: str, tls_args: tuple[ssl.SSLContext, str] | None
) -> tuple[Association, _Watch]:
    """Request an association, watching what the request meets (see :func:`association_failure`)."""
    watch = _Watch()
    assoc = ae.associate(
        host, port, ae_title=called_ae, tls_args=tls_args, evt_handlers=watch.handlers()
    )
    return assoc, watch


@dataclass(frozen=True)
class _File:
    """One file to send: its SOP class and transfer syntax, or why it cannot be sent."""

    path: Path
    sop_class: UID = UID("")
    syntax: UID = UID("")
    problem: str = ""


def _read(path: Path) -> _File:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except OSError as exc:
        return _File(path, problem=f"cannot read file: {exc.strerror or exc}")
    except InvalidDicomError:
        return _File(path, problem="not a DICOM file (no DICM prefix / file meta information)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    missing = [
        name
        for name, value in (
            ("Transfer Syntax UID (0002,0010)", syntax),
            ("SOP Class UID (0008,0016)", ds.get("SOPClassUID")),
            ("SOP Instance UID (0008,0018)", ds.get("SOPInstanceUID")),
        )
        if not value
    ]
    if missing:
        return _File(path, problem=f"not sent: the file has no {' and no '.join(missing)}")
    return _File(path, UID(ds.SOPClassUID), UID(syntax))


def proposed_contexts(files: Iterable[tuple[UID, UID]]) -> list[tuple[UID, list[UID]]]:
    """The presentation contexts proposed for files of these ``(SOP class, transfer syntax)``:
    per SOP class, one with Explicit and Implicit VR Little Endian, and one more for each other
    syntax a file is in (a peer accepts one syntax per context; each file goes in its own)."""
    contexts: dict[tuple[UID, tuple[UID, ...]], None] = {}
    for sop_class, syntax in files:
        contexts[(sop_class, LITTLE_ENDIAN)] = None
        if syntax not in LITTLE_ENDIAN:
            contexts[(sop_class, (syntax,))] = None
    return [(sop, list(syntaxes)) for sop, syntaxes in contexts]


def _proposals(files: Sequence[_File]) -> list[tuple[UID, list[UID]]]:
    """The presentation contexts for ``files`` (:func:`proposed_contexts`)."""
    return proposed_contexts((f.sop_class, f.syntax) for f in files)


def _batches(files: Sequence[_File]) -> Iterator[list[_File]]:
    """``files`` in order, in runs whose contexts fit one association (128 at most)."""
    batch: list[_File] = []
    for f in files:
        if batch and len(_proposals([*batch, f])) > MAX_CONTEXTS:
            yield batch
            batch = []
        batch.append(f)
    if batch:
        yield batch


def _no_context(assoc: Association, f: _File) -> str:
    """Why ``f`` has no context: what the peer accepted for its SOP class, what to do."""
    accepted = sorted(
        {
            cx.transfer_syntax[0].name
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == f.sop_class and cx.transfer_syntax
        }
    )
    said = (
        f"it accepted only {', '.join(accepted)} for this SOP class"
        if accepted
        else "it accepted no transfer syntax for this SOP class"
    )
    hint = (
        "; decompress the file (e.g. dcmdjpeg, dcmdjpls, dcmdrle) or let the peer accept it"
        if f.syntax.is_compressed
        else ""
    )
    return (
        f"not sent: the peer accepted no presentation context for "
        f"{f.sop_class.name or f.sop_class} in {f.syntax.name or f.syntax}; {said}{hint}"
    )


def store_files(
    destination: DimseDestination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
) -> list[StoreResult]:
    """C-STORE ``paths`` to ``destination`` (over one association while 128 contexts fit).

    Proposes, for each SOP class, the little-endian uncompressed syntaxes and each file's own
    transfer syntax in a context of its own, and sends each file as it is (compressed data
    are never decoded). Never raises for network trouble: every path gets a
    :class:`StoreResult`.
    """
    return list(_store(destination, paths, calling_ae=calling_ae).results)


def _store(destination: DimseDestination, paths: Sequence[Path], *, calling_ae: str) -> SendOutcome:
    try:
        tls_args = (
            None
            if destination.tls is None
            else (client_context(destination.tls, check_hostname=False), destination.host)
        )
    except (ssl.SSLError, OSError) as exc:
        return SendOutcome.all_failed(paths, f"TLS set-up failed: {exc}")
    files = [_read(p) for p in paths]
    results = {f.path: StoreResult(f.path, False, f.problem) for f in files if f.problem}
    answered = False
    for batch in _batches([f for f in files if not f.problem]):
        sent, took_part = _store_batch(destination, batch, calling_ae, tls_args)
        results.update((r.path, r) for r in sent)
        answered = answered or took_part
    return SendOutcome(tuple(results[p] for p in paths), answered)


def _store_batch(
    destination: DimseDestination,
    files: Sequence[_File],
    calling_ae: str,
    tls_args: tuple[ssl.SSLContext, str] | None,
) -> tuple[list[StoreResult], bool]:
    """Send ``files`` over one association: a result per file, and whether the peer answered."""
    ae = _ae(calling_ae, destination.connect_timeout_s, destination.timeout_s)
    for sop_class, syntaxes in _proposals(files):
        ae.add_requested_context(sop_class, syntaxes)
    assoc, watch = _associate(
        ae, destination.host, destination.port, destination.ae_title, tls_args
    )
    if not assoc.is_established:
        # No probing connection here: delivery retries a peer that is down anyway.
        why = "no association (peer down?)"
        if watch.connected:
            why = "no association: " + association_failure(
                assoc, watch, destination.host, destination.port, tls=tls_args is not None
            )
        return [StoreResult(f.path, False, why) for f in files], assoc.is_rejected
    results = []
    try:
        for f in files:
            if not assoc.is_established:
                results.append(StoreResult(f.path, False, "association lost"))
                continue
            try:
                rsp = assoc.send_c_store(f.path)
            except ValueError as exc:
                no_context = "No presentation context" in str(exc)
                detail = _no_context(assoc, f) if no_context else f"not sent: {exc}"
                results.append(StoreResult(f.path, False, detail))
                continue
            except (AttributeError, RuntimeError, OSError) as exc:
                results.append(StoreResult(f.path, False, f"not sent: {exc}"))
                continue
            status = rsp.get("Status") if rsp else None
            if status is None:
                results.append(StoreResult(f.path, False, "no response (timeout or abort)"))
            else:
                results.append(StoreResult(f.path, status in STORED, f"status 0x{status:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results, True


def echo(
    host: str,
    port: int,
    ae_title: str,
    *,
    calling_ae: str = "DICOMNODE",
    timeout_s: float = 10,
    connect_timeout_s: float | None = None,
    tls: TLSSettings | None = None,
    tls_context: ssl.SSLContext | None = None,
    probe: bool = True,
) -> EchoResult:
    """C-ECHO a peer: its status (0 is success), or no status and why (see :class:`EchoResult`).

    With ``tls`` the association is made over TLS, as :func:`store_files` does;
    ``tls_context`` instead gives the TLS context itself (the node's health check).
    ``connect_timeout_s`` (default ``timeout_s``) bounds the connection and negotiation.
    ``probe``: when TCP does not connect, try once more to say why (see
    :func:`association_failure`).
    """
    ae = _ae(calling_ae, timeout_s if connect_timeout_s is None else connect_timeout_s, timeout_s)
    ae.add_requested_context(Verification)
    try:
        if tls_context is None and tls is not None:
            tls_context = client_context(tls, check_hostname=False)
    except (ssl.SSLError, OSError) as exc:
        return EchoResult(None, f"TLS set-up failed: {exc}")
    tls_args = None if tls_context is None else (tls_context, host)
    assoc, watch = _associate(ae, host, port, ae_title, tls_args)
    if not assoc.is_established:
        why = association_failure(
            assoc, watch, host, port, tls=tls_context is not None, probe=probe
        )
        return EchoResult(None, why)
    try:
        rsp = assoc.send_c_echo()
        status = rsp.get("Status") if rsp else None
        if status is None:
            return EchoResult(None, f"no C-ECHO response within {timeout_s:g} s")
        return EchoResult(int(status))
    finally:
        assoc.release()


class DimseSender:
    """C-STORE to a DIMSE destination; C-ECHO as its reachability check."""

    def __init__(self, destination: DimseDestination, *, calling_ae: str) -> None:
        self.destination = destination
        self.calling_ae = calling_ae

    def send(self, files: Sequence[Path]) -> SendOutcome:
        return _store(self.destination, files, calling_ae=self.calling_ae)

    def echo(self) -> bool:
        """True when the destination answers a C-ECHO (Verification SOP Class) with Success."""
        dest = self.destination
        result = echo(
            dest.host,
            dest.port,
            dest.ae_title,
            calling_ae=self.calling_ae,
            timeout_s=min(dest.timeout_s, ECHO_TIMEOUT_S),
            connect_timeout_s=min(dest.connect_timeout_s, ECHO_TIMEOUT_S),
            tls=dest.tls,
            probe=False,
        )
        return result.status == 0
