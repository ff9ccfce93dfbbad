"""Retention: received instances are purged once their results are delivered
(``delete_after_success``) or after ``retention_days``; every deletion is audited.

Nothing is deleted while a job for the series may still run or a result still waits to be
sent. The series' delivered results in the outbox go with it (the destinations hold them).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from dicom_node.audit.events import AuditAction, AuditEvent, AuditOutcome, Participants
from dicom_node.audit.log import AuditLog
from dicom_node.store.files import remove_empty_parents
from dicom_node.store.retention import RetentionStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class RetentionSettings:
    """The policy and the folders retention purges (built by :mod:`dicom_node.app.node`)."""

    ae_title: str
    #: Received instances (``StorageLayout.spool_dir``); the folder itself is kept.
    spool_dir: Path
    #: Results, one folder per job (``StorageLayout.outbox_dir``).
    outbox_dir: Path
    retention_days: float | None
    delete_after_success: bool


class Retention:
    """Purges received instances and their results by policy (:meth:`tick`), audited."""

    def __init__(self, settings: RetentionSettings, db: RetentionStore, audit: AuditLog) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit

    def tick(self, now: float | None = None) -> int:
        """Purge what the policy allows; return the number of series purged."""
        now = time.time() if now is None else now
        due: dict[str, str] = {}
        if self.settings.retention_days is not None:
            cutoff = now - self.settings.retention_days * 86400
            due.update(dict.fromkeys(self.db.series_older_than(cutoff), "retention period"))
        if self.settings.delete_after_success:
            due.update(dict.fromkeys(self.db.finished_series(), "delivered"))
        for series_uid, reason in sorted(due.items()):
            self.purge(series_uid, reason)
        return len(due)

    def purge(self, series_uid: str, reason: str) -> None:
        info = self.db.series_info(series_uid) or {}
        records = self.db.forget_instances(series_uid)
        if not records:
            return
        for record in records:
            record.path.unlink(missing_ok=True)
            remove_empty_parents(record.path, self.settings.spool_dir)
        for job_id in self.db.series_job_ids(series_uid):
            shutil.rmtree(self.settings.outbox_dir / str(job_id), ignore_errors=True)
        self.audit.record(
            AuditEvent.STUDY_DELETED,
            AuditAction.DELETE,
            AuditOutcome.SUCCESS,
            Participants(called_ae=self.settings.ae_title),
            patient_id=info.get("patient_id"),
            study_uid=info.get("study_uid"),
            instances=len(records),
            reason=reason,
        )
        log.info("retention.purged", instances=len(records), reason=reason)
