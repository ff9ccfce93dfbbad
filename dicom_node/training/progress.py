"""Progress lines on stderr for long commands (``train``, ``evaluate``): never silent for long.

A line is printed after the first item, every ``every_n`` items, at least every ``every_s``
seconds while items complete, and after the last item::

    evaluate: 40/247 cases, 52 s elapsed, about 4 min 28 s left

Plain lines rather than a redrawn bar, so that a log file or the journal shows them too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_seconds(seconds: float) -> str:
    """``"52 s"``, ``"4 min 28 s"`` or ``"2 h 05 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLines:
    """Counts completed items of one task and prints a progress line now and then.

    Parameters
    ----------
    what
        Starts every line, e.g. ``"evaluate"``.
    total
        Number of items.
    unit
        Plural name of an item, e.g. ``"cases"``.
    every_n
        Print every this many items (default: about every 5 %).
    every_s
        Print when this many seconds passed since the last line.
    by_count
        False: print on time only (``every_s``), not after the first, every n-th or last item.
    enabled
        False: print nothing (``--no-progress``).
    already_done
        Items completed before this count started (a resumed training): they are counted in
        ``done`` but not in the pace the time left is estimated from.
    stream
        Default ``sys.stderr`` (looked up when printing).
    clock
        Seconds, monotonic; tests pass a fake one.
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        *,
        every_n: int | None = None,
        every_s: float = 30.0,
        by_count: bool = True,
        enabled: bool = True,
        already_done: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 0 or (every_n is not None and every_n < 1) or every_s <= 0 or already_done < 0:
            raise ValueError("total, already_done must be >= 0, every_n >= 1 and every_s > 0")
        self.what, self.total, self.unit = what, total, unit
        self.every_n = every_n or max(1, total // 20)
        self.every_s = every_s
        self.by_count = by_count
        self.enabled = enabled
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self._last_line = self.started
        self.already_done = already_done
        self.done = already_done

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def update(self, done: int | None = None, detail: str = "") -> None:
        """Record that ``done`` items (default: one more) are complete; print when due."""
        self.done = self.done + 1 if done is None else done
        now = self.clock()
        due = now - self._last_line >= self.every_s or (
            self.by_count and (self.done in (1, self.total) or self.done % self.every_n == 0)
        )
        if due:
            self._last_line = now
            elapsed = now - self.started
            text = f"{self.what}: {self.done}/{self.total} {self.unit}, "
            text += f"{format_seconds(elapsed)} elapsed"
            if self.already_done < self.done < self.total:
                left = elapsed / (self.done - self.already_done) * (self.total - self.done)
                text += f", about {format_seconds(left)} left"
            self.print(text + (f"; {detail}" if detail else ""))

    def print(self, text: str) -> None:
        """Print ``text`` as a line of its own when enabled."""
        if self.enabled:
            print(text, file=self.stream or sys.stderr, flush=True)
