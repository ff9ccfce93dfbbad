"""The audit chain in a JSON-lines file (``<storage_dir>/audit.jsonl``): the SQLite default.

One line a record, each sealed as :func:`~dicom_node.audit.chain.seal` says; the chain head is
kept in the node database (``audit_head``, name ``head``) after each record. Several processes
may append (the node's receiver processes, ``receivers: N``): each append holds an exclusive
``flock`` on the file, reads the chain end another process may have moved, then writes. Each
record is one ``write`` and one ``fsync``; a failed or short write is cut back, so a record is
stored whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dicom_node.audit.chain import GENESIS, HEAD, HeadStore, seal
from dicom_node.audit.keys import load_key
from dicom_node.common.errors import AuditWriteError, StartupError

log = structlog.get_logger(__name__)


def _write(fd: int, data: bytes) -> int:
    """One ``write`` to the log (a seam for the tests that simulate a full disk)."""
    return os.write(fd, data)


@dataclass
class _Scan:
    """What the start-up scan of the log found: the chain end and a torn tail, if any."""

    seq: int = 0
    prev: str = GENESIS
    keyed: int = 0
    intact_bytes: int = 0
    torn: bytes = b""


def _scan(path: Path) -> _Scan:
    scan = _Scan()
    if not path.exists():
        return scan
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    scan.intact_bytes, scan.torn = end, data[end:]
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            digest = str(record["hash"])
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line: `audit verify` reports it; the chain goes on after it
        scan.seq = int(record.get("seq", scan.seq + 1))
        scan.prev = digest
        scan.keyed += "hmac" in record
    return scan


#: Bytes read back from the end of the file to find the last record another process wrote.
TAIL_BYTES = 256 * 1024


def _last_record(data: bytes) -> tuple[int, str] | None:
    """``(seq, hash)`` of the last whole line of ``data`` (ending in a newline), or None."""
    lines = data[: data.rfind(b"\n")].rsplit(b"\n", 1)
    try:
        record = json.loads(lines[-1])
        return int(record["seq"]), str(record["hash"])
    except (ValueError, KeyError, TypeError):
        return None


class FileChain:
    """The JSON-lines file (``<storage_dir>/audit.jsonl``); one or several processes append.

    Each record is one ``write`` of one line, fsynced, under an exclusive ``flock`` of the file
    (threads of one process: a lock too); a failed or short write is cut back to the previous
    end of file. Before sealing, a process whose last known end of file is not the file's
    reads the last record back (another process appended). A torn record left by a crash is
    set aside at open, or at the next append of another process, into
    ``audit.jsonl.torn-<time>``. The head is stored in ``head`` after each record.

    Raises
    ------
    StartupError
        When the key file is missing although the log holds keyed records, or unreadable.
    """

    def __init__(
        self, path: Path, key_file: Path | None = None, head: HeadStore | None = None
    ) -> None:
        self.path = path
        self.location = str(path)
        self.key_file = key_file or path.parent / "audit.key"
        self._lock = threading.Lock()
        self._head = head
        self._dirty = False
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = self._open()
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another process may be appending
            self._open_chain(head)
        finally:
            os.close(lock_fd)

    def _open_chain(self, head: HeadStore | None) -> None:
        """Scan the file (under its lock): chain end, torn tail, key, head."""
        path = self.path
        scan = _scan(path)
        if scan.keyed and not self.key_file.exists():
            raise StartupError(
                f"audit.key_file: {self.key_file} is missing but {path} holds keyed records; "
                "restore the key file (a new key would make the trail unverifiable)"
            )
        key = load_key(self.key_file, create=True)
        assert key is not None
        self.key = key
        self._seq, self._prev = scan.seq, scan.prev
        self._alerts: list[dict[str, Any]] = []
        if scan.torn:
            self._alerts.append(self._set_aside(scan))
        self._end = scan.intact_bytes  # the end of file after this process's last record
        stored = head.audit_mark(HEAD) if head is not None else None
        if stored is not None and stored[0] > self._seq:
            # Records were removed from the end: keep the numbering of the head, so that the
            # gap stays visible in the log itself, and say so.
            log.error("audit.truncated", log_seq=self._seq, head_seq=stored[0])
            self._alerts.append(
                {
                    "reason": "audit log ends before the chain head in the database",
                    "log_seq": self._seq,
                    "head_seq": stored[0],
                }
            )
            self._seq = stored[0]

    def startup_alerts(self) -> list[dict[str, Any]]:
        alerts, self._alerts = self._alerts, []
        return alerts

    def _set_aside(self, scan: _Scan) -> dict[str, Any]:
        """Move a torn tail (a record cut by a crash) to ``<log>.torn-<time>``; cut it off."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        torn_path = self.path.with_name(f"{self.path.name}.torn-{stamp}")
        torn_path.write_bytes(scan.torn)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scan.intact_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("audit.torn_record_set_aside", file=torn_path.name, bytes=len(scan.torn))
        return {
            "reason": "torn audit record set aside",
            "torn_file": torn_path.name,
            "torn_bytes": len(scan.torn),
        }

    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by the close
                if self._dirty:
                    self._repair()
                self._catch_up(fd)
                digest, line = seal(body, self._seq + 1, self._prev, self.key)
                self._append(fd, (line + "\n").encode())
                self._seq, self._prev = body["seq"], digest
                if self._head is not None:  # under the locks: the head never goes backwards
                    try:
                        self._head.set_audit_mark(HEAD, body["seq"], digest)
                    except Exception as exc:  # noqa: BLE001 - the record is written; head lags
                        log.warning("audit.head_not_saved", error=type(exc).__name__)
            finally:
                os.close(fd)
        return json.loads(line)  # type: ignore[no-any-return]

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditWriteError(f"cannot open the audit log: {exc.strerror}") from exc

    def _catch_up(self, fd: int) -> None:
        """Take the chain end from the file when another process appended since our last
        record (the file's lock is held); set aside a record it left torn."""
        size = os.fstat(fd).st_size
        if size == self._end:
            return
        with self.path.open("rb") as fh:
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read()
        last = _last_record(tail) if tail.endswith(b"\n") else None
        if last is None:  # a torn or damaged end, or a line longer than the tail: scan it all
            scan = _scan(self.path)
            if scan.torn:
                try:
                    self._set_aside(scan)
                except OSError as exc:
                    raise AuditWriteError(f"cannot repair the audit log: {exc.strerror}") from exc
            last = (scan.seq, scan.prev)
        self._seq, self._prev = max(last[0], self._seq), last[1]
        self._end = os.fstat(fd).st_size

    def _append(self, fd: int, data: bytes) -> None:
        start = os.fstat(fd).st_size
        try:
            written = _write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write to the audit log")
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                self._dirty = True  # cut it back before the next record
            log.error("audit.write_failed", error=exc.strerror)
            raise AuditWriteError(f"cannot write the audit log: {exc.strerror}") from exc
        self._end = start + written

    def _repair(self) -> None:
        """Set aside what a failed write left after the last whole record."""
        scan = _scan(self.path)
        if scan.torn:
            try:
                self._set_aside(scan)
            except OSError as exc:
                raise AuditWriteError(f"cannot repair the audit log: {exc.strerror}") from exc
        self._dirty = False

    def reader(self) -> FileReader:
        return FileReader(self.path)

    def take_lease(self, name: str, owner: str, now: int, until: int) -> bool:
        return True  # one process writes and exports a file chain

    def release_lease(self, name: str, owner: str) -> None:
        return None


class FileReader:
    """Reads the audit file forward from the byte offset where it last stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._seq = 0  # implied numbering of records written before sequence numbers

    def pending(self, after: int) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        out = []
        for line in data[:end].splitlines():
            self._offset += len(line) + 1
            try:
                record = json.loads(line)
            except ValueError:
                continue  # damaged: `audit verify` reports it
            self._seq = int(record.get("seq", self._seq + 1))
            record.setdefault("seq", self._seq)
            if self._seq > after:
                out.append(record)
        return out


def decode(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Records of JSON lines, damaged ones left out."""
    out = []
    for line in lines:
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def read_events(path: Path) -> list[dict[str, Any]]:
    """All intact events of the audit file, oldest first."""
    if not path.exists():
        return []
    return decode(path.read_text(encoding="utf-8", errors="replace").splitlines())
