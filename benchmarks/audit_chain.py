"""Audit records per second: the file chain against the database chain, 1 and N processes.

Run with ``.venv/bin/python -m benchmarks.audit_chain [--records N] [--processes P]``. Each
writer appends ``--records`` Instances Transferred records through :class:`AuditLog`, as the
receiver does once per study and association; the figure is records per second over all
writers, the median of ``--repeat`` runs, each on a fresh chain:

- ``file``: ``audit.jsonl`` (one write and fsync per record; the head in SQLite);
- ``database, sqlite``: the database chain on SQLite (synchronous=FULL), one process;
- ``database, postgresql``: the database chain on a real PostgreSQL (Debian's, started here in
  a temporary folder with the tests' helper, then set durable again: ``fsync``,
  ``synchronous_commit`` and ``full_page_writes`` on), 1 process and ``--processes`` at once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog, open_audit_log
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.store.database import open_database
from tests.factories import record_transfers


def settings_for(folder: Path, url: str | None) -> Settings:
    return parse_settings({"storage_dir": str(folder / "var"), "database": url})


def _writer(folder: str, url: str | None, n: int, ready: Any, start: Any, done: Any) -> None:
    settings = settings_for(Path(folder), url)
    db = open_database(settings.database, stage_settings(settings).layout.database_path)
    log = open_audit_log(
        db,
        audit_path=stage_settings(settings).layout.audit_path,
        key_file=stage_settings(settings).layout.audit_key_file,
    )
    ready.put(os.getpid())
    start.wait(600)
    record_transfers(log, n, instances=300)
    done.put(time.perf_counter())
    db.close()


def rate(url_for_run: Callable[[], str | None], n: int, processes: int, chain: str) -> float:
    """Records per second of ``processes`` writers of ``n`` records each, on a fresh chain."""
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        folder = Path(tmp)
        url = url_for_run()
        settings = settings_for(folder, url)
        settings.storage_dir.mkdir(parents=True)
        db = open_database(settings.database, stage_settings(settings).layout.database_path)
        if chain == "database" and url is None:  # the database chain on SQLite
            from dicom_node.audit.database_chain import DatabaseChain

            log = AuditLog(chain=DatabaseChain(db, stage_settings(settings).layout.audit_key_file))
        else:
            log = open_audit_log(
                db,
                audit_path=stage_settings(settings).layout.audit_path,
                key_file=stage_settings(settings).layout.audit_key_file,
            )
        if processes == 1:
            began = time.perf_counter()
            record_transfers(log, n, instances=300)
            elapsed = time.perf_counter() - began
            db.close()
            return n / elapsed
        db.close()
        ctx = multiprocessing.get_context("spawn")
        ready, start, done = ctx.Queue(), ctx.Event(), ctx.Queue()
        workers = [
            ctx.Process(target=_writer, args=(tmp, url, n, ready, start, done))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:  # every process has imported and opened its chain
            ready.get(timeout=600)
        began = time.perf_counter()
        start.set()
        elapsed = max(done.get(timeout=600) for _ in workers) - began
        for worker in workers:
            worker.join(30)
        return processes * n / elapsed


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200, help="records per writer")
    parser.add_argument("--processes", type=int, default=4, help="writers at once on PostgreSQL")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import psycopg

    import tests.conftest  # noqa: F401 - first: tests.postgres imports its helpers
    from tests.postgres import PostgresServer, require_postgres

    server = PostgresServer(require_postgres()).start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as admin:
            for name in ("fsync", "synchronous_commit", "full_page_writes"):
                admin.execute(f"ALTER SYSTEM SET {name} = on")
            admin.execute("SELECT pg_reload_conf()")
        runs = [
            ("file (audit.jsonl)", lambda: None, 1, "file"),
            ("database, sqlite", lambda: None, 1, "database"),
            ("database, postgresql", server.create_database, 1, "database"),
            (
                "database, postgresql",
                server.create_database,
                args.processes,
                "database",
            ),
        ]
        rows = []
        for label, url, processes, chain in runs:
            rates = [rate(url, args.records, processes, chain) for _ in range(args.repeat)]
            rows.append(
                [
                    label,
                    str(processes),
                    str(args.records * processes),
                    f"{statistics.median(rates):.0f}",
                    f"{min(rates):.0f}..{max(rates):.0f}",
                ]
            )
    finally:
        server.stop()
    print(
        f"audit chain appends, {platform.node()}, {os.cpu_count()} CPU(s), "
        f"median of {args.repeat} runs"
    )
    print(table(["chain", "processes", "records", "records/s", "range"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
