"""The node's health check: is the node this config describes up and answering?

``dicom-node health --config FILE`` (the container's ``HEALTHCHECK``) reads the same config as
``serve``, with the same environment overrides (``DICOM_NODE_AE_TITLE``, ``DICOM_NODE_PORT``,
...), so it follows a changed AE title or port and TLS on the DICOM port without editing the
check. A process that receives (role ``all`` or ``receiver``) is healthy when a C-ECHO to its
own AE title on its own port is answered with Success:

- the address is ``bind_address``, or the loopback address when the node listens on all
  addresses;
- the calling AE title is the first of ``allowed_callers`` (the node admits it), else the
  node's own title;
- with ``tls`` the echo runs over TLS (:func:`~dicom_node.common.tls.self_check_context`): the
  node's own certificate is expected, and offered as the client certificate.

Roles without a DICOM port (``worker``, ``sender``) are healthy when their PostgreSQL database
opens.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from dicom_node.app.roles import Role
from dicom_node.common.tls import self_check_context
from dicom_node.config.settings import Settings
from dicom_node.send.senders.dimse import echo
from dicom_node.store.database import open_database
from dicom_node.store.files import StorageLayout


@dataclass(frozen=True)
class Health:
    """The outcome of a health check: ``healthy`` and one line that says what was checked."""

    healthy: bool
    detail: str


def check_address(bind_address: str) -> str:
    """Where the check connects: ``bind_address``, or loopback when it is a wildcard."""
    address = ipaddress.ip_address(bind_address)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


def check_health(settings: Settings, role: Role, *, timeout_s: float = 10.0) -> Health:
    """Check the node that ``settings`` describes, in ``role``; see the module docstring."""
    if not role.receives:
        return _database_health(settings)
    host = check_address(settings.bind_address)
    calling_ae = settings.allowed_callers[0] if settings.allowed_callers else settings.ae_title
    peer = f"C-ECHO {settings.ae_title}@{host}:{settings.port}"
    context = None
    if settings.tls is not None:
        peer += " over TLS"
        try:
            context = self_check_context(settings.tls)
        except (ssl.SSLError, OSError, ValueError) as exc:
            return Health(False, f"{peer}: TLS set-up failed: {exc}")
    result = echo(
        host,
        settings.port,
        settings.ae_title,
        calling_ae=calling_ae,
        timeout_s=timeout_s,
        tls_context=context,
    )
    if result.status is None:
        return Health(False, f"{peer}: no association: {result.detail}")
    if result.status != 0:
        return Health(False, f"{peer}: status 0x{result.status:04X}")
    return Health(True, f"{peer}: status 0x0000")


def _database_health(settings: Settings) -> Health:
    if settings.database is None:  # serve refuses these roles on SQLite too
        return Health(False, "database: roles in separate processes need PostgreSQL (database:)")
    try:
        db = open_database(settings.database, StorageLayout.at(settings.storage_dir).database_path)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the answer
        return Health(False, f"database: cannot open: {exc}")
    try:
        return Health(True, f"database: {db.backend} {db.location} opens")
    finally:
        db.close()
