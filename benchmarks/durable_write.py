"""Per-instance cost of making a received instance durable, before and after issue 19.

Each repetition writes one file as pynetdicom does (into ``incoming``, no flush), then makes it
durable and indexed one of two ways, alternating so both see the same load:

- ``three flushes`` (before issue 19): ``fsync`` of the file, rename into the spool, ``fsync``
  of its folder, one SQLite row committed with ``synchronous=FULL`` (WAL);
- ``journal`` (issue 19): CRC-32 of the file, append to the receive journal with one
  ``fdatasync`` (:class:`dicom_node.store.journal.Journal`), rename without flush, one SQLite
  row committed with ``synchronous=NORMAL``.

The files are written before the clock starts for each; the time is the durable path alone.
Prints medians (ms) and their ratio as JSON.

Usage: ``PYTHONPATH=. python -m benchmarks.durable_write [--instances 200] [--bytes 524288]
[--folder DIR]`` (DIR: on the disk to measure; default a temporary folder in the current one).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from dicom_node.store.files import fsync_file, rename_durably, rename_quickly
from dicom_node.store.journal import Journal, file_checksum


def index(db: sqlite3.Connection, uid: str, path: Path, durable: bool) -> None:
    db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?)", (uid, str(path)))
    db.execute("COMMIT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--bytes", type=int, default=512 * 1024)
    parser.add_argument("--folder", type=Path, default=Path.cwd())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="durable-", dir=args.folder) as tmp:
        root = Path(tmp)
        incoming, spool = root / "incoming", root / "spool"
        incoming.mkdir()
        db = sqlite3.connect(root / "index.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE instances (uid TEXT PRIMARY KEY, path TEXT)")
        journal = Journal(root / "journal")
        journal.open()
        times: dict[str, list[float]] = {"three flushes": [], "journal": []}
        payload = os.urandom(args.bytes)
        for i in range(args.instances):
            order = ["three flushes", "journal"] if i % 2 else ["journal", "three flushes"]
            for way in order:
                uid = f"1.2.826.0.1.{i}.{len(way)}"
                src = incoming / f"rx-{uid}.dcm"
                src.write_bytes(payload)
                path = spool / "1.2.3" / "1.2.3.4" / f"{uid}.dcm"
                started = time.perf_counter()
                if way == "journal":
                    crc, size = file_checksum(src)
                    ticket = journal.append({"sop": uid}, src, crc, size)
                    rename_quickly(src, path)
                    index(db, uid, path, durable=False)
                    ticket.done()
                else:
                    fsync_file(src)
                    rename_durably(src, path)
                    index(db, uid, path, durable=True)
                times[way].append(time.perf_counter() - started)
        journal.close()
        db.close()
    before = statistics.median(times["three flushes"]) * 1000
    after = statistics.median(times["journal"]) * 1000
    print(
        json.dumps(
            {
                "instances": args.instances,
                "bytes": args.bytes,
                "three_flushes_median_ms": round(before, 3),
                "journal_median_ms": round(after, 3),
                "journal_over_three_flushes": round(after / before, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
