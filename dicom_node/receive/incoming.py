"""Where pynetdicom writes a C-STORE data set while it arrives: ``<storage_dir>/incoming``.

With ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming data set
to a ``tempfile.NamedTemporaryFile`` as its fragments arrive, in the system temp folder: maybe
a tmpfs (memory), maybe another file system than the spool, and outside the node's free-space
watermark. pynetdicom has no setting for that folder, and the process-wide
``tempfile.tempdir`` would be one folder for every receiver in the process (the tests run
several). So :func:`install` replaces the ``NamedTemporaryFile`` that
``pynetdicom.dimse_messages`` calls, once per process, by :func:`_incoming_file`: that call is
made in ``DIMSEMessage.decode_msg`` on the association's DUL thread (pynetdicom 3.0: the state
machine's P-DATA actions call ``DIMSEServiceProvider.receive_primitive`` there), so the current
thread names the association and its AE, and :func:`register` maps each receiver's AE to its
folder. Anywhere else (another AE, another thread) the default applies.

The data set then lies on the spool's file system: the receiver renames it into the spool
(no copy), the free-space watermark covers it, and :func:`clean` removes what a killed process
left there.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages
from pynetdicom.ae import ApplicationEntity
from pynetdicom.dul import DULServiceProvider

#: Names of the files pynetdicom writes in the incoming folder.
PREFIX = "rx-"
SUFFIX = ".dcm"

_folders: weakref.WeakKeyDictionary[ApplicationEntity, Path] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_original: Any = None


def _incoming_file(*args: Any, **kwargs: Any) -> Any:
    """``NamedTemporaryFile`` in the folder registered for the current association's AE."""
    thread = threading.current_thread()
    if isinstance(thread, DULServiceProvider) and "dir" not in kwargs:
        folder = _folders.get(thread.assoc.ae)
        if folder is not None:
            kwargs.update(dir=folder, prefix=PREFIX, suffix=SUFFIX)
    return _original(*args, **kwargs)


def install() -> None:
    """Route pynetdicom's incoming data set files through :func:`_incoming_file` (once)."""
    global _original
    with _lock:
        if _original is None:
            _original = dimse_messages.NamedTemporaryFile
            dimse_messages.NamedTemporaryFile = _incoming_file


def register(ae: ApplicationEntity, folder: Path) -> None:
    """Have the data sets that ``ae``'s associations receive written into ``folder``."""
    install()
    folder.mkdir(parents=True, exist_ok=True)
    _folders[ae] = folder


def clean(folder: Path, older_than_s: float = 0.0) -> int:
    """Remove the files a killed or stopped receiver left in ``folder``; return how many.

    Run before the receiver listens: no data set of this process is arriving then. On SQLite
    the folder is the node's own (one node per ``storage_dir``, held by its lock file). On
    PostgreSQL several receivers may share ``storage_dir`` (roles): ``older_than_s`` then
    keeps files modified more recently, which may be another receiver's data set still
    arriving (a live one is written to at least every ``limits.idle_timeout_s``).
    """
    count = 0
    cutoff = time.time() - older_than_s
    if folder.is_dir():
        for path in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if not (path.is_file() or path.is_symlink()):
                    continue
                if older_than_s > 0 and path.lstat().st_mtime > cutoff:
                    continue
                path.unlink()
                count += 1
    return count
