"""Delivery: C-STORE each queued result to its destination, with persisted retries.

A failed attempt is retried with exponential backoff (``send.initial_backoff_s`` doubling up
to ``send.max_backoff_s``); the schedule lives in the database, so it survives restarts.
After ``send.max_attempts`` the send is dead-lettered: visible in ``dicom-node status`` and
put back in the queue by ``dicom-node retry``. A result is never deleted before it is sent.

Catching up: the moment a destination answers again, its waiting sends become due at once
instead of sitting out their backoff (up to ``send.max_backoff_s``). It answers when a send to
it succeeds, or when a C-ECHO succeeds: every ``send.echo_interval_s`` a destination whose
sends wait (and whose next attempt is further away than that) is echoed on a short-lived
thread of its own, at most one echo in flight per destination, so a peer that hangs never
stalls the scheduler.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from itertools import groupby

import structlog

from dicom_node.audit import AuditAction, AuditEvent, AuditLog, AuditOutcome, Participants
from dicom_node.config import Destination, Settings
from dicom_node.metrics import NodeMetrics
from dicom_node.net.sender import echo_destination, store_files
from dicom_node.store.database import Database, Send, SendState

log = structlog.get_logger(__name__)

#: Upper bound of one probing C-ECHO (association, request, release), in seconds.
ECHO_TIMEOUT_S = 5.0


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
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """``on_ready`` is called (from an echo thread) when waiting sends became due."""
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self.db = db
        self.audit = audit
        self.on_ready = on_ready
        self._probe_lock = threading.Lock()
        self._probes: dict[str, threading.Thread] = {}  # destination -> echo in flight
        self._last_probe: dict[str, float] = {}  # destination -> time.monotonic() of last echo

    def tick(self, now: float | None = None) -> int:
        """Attempt every send that is due, then probe destinations whose sends wait.

        Returns how many sends were delivered.
        """
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
            if any(r.ok for r in results):
                self._caught_up(dest_name, via="send")
        self.probe(now)
        return delivered

    def probe(self, now: float | None = None) -> int:
        """C-ECHO each destination whose sends wait for their backoff; return how many started.

        A destination is echoed at most every ``send.echo_interval_s`` seconds, never twice at
        once, and only when its next attempt is further away than that interval (a sooner
        attempt finds out by itself). The echo runs on its own daemon thread.
        """
        interval = self.settings.send.echo_interval_s
        if interval <= 0:
            return 0
        now = time.time() if now is None else now
        started = 0
        for name, next_at in self.db.waiting_destinations(now).items():
            dest = self.settings.destinations.get(name)
            if dest is None or next_at - now <= interval:
                continue
            with self._probe_lock:
                running = self._probes.get(name)
                if running is not None and running.is_alive():
                    continue
                if time.monotonic() - self._last_probe.get(name, -math.inf) < interval:
                    continue
                self._last_probe[name] = time.monotonic()
                thread = threading.Thread(
                    target=self._echo, args=(dest,), name=f"echo-{name}", daemon=True
                )
                self._probes[name] = thread
            thread.start()
            started += 1
        return started

    def stop(self, timeout_s: float = ECHO_TIMEOUT_S * 2) -> None:
        """Wait for echoes in flight to end (before the database closes)."""
        with self._probe_lock:
            threads = list(self._probes.values())
        for thread in threads:
            thread.join(timeout_s)

    def _echo(self, dest: Destination) -> None:
        timeout_s = min(self.settings.send.timeout_s, ECHO_TIMEOUT_S)
        try:
            answered = echo_destination(
                dest, calling_ae=self.settings.ae_title, timeout_s=timeout_s
            )
            if answered:
                self._caught_up(dest.name, via="echo")
        except Exception:  # noqa: BLE001 - a probe's failure must not end silently or spread
            log.exception("destination.echo_error", destination=dest.name)

    def _caught_up(self, dest_name: str, *, via: str) -> None:
        """``dest_name`` answered: make its waiting sends due now and wake the scheduler."""
        n = self.db.sends_due_now(dest_name)
        if n:
            log.info("destination.answering", destination=dest_name, via=via, sends_due=n)
            if self.on_ready is not None:
                self.on_ready()

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
