"""The shared hex key file: made once (0600, no partial file left), read back, refused when it
holds no key of the length asked for; several threads making it at once get one key."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from dicom_node.common.errors import StartupError
from dicom_node.common.keyfile import KeyFileError, load_hex_key
from dicom_node.console.security import load_session_key


def test_made_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "k.key"
    assert load_hex_key(path, 32, create=False) is None and not path.exists()
    key = load_hex_key(path, 32, create=True)
    assert key is not None and len(key) == 32
    assert load_hex_key(path, 32, create=False) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["k.key"]  # no partial file left


def test_short_or_garbage_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    for text in ("ab" * 31, "not hex at all", ""):
        path.write_text(text)
        with pytest.raises(KeyFileError):
            load_hex_key(path, 32, create=True)
    path.write_text("ab" * 31)
    with pytest.raises(StartupError, match="holds no session key; delete it"):
        load_session_key(path)


def test_threads_starting_at_once_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    keys: list[bytes | None] = []
    barrier = threading.Barrier(8)

    def first_use() -> None:
        barrier.wait()
        keys.append(load_hex_key(path, 32, create=True))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and keys[0] is not None
