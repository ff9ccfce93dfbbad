"""The console's local users: names, roles and argon2id password hashes in one JSON file.

``dicom-node console user add NAME --role admin|viewer`` writes it (the password comes from a
prompt or standard input, never the command line). The file holds hashes only (argon2-cffi's
defaults, RFC 9106), is written whole (temp file, fsync, rename) with mode 0600, and is read
again whenever it changes, so a removed user's session ends at their next request.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import argon2

from dicom_node.common.errors import DicomNodeError
from dicom_node.config.sections import ConsoleRole

__all__ = ["MIN_PASSWORD_LENGTH", "User", "UserStore", "check_name"]

MIN_PASSWORD_LENGTH = 10
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HASHER = argon2.PasswordHasher()
#: Verified against when the user does not exist, so a wrong name costs the same time.
_DUMMY_HASH = _HASHER.hash("dicom-node: no such user")


@dataclass(frozen=True)
class User:
    name: str
    role: ConsoleRole


def check_name(name: str) -> str:
    """A user name: 1 to 64 letters, digits or ``. _ @ -``."""
    if not _NAME.match(name):
        raise DicomNodeError(
            f"user name {name!r}: use 1 to 64 letters, digits or the characters . _ @ -"
        )
    return name


class UserStore:
    """The users file (``console.users_file``); safe to use from any thread.

    Parameters
    ----------
    path
        The JSON file: ``{"users": {"NAME": {"role": ..., "hash": ...}}}``; a missing file
        means no users.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, dict[str, str]] = {}

    def _load(self) -> dict[str, dict[str, str]]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._users = None, {}
                return self._users
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    doc = json.loads(self.path.read_text(encoding="utf-8"))
                    users = dict(doc["users"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise DicomNodeError(
                        f"console.users_file: {self.path} is not a users file ({exc}); "
                        "remove it and add the users again with `dicom-node console user add`"
                    ) from None
                self._stamp, self._users = stamp, users
            return self._users

    def users(self) -> list[User]:
        return [User(n, ConsoleRole(u["role"])) for n, u in sorted(self._load().items())]

    def role_of(self, name: str) -> ConsoleRole | None:
        """The role of local user ``name``, or None when there is no such user."""
        entry = self._load().get(name)
        return ConsoleRole(entry["role"]) if entry else None

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs, else None (unknown names take as long)."""
        entry = self._load().get(name)
        try:
            _HASHER.verify(entry["hash"] if entry else _DUMMY_HASH, password)
        except argon2.exceptions.VerificationError:
            return None
        except argon2.exceptions.InvalidHashError:
            return None
        return User(name, ConsoleRole(entry["role"])) if entry else None

    def add(self, name: str, password: str, role: ConsoleRole) -> bool:
        """Add user ``name`` (or set a new password and role); True when the user is new.

        Raises
        ------
        DicomNodeError
            For a bad name or a password shorter than :data:`MIN_PASSWORD_LENGTH`.
        """
        check_name(name)
        if len(password) < MIN_PASSWORD_LENGTH:
            raise DicomNodeError(
                f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters"
            )
        users = dict(self._load())
        new = name not in users
        users[name] = {"role": ConsoleRole(role).value, "hash": _HASHER.hash(password)}
        self._write(users)
        return new

    def remove(self, name: str) -> bool:
        """Remove user ``name``; False when there was none."""
        users = dict(self._load())
        if users.pop(name, None) is None:
            return False
        self._write(users)
        return True

    def _write(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.new-{os.getpid()}")
        data = json.dumps({"users": users}, indent=2, sort_keys=True).encode()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
