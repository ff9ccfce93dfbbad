"""``dicom-node audit export``: the audit chain, up to its head now, copied to a new file.

One record a line, exactly as stored (the format of ``audit.jsonl``), from the database chain
or the audit file, so the copy verifies with ``audit verify --file`` and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.audit.chain import HEAD
from dicom_node.audit.database_chain import ChainDatabase, all_records
from dicom_node.common.errors import DicomNodeError


class OpenChainDatabase(ChainDatabase, Protocol):
    """The node database as :func:`export_chain` opens it: the chain's, and closed after."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Exported:
    """What ``audit export`` wrote: how many records, their sequence numbers, the last hash."""

    records: int
    first: int
    last: int
    last_hash: str
    source: str


def export_chain(
    path: Path,
    audit_path: Path,
    open_db: Callable[[], OpenChainDatabase] | None = None,
) -> Exported:
    """Write the node's audit chain, up to its head now, to the new file ``path``.

    One record a line, exactly as stored (the format of ``audit.jsonl``), so the file verifies
    with ``audit verify --file`` and the key. Written to a hidden file beside ``path``, fsynced
    and linked to ``path`` when complete; an existing ``path`` is never overwritten.

    Parameters
    ----------
    path
        The new file.
    audit_path
        The audit file (``<storage_dir>/audit.jsonl``): the chain when there is no ``open_db``.
    open_db
        Opens the node database whose chain is exported (PostgreSQL); called once ``path`` is
        checked, and the database closed when its records are read.

    Raises
    ------
    DicomNodeError
        When ``path`` exists, or its folder does not, or (no ``open_db``) ``audit_path`` does
        not exist.
    """
    if path.exists():
        raise DicomNodeError(f"{path} exists; name a new file (an export never overwrites)")
    if not path.parent.is_dir():
        raise DicomNodeError(f"{path.parent} is not a folder; create it or name another file")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    first = last = count = 0
    last_hash = ""
    try:
        with partial.open("x", encoding="utf-8") as out:
            lines, source, close = _chain_lines(audit_path, open_db)
            try:
                for line in lines:
                    out.write(line + "\n")
                    count += 1
                    try:
                        record = json.loads(line)
                        last, last_hash = int(record.get("seq", last + 1)), str(record["hash"])
                    except (ValueError, KeyError, TypeError):
                        last += 1  # damaged: copied as it is; `audit verify --file` names it
                    first = first or last
            finally:
                close()
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            raise DicomNodeError(
                f"{path} exists; name a new file (an export never overwrites)"
            ) from None
    finally:
        partial.unlink(missing_ok=True)
    return Exported(count, first, last, last_hash, source)


def _chain_lines(
    path: Path, open_db: Callable[[], OpenChainDatabase] | None
) -> tuple[Iterator[str], str, Callable[[], None]]:
    """The stored records of the node's chain (up to its head now), where, and a closer."""
    if open_db is not None:
        db = open_db()
        head = db.audit_mark(HEAD)
        lines = (line for _, line in all_records(db, upto=head[0] if head else 0))
        return lines, "database audit chain", db.close
    if not path.exists():
        raise DicomNodeError(f"{path}: no audit log (the node has not run yet?)")
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")
    return (line for line in whole.splitlines() if line.strip()), str(path), lambda: None
