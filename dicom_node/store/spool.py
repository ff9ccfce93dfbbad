"""Durable files on disk: received instances (the spool) and results waiting to be sent (outbox).

Every write is temp file -> fsync -> rename -> fsync of the folder, so a file that exists under
its final name is complete, whatever instant the process was killed at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dicom_node.uids import is_valid_uid


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    _durable(path, lambda fh: fh.write(data))


def durable_copy(src: Path, path: Path) -> None:
    """Copy the file ``src`` to ``path`` atomically and durably, streaming (bounded memory)."""

    def fill(fh: BinaryIO) -> None:
        with src.open("rb") as source:
            shutil.copyfileobj(source, fh, 1024 * 1024)

    _durable(path, fill)


def _durable(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Have ``fill`` write a temp file beside ``path``, fsync it, rename it over ``path``, and
    fsync the folder: a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Path of a received instance: ``root/<study>/<series>/<sop>.dcm``.

    Raises
    ------
    ValueError
        When any UID is not a valid DICOM UID: only validated UIDs become path components, so
        network input such as ``1.2.3/../../etc`` can never name a file outside the spool.
    """
    for name, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {name} UID")
    return root / study_uid / series_uid / f"{sop_uid}.dcm"


def remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove the empty folders above ``path`` up to (not including) ``stop``."""
    parent = path.parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def clean_stale_temp_files(root: Path, older_than_s: float = 0.0) -> int:
    """Remove temp files left by a write that was killed half-way; return how many.

    ``older_than_s``: keep files modified more recently than that. A folder shared by several
    processes (PostgreSQL roles) may hold another live process's write in progress.
    """
    count = 0
    cutoff = time.time() - older_than_s
    if root.is_dir():
        for tmp in root.rglob(".incoming-*.tmp"):
            try:
                if older_than_s > 0 and tmp.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue  # renamed by its writer meanwhile
            tmp.unlink(missing_ok=True)
            count += 1
    return count
