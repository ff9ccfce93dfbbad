"""TLS on the DICOM port with the handshake off the accept loop, bounded and audited.

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` performs the TLS
handshake in ``get_request``, i.e. in the one thread that accepts connections, on a socket
without a timeout: a single peer that opens a connection and never finishes the handshake
stops the node from accepting anyone. Here the accept loop only accepts; the handshake runs
in the connection's own thread under ``handshake_timeout_s``, and a handshake that fails
(plain TCP, a certificate from another CA, an expired one, TLS below 1.2) or stalls is
reported to ``on_refused`` (the receiver audits it as a Security Alert) and the connection
closed, before any association exists.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

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


class TLSAssociationServer(ThreadedAssociationServer):
    """A threaded association server that does each TLS handshake in its connection's thread.

    Attributes
    ----------
    handshake_timeout_s : float
        Seconds a peer has to complete the handshake.
    on_refused : callable or None
        Called with the peer's ``"address:port"`` and the reason when a handshake fails.
    """

    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    on_refused: Callable[[str, str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; no handshake here, so the accept loop never waits on a peer."""
        listening = cast(socket.socket, self.socket)
        client, address = listening.accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Complete the TLS handshake (bounded), then serve the association as pynetdicom does."""
        context = self.ssl_context
        if context is not None and isinstance(request, socket.socket):
            try:
                request.settimeout(self.handshake_timeout_s)
                secure = context.wrap_socket(request, server_side=True)
                secure.settimeout(None)  # as pynetdicom's own accepted sockets
            except (OSError, ValueError) as exc:
                peer = f"{client_address[0]}:{client_address[1]}"
                if self.on_refused is not None:
                    self.on_refused(peer, handshake_failure(exc))
                self.shutdown_request(request)
                return
            request = secure
        super().process_request_thread(request, client_address)
