"""DIMSE destinations: C-STORE files over one association, C-ECHO a peer (the SCU side).

Timeouts (pynetdicom's AE): ``connect_timeout_s`` bounds the TCP connection
(``connection_timeout``) and the association negotiation (``acse_timeout``); ``timeout_s``
bounds each DIMSE response (``dimse_timeout``) and any silence on the association
(``network_timeout``). A destination that accepts the connection and never answers therefore
costs at most those seconds, and only its own delivery thread waits.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.common.status import STORED
from dicom_node.common.syntaxes import UNCOMPRESSED
from dicom_node.common.tls import client_context
from dicom_node.config.destinations import DimseDestination
from dicom_node.config.sections import TLSSettings
from dicom_node.send.senders.interface import SendOutcome, StoreResult

#: Upper bound of one probing C-ECHO's response, in seconds.
ECHO_TIMEOUT_S = 5.0


def _contexts(paths: Sequence[Path]) -> dict[tuple[UID, UID], None]:
    contexts: dict[tuple[UID, UID], None] = {}
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        contexts[(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)] = None
    return contexts


def store_files(
    destination: DimseDestination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
) -> list[StoreResult]:
    """C-STORE ``paths`` to ``destination`` over one association.

    Proposes, for each SOP class, the file's own transfer syntax plus the uncompressed ones.
    Never raises for network trouble: every path gets a :class:`StoreResult`.
    """
    return list(_store(destination, paths, calling_ae=calling_ae).results)


def _ae(calling_ae: str, connect_timeout_s: float, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = connect_timeout_s
    ae.acse_timeout = connect_timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def _store(destination: DimseDestination, paths: Sequence[Path], *, calling_ae: str) -> SendOutcome:
    ae = _ae(calling_ae, destination.connect_timeout_s, destination.timeout_s)
    try:
        contexts = _contexts(paths)
    except OSError as exc:
        return SendOutcome.all_failed(paths, f"cannot read output file: {exc.strerror}")
    for sop_class in {sop for sop, _ in contexts}:
        syntaxes = [ts for (sop, ts) in contexts if sop == sop_class]
        syntaxes += [ts for ts in UNCOMPRESSED if ts not in syntaxes]
        ae.add_requested_context(sop_class, syntaxes)
    try:
        tls_args = (
            None
            if destination.tls is None
            else (client_context(destination.tls, check_hostname=False), destination.host)
        )
    except (ssl.SSLError, OSError) as exc:
        return SendOutcome.all_failed(paths, f"TLS set-up failed: {exc}")
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            return SendOutcome.all_failed(paths, "association rejected", answered=True)
        return SendOutcome.all_failed(paths, "no association (peer down?)")
    results = []
    try:
        for path in paths:
            if not assoc.is_established:
                results.append(StoreResult(path, False, "association lost"))
                continue
            try:
                rsp = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:
                results.append(StoreResult(path, False, f"not sent: {exc}"))
                continue
            status = rsp.get("Status") if rsp else None
            if status is None:
                results.append(StoreResult(path, False, "no response (timeout or abort)"))
            else:
                results.append(StoreResult(path, status in STORED, f"status 0x{status:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return SendOutcome(tuple(results), answered=True)


def echo(
    host: str,
    port: int,
    ae_title: str,
    *,
    calling_ae: str = "DICOMNODE",
    timeout_s: float = 10,
    connect_timeout_s: float | None = None,
    tls: TLSSettings | None = None,
) -> int | None:
    """C-ECHO a peer; return the status (0 is success) or None when no association.

    With ``tls`` the association is made over TLS, as :func:`store_files` does.
    ``connect_timeout_s`` (default ``timeout_s``) bounds the connection and negotiation.
    """
    ae = _ae(calling_ae, timeout_s if connect_timeout_s is None else connect_timeout_s, timeout_s)
    ae.add_requested_context(Verification)
    try:
        tls_args = None if tls is None else (client_context(tls, check_hostname=False), host)
    except (ssl.SSLError, OSError):
        return None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        status = rsp.get("Status") if rsp else None
        return None if status is None else int(status)
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
        status = echo(
            dest.host,
            dest.port,
            dest.ae_title,
            calling_ae=self.calling_ae,
            timeout_s=min(dest.timeout_s, ECHO_TIMEOUT_S),
            connect_timeout_s=min(dest.connect_timeout_s, ECHO_TIMEOUT_S),
            tls=dest.tls,
        )
        return status == 0
