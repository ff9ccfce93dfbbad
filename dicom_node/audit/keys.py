"""The HMAC key of the audit chain (``audit.key_file``): created once, read at every start.

Every record's hash is keyed with it (:func:`~dicom_node.audit.chain.mac`), so a rewrite that
recomputes every later hash is detected by anyone holding the key. The key is kept outside the
chain; a database chain names it by :func:`key_id`, never by the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from dicom_node.common.errors import StartupError

KEY_BYTES = 32


def load_key(path: Path, *, create: bool) -> bytes | None:
    """The HMAC key in ``path`` (hex); created with mode 0600 when missing and ``create``.

    Raises
    ------
    StartupError
        When the file exists but cannot be read or holds no key of at least 32 bytes.
    """
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside it, then linked: a process that starts at the same time sees either
        # no key or the whole key, and the first link wins.
        partial = path.with_name(f".{path.name}.new-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(KEY_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(partial, path)
        except FileExistsError:
            pass  # another process made it first: use that one
        finally:
            partial.unlink()
        return load_key(path, create=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"audit.key_file: cannot read {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise StartupError(
            f"audit.key_file: {path} holds no audit key ({KEY_BYTES * 2} or more hex digits); "
            "restore the node's key file"
        )
    return key


def key_id(key: bytes) -> str:
    """A name of the key that does not reveal it (HMAC of a fixed text)."""
    return hmac.new(key, b"dicom-node audit key id", hashlib.sha256).hexdigest()
