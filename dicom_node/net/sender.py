"""The SCU side: C-STORE files to a destination and C-ECHO a peer."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Destination, TLSSettings
from dicom_node.net.status import STORED
from dicom_node.net.syntaxes import UNCOMPRESSED


@dataclass(frozen=True)
class StoreResult:
    """Outcome of one C-STORE: ``ok`` when the destination stored it (Success or Warning)."""

    path: Path
    ok: bool
    detail: str


def _contexts(paths: Sequence[Path]) -> dict[tuple[UID, UID], None]:
    contexts: dict[tuple[UID, UID], None] = {}
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        contexts[(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)] = None
    return contexts


def store_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout_s: float = 30.0,
) -> list[StoreResult]:
    """C-STORE ``paths`` to ``destination`` over one association.

    Proposes, for each SOP class, the file's own transfer syntax plus the uncompressed ones.
    Never raises for network trouble: every path gets a :class:`StoreResult`.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    try:
        contexts = _contexts(paths)
    except OSError as exc:
        return [StoreResult(p, False, f"cannot read output file: {exc.strerror}") for p in paths]
    for sop_class in {sop for sop, _ in contexts}:
        syntaxes = [ts for (sop, ts) in contexts if sop == sop_class]
        syntaxes += [ts for ts in UNCOMPRESSED if ts not in syntaxes]
        ae.add_requested_context(sop_class, syntaxes)
    try:
        tls_args = (
            None if destination.tls is None else (client_context(destination.tls), destination.host)
        )
    except (ssl.SSLError, OSError) as exc:
        return [StoreResult(p, False, f"TLS set-up failed: {exc}") for p in paths]
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down?)"
        return [StoreResult(p, False, reason) for p in paths]
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
    return results


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS 1.2+ towards a destination whose certificate ``tls.ca_file`` signed.

    Host names are not checked (DICOM peers are usually addressed by IP and identified by
    their certificate's CA); the client certificate is offered when configured.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def echo(
    host: str,
    port: int,
    ae_title: str,
    *,
    calling_ae: str = "DICOMNODE",
    timeout_s: float = 10,
    tls: TLSSettings | None = None,
) -> int | None:
    """C-ECHO a peer; return the status (0 is success) or None when no association.

    With ``tls`` the association is made over TLS, as :func:`store_files` does.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    try:
        tls_args = None if tls is None else (client_context(tls), host)
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


def echo_destination(destination: Destination, *, calling_ae: str, timeout_s: float) -> bool:
    """True when ``destination`` answers a C-ECHO (Verification SOP Class) with Success."""
    status = echo(
        destination.host,
        destination.port,
        destination.ae_title,
        calling_ae=calling_ae,
        timeout_s=timeout_s,
        tls=destination.tls,
    )
    return status == 0
