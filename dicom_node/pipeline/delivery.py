"""Delivery: C-STORE each queued result to its destination, with persisted retries.

A failed attempt is retried with exponential backoff (``send.initial_backoff_s`` doubling up
to ``send.max_backoff_s``); the schedule lives in the database, so it survives restarts.
After ``send.max_attempts`` the send is dead-lettered: visible in ``dicom-node status`` and
put back in the queue by ``dicom-node retry``. A result is never deleted before it is sent.
"""

from __future__ import annotations

import time
from itertools import groupby

import structlog

from dicom_node.audit import AuditAction, AuditEvent, AuditLog, AuditOutcome, Participants
from dicom_node.config import Settings
from dicom_node.metrics import NodeMetrics
from dicom_node.net.sender import store_files
from dicom_node.store.database import Database, Send, SendState

log = structlog.get_logger(__name__)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1, 2, ...)."""
    return float(min(max_s, initial_s * 2 ** max(attempts - 1, 0)))


class Delivery:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        audit: AuditLog,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self.db = db
        self.audit = audit

    def tick(self, now: float | None = None) -> int:
        """Attempt every send that is due; return how many were delivered."""
        due = self.db.due_sends(now)
        delivered = 0
        policy = self.settings.send
        for dest_name, group in groupby(due, key=lambda s: s.destination):
            sends = list(group)
            dest = self.settings.destinations.get(dest_name)
            if dest is None:
                for s in sends:
                    self.db.send_failed(
                        s.id, f"destination {dest_name!r} is not configured", next_attempt_at=None
                    )
                continue
            results = store_files(
                dest,
                [s.path for s in sends],
                calling_ae=self.settings.ae_title,
                timeout_s=policy.timeout_s,
            )
            who = Participants(
                calling_ae=self.settings.ae_title,
                called_ae=dest.ae_title,
                peer_address=f"{dest.host}:{dest.port}",
            )
            for send, result in zip(sends, results, strict=True):
                delivered += self._record(send, dest_name, who, result.ok, result.detail)
        return delivered

    def _record(self, send: Send, dest_name: str, who: Participants, ok: bool, detail: str) -> int:
        """Record one attempt's outcome: done, retry later, or dead letter; return 1 if done."""
        bound = log.bind(job_id=send.job_id, destination=dest_name)
        self.metrics.sends.labels(dest_name, "done" if ok else "failed").inc()
        if ok:
            self.db.send_done(send.id)
            bound.info("send.done", detail=detail)
            outcome = AuditOutcome.SUCCESS
        else:
            policy = self.settings.send
            attempts = send.attempts + 1
            next_at = None
            if attempts < policy.max_attempts:
                wait = backoff_s(attempts, policy.initial_backoff_s, policy.max_backoff_s)
                next_at = time.time() + wait
            state = self.db.send_failed(send.id, detail, next_attempt_at=next_at)
            dead = state is SendState.FAILED
            bound.warning("send.failed", detail=detail, attempts=attempts, dead_letter=dead)
            if not dead:
                return 0
            outcome = AuditOutcome.SERIOUS_FAILURE
        info = self.db.job_series_info(send.job_id)
        self.audit.record(
            AuditEvent.INSTANCES_TRANSFERRED,
            AuditAction.READ,
            outcome,
            who,
            patient_id=info.get("patient_id"),
            study_uid=info.get("study_uid"),
            job_id=send.job_id,
            destination=dest_name,
            sop_instance_uid=send.sop_instance_uid,
            error=None if ok else detail,
        )
        return 1 if ok else 0
