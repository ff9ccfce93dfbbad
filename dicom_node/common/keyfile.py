"""A secret key kept as hex in a file of its own (mode 0600), made once on first use.

Used for the audit chain's HMAC key (:mod:`dicom_node.audit.keys`) and the console's session
key (:mod:`dicom_node.console.security`); each caller words its own errors.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path


class KeyFileError(ValueError):
    """The file exists but holds no key of the required length."""


def load_hex_key(path: Path, n_bytes: int, *, create: bool) -> bytes | None:
    """The key in ``path`` (hex, at least ``n_bytes`` bytes); a new random one written there
    (mode 0600) when the file is missing and ``create``, else None.

    A new key is written beside ``path`` and then linked to it, so that a process starting
    at the same time sees either no key or the whole key, and the first link wins.

    Raises
    ------
    OSError, UnicodeDecodeError
        When the file cannot be read (or written).
    KeyFileError
        When it holds no key of at least ``n_bytes`` bytes.
    """
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.new-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(n_bytes) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(partial, path)
        except FileExistsError:
            pass  # another process made it first: use that one
        finally:
            partial.unlink()
        return load_hex_key(path, n_bytes, create=False)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < n_bytes:
        raise KeyFileError(f"{path} holds no key of {n_bytes * 2} or more hex digits")
    return key
