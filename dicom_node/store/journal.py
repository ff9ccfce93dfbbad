"""The receive journal: one ``fdatasync`` per received instance makes it durable.

A received instance is appended to a preallocated segment file in ``<storage_dir>/journal``
as one record: a header (magic, the segment's generation, lengths, a CRC-32 of the data and a
CRC-32 of the header and metadata), its metadata (JSON: UIDs, routing attributes, association,
time) and its bytes, copied by the kernel (``copy_file_range``) from the file pynetdicom wrote.
One ``fdatasync`` of the segment then makes the record durable; appenders that arrive together
share it (group commit). That record, not the per-instance file, is what Success stands on:
the receiver then renames the received file into the spool and indexes it without any flush
of their own (:mod:`dicom_node.receive.receiver`).

A segment is retired once it is rotated out (full, or older than ``max_age_s``) and every
record in it is indexed: ``syncfs`` of the file system (the spool files, their folders and the
SQLite database) and the segment is removed. At start, :meth:`Journal.recover` reads what a
killed process left: complete records are handed back to be re-applied (file rewritten from
the record, index entry made when missing), a torn tail (a record whose header or data CRC
does not match, or a stale record of a recycled file) ends the scan and is logged.

Each segment is locked (``flock``) by the process that writes it, so several processes on one
``storage_dir`` (PostgreSQL roles, several receivers) recover only the segments of dead ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAGIC = b"DNJ1"
#: magic, generation, flags, metadata bytes, data bytes, data CRC-32, header CRC-32.
HEADER = struct.Struct("<4sQII QII")
#: Byte offset of the flags word in a record (written once more to cancel a record).
FLAGS_OFFSET = 12
#: A record whose index entry was refused after it was written: not recovered.
FLAG_CANCELLED = 1
#: Segment size preallocated (``posix_fallocate``); a larger record gets a larger segment.
SEGMENT_BYTES = 64 * 1024 * 1024
#: A segment with records is rotated out (and retired) once it is this old, in seconds.
MAX_AGE_S = 2.0
SUFFIX = ".jnl"
#: Bytes read at a time when a checksum or a copy streams through a file.
CHUNK_BYTES = 1024 * 1024
#: Largest metadata accepted when a segment is read back (a corrupt length is a torn tail).
MAX_META_BYTES = 1024 * 1024


class JournalError(Exception):
    """The journal cannot be written or recovered (the message says what to do)."""


def file_checksum(path: Path) -> tuple[int, int]:
    """CRC-32 and size in bytes of the file ``path``, streaming (zlib releases the GIL)."""
    crc = 0
    size = 0
    with path.open("rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Flush every file of the file system that holds ``fd`` (Linux ``syncfs``; else sync)."""
    call = getattr(_libc, "syncfs", None)
    if call is None:
        os.sync()
        return
    if call(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(generation: int, flags: int, meta: bytes, data_bytes: int, data_crc: int) -> bytes:
    head = HEADER.pack(MAGIC, generation, flags, len(meta), data_bytes, data_crc, 0)[:-4]
    # The flags word is left out of the header CRC: cancelling a record rewrites it alone.
    checked = head[:FLAGS_OFFSET] + head[FLAGS_OFFSET + 4 :] + meta
    return head + struct.pack("<I", zlib.crc32(checked))


@dataclass
class _Segment:
    path: Path
    fd: int
    generation: int
    capacity: int
    #: Bytes appended (the next record's offset) and bytes known durable.
    written: int = 0
    synced: int = 0
    records: int = 0
    #: Records appended whose index entry is not yet made (:meth:`Ticket.done`).
    inflight: int = 0
    first_at: float = 0.0
    sync_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Ticket:
    """One durable record; :meth:`done` once its file is in the spool and it is indexed."""

    journal: Journal
    segment: _Segment
    offset: int
    _done: bool = False

    def done(self) -> None:
        """The record is applied (or refused): its segment may be retired."""
        if not self._done:
            self._done = True
            self.journal._applied(self.segment)

    def cancel(self) -> None:
        """The instance was refused after its record was written: recovery skips it."""
        with contextlib.suppress(OSError):
            os.pwrite(
                self.segment.fd, struct.pack("<I", FLAG_CANCELLED), self.offset + FLAGS_OFFSET
            )
        self.done()


@dataclass(frozen=True)
class JournalRecord:
    """A complete record read back from a segment at recovery."""

    meta: dict[str, Any]
    segment: Path
    data_offset: int
    data_bytes: int
    data_crc: int

    def matches(self, path: Path) -> bool:
        """``path`` holds exactly this record's bytes (size and CRC-32)."""
        try:
            if path.stat().st_size != self.data_bytes:
                return False
            return file_checksum(path) == (self.data_crc, self.data_bytes)
        except OSError:
            return False

    def write_to(self, path: Path) -> None:
        """Write the record's bytes to ``path`` durably (temp file, fsync, rename, fsync)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".incoming-{secrets.token_hex(6)}.tmp")
        try:
            with self.segment.open("rb") as src, tmp.open("wb") as dst:
                src.seek(self.data_offset)
                left = self.data_bytes
                while left:
                    chunk = src.read(min(CHUNK_BYTES, left))
                    if not chunk:
                        raise JournalError(f"{self.segment} ends inside a record")
                    dst.write(chunk)
                    left -= len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


@dataclass
class RecoveryReport:
    """What :meth:`Journal.recover` found."""

    segments: int = 0
    records: int = 0
    cancelled: int = 0
    torn_bytes: int = 0
    #: Segments another live process holds (left alone).
    busy: int = 0


class Journal:
    """Append-only, preallocated segments in ``folder``; see the module docstring.

    Parameters
    ----------
    folder
        ``<storage_dir>/journal``, on the spool's file system (one ``syncfs`` retires it).
    segment_bytes
        Bytes preallocated per segment.
    max_age_s
        A segment with records is rotated out once it is this old (seconds), so that records
        are retired promptly also under a trickle of instances.
    """

    def __init__(
        self, folder: Path, segment_bytes: int = SEGMENT_BYTES, max_age_s: float = MAX_AGE_S
    ) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._active: _Segment | None = None
        self._spare: _Segment | None = None
        self._retiring: list[_Segment] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- writing ---------------------------------------------------------------------------

    def open(self) -> None:
        """Start the background thread that prepares spare segments and retires full ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def append(self, meta: dict[str, Any], src: Path, data_crc: int, data_bytes: int) -> Ticket:
        """Append ``src`` (``data_bytes`` long, CRC-32 ``data_crc``) and ``meta`` as one record;
        return once it is durable (one ``fdatasync``, shared with concurrent appenders).

        Raises
        ------
        OSError
            When the record cannot be written or flushed: nothing was promised.
        """
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        with self._lock:
            size = HEADER.size + len(meta_bytes) + data_bytes
            segment = self._active
            if segment is None or segment.written + size > segment.capacity:
                segment = self._rotate(size)
            offset = segment.written
            head = _header(segment.generation, 0, meta_bytes, data_bytes, data_crc)
            os.pwrite(segment.fd, head + meta_bytes, offset)
            _copy(src, segment.fd, offset + len(head) + len(meta_bytes), data_bytes)
            segment.written = offset + size
            segment.records += 1
            segment.inflight += 1
            if segment.records == 1:
                segment.first_at = time.monotonic()
        ticket = Ticket(self, segment, offset)
        try:
            self._sync(segment, offset + size)
        except BaseException:
            ticket.cancel()
            raise
        return ticket

    def _sync(self, segment: _Segment, end: int) -> None:
        """Make ``segment`` durable up to ``end``: one ``fdatasync`` covers every record
        appended before it started (group commit)."""
        with segment.sync_lock:
            if segment.synced >= end:
                return
            target = segment.written
            os.fdatasync(segment.fd)
            segment.synced = target

    def _rotate(self, size: int) -> _Segment:
        """Retire the active segment; the spare (or a new one) takes its place. Lock held."""
        if self._active is not None:
            if self._active.records:
                self._retiring.append(self._active)
            else:
                self._discard(self._active)
        spare, self._spare = self._spare, None
        if spare is None or spare.capacity < size:
            if spare is not None:
                self._discard(spare)
            spare = self._new_segment(max(size, self.segment_bytes))
        self._active = spare
        self._wake.notify_all()
        return spare

    def _new_segment(self, capacity: int) -> _Segment:
        """A preallocated segment whose name is durable in the folder."""
        generation = secrets.randbits(63) or 1
        path = self.folder / f"{time.time_ns():020d}-{generation:016x}{SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(OSError):  # not every file system preallocates
                os.posix_fallocate(fd, 0, capacity)
            os.fsync(fd)
            _fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return _Segment(path, fd, generation, capacity)

    def _discard(self, segment: _Segment) -> None:
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)

    def _applied(self, segment: _Segment) -> None:
        with self._lock:
            segment.inflight -= 1
            if segment.inflight == 0 and segment in self._retiring:
                self._wake.notify_all()

    def _run(self) -> None:
        """Keep a spare segment ready; rotate out old segments; retire applied ones."""
        while True:
            with self._lock:
                if self._stopping:
                    return
                active = self._active
                if (
                    active is not None
                    and active.records
                    and time.monotonic() - active.first_at >= self.max_age_s
                ):
                    self._retiring.append(active)
                    self._active = None
                done = [s for s in self._retiring if s.inflight == 0]
                need_spare = self._spare is None
            try:
                for segment in done:
                    self._retire(segment)
                if need_spare:
                    spare = self._new_segment(self.segment_bytes)
                    with self._lock:
                        if self._spare is None:
                            self._spare = spare
                        else:
                            self._discard(spare)
            except OSError as exc:  # e.g. disk full: appends create segments as they go
                log.error("journal.background_failed", error=exc.strerror)
            with self._lock:
                if not self._stopping:
                    self._wake.wait(min(0.5, self.max_age_s / 2))

    def _retire(self, segment: _Segment) -> None:
        """Flush what the segment's records became (spool files, index), then remove it."""
        syncfs(segment.fd)
        segment.path.unlink(missing_ok=True)
        _fsync_dir(self.folder)
        with self._lock:
            self._retiring.remove(segment)
        os.close(segment.fd)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop: wait (at most ``timeout_s``) for records in flight, retire every segment."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
        with self._lock:
            if self._active is not None:
                if self._active.records:
                    self._retiring.append(self._active)
                else:
                    self._discard(self._active)
                self._active = None
            if self._spare is not None:
                self._discard(self._spare)
                self._spare = None
        deadline = time.monotonic() + timeout_s
        for segment in list(self._retiring):
            while segment.inflight and time.monotonic() < deadline:
                time.sleep(0.01)
            if segment.inflight:  # left for the next start's recovery
                log.warning("journal.close_in_flight", segment=segment.path.name)
                continue
            self._retire(segment)

    # -- recovery --------------------------------------------------------------------------

    def recover(self, apply: Callable[[JournalRecord], None]) -> RecoveryReport:
        """Hand every complete record of the segments dead processes left to ``apply``, in
        order, then remove those segments. Run before :meth:`open`.

        Raises
        ------
        JournalError
            When a record cannot be applied (e.g. the database is down): the segment stays
            for the next start.
        """
        report = RecoveryReport()
        if not self.folder.is_dir():
            return report
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    report.busy += 1
                    continue
                if not _same_file(fd, path):  # recovered and removed by another process
                    continue
                report.segments += 1
                for record in self._records(path, fd, report):
                    try:
                        apply(record)
                    except Exception as exc:
                        raise JournalError(
                            f"cannot re-index a received instance kept in {path}: {exc}; "
                            "fix the cause (database, disk) and start again"
                        ) from exc
                    report.records += 1
                syncfs(fd)
                path.unlink(missing_ok=True)
                _fsync_dir(self.folder)
            finally:
                os.close(fd)
        if report.segments:
            log.info(
                "journal.recovered",
                segments=report.segments,
                records=report.records,
                cancelled=report.cancelled,
                torn_bytes=report.torn_bytes,
            )
        return report

    def _records(self, path: Path, fd: int, report: RecoveryReport) -> Iterator[JournalRecord]:
        """The complete records of one segment, up to its first torn or stale one."""
        end = os.fstat(fd).st_size
        generation = _generation(path)
        offset = 0
        while offset + HEADER.size <= end:
            head = os.pread(fd, HEADER.size, offset)
            magic, gen, flags, meta_len, data_bytes, data_crc, head_crc = HEADER.unpack(head)
            if magic != MAGIC or gen != generation or meta_len > MAX_META_BYTES:
                break
            meta = os.pread(fd, meta_len, offset + HEADER.size)
            checked = head[:FLAGS_OFFSET] + head[FLAGS_OFFSET + 4 : -4] + meta
            if len(meta) != meta_len or zlib.crc32(checked) != head_crc:
                break
            data_offset = offset + HEADER.size + meta_len
            if data_offset + data_bytes > end or _crc_at(fd, data_offset, data_bytes) != data_crc:
                break
            offset = data_offset + data_bytes
            if flags & FLAG_CANCELLED:
                report.cancelled += 1
                continue
            yield JournalRecord(json.loads(meta), path, data_offset, data_bytes, data_crc)
        if offset < end and any(os.pread(fd, HEADER.size, offset)):
            torn = _written_bytes(fd, offset, end)
            report.torn_bytes += torn
            log.warning("journal.torn_tail_dropped", segment=path.name, offset=offset, bytes=torn)


def _same_file(fd: int, path: Path) -> bool:
    """``fd`` is still the file named ``path`` (not removed since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _generation(path: Path) -> int:
    try:
        return int(path.stem.rsplit("-", 1)[1], 16)
    except (IndexError, ValueError):
        return -1


def _crc_at(fd: int, offset: int, length: int) -> int:
    crc = 0
    while length:
        chunk = os.pread(fd, min(CHUNK_BYTES, length), offset)
        if not chunk:
            return -1
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
        length -= len(chunk)
    return crc


def _written_bytes(fd: int, offset: int, end: int) -> int:
    """Bytes from ``offset`` to the last non-zero byte before ``end`` (a torn record)."""
    start = last = offset
    while offset < end:
        chunk = os.pread(fd, min(CHUNK_BYTES, end - offset), offset)
        stripped = chunk.rstrip(b"\0")
        if stripped:
            last = offset + len(stripped)
        offset += len(chunk)
    return last - start


def _copy(src: Path, fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` into ``fd`` at ``offset``, in the kernel if it can."""
    with src.open("rb", buffering=0) as fh:
        src_fd = fh.fileno()
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src_fd, fd, length - done, done, offset + done)
                if n == 0:
                    raise JournalError(f"{src.name} is shorter than its {length} bytes")
                done += n
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        while done < length:
            chunk = os.pread(src_fd, min(CHUNK_BYTES, length - done), done)
            if not chunk:
                raise JournalError(f"{src.name} is shorter than its {length} bytes")
            os.pwrite(fd, chunk, offset + done)
            done += len(chunk)
