"""The node's files on disk: where each lives (:class:`StorageLayout`), and durable writes of
received instances (the spool) and results waiting to be sent (the outbox).

Every write is temp file -> fsync -> rename -> fsync of the folder, so a file that exists under
its final name is complete, whatever instant the process was killed at.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicom_node.common.uids import is_valid_uid


@dataclass(frozen=True)
class StorageLayout:
    """Where the node keeps its files: everything under ``storage_dir`` but, when the config
    names one, the audit key. Build it with :meth:`at`; on-disk names never change.
    """

    storage_dir: Path
    #: Received instances: ``<study>/<series>/<sop>.dcm`` (:func:`instance_path`).
    spool_dir: Path
    #: Results waiting to be sent: ``<job id>/...``.
    outbox_dir: Path
    #: Where C-STORE data sets are written while they arrive (the spool's file system).
    incoming_dir: Path
    #: The receive journal: one durable record per received instance until it is applied
    #: (:mod:`dicom_node.store.journal`).
    journal_dir: Path
    #: The SQLite database (unused with PostgreSQL).
    database_path: Path
    #: The audit trail's file (SQLite; PostgreSQL keeps the chain in the database).
    audit_path: Path
    #: The audit trail's HMAC key (``audit.key_file``, default ``<storage_dir>/audit.key``).
    audit_key_file: Path
    #: Locked by each node process on the folder (exclusive on SQLite, shared on PostgreSQL).
    lock_file: Path
    #: The web console's local users (``console.users_file`` when the config names one).
    console_users_file: Path
    #: The key that signs the web console's session cookies.
    console_key_file: Path

    @classmethod
    def at(cls, storage_dir: Path, audit_key_file: Path | None = None) -> StorageLayout:
        """The layout under ``storage_dir``; ``audit_key_file`` when the config sets one."""
        return cls(
            storage_dir=storage_dir,
            spool_dir=storage_dir / "spool",
            outbox_dir=storage_dir / "outbox",
            incoming_dir=storage_dir / "incoming",
            journal_dir=storage_dir / "journal",
            database_path=storage_dir / "node.sqlite3",
            audit_path=storage_dir / "audit.jsonl",
            audit_key_file=audit_key_file or storage_dir / "audit.key",
            lock_file=storage_dir / "node.lock",
            console_users_file=storage_dir / "console-users.json",
            console_key_file=storage_dir / "console.key",
        )


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    _durable(path, lambda fh: fh.write(data))


def durable_copy(src: Path, path: Path) -> None:
    """Copy the file ``src`` to ``path`` atomically and durably, streaming (bounded memory)."""

    def fill(fh: BinaryIO) -> None:
        with src.open("rb") as source:
            shutil.copyfileobj(source, fh, 1024 * 1024)

    _durable(path, fill)


def free_disk_bytes(path: Path) -> int:
    """Bytes free for this process on the file system that holds ``path``."""
    return shutil.disk_usage(path).free


def fsync_file(path: Path) -> None:
    """Flush the data and metadata of the file ``path`` to disk (a folder too: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durably(src: Path, path: Path) -> None:
    """Rename the durable (fsync'ed) file ``src`` to ``path`` and fsync the folder.

    ``src`` should be on the same file system (the receiver's ``<storage_dir>/incoming``): a
    rename, never a copy, so a reader sees the old file or the whole new one. A folder created
    on the way is made durable in its parent. On another file system (``EXDEV``) the file is
    copied (:func:`durable_copy`) and ``src`` removed.
    """
    created = _make_folders(path.parent)
    try:
        os.replace(src, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        durable_copy(src, path)
        src.unlink(missing_ok=True)
        return
    for folder in (path.parent, *created):
        fsync_file(folder)


def rename_quickly(src: Path, path: Path) -> None:
    """Rename ``src`` to ``path`` (folders made as needed) with no flush at all.

    For a file whose durable copy is elsewhere until the file system is flushed (the receive
    journal, :mod:`dicom_node.store.journal`). On another file system (``EXDEV``) the file is
    copied and ``src`` removed.
    """
    _make_folders(path.parent)
    try:
        os.replace(src, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, path)
        src.unlink(missing_ok=True)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the parents whose entries are new."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
    return [new.parent for new in missing]


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
    fsync_file(path.parent)


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


#: On a shared storage folder (PostgreSQL), temp files younger than this may be another
#: process's write in progress: a start removes only older ones.
SHARED_STALE_TEMP_S = 3600.0


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
