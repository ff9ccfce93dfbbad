"""Worker processes on PostgreSQL: jobs per second with 1 versus 2 ``serve --role worker``.

Run with ``make bench-workers`` (``.venv/bin/python -m benchmarks.workers``). A private
PostgreSQL cluster (Debian's, as in the tests: ``tests/postgres.py``) holds the queue. Each
run starts a fresh database and storage folder, starts the worker processes and waits until
every one has loaded its model, then queues the same ``--series`` prepared radiograph series
at once (instances indexed beforehand, as a receiver would have) and times from the first
job queued until the last job's own finishing time (``jobs.updated_at``). Before that, warm-up
jobs run until every process has run one: a fresh process's first inference sets up torch's
kernels (seconds on a loaded machine), which is start-up, not throughput. No sender runs, so
the figure is the workers' alone: claim, read the series, random 2D U-Net on the CPU, SEG +
SR written to the shared outbox, sends queued.

Configurations, each run ``--repeat`` times in alternating order:

- 1 worker process, 1 torch thread (``OMP_NUM_THREADS=1``);
- 2 worker processes, 1 torch thread each: the scale-out being measured;
- 1 worker process, torch's default threads (one per core): the peer that uses the same
  cores from one process.

The helpers (node processes, free ports) are those of the tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from benchmarks.receive import BenchmarkError, machine, run_end, runs, table
from dicom_node.store.database import Database, JobState, open_database
from dicom_node.store.files import StorageLayout
from dicom_node.testing.random_package import make_random_package
from tests.conftest import NodeProcess, node_settings
from tests.factories import dx_from_array, write_files
from tests.postgres import PostgresServer, postgres_bin

SERIES = 20
#: Extra series, queued one at a time before the timed run until every process ran one.
WARM_UP_SERIES = 6
IMAGE_SIZE = 1024
DONE_TIMEOUT_S = 600.0
START_TIMEOUT_S = 300.0  # a loaded 2-core machine takes minutes to import torch


@dataclass
class Config:
    label: str
    processes: int
    torch_threads: int | None  # None: torch's default (one per core)
    rates: list[float] = field(default_factory=list)  # jobs/s, one per run
    shares: list[list[int]] = field(default_factory=list)  # jobs per process, one per run


def radiographs(folder: Path, n: int) -> list[Path]:
    """``n`` one-instance DX series (smooth random images), each its own study."""
    rng = np.random.default_rng(0)
    files = []
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        image = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) * 8) + rng.normal(0, 0.05, xx.shape)
        files += write_files([dx_from_array(image)], folder / f"dx{i}")
    return files


def index(db: Database, files: list[Path]) -> list[str]:
    """Index every file as a receiver does; return the series UIDs (no job queued yet)."""
    from pydicom import dcmread

    series = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        db.record_instance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            patient_id=str(ds.PatientID),
            attributes={"Modality": str(ds.Modality)},
            path=path,
            association_id="bench",
            late_policy="reprocess",
        )
        series.append(str(ds.SeriesInstanceUID))
    return series


def warm(db: Database, series: list[str], nodes: list[NodeProcess]) -> None:
    """Run warm-up jobs until every worker process has run one (its first inference pays
    for torch's kernel set-up: that is start-up, not throughput)."""
    pids = {str(n.pid) for n in nodes}
    pending = list(series)
    while True:
        ran = {str(j["owner"]).split(":")[1] for j in db.jobs() if j["state"] == JobState.DONE}
        if pids <= ran:
            return
        if not pending:
            raise BenchmarkError(f"{WARM_UP_SERIES} warm-up jobs did not reach every worker")
        for _ in range(min(len(pids - ran), len(pending))):  # one each, taken at once
            db.queue_series(pending.pop(), ["chest"])
        deadline = time.perf_counter() + DONE_TIMEOUT_S
        while db.status()["jobs"].get(JobState.PENDING) or db.status()["jobs"].get(
            JobState.RUNNING
        ):
            if time.perf_counter() > deadline:
                raise BenchmarkError("a warm-up job did not finish")
            time.sleep(0.05)


def one_run(
    work: Path, server: PostgresServer, model: Path, files: list[Path], config: Config
) -> None:
    folder = work / f"run-{config.processes}-{config.torch_threads}-{len(config.rates)}"
    url = server.create_database()
    shared = {
        "storage_dir": str(folder / "shared"),
        "database": url,
        "log_level": "info",
        "workers": 1,  # threads per process: one job at a time each
    }
    db = open_database(url, StorageLayout.at(folder / "shared").database_path)
    nodes: list[NodeProcess] = []
    try:
        series = index(db, files[: len(files) - WARM_UP_SERIES])
        warm_up = index(db, files[len(files) - WARM_UP_SERIES :])
        for i in range(config.processes):
            node = NodeProcess(
                folder / f"worker{i}",
                node_settings(folder / f"worker{i}", model, 1, **shared),
                role="worker",
            )
            if config.torch_threads is not None:
                node.env["OMP_NUM_THREADS"] = str(config.torch_threads)
            nodes.append(node.spawn())
        for node in nodes:
            node.ready(timeout_s=START_TIMEOUT_S)  # its model is loaded
        warm(db, warm_up, nodes)
        timed = set(series)
        started = time.time()  # the workers stamp updated_at with time.time() too
        for uid in series:
            db.queue_series(uid, ["chest"])
        deadline = started + DONE_TIMEOUT_S
        while True:  # a light poll: the end time is the last job's own finishing stamp
            states = [j["state"] for j in db.jobs() if j["series_uid"] in timed]
            if JobState.FAILED in states:
                raise BenchmarkError(f"jobs failed: {db.status()['failed_jobs'][:3]}")
            if states.count(JobState.DONE) == len(series):
                break
            if time.time() > deadline:
                raise BenchmarkError(f"not done after {DONE_TIMEOUT_S} s")
            time.sleep(0.5)
        jobs = [j for j in db.jobs() if j["series_uid"] in timed]
        if {j["attempts"] for j in jobs} != {1}:
            raise BenchmarkError("a job ran more than once")
        elapsed = max(float(j["updated_at"]) for j in jobs) - started
        by_pid: dict[str, int] = {}
        for job in jobs:
            pid = str(job["owner"]).split(":")[1]
            by_pid[pid] = by_pid.get(pid, 0) + 1
        config.rates.append(len(series) / elapsed)
        config.shares.append(sorted(by_pid.values(), reverse=True))
        print(
            f"{config.label}: {len(series)} jobs in {elapsed:.2f} s "
            f"({config.rates[-1]:.2f} jobs/s), jobs per process {config.shares[-1]}",
            flush=True,
        )
    finally:
        for node in nodes:
            node.stop()
        db.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (3)")
    parser.add_argument("--series", type=int, default=SERIES, help=f"jobs per run ({SERIES})")
    parser.add_argument("--workdir", type=Path, default=None, help="temporary files' folder")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.series < 1:
        parser.error("--repeat and --series must be at least 1")
    bin_dir = postgres_bin()
    if bin_dir is None:
        print("benchmark failed: PostgreSQL is not installed (make peers)", file=sys.stderr)
        return 1

    configs = [
        Config("1 worker process, 1 torch thread", 1, 1),
        Config("2 worker processes, 1 torch thread each", 2, 1),
        Config("1 worker process, default torch threads", 1, None),
    ]
    started = time.perf_counter()
    server = PostgresServer(bin_dir)
    try:
        print("\n".join(machine()), flush=True)
        server.start()
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-", dir=args.workdir) as tmp:
            work = Path(tmp)
            model = work / "model"
            make_random_package(model)
            files = radiographs(work / "inputs", args.series + WARM_UP_SERIES)
            for i in range(args.repeat):
                for config in configs if i % 2 == 0 else configs[::-1]:
                    one_run(work, server, model, files, config)
    except (BenchmarkError, pytest.fail.Exception) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        if configs[0].rates:
            report(configs, args.series, started)  # the runs that finished
        return 1
    finally:
        server.stop()
    report(configs, args.series, started)
    return 0


def report(configs: list[Config], series: int, started: float) -> None:
    """The table: median jobs/s of each configuration, ratio to the first."""
    base = statistics.median(configs[0].rates)
    rows = [
        [
            c.label,
            f"{statistics.median(c.rates):.2f}" if c.rates else "-",
            f"{statistics.median(c.rates) / base:.2f}" if c.rates else "-",
            runs(c.rates),
            "; ".join("/".join(map(str, s)) for s in c.shares),
        ]
        for c in configs
    ]
    print()
    print(
        f"### Worker processes on PostgreSQL: {series} radiographs {IMAGE_SIZE}x"
        f"{IMAGE_SIZE} (random 2D U-Net, CPU), median of {max(len(c.rates) for c in configs)}\n"
    )
    print(
        table(
            ["workers", "median jobs/s", "vs 1 process, 1 thread", "runs (jobs/s)", "jobs/process"],
            rows,
        )
    )
    print(run_end(started))


if __name__ == "__main__":
    raise SystemExit(main())
