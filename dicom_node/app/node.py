"""The node: composes receive -> assemble -> queue -> infer -> write -> send in one process.

Threads: the receiver's association threads (thin: write + index; with ``receivers`` above 1
they run in receiver processes the node supervises, :mod:`dicom_node.app.receivers`), one
scheduler thread that runs the assembler and retention ticks, ``workers`` worker threads that
run jobs, and one delivery thread per destination (:mod:`dicom_node.send.delivery`), so a
slow destination delays only its own results. Every stage hands over through the database, so
a node killed at any instant restarts into a consistent state: ``start`` returns its dead
predecessor's running jobs to the queue and resumes sends.

A process runs the stages of its :class:`~dicom_node.app.roles.Role` only: ``all`` is
every stage (the one-host node); ``receiver``, ``worker`` and ``sender`` split it over
processes and hosts that share one PostgreSQL database and one storage folder.

This module is the node's composition root: :func:`stage_settings` cuts the whole
:class:`~dicom_node.config.settings.Settings` into what each stage reads, with the folders of
the :class:`~dicom_node.store.files.StorageLayout`, and :class:`Node` hands each stage that,
the store Protocol it uses (the one :class:`~dicom_node.store.database.Database`) and the
audit log.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog
import torch

from dicom_node.app.receivers import ChildSpec, ReceiverPool
from dicom_node.app.roles import Role, check_role
from dicom_node.assemble.assembler import Assembler, AssemblySettings
from dicom_node.audit.events import (
    AuditAction,
    AuditEvent,
    AuditEventType,
    AuditOutcome,
    Participants,
)
from dicom_node.audit.export import SyslogExporter
from dicom_node.audit.log import open_audit_log
from dicom_node.common.errors import DicomNodeError, StartupError
from dicom_node.common.metrics import NodeMetrics
from dicom_node.config.sections import Route
from dicom_node.config.settings import Settings
from dicom_node.models.inference import select_device
from dicom_node.receive.receiver import Receiver, ReceiverSettings
from dicom_node.retain.retention import Retention, RetentionSettings
from dicom_node.send.delivery import Delivery, DeliverySettings
from dicom_node.store.database import open_database
from dicom_node.store.files import SHARED_STALE_TEMP_S, StorageLayout, clean_stale_temp_files
from dicom_node.store.status import disk_space
from dicom_node.work.worker import Worker, WorkerSettings

if TYPE_CHECKING:
    from dicom_node.console.server import ConsoleServer

log = structlog.get_logger(__name__)

TICK_S = 0.2
RETENTION_EVERY_S = 30.0
#: A tick at the end of a release grace comes this much after it (the release was stamped in
#: the database just before the receiver woke the scheduler).
GRACE_SLACK_S = 0.005


def next_wait(grace_ends: list[float], now: float) -> float:
    """Seconds the scheduler sleeps: :data:`TICK_S`, or less when a release grace ends sooner.

    ``grace_ends`` holds ``time.monotonic()`` instants; those past ``now`` are dropped from it.
    Waking at the end of the grace, not at the next tick, saves a series that is complete only
    after ``release_grace_s`` (a CT, say) up to one tick.
    """
    grace_ends[:] = [t for t in grace_ends if t > now]
    return min([TICK_S, *(t - now for t in grace_ends)])


@dataclass(frozen=True)
class StageSettings:
    """The node's settings cut by stage: what each one reads, and where the files are."""

    layout: StorageLayout
    receiver: ReceiverSettings
    assembly: AssemblySettings
    worker: WorkerSettings
    delivery: DeliverySettings
    retention: RetentionSettings


def stage_settings(settings: Settings) -> StageSettings:
    """Each stage's settings from the node's ``settings`` (the one place that cuts them)."""
    layout = StorageLayout.at(settings.storage_dir, settings.audit.key_file)
    return StageSettings(
        layout=layout,
        receiver=ReceiverSettings(
            ae_title=settings.ae_title,
            port=settings.port,
            storage_dir=layout.storage_dir,
            spool_dir=layout.spool_dir,
            incoming_dir=layout.incoming_dir,
            journal_dir=layout.journal_dir,
            bind_address=settings.bind_address,
            called_ae_titles=settings.called_ae_titles,
            allowed_callers=settings.allowed_callers,
            allowed_networks=settings.allowed_networks,
            tls=settings.tls,
            limits=settings.limits,
            late_instances=settings.late_instances,
            shared_storage=settings.database is not None,
        ),
        assembly=AssemblySettings(
            routes=settings.routes,
            stable_after_s=settings.stable_after_s,
            release_grace_s=settings.release_grace_s,
            complete_at_release=settings.complete_at_release,
            study_timeout_s=settings.study_timeout_s,
        ),
        worker=WorkerSettings(
            ae_title=settings.ae_title,
            outbox_dir=layout.outbox_dir,
            routes=settings.routes,
            destinations=settings.destinations,
            gpu_slots=settings.gpu_slots,
            batch_size=settings.batch_size,
            job_lease_s=settings.job_lease_s,
            max_job_attempts=settings.max_job_attempts,
        ),
        delivery=DeliverySettings(
            ae_title=settings.ae_title,
            destinations=settings.destinations,
            send=settings.send,
        ),
        retention=RetentionSettings(
            ae_title=settings.ae_title,
            spool_dir=layout.spool_dir,
            outbox_dir=layout.outbox_dir,
            retention_days=settings.retention_days,
            delete_after_success=settings.delete_after_success,
        ),
    )


def receiver_count(settings: Settings) -> int:
    """Receiver processes: ``receivers``, or by default the cores this process may use."""
    if settings.receivers is not None:
        return settings.receivers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _device(preference: str) -> torch.device:
    """The inference device from the ``device`` setting: auto, cpu or cuda."""
    if preference == "auto":
        return select_device()
    if preference == "cuda" and not torch.cuda.is_available():
        raise DicomNodeError("device: cuda is set but no CUDA device is available; use auto or cpu")
    return torch.device(preference)


def prepare_storage(storage_dir: Path) -> None:
    """Create ``storage_dir`` if needed and check that this process can write into it.

    Raises
    ------
    StartupError
        In one line: the folder, what went wrong and what to do.
    """
    fix = (
        "create it and give the user running dicom-node write access "
        f"(uid {os.getuid()}), or set storage_dir (or DICOM_NODE_STORAGE_DIR) to a writable folder"
    )
    try:
        storage_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(
            f"storage_dir: {storage_dir} exists and is not a folder; {fix}"
        ) from None
    except OSError as exc:
        raise StartupError(
            f"storage_dir: cannot create {storage_dir} ({exc.strerror}); {fix}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=storage_dir):
            pass
    except OSError as exc:
        raise StartupError(
            f"storage_dir: cannot write in {storage_dir} ({exc.strerror}); {fix}"
        ) from None


def check_roles(route: Route, package_roles: tuple[str, ...]) -> None:
    """Refuse a route whose input roles do not fit its model package's inputs.

    A one-role route fits any one-input package (the role name does not matter); otherwise
    the route's roles must be the package's roles.

    Raises
    ------
    StartupError
        Naming the route, both sets of roles and what to change.
    """
    roles = tuple(r.role for r in route.input_roles)
    if len(roles) == 1 and len(package_roles) == 1:
        return
    if set(roles) != set(package_roles):
        raise StartupError(
            f"routes: {route.name}: its inputs {list(roles)} do not fit the model package "
            f"{route.model}, whose inputs are {list(package_roles)}; give the route "
            "trigger: study and one input per package role, with the package's role names"
        )


def listen_error(what: str, address: str, port: int, exc: OSError) -> StartupError:
    """A one-line :class:`StartupError` for a port the node cannot listen on."""
    if exc.errno == errno.EADDRINUSE:
        hint = (
            f"another program (another dicom-node?) listens there; stop it or set {what} "
            "to a free port"
        )
    elif exc.errno == errno.EACCES:
        hint = f"ports below 1024 need privileges; set {what} to 1024 or above"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = "bind_address is not an address of this host; use 0.0.0.0 or one of its own"
    else:
        hint = f"check {what} and bind_address"
    return StartupError(f"{what}: cannot listen on {address}:{port} ({exc.strerror}); {hint}")


class Node:
    """The stages of ``role`` over one database and one storage folder.

    Parameters
    ----------
    settings
        The node configuration.
    role
        Which stages this process runs (default: all of them).

    Raises
    ------
    StartupError
        The role needs what the config lacks, or storage_dir is in use or not writable.
    """

    def __init__(self, settings: Settings, role: Role = Role.ALL) -> None:
        self.settings = settings
        self.role = role
        self.stages = stages = stage_settings(settings)
        self.layout = layout = stages.layout
        self.shared = settings.database is not None  # PostgreSQL: several processes
        check_role(
            role,
            "postgresql" if self.shared else "sqlite",
            has_routes=bool(settings.routes),
            has_destinations=bool(settings.destinations),
        )
        prepare_storage(layout.storage_dir)
        self._lock_file = self._take_lock()
        self.db = open_database(
            settings.database, layout.database_path, settings.limits.database_timeout_s
        )
        # The file, or the database's chain.
        self.audit = open_audit_log(
            self.db, audit_path=layout.audit_path, key_file=layout.audit_key_file
        )
        self.wake = threading.Event()  # scheduler: an association ended
        self.work = threading.Event()  # workers: a job was queued
        self.stopping = threading.Event()
        self.metrics = NodeMetrics(self.db.status)
        self.receiver: Receiver | None = None  # receivers: 1, in this process
        self.receivers: ReceiverPool | None = None  # receivers: N > 1, child processes
        self.assembler: Assembler | None = None
        self.retention: Retention | None = None
        self.worker: Worker | None = None
        self.delivery: Delivery | None = None
        self.audit_export: SyslogExporter | None = None
        self.device: torch.device | None = None
        if role.receives:
            count = receiver_count(settings)
            if count > 1:
                spec = ChildSpec(
                    receiver=stages.receiver,
                    database=settings.database,
                    database_path=layout.database_path,
                    database_timeout_s=settings.limits.database_timeout_s,
                    audit_path=layout.audit_path,
                    audit_key_file=layout.audit_key_file,
                    log_format=str(settings.log_format),
                    log_level=str(settings.log_level),
                )
                self.receivers = ReceiverPool(
                    spec, count, on_release=self.wake, metrics=self.metrics
                )
            else:
                self.receiver = Receiver(
                    stages.receiver, self.db, self.audit, on_release=self.wake, metrics=self.metrics
                )
            self.assembler = Assembler(stages.assembly, self.db)
            self.retention = Retention(stages.retention, self.db, self.audit)
            if settings.audit.syslog is not None:  # one exporter: where the scheduler runs
                self.audit_export = SyslogExporter(
                    settings.audit.syslog, self.audit, self.db, settings.ae_title
                )
        if role.works:
            self.device = _device(settings.device)
            self.worker = Worker(stages.worker, self.db, self.audit, self.device, self.metrics)
        if role.sends:
            self.delivery = Delivery(stages.delivery, self.db, self.audit, self.metrics)
        self.console: ConsoleServer | None = None
        if settings.console.enabled:
            from dicom_node.app.console import build_console

            worker = self.worker
            self.console = build_console(
                settings,
                layout,
                self.db,
                self.audit,
                str(role),
                settings.workers if role.works else 0,
                (lambda model: worker.segmenter(model).package) if worker is not None else None,
            )
        self._threads: list[threading.Thread] = []

    def _take_lock(self) -> IO[str]:
        """Lock ``storage_dir/node.lock``: exclusively on SQLite, shared on PostgreSQL.

        SQLite is one process per storage folder, so a second node there is refused. On
        PostgreSQL the role processes of a deployment share the folder (the database
        coordinates them), so each takes a shared lock: several of them start, but none
        starts beside a SQLite node on the same folder, nor a SQLite node beside them.
        """
        fh = self.layout.lock_file.open("a+")
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            if self.shared:
                raise StartupError(
                    f"{self.layout.storage_dir} is in use by a dicom-node on SQLite; stop it, "
                    "or give this PostgreSQL deployment its own storage_dir"
                ) from None
            raise StartupError(
                f"{self.layout.storage_dir} is in use by another dicom-node process; give "
                "each node its own storage_dir (several processes on one storage folder need "
                "database: postgresql://... and serve --role)"
            ) from None
        if not self.shared:
            fh.truncate(0)
            fh.write(str(os.getpid()))
            fh.flush()
        return fh

    def start(self) -> None:
        stale_after_s = SHARED_STALE_TEMP_S if self.shared else 0.0
        resumed = 0
        if self.worker is not None:
            clean_stale_temp_files(self.layout.outbox_dir, stale_after_s)
            # SQLite: the exclusive lock proves every running job's owner is dead. PostgreSQL:
            # only this host's dead processes' jobs; other hosts' wait for their lease.
            resumed = self.db.recover_after_restart()
            for route in self.settings.routes:  # fail at start, not at the first study
                check_roles(route, self.worker.segmenter(route.model).package.roles)
            self.worker.warm_up()  # each model once: the first study as fast as the next
        if self.role.receives:
            clean_stale_temp_files(self.layout.spool_dir, stale_after_s)
            self._warn_low_disk()
        address = self.settings.bind_address
        if self.settings.metrics_port is not None:
            try:
                self.metrics.serve(self.settings.metrics_port, address)
            except OSError as exc:
                raise listen_error(
                    "metrics_port", address, self.settings.metrics_port, exc
                ) from None
        if self.role.receives:
            try:
                if self.receivers is not None:
                    self.receivers.start()
                elif self.receiver is not None:
                    self.receiver.start()
            except OSError as exc:
                raise listen_error("port", address, self.settings.port, exc) from None
        if self.console is not None:
            try:
                self.console.start()
            except OSError as exc:
                raise listen_error(
                    "console.port", self.settings.console.host, self.settings.console.port, exc
                ) from None
        self.audit.record(
            AuditEvent.APPLICATION_ACTIVITY,
            AuditAction.EXECUTE,
            AuditOutcome.SUCCESS,
            Participants(called_ae=self.settings.ae_title),
            event_type=AuditEventType.APPLICATION_START,
        )
        if self.audit_export is not None:
            self.audit_export.start()
        if self.assembler is not None:
            self._spawn("scheduler", self._schedule)
        if self.delivery is not None:
            self.delivery.start()
        if self.worker is not None:
            for i in range(self.settings.workers):
                self._spawn(f"worker-{i}", self._work)
        log.info(
            "node.started",
            role=str(self.role),
            resumed_jobs=resumed,
            database=self.db.location,
            device=str(self.device) if self.device is not None else None,
            routes=[r.name for r in self.settings.routes],
        )

    def _warn_low_disk(self) -> None:
        """Say at start when storage_dir is already below ``limits.min_free_disk_bytes``."""
        disk = disk_space(self.layout.storage_dir, self.settings.limits.min_free_disk_bytes)
        if disk["below_mark"]:
            log.warning(
                "storage.below_free_space_mark",
                storage_dir=disk["storage_dir"],
                free_bytes=disk["free_bytes"],
                min_free_disk_bytes=disk["min_free_disk_bytes"],
                hint="every C-STORE is refused (0xA700) until storage_dir has more free space; "
                "free space there, or lower limits.min_free_disk_bytes",
            )

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _schedule(self) -> None:
        assert self.assembler is not None and self.retention is not None
        next_retention = 0.0
        grace = self.settings.release_grace_s
        grace_ends: list[float] = []
        while not self.stopping.is_set():
            # Woken by a release (the receiver's on_release): tick now, and again when its
            # grace ends.
            if self.wake.wait(next_wait(grace_ends, time.monotonic())) and grace > 0:
                grace_ends.append(time.monotonic() + grace + GRACE_SLACK_S)
            self.wake.clear()
            stages: list[Assembler | Retention] = [self.assembler]
            if time.monotonic() >= next_retention:  # purging need not be sub-second
                stages.append(self.retention)
                next_retention = time.monotonic() + RETENTION_EVERY_S
            for stage in stages:
                try:
                    if stage.tick() and stage is self.assembler:
                        self.work.set()
                except Exception:  # noqa: BLE001 - a stage error must not stop the node
                    log.exception("stage.error", stage=type(stage).__name__)

    def _work(self) -> None:
        assert self.worker is not None
        while not self.stopping.is_set():
            try:
                ran = self.worker.run_once()
            except Exception:  # noqa: BLE001 - keep the worker alive; the job lease expires
                log.exception("worker.error")
                ran = False
            if not ran:
                self.work.wait(TICK_S)
                self.work.clear()
            elif self.delivery is not None:
                self.delivery.wake()  # results are queued: send them now

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.work.set()
        if self.console is not None:
            self.console.stop()
        if self.receiver is not None:
            self.receiver.stop()
        if self.receivers is not None:
            self.receivers.stop()  # their associations end first (receivers.DRAIN_S)
        for thread in self._threads:
            thread.join(timeout=30)
        if self.delivery is not None:
            self.delivery.stop()
        self.audit.record(
            AuditEvent.APPLICATION_ACTIVITY,
            AuditAction.EXECUTE,
            AuditOutcome.SUCCESS,
            Participants(called_ae=self.settings.ae_title),
            event_type=AuditEventType.APPLICATION_STOP,
        )
        if self.audit_export is not None:
            self.audit_export.stop()
        self.db.close()
        self._lock_file.close()
        log.info("node.stopped", role=str(self.role))
