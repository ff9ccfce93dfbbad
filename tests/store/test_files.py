from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_node.store.files import (
    StorageLayout,
    clean_stale_temp_files,
    durable_write,
    fsync_file,
    instance_path,
    rename_durably,
)


def test_the_storage_layout_keeps_the_names_on_disk(tmp_path: Path) -> None:
    """A storage_dir written by an earlier node opens: every name is the one it used."""
    layout = StorageLayout.at(tmp_path)
    assert layout.storage_dir == tmp_path
    assert layout.spool_dir == tmp_path / "spool"
    assert layout.outbox_dir == tmp_path / "outbox"
    assert layout.incoming_dir == tmp_path / "incoming"
    assert layout.database_path == tmp_path / "node.sqlite3"
    assert layout.audit_path == tmp_path / "audit.jsonl"
    assert layout.audit_key_file == tmp_path / "audit.key"
    assert layout.lock_file == tmp_path / "node.lock"
    elsewhere = tmp_path / "keys" / "audit.key"
    assert StorageLayout.at(tmp_path, elsewhere).audit_key_file == elsewhere


def test_instance_path_only_from_valid_uids(tmp_path: Path) -> None:
    assert instance_path(tmp_path, "1.2", "1.2.3", "1.2.3.4") == tmp_path / "1.2/1.2.3/1.2.3.4.dcm"
    for bad in ("1.2.3/../../etc", "..", "1.2.3\x00", "/etc/passwd", "1..2", "01.2"):
        with pytest.raises(ValueError):
            instance_path(tmp_path, "1.2", bad, "1.2.3")


def test_durable_write_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    durable_write(target, b"one")
    durable_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["b.dcm"]


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".incoming-abc.tmp").write_bytes(b"half")
    (tmp_path / "x" / "keep.dcm").write_bytes(b"whole")
    assert clean_stale_temp_files(tmp_path) == 1
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.dcm"]


def test_rename_durably_moves_the_very_file_and_creates_its_folders(tmp_path: Path) -> None:
    src = tmp_path / "incoming" / "rx-1.dcm"
    src.parent.mkdir()
    src.write_bytes(b"received")
    inode = src.stat().st_ino
    fsync_file(src)
    target = tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    rename_durably(src, target)
    assert not src.exists()
    assert target.read_bytes() == b"received" and target.stat().st_ino == inode
    # A resend replaces the earlier copy whole.
    src.write_bytes(b"sent again")
    rename_durably(src, target)
    assert target.read_bytes() == b"sent again"
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3.4.dcm"]


def test_rename_durably_copies_across_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "elsewhere.dcm"
    src.write_bytes(b"received")
    real_replace = os.replace

    def cross_device(a: Any, b: Any) -> None:
        if Path(a) == src:  # the final rename of the copy's temp file still works
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", cross_device)
    target = tmp_path / "spool" / "x.dcm"
    rename_durably(src, target)
    assert target.read_bytes() == b"received" and not src.exists()
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]


def test_on_a_shared_folder_only_old_temp_files_are_cleaned(tmp_path: Path) -> None:
    """Another process's write in progress (a recent temp file) survives a start beside it."""
    old = tmp_path / ".incoming-old.tmp"
    fresh = tmp_path / ".incoming-fresh.tmp"
    old.write_bytes(b"killed half-way")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert clean_stale_temp_files(tmp_path, older_than_s=3600) == 1
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]
