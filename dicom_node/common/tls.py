"""TLS: every TLS context of the node, and the handshakes on the DICOM port.

:func:`server_context` serves the node's DICOM port, :func:`client_context` connects to a
DIMSE destination or the syslog audit repository. Both allow TLS 1.2 and above only (PS3.15
B.1, RFC 5425), with Python's default cipher suites. Their files come from the config
(:class:`~dicom_node.config.sections.TLSSettings`,
:class:`~dicom_node.config.sections.SyslogSettings`), read here as :class:`TLSFiles`.

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` performs the TLS
handshake in ``get_request``, i.e. in the one thread that accepts connections, on a socket
without a timeout: a single peer that opens a connection and never finishes the handshake
stops the node from accepting anyone. :class:`dicom_node.receive.limits.LimitedServer` only
accepts there; the handshake runs in the connection's own thread under
``handshake_timeout_s``, and a handshake that fails (plain TCP, a certificate from another
CA, an expired one, TLS below 1.2) or stalls is reported with :func:`handshake_failure` (the
receiver audits it as a Security Alert) and the connection closed, before any association
exists.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Protocol

#: Seconds a peer has to complete the TLS handshake.
HANDSHAKE_TIMEOUT_S = 10.0

#: The lowest TLS version any context of the node accepts (PS3.15 B.1, RFC 5425).
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def handshake_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake, from OpenSSL's reason code (no peer data)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason}"
    return f"TLS handshake failed: {type(exc).__name__}"


class TLSFiles(Protocol):
    """The PEM files of one TLS endpoint: its certificate and key, and the CA it trusts."""

    @property
    def cert_file(self) -> Path | None: ...

    @property
    def key_file(self) -> Path | None: ...

    @property
    def ca_file(self) -> Path | None: ...


def server_context(tls: TLSFiles) -> ssl.SSLContext:
    """TLS 1.2+ with the node's certificate; mutual TLS when ``tls.ca_file`` is set.

    With ``ca_file`` a caller must present a certificate that CA signed; without it callers
    are not asked for one.

    Raises
    ------
    ValueError
        Without ``cert_file`` and ``key_file`` (the config requires them on the node's port).
    ssl.SSLError, OSError
        When a file cannot be read or does not hold what it should.
    """
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("a TLS server needs cert_file and key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    tls: TLSFiles, *, check_hostname: bool, system_cas: bool = False
) -> ssl.SSLContext:
    """TLS 1.2+ towards a server whose certificate ``tls.ca_file`` signed.

    The server's certificate is always verified. ``check_hostname``: it must also name the
    host connected to (the syslog repository); DIMSE peers are usually addressed by IP and
    identified by their certificate's CA, so not for them. ``system_cas``: the system's CAs
    are trusted besides ``ca_file``. The client certificate is offered when ``cert_file`` and
    ``key_file`` are set.

    Raises
    ------
    ssl.SSLError, OSError
        When a file cannot be read or does not hold what it should.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    if system_cas:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def self_check_context(tls: TLSFiles) -> ssl.SSLContext:
    """TLS 1.2+ towards the node's own port, for its health check.

    The server must present the node's own certificate (``tls.cert_file`` is the trust
    anchor; ``tls.ca_file``, when set, is trusted too), and the node's certificate and key are
    offered as the client certificate, so a node with mutual TLS admits its own check when
    its ``ca_file`` signed its certificate. The host name is not checked (the check connects to
    a loopback address).

    Raises
    ------
    ValueError
        Without ``cert_file`` and ``key_file``.
    ssl.SSLError, OSError
        When a file cannot be read or does not hold what it should.
    """
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("the node's TLS needs cert_file and key_file")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.cert_file)
    if tls.ca_file is not None:
        context.load_verify_locations(tls.ca_file)
    # the node's own certificate is a trust anchor even when a CA issued it
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
