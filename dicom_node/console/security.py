"""The console's guards: the session key, CSRF tokens, and the login rate limit."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from dicom_node.common.errors import StartupError
from dicom_node.common.keyfile import KeyFileError, load_hex_key

__all__ = ["LoginLimiter", "csrf_ok", "load_session_key", "new_csrf_token"]

SESSION_KEY_BYTES = 32


def load_session_key(path: Path) -> bytes:
    """The key that signs session cookies (hex in ``path``, made with mode 0600 if missing:
    :func:`~dicom_node.common.keyfile.load_hex_key`).

    A new key (a deleted file) ends every session.

    Raises
    ------
    StartupError
        When the file cannot be read or holds no key.
    """
    try:
        key = load_hex_key(path, SESSION_KEY_BYTES, create=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"console: cannot read the session key {path}: {exc}") from exc
    except KeyFileError:
        raise StartupError(
            f"console: {path} holds no session key; delete it (every console session ends) "
            "and start the node again"
        ) from None
    assert key is not None  # created when missing
    return key


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: object, given: object) -> bool:
    """The form's token equals the session's (constant time); both must be non-empty."""
    if not isinstance(expected, str) or not isinstance(given, str) or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class LoginLimiter:
    """At most ``max_failures`` failed logins per key (client address, user name) within
    ``window_s``; beyond, logins for that key are refused until the oldest failure ages out.

    In memory: a restart forgets the failures (the audit trail keeps them).
    """

    def __init__(
        self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def wait_s(self, keys: Iterable[str]) -> float:
        """Seconds until a login for any of ``keys`` is allowed again; 0: allowed now."""
        now = self._clock()
        with self._lock:
            waits = [
                times[0] + self.window_s - now
                for key in keys
                if len(times := self._recent(key, now)) >= self.max_failures
            ]
        return max(waits, default=0.0)

    def failed(self, keys: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def succeeded(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
