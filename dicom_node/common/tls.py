"""TLS handshakes on the DICOM port: their time limit and how a failure is reported.

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

#: Seconds a peer has to complete the TLS handshake.
HANDSHAKE_TIMEOUT_S = 10.0


def handshake_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake, from OpenSSL's reason code (no peer data)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason}"
    return f"TLS handshake failed: {type(exc).__name__}"
