"""Retention: received instances are purged once their results are delivered
(``delete_after_success``) or after ``retention_days``; every deletion is audited.

Nothing is deleted while a job for the series may still run or a result still waits to be
sent. Delivered results stay in the outbox for now (not yet purged; see docs/operations.md).
"""

from __future__ import annotations

import time

import structlog

from dicom_node.audit import AuditAction, AuditEvent, AuditLog, AuditOutcome, Participants
from dicom_node.config import Settings
from dicom_node.store.database import Database
from dicom_node.store.spool import remove_empty_parents

log = structlog.get_logger(__name__)


class Retention:
    def __init__(self, settings: Settings, db: Database, audit: AuditLog) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit

    def tick(self, now: float | None = None) -> int:
        """Purge what the policy allows; return the number of series purged."""
        now = time.time() if now is None else now
        series: set[str] = set()
        if self.settings.delete_after_success:
            series.update(self.db.finished_series())
        if self.settings.retention_days is not None:
            series.update(self.db.series_older_than(now - self.settings.retention_days * 86400))
        for series_uid in sorted(series):
            self.purge(
                series_uid,
                reason="delivered" if self.settings.delete_after_success else "retention period",
            )
        return len(series)

    def purge(self, series_uid: str, reason: str) -> None:
        info = self.db.series_info(series_uid) or {}
        records = self.db.forget_instances(series_uid)
        if not records:
            return
        for record in records:
            record.path.unlink(missing_ok=True)
            remove_empty_parents(record.path, self.settings.spool_dir)
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
