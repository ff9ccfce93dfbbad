"""``dicom-node audit verify``: check every record of a chain, and say which and why.

The same checks for the file (:func:`verify`, problems named by line) and the database chain
(:func:`verify_database`, problems named by sequence number): whole JSON, sequence numbers,
the hash chain, each record's hash, its HMAC under the key, and the chain head kept in the
database.
"""

from __future__ import annotations

import enum
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.audit.chain import GENESIS, HEAD, digest, mac
from dicom_node.audit.database_chain import ChainDatabase, all_records


class Check(enum.StrEnum):
    """The check of ``audit verify`` that a line failed."""

    JSON = "json"
    HASH = "hash"
    CHAIN = "chain"
    HMAC = "hmac"
    SEQUENCE = "sequence"
    HEAD = "head"
    TORN = "torn"


@dataclass(frozen=True)
class Problem:
    """One failed check: where (line, sequence number) and why.

    ``line`` is None for a problem of the whole log, and for every problem of a database
    chain (``in_database``), whose records are named by their sequence number alone.
    """

    line: int | None
    seq: int | None
    check: Check
    message: str
    in_database: bool = False

    def __str__(self) -> str:
        if self.in_database:
            where = f"seq {self.seq}" if self.seq is not None else "chain"
        else:
            where = f"line {self.line}" if self.line is not None else "log"
            if self.seq is not None:
                where += f" (seq {self.seq})"
        return f"{where}: {self.check}: {self.message}"


@dataclass
class Report:
    """What ``audit verify`` found."""

    records: int = 0
    keyed: int = 0
    unkeyed: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Entry:
    """One stored record: its line number (file) or row key (database), and its bytes."""

    line: int | None
    row_seq: int | None
    raw: bytes
    torn: bool = False


def _file_entries(data: bytes) -> Iterable[_Entry]:
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        if raw.strip():
            yield _Entry(lineno, None, raw, torn=lineno == len(lines))


def _check(
    entries: Iterable[_Entry],
    key: bytes | None,
    head: tuple[int, str] | None,
    *,
    check_head: bool,
    in_database: bool = False,
    head_now: Callable[[], int] | None = None,
) -> Report:
    report = Report()

    def problem(line: int | None, seq: int | None, check: Check, message: str) -> None:
        report.problems.append(Problem(line, seq, check, message, in_database))

    prev, seq, found_head, beyond_head = GENESIS, 0, False, False
    limit = head[0] if head is not None else 0
    for entry in entries:
        report.records += 1
        lineno = entry.line
        if entry.torn:  # no newline after it: cut while being written
            problem(
                lineno,
                None,
                Check.TORN,
                f"incomplete last record ({len(entry.raw)} bytes, no end of line): a crash or "
                "a full disk while writing; the node sets it aside at its next start",
            )
            break
        try:
            record = json.loads(entry.raw)
            stored = str(record.pop("hash"))
            stored_mac = record.pop("hmac", None)
        except (ValueError, KeyError, TypeError, AttributeError):
            problem(lineno, entry.row_seq, Check.JSON, "not a complete audit record (not JSON)")
            continue
        expected = seq + 1
        seq = int(record.get("seq", expected))
        where = seq if entry.row_seq is None else entry.row_seq
        if entry.row_seq is not None and seq != entry.row_seq:
            problem(
                lineno,
                where,
                Check.SEQUENCE,
                f"the record says seq {seq} but is stored as seq {entry.row_seq} (moved)",
            )
        if seq != expected:
            problem(
                lineno,
                where,
                Check.SEQUENCE,
                f"sequence gap: expected {expected}, found {seq} (records removed)",
            )
        if record.get("prev") != prev:
            problem(
                lineno,
                where,
                Check.CHAIN,
                "does not follow the previous record (removed, inserted or reordered)",
            )
        if digest(record.get("prev", ""), record) != stored:
            problem(lineno, where, Check.HASH, "content does not match its hash (edited)")
        if stored_mac is None:
            report.unkeyed += 1
            if report.keyed:
                problem(lineno, where, Check.HMAC, "no HMAC after keyed records (inserted)")
        else:
            report.keyed += 1
            if key is not None and not hmac.compare_digest(str(stored_mac), mac(key, stored)):
                problem(
                    lineno,
                    where,
                    Check.HMAC,
                    "HMAC does not match: written without the node's key (rewritten)",
                )
        if head is not None and seq == head[0]:
            found_head = True
            if stored != head[1]:
                problem(
                    lineno,
                    where,
                    Check.HEAD,
                    "differs from the chain head kept in the database (rewritten)",
                )
        elif head_now is not None and seq > limit and not beyond_head:
            # The database chain moves its head in the transaction of each record: a record
            # above the head as it is now (read again: appends go on while we read) was
            # stored before a head that was then moved back.
            limit = head_now()
            if seq > limit:
                beyond_head = True
                problem(
                    lineno,
                    where,
                    Check.HEAD,
                    f"after the chain head (seq {limit}): the head was moved back",
                )
        prev = stored
    scope = "chain" if in_database else "log"
    if head is not None and not found_head and head[0] > 0:
        problem(
            None,
            head[0],
            Check.HEAD,
            f"the {scope} ends at seq {seq} but the database's chain head is seq {head[0]}: "
            "records removed from the end",
        )
    elif head is None and check_head and report.keyed:
        problem(None, None, Check.HEAD, f"no chain head in the database for a keyed {scope}")
    if report.unkeyed:
        report.notes.append(
            f"{report.unkeyed} unkeyed record(s) (written before HMAC keys): chain checked, "
            "authorship not provable"
        )
    if key is None and report.keyed:
        report.notes.append("no key: HMACs not checked")
    return report


def verify(
    path: Path,
    key: bytes | None = None,
    head: tuple[int, str] | None = None,
    *,
    check_head: bool = False,
) -> Report:
    """Check every record of the audit log (PS3.15 A.5 events, hash chain, HMAC, head).

    Parameters
    ----------
    path
        The audit log (JSON lines: ``audit.jsonl`` or a file of ``audit export``).
    key
        The HMAC key; None checks the chain only and says so.
    head
        ``(seq, hash)`` of the chain head from the node database.
    check_head
        Report a missing ``head`` as a problem (the database was given).
    """
    if not path.exists():
        report = Report()
        report.problems.append(Problem(None, None, Check.JSON, f"{path}: no audit log"))
        return report
    return _check(_file_entries(path.read_bytes()), key, head, check_head=check_head)


def verify_database(db: ChainDatabase, key: bytes | None) -> Report:
    """Check every record of the database chain (``audit_records``) and its head.

    Problems are named by sequence number (``seq S: <check>: <why>``). Records after the head
    are a problem here (the head moves with each record, in its transaction), and so is a
    head above the last record (records removed from the end).
    """
    head = db.audit_mark(HEAD)
    if head is not None and head[0] == 0:  # a new chain, no record yet
        head = None
    entries = (
        _Entry(None, seq, line.encode("utf-8", errors="replace")) for seq, line in all_records(db)
    )

    def head_now() -> int:
        mark = db.audit_mark(HEAD)
        return mark[0] if mark is not None else 0

    return _check(entries, key, head, check_head=True, in_database=True, head_now=head_now)
