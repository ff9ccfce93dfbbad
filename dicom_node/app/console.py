"""The web console's composition: what the node hands :mod:`dicom_node.console`.

Built by :class:`~dicom_node.app.node.Node` when ``console.enabled`` is true, in any role
(run it in one process of a scaled-out node: each would need its own port).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import Settings
from dicom_node.console.security import load_session_key
from dicom_node.console.server import ConsoleServer
from dicom_node.console.state import ChainCheck, PackageInfo
from dicom_node.console.users import UserStore
from dicom_node.console.web import ConsoleSources, create_app
from dicom_node.package.manifest import ModelPackage, load_package
from dicom_node.store.database import Database
from dicom_node.store.files import StorageLayout

__all__ = ["build_console"]


def build_console(
    settings: Settings,
    layout: StorageLayout,
    db: Database,
    audit: AuditLog,
    role: str,
    workers: int,
    package_of: Callable[[Path], ModelPackage] | None,
) -> ConsoleServer:
    """The console server over ``db`` and ``audit``, on ``console.host:console.port``.

    ``package_of`` gives the loaded package of a route's model folder (a worker process);
    without it the packages' ``model.yaml`` are read.
    """
    console = settings.console
    loaded: list[PackageInfo] = []

    def packages() -> list[PackageInfo]:
        if not loaded:
            for route in settings.routes:
                package = package_of(route.model) if package_of else load_package(route.model)
                loaded.append(
                    PackageInfo(
                        route=route.name,
                        name=package.name,
                        version=package.version,
                        dims=package.dims,
                        structures=tuple(s.label for s in package.structures),
                        path=package.path,
                    )
                )
        return loaded

    file_chain = None if db.backend == "postgresql" else layout.audit_path
    chain = ChainCheck(db, layout.audit_key_file, file_chain)
    sources = ConsoleSources(
        store=db,
        audit=audit,
        ae_title=settings.ae_title,
        storage_dir=layout.storage_dir,
        outbox_dir=layout.outbox_dir,
        min_free_disk_bytes=settings.limits.min_free_disk_bytes,
        destinations={name: d.address for name, d in settings.destinations.items()},
        workers=workers,
        role=role,
        packages=packages,
        chain=chain.state,
    )
    users = UserStore(console.users_file or layout.console_users_file)
    tls = settings.tls
    https = tls is not None and tls.cert_file is not None
    app = create_app(
        console, sources, users, load_session_key(layout.console_key_file), https=https
    )
    return ConsoleServer(
        app,
        console.host,
        console.port,
        tls.cert_file if https and tls is not None else None,
        tls.key_file if https and tls is not None else None,
    )
