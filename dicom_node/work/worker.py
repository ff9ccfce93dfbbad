"""The worker: leases a job, segments its series, writes its outputs to the outbox, queues sends.

The outputs written are those any destination of the route asked for
(``destinations.<name>.outputs``: SEG, SR, overlay); each destination is queued only its kinds.

A job that raises :class:`~dicom_node.common.errors.InputError` or
:class:`~dicom_node.common.errors.ModelPackageError` fails for good at once (retrying cannot
help and the message says what to fix); deterministic pydicom/highdicom failures on a bad
dataset become InputErrors in :mod:`dicom_node.work.segment`. Any other failure is retried up to
``max_job_attempts``. Either way the reason, ``"ExceptionType: message"`` without patient data
(:mod:`dicom_node.common.redact`), is stored for ``dicom-node status`` and logged with the job id,
route, error type and where it was raised. A node
killed while a job runs starts it again on restart; output UIDs are deterministic, so a
second delivery replaces the first at the destination instead of duplicating it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from dicom_node.audit.events import AuditAction, AuditEvent, AuditOutcome, Participants
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import InputError, ModelPackageError, StartupError
from dicom_node.common.metrics import NodeMetrics
from dicom_node.common.output_kinds import OutputKind
from dicom_node.common.redact import describe
from dicom_node.config.destinations import Destination
from dicom_node.config.sections import Route
from dicom_node.models.formats import load_model
from dicom_node.models.inference import CaseSegmenter, DeviceSlots
from dicom_node.store.jobs import Job, JobQueue, JobState
from dicom_node.work.segment import (
    WrittenOutput,
    segment_case,
    segment_series,
    write_outputs,
)
from dicom_node.work.warmup import warm_up

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a worker reads of the configuration, and where it writes results (built by
    :mod:`dicom_node.app.node`)."""

    #: The node's AE title (the audit trail's participant).
    ae_title: str
    #: Results, one folder per job (``StorageLayout.outbox_dir``).
    outbox_dir: Path
    routes: tuple[Route, ...]
    #: What each destination asked for (``destinations.<name>.outputs``).
    destinations: dict[str, Destination]
    gpu_slots: int
    batch_size: int
    job_lease_s: float
    max_job_attempts: int


class Worker:
    """Runs jobs from the queue; one instance per worker thread shares the model cache."""

    def __init__(
        self,
        settings: WorkerSettings,
        db: JobQueue,
        audit: AuditLog,
        device: torch.device,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self.db = db
        self.audit = audit
        self.device = device
        self._routes = {r.name: r for r in settings.routes}
        self._segmenters: dict[Path, CaseSegmenter] = {}
        self._lock = threading.Lock()
        self.slots = DeviceSlots(settings.gpu_slots)  # shared by every model and thread

    def segmenter(self, model: Path) -> CaseSegmenter:
        """The loaded model at ``model``, of any format (:func:`~dicom_node.models.formats.
        load_model`; loaded once, then cached)."""
        with self._lock:
            if model not in self._segmenters:
                self._segmenters[model] = load_model(
                    model,
                    self.device,
                    batch_size=self.settings.batch_size,
                    slots=self.slots,
                )
            return self._segmenters[model]

    def warm_up(self) -> None:
        """Load each route's model and run it once (:func:`~dicom_node.work.warmup.warm_up`),
        so that the first study is as fast as the next; logs ``model.warmed_up`` per model.

        Raises
        ------
        StartupError
            When a model cannot run: naming the route, the package and the error.
        """
        done: set[Path] = set()
        for route in self.settings.routes:
            if route.model in done:
                continue
            done.add(route.model)
            segmenter = self.segmenter(route.model)
            try:
                seconds = warm_up(segmenter)
            except Exception as exc:  # noqa: BLE001 - any failure of the model: refuse to start
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise StartupError(
                    f"routes: {route.name}: the model package {route.model} fails on a "
                    f"synthetic input at start ({type(exc).__name__}: {first}); fix or "
                    "replace the package"
                ) from exc
            log.info(
                "model.warmed_up",
                model=segmenter.package.name,
                version=segmenter.package.version,
                device=str(self.device),
                seconds=round(seconds, 3),
            )

    def run_once(self, owner: str | None = None) -> bool:
        """Claim and run one job as ``owner``; return False when the queue had none.

        ``owner`` (default: host, process and thread) holds the job's lease, which a timer
        renews every ``job_lease_s / 3`` while the job runs.
        """
        owner = owner or default_owner()
        job = self.db.claim_job(owner, self.settings.job_lease_s)
        if job is None:
            return False
        with keep_lease(self.db, job, self.settings.job_lease_s):
            self.run(job)
        return True

    def run(self, job: Job) -> None:
        bound = log.bind(job_id=job.id, route=job.route, attempt=job.attempts)
        info = self.db.series_info(job.series_uid) or {}
        who = Participants(called_ae=self.settings.ae_title)
        route = self._routes.get(job.route)
        try:
            if route is None:
                raise InputError(
                    f"route {job.route} is no longer in the configuration; add it back to "
                    "the config and send the series again to process it"
                )
            with self.metrics.job_seconds.labels(job.route).time():
                outputs = self._process(job, route)
        except (InputError, ModelPackageError) as exc:
            self._failed(job, bound, who, info, exc, retry=False)
            return
        except Exception as exc:  # noqa: BLE001 - any other failure: retry, then fail for good
            retry = job.attempts < self.settings.max_job_attempts
            self._failed(job, bound, who, info, exc, retry=retry)
            return
        if not self.db.finish_job(job.id, job.owner, outputs, self._wanted_by(route)):
            if self.db.job_state(job.id) is JobState.SUPERSEDED:
                bound.info("job.superseded")
                self.metrics.jobs.labels(job.route, "superseded").inc()
            else:
                bound.warning("job.lease_lost", stage="finish")
                self.metrics.jobs.labels(job.route, "lease_lost").inc()
            return
        self.metrics.jobs.labels(job.route, "done").inc()
        self.audit.record(
            AuditEvent.INSTANCES_ACCESSED,
            AuditAction.CREATE,
            AuditOutcome.SUCCESS,
            who,
            patient_id=info.get("patient_id"),
            study_uid=info.get("study_uid"),
            job_id=job.id,
            route=job.route,
            created=[o.sop_uid for o in outputs],
        )
        bound.info("job.done", outputs=len(outputs), destinations=list(route.send_to))

    def _wanted_by(self, route: Route) -> dict[str, tuple[OutputKind, ...]]:
        """Each destination of ``route`` -> the output kinds it asked for."""
        return {name: self.settings.destinations[name].outputs for name in route.send_to}

    def _process(self, job: Job, route: Route) -> list[WrittenOutput]:
        inputs: dict[str, list[Path]] = {}
        for role, series_uid in (job.inputs or {"image": job.series_uid}).items():
            inputs[role] = [r.path for r in self.db.series_instances(series_uid)]
            if not inputs[role]:
                raise InputError(
                    f"no instances left for the series of input {role} (deleted by retention?)"
                )
        segmenter = self.segmenter(route.model)
        wanted = {kind for kinds in self._wanted_by(route).values() for kind in kinds}
        kinds = [kind for kind in OutputKind if kind in wanted]  # only what someone asked for
        if len(route.input_roles) == 1:  # one input: today's pipeline, whatever the role is called
            results = segment_series(next(iter(inputs.values())), segmenter, kinds)
        else:
            results = segment_case(inputs, segmenter, kinds)
        for result in results:
            if result.inference.degraded:  # CUDA out of memory: smaller batch or the CPU
                log.warning(
                    "job.inference_degraded",
                    job_id=job.id,
                    route=job.route,
                    oom=result.inference.oom,
                    batch_size=result.inference.batch_size,
                    device=result.inference.device,
                )
        return write_outputs(results, self.settings.outbox_dir / str(job.id))

    def _failed(
        self,
        job: Job,
        bound: structlog.stdlib.BoundLogger,
        who: Participants,
        info: dict[str, object],
        exc: Exception,
        *,
        retry: bool,
    ) -> None:
        patient_id = str(info.get("patient_id") or "")
        message = describe(exc, [patient_id] if patient_id else [])
        if not self.db.fail_job(job.id, job.owner, message, retry=retry):
            bound.warning("job.lease_lost", stage="fail", error=type(exc).__name__)
            self.metrics.jobs.labels(job.route, "lease_lost").inc()
            return
        state = JobState.PENDING if retry else JobState.FAILED
        self.metrics.jobs.labels(job.route, "retried" if retry else "failed").inc()
        bound.warning(
            "job.failed",
            error=type(exc).__name__,
            reason=message,
            cause=type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
            raised_at=_origin(exc.__cause__ or exc),
            retry=state is JobState.PENDING,
            kind="input" if isinstance(exc, InputError | ModelPackageError) else "unexpected",
        )
        if state is JobState.FAILED:
            self.audit.record(
                AuditEvent.INSTANCES_ACCESSED,
                AuditAction.CREATE,
                AuditOutcome.SERIOUS_FAILURE,
                who,
                patient_id=str(info.get("patient_id", "")),
                study_uid=str(info.get("study_uid", "")),
                job_id=job.id,
                route=job.route,
                error=message,
            )


def default_owner() -> str:
    """The lease owner of the calling worker thread: host, process id and thread name."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


@contextmanager
def keep_lease(db: JobQueue, job: Job, lease_s: float) -> Iterator[threading.Event]:
    """Renew ``job``'s lease every ``lease_s / 3`` on a timer thread while the block runs.

    Yields an event that is set when the lease was lost (another worker took the job after
    it expired, or late instances superseded it): ``finish_job``/``fail_job`` then refuse the
    stale owner, so nothing is delivered or reset twice.
    """
    stop = threading.Event()
    lost = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not db.renew_lease(job.id, job.owner, lease_s):
                    lost.set()
                    log.warning("job.lease_lost", job_id=job.id, stage="renew")
                    return
            except Exception:  # noqa: BLE001 - try again at the next tick; never kill the job
                log.exception("job.lease_renew_error", job_id=job.id)

    thread = threading.Thread(target=renew, name=f"lease-{job.id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def _origin(exc: BaseException) -> str | None:
    """``module.py:line`` where ``exc`` was raised: tells a bug from bad input, no data."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
