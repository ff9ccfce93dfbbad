"""Delivery: send each queued result to its destination on that destination's own thread.

Every configured destination has one delivery thread (``deliver-<name>``) with its own
:class:`~dicom_node.send.senders.Sender` (C-STORE or STOW-RS, ``net/senders``). The thread
sleeps until it is woken (a job queued results: :meth:`Delivery.wake`) or :data:`POLL_S`
passes (a backoff ran out, ``dicom-node retry`` changed the database), then sends what is due
for its destination. A destination that is slow or silent holds only its own thread, for at
most its ``connect_timeout_s`` + ``timeout_s``: other destinations, other routes and the
scheduler (assembly, retention) go on.

A failed attempt is retried with exponential backoff (``send.initial_backoff_s`` doubling up
to ``send.max_backoff_s``); the schedule lives in the database, so it survives restarts.
After ``send.max_attempts``, or at once for a permanent failure (a DICOMweb server's 4xx
other than 408/429), the send is dead-lettered: visible in ``dicom-node status`` and put back
in the queue by ``dicom-node retry``. A result is never deleted before it is sent.

Several sender processes (or hosts) may share one database: a delivery pass claims the sends
it is about to send (:meth:`~dicom_node.store.sends.SqlSendStore.claim_sends`), leased to this
process's thread of that destination for :func:`send_lease_s`, and records each outcome as
their owner, so no send goes out twice at once and a stale sender never overwrites another's
outcome. A sender that dies leaves its claims to run out; another sender takes them then.

Catching up: the moment a destination answers again, its waiting sends become due at once
instead of sitting out their backoff (up to ``send.max_backoff_s``). It answers when a send to
it succeeds, or when its echo (C-ECHO; a QIDO-RS search for DICOMweb) succeeds: every
``send.echo_interval_s`` a destination whose sends wait (and whose next attempt is further away
than that) is echoed by its own delivery thread.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass

import structlog

from dicom_node.audit.events import AuditAction, AuditEvent, AuditOutcome, Participants
from dicom_node.audit.log import AuditLog
from dicom_node.common.metrics import NodeMetrics
from dicom_node.config.destinations import Destination, DestinationType
from dicom_node.config.sections import SendPolicy
from dicom_node.send.senders import Sender, StoreResult, sender_for
from dicom_node.store.sends import Send, SendState, SendStore

log = structlog.get_logger(__name__)

#: Seconds a delivery thread sleeps when nothing wakes it (then it looks for due sends).
POLL_S = 0.25


#: Sends one delivery pass claims and sends at most (one association).
BATCH = 64


def send_lease_s(dest: Destination) -> float:
    """How long a claimed batch stays leased: twice what one pass may take, plus a minute."""
    return 2 * (dest.connect_timeout_s + dest.timeout_s) + 60


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1, 2, ...)."""
    return float(min(max_s, initial_s * 2 ** max(attempts - 1, 0)))


@dataclass(frozen=True, kw_only=True)
class DeliverySettings:
    """What delivery reads of the configuration (built by :mod:`dicom_node.app.node`)."""

    #: The calling AE title of C-STOREs and C-ECHOs (the node's ``ae_title``).
    ae_title: str
    destinations: dict[str, Destination]
    send: SendPolicy


class Delivery:
    """Delivery threads, one per destination; :meth:`deliver` and :meth:`probe` are one pass."""

    def __init__(
        self,
        settings: DeliverySettings,
        db: SendStore,
        audit: AuditLog,
        metrics: NodeMetrics | None = None,
        owner: str | None = None,
    ) -> None:
        """``owner`` (default: host and process) names this delivery's claims of sends; each
        destination's thread claims as ``<owner>-<destination>``."""
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self.db = db
        self.audit = audit
        self.senders: dict[str, Sender] = {
            name: sender_for(dest, calling_ae=settings.ae_title)
            for name, dest in settings.destinations.items()
        }
        self._stopping = threading.Event()
        self._wake = {name: threading.Event() for name in settings.destinations}
        self._threads: dict[str, threading.Thread] = {}
        self._last_probe: dict[str, float] = {}  # destination -> time.monotonic() of last echo
        self._owner = owner or f"{socket.gethostname()}:{os.getpid()}:deliver"

    # -- threads -----------------------------------------------------------------------------

    def start(self) -> None:
        """Dead-letter sends to destinations no longer configured; start one thread each."""
        self.drop_unconfigured()
        for name in self.settings.destinations:
            thread = threading.Thread(
                target=self._run, args=(name,), name=f"deliver-{name}", daemon=True
            )
            self._threads[name] = thread
            thread.start()

    def wake(self, destination: str | None = None) -> None:
        """Make the thread of ``destination`` (None: every one) look for due sends now."""
        for name, event in self._wake.items():
            if destination is None or name == destination:
                event.set()

    def stop(self) -> None:
        """Stop the threads; a send in flight ends within its destination's timeouts."""
        self._stopping.set()
        self.wake()
        for name, thread in self._threads.items():
            dest = self.settings.destinations[name]
            thread.join(dest.connect_timeout_s + 2 * dest.timeout_s + 5)
            if thread.is_alive():
                log.warning("delivery.stop_timeout", destination=name)

    def _run(self, name: str) -> None:
        event = self._wake[name]
        while not self._stopping.is_set():
            try:
                while self.deliver(name) and not self._stopping.is_set():
                    pass  # a full batch may leave more due
                if not self._stopping.is_set():
                    self.probe(name)
            except Exception:  # noqa: BLE001 - a delivery error must not end the thread
                log.exception("delivery.error", destination=name)
            event.wait(POLL_S)
            event.clear()

    # -- one pass ----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> int:
        """One pass over every destination on the calling thread: deliver what is due, then
        probe; return how many sends were delivered (tests and tools; the node uses threads).
        """
        self.drop_unconfigured()
        delivered = 0
        for name in self.settings.destinations:
            delivered += self.deliver(name, now)
            self.probe(name, now)
        return delivered

    def drop_unconfigured(self) -> int:
        """Dead-letter pending sends whose destination is not (any more) in the config.

        Sends are queued only for configured destinations, so this matters only after a
        destination was removed from the config: at start (and in each :meth:`tick`). Sends
        another sender process holds a lease on are left to it.
        """
        return self.db.dead_letter_unconfigured(self.settings.destinations)

    def deliver(self, name: str, now: float | None = None) -> int:
        """Send what is due for destination ``name`` (one batch); return how many were stored."""
        dest = self.settings.destinations[name]
        owner = f"{self._owner}-{name}"
        sends = self.db.claim_sends(name, owner, send_lease_s(dest), BATCH, now)
        if not sends:
            return 0
        outcome = self.senders[name].send([s.path for s in sends])
        who = _participants(self.settings.ae_title, dest)
        delivered = 0
        for send, result in zip(sends, outcome.results, strict=True):
            delivered += self._record(send, name, owner, who, result)
        if delivered:
            self._caught_up(name, via="send")
        return delivered

    def probe(self, name: str, now: float | None = None) -> bool:
        """Echo destination ``name`` if its sends wait for their backoff; True if it answered.

        A destination is echoed at most every ``send.echo_interval_s`` seconds, and only when
        its next attempt is further away than that interval (a sooner attempt finds out by
        itself). The echo runs on the calling thread (the destination's own).
        """
        interval = self.settings.send.echo_interval_s
        if interval <= 0:
            return False
        now = time.time() if now is None else now
        next_at = self.db.waiting_destinations(now).get(name)
        if next_at is None or next_at - now <= interval:
            return False
        if time.monotonic() - self._last_probe.get(name, -math.inf) < interval:
            return False
        self._last_probe[name] = time.monotonic()
        if not self.senders[name].echo():
            return False
        self._caught_up(name, via="echo")
        return True

    def _caught_up(self, dest_name: str, *, via: str) -> None:
        """``dest_name`` answered: make its waiting sends due now and wake its thread."""
        n = self.db.sends_due_now(dest_name)
        if n:
            log.info("destination.answering", destination=dest_name, via=via, sends_due=n)
            self.wake(dest_name)

    def _record(
        self, send: Send, dest_name: str, owner: str, who: Participants, result: StoreResult
    ) -> int:
        """Record one attempt's outcome: done, retry later, or dead letter; return 1 if done.

        Only as ``owner``: when its claim was lost (it ran out and another sender took the
        send), nothing is recorded or audited here; the other sender records its own.
        """
        ok, detail = result.ok, result.detail
        bound = log.bind(job_id=send.job_id, destination=dest_name)
        self.metrics.sends.labels(dest_name, "done" if ok else "failed").inc()
        if ok:
            if not self.db.send_done(send.id, owner=owner):
                bound.warning("send.lease_lost", outcome="done")
                return 0
            bound.info("send.done", detail=detail)
            outcome = AuditOutcome.SUCCESS
        else:
            policy = self.settings.send
            attempts = send.attempts + 1
            next_at = None
            if attempts < policy.max_attempts and not result.permanent:
                wait = backoff_s(attempts, policy.initial_backoff_s, policy.max_backoff_s)
                next_at = time.time() + wait
            state = self.db.send_failed(send.id, detail, next_attempt_at=next_at, owner=owner)
            if state is None:
                bound.warning("send.lease_lost", outcome="failed")
                return 0
            dead = state is SendState.FAILED
            bound.warning(
                "send.failed",
                detail=detail,
                attempts=attempts,
                dead_letter=dead,
                permanent=result.permanent,
            )
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


def _participants(calling_ae: str, dest: Destination) -> Participants:
    """The audit's participants of a send: AE titles and address, or the DICOMweb URL."""
    if dest.type is DestinationType.DICOMWEB:
        return Participants(calling_ae=calling_ae, peer_address=str(dest.url))
    return Participants(
        calling_ae=calling_ae, called_ae=dest.ae_title, peer_address=f"{dest.host}:{dest.port}"
    )
