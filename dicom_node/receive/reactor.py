"""Event-driven waits for pynetdicom's two reactor threads of each accepted association.

pynetdicom 3.0 runs two polling loops per association: the DUL thread
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever a pass found
nothing to do, then checks the socket with a zero-timeout ``select``; the association thread
(``Association._run_reactor``) sleeps 1 ms before every look at its queues. Each C-STORE
crosses both loops several times (its PDUs arrive, its message is handed to the handler, the
response goes out), so an instance waits a few milliseconds in ``time.sleep`` while the
CPU is idle, and a loaded machine stretches every 1 ms sleep further.

:func:`make_event_driven` changes that for one association, before it starts, without copying
pynetdicom's loops: the ``time`` that ``pynetdicom.dul`` and ``pynetdicom.association`` call
``sleep`` on is replaced (once per process) by :class:`_ReactorTime`, whose ``sleep`` in the
threads of such an association waits for the work itself, at most :data:`POLL_S`:

- DUL thread: ``select`` on the socket and on a wake-up pipe written whenever a primitive is
  queued for it (``to_provider_queue``) or it is told to stop;
- association thread: a :class:`threading.Event` set whenever a DIMSE message
  (``dimse.msg_queue``) or an ACSE primitive (``dul.to_user_queue``) is queued, or the
  association is killed.

Every other thread, and every other call of ``sleep``, sleeps as before. The timers the loops
check (ARTIM, the network idle timer) are seen within :data:`POLL_S`.
``tests/receive/test_reactor.py`` fails when pynetdicom's loops no longer call what this relies
on (after an upgrade). The change proposed upstream: ``docs/pynetdicom-event-driven.md``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time as _time
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

#: Longest wait of a reactor loop when nothing arrives (seconds): timers are seen this late.
POLL_S = 0.05
#: The delays pynetdicom's loops sleep between passes (``_run_reactor``'s literal 1 ms).
ASSOCIATION_LOOP_DELAY_S = 0.001

_lock = threading.Lock()
_installed = False


class _SignallingQueue(queue.Queue[Any]):
    """A queue that calls ``signal`` after each ``put``."""

    def __init__(self, signal: Any) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class EventDUL(DULServiceProvider):
    """pynetdicom's DUL thread, woken by a pipe instead of polled (the class of a DUL that
    :func:`make_event_driven` prepared; never constructed directly)."""

    _wake_r: int
    _wake_w: int
    #: Waits served by :func:`_dul_wait` (the tests check the hook still applies).
    event_waits: int

    def wake(self) -> None:
        """Interrupt the wait of the reactor loop."""
        with contextlib.suppress(OSError):  # the pipe is full (it is woken) or closed
            os.write(self._wake_w, b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        self.wake()
        return bool(super().stop_dul())

    def _wait(self, delay_s: float) -> None:
        """Wait until the socket has data, a primitive is queued, or :data:`POLL_S`."""
        self.event_waits += 1
        if not (self.to_provider_queue.empty() and self.event_queue.empty()):
            return
        sock = getattr(self.socket, "socket", None)
        try:
            if sock is None or sock.fileno() < 0:
                raise ValueError("no socket")
            if hasattr(sock, "pending") and sock.pending():
                return  # TLS: bytes already decrypted, select() cannot see them
            ready, _, _ = select.select([sock, self._wake_r], [], [], POLL_S)
        except (OSError, ValueError):
            _time.sleep(delay_s)
            return
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)

    def close_wake(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class EventAssociation(Association):
    """pynetdicom's accepted association, its reactor woken by its queues instead of polled
    (the class of an association :func:`make_event_driven` prepared)."""

    _wake: threading.Event
    event_waits: int

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _wait(self, delay_s: float) -> None:
        """Wait until a DIMSE message or ACSE primitive is queued, or :data:`POLL_S`."""
        self.event_waits += 1
        if self._kill:  # kill() waiting for the DUL thread to end
            _time.sleep(delay_s)
            return
        self._wake.clear()
        if not self.dimse.msg_queue.empty():
            return
        self._wake.wait(POLL_S)


class _ReactorTime:
    """The ``time`` module, but ``sleep`` in an event-driven reactor thread waits for work."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    @staticmethod
    def sleep(delay_s: float) -> None:
        thread = threading.current_thread()
        loop_delay_s = (
            thread._run_loop_delay
            if isinstance(thread, EventDUL)
            else ASSOCIATION_LOOP_DELAY_S
            if isinstance(thread, EventAssociation)
            else None
        )
        if delay_s == loop_delay_s:
            thread._wait(delay_s)  # type: ignore[attr-defined]
        else:
            _time.sleep(delay_s)


def install() -> None:
    """Give ``pynetdicom.dul`` and ``pynetdicom.association`` the :class:`_ReactorTime` (once).

    Threads of associations not made event-driven sleep exactly as before.
    """
    global _installed
    with _lock:
        if not _installed:
            _dul.time = _ReactorTime()  # type: ignore[assignment]
            _association.time = _ReactorTime()  # type: ignore[assignment]
            _installed = True


def make_event_driven(assoc: Association) -> None:
    """Have the accepted, not yet started ``assoc`` wait for work instead of polling."""
    install()
    dul = assoc.dul
    dul.__class__ = EventDUL
    assert isinstance(dul, EventDUL)
    dul._wake_r, dul._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    dul.event_waits = 0
    dul.to_provider_queue = _SignallingQueue(dul.wake)
    assoc.__class__ = EventAssociation
    assert isinstance(assoc, EventAssociation)
    assoc._wake = threading.Event()
    assoc.event_waits = 0
    dul.to_user_queue = _SignallingQueue(assoc._wake.set)
    assoc.dimse.msg_queue = _SignallingQueue(assoc._wake.set)


def release(assoc: Association) -> None:
    """Close the wake-up pipe of an event-driven association that ended."""
    if isinstance(assoc.dul, EventDUL):
        assoc.dul.close_wake()
