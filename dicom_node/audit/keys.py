"""The HMAC key of the audit chain (``audit.key_file``): created once, read at every start.

Every record's hash is keyed with it (:func:`~dicom_node.audit.chain.mac`), so a rewrite that
recomputes every later hash is detected by anyone holding the key. The key is kept outside the
chain; a database chain names it by :func:`key_id`, never by the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from dicom_node.common.errors import StartupError
from dicom_node.common.keyfile import KeyFileError, load_hex_key

KEY_BYTES = 32


def load_key(path: Path, *, create: bool) -> bytes | None:
    """The HMAC key in ``path`` (hex); created with mode 0600 when missing and ``create``
    (:func:`~dicom_node.common.keyfile.load_hex_key`).

    Raises
    ------
    StartupError
        When the file exists but cannot be read or holds no key of at least 32 bytes.
    """
    try:
        return load_hex_key(path, KEY_BYTES, create=create)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"audit.key_file: cannot read {path}: {exc}") from exc
    except KeyFileError:
        raise StartupError(
            f"audit.key_file: {path} holds no audit key ({KEY_BYTES * 2} or more hex digits); "
            "restore the node's key file"
        ) from None


def key_id(key: bytes) -> str:
    """A name of the key that does not reveal it (HMAC of a fixed text)."""
    return hmac.new(key, b"dicom-node audit key id", hashlib.sha256).hexdigest()
