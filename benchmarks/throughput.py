"""Sustained throughput: several senders at once, one node (SQLite, CPU), for a fixed time.

Run with ``make bench-throughput`` (600 s) or ``.venv/bin/python -m benchmarks.throughput
[--duration 180]`` (``make bench`` runs 120 s). One ``dicom-node serve`` process with the
configuration's defaults (SQLite, ``workers: 1``, CPU, ``release_grace_s`` 1,
``complete_at_release`` for the radiographs) and two routes, each to a DCMTK ``storescp``
destination: DX radiographs to the shipped ``cxr-anatomy`` model, CT series to a random 2D
U-Net package. ``--senders`` threads each run DCMTK ``storescu`` processes (one association
per study, new UIDs each time, files written before the clock starts) on an open-loop
schedule: radiographs at ``--dx-per-hour`` and a small CT series (24 slices of 256 x 256)
at ``--ct-per-hour``, evenly spaced, dealt round-robin to the senders. A sender that is late
(its previous storescu still running) sends at once.

Every ``--sample-s`` the node's database is read (read-only) for the queue: jobs pending and
running, sends waiting. The report gives studies sent and results delivered per hour, the
queue over time, its trend (least-squares slope over the second half of the run, jobs per
minute; a queue that keeps up has a slope near 0 and a bounded maximum), the latency of each
radiograph from the end of its send to its SEG + SR at storescp, and, after the senders stop,
how long the node takes to drain what is left.
"""

from __future__ import annotations

import argparse
import math
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from benchmarks.receive import CXR_ANATOMY, BenchmarkError, machine, run_end, table
from tests.conftest import NodeProcess, StoreSCP, free_port, node_settings, storescu
from tests.factories import JSRT, REPO, ct_series, jsrt_cases, jsrt_dx, write_files

CT_SHAPE = (24, 256, 256)  # slices, rows, columns
DRAIN_TIMEOUT_S = 300.0
NODE_START_TIMEOUT_S = 300.0


@dataclass
class Sent:
    """One study on the schedule."""

    kind: str  # "DX" or "CT"
    due: float  # seconds after the start
    files: list[Path]
    study_uid: str
    started: float | None = None  # seconds after the start
    ended: float | None = None  # epoch seconds at storescu's exit
    ok: bool = False


@dataclass
class Sample:
    t: float  # seconds after the start
    pending: int
    running: int
    done: int
    sends_waiting: int


@dataclass
class Run:
    studies: list[Sent] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    t0_epoch: float = 0.0  # time.time() when the schedule started


def build_schedule(
    work: Path, duration: float, dx_per_hour: float, ct_per_hour: float
) -> list[Sent]:
    """Every study of the run, written to disk now, in order of due time."""
    if not (JSRT / "images").is_dir():
        raise BenchmarkError(f"JSRT radiographs not found under {JSRT}; set DICOM_NODE_SHARED_DATA")
    cases = jsrt_cases()
    out: list[Sent] = []
    for kind, per_hour in (("DX", dx_per_hour), ("CT", ct_per_hour)):
        if per_hour <= 0:
            continue
        step = 3600.0 / per_hour
        count = int(duration // step)
        offset = step / 2 if kind == "CT" else 0.0  # not on the same instant as a DX
        for i in range(count):
            study_uid = generate_uid()
            if kind == "DX":
                datasets = [jsrt_dx(cases[i % len(cases)], study_uid=study_uid)]
            else:
                n, rows, cols = CT_SHAPE
                datasets = ct_series(n_slices=n, rows=rows, cols=cols, study_uid=study_uid, seed=i)
            files = write_files(datasets, work / "send" / f"{kind}-{i}")
            out.append(Sent(kind, offset + i * step, files, study_uid))
    return sorted(out, key=lambda s: s.due)


def sender(
    port: int, ae_title: str, studies: list[Sent], t0: float, stop: threading.Event, run: Run
) -> None:
    for study in studies:
        wait = t0 + study.due - time.monotonic()
        if wait > 0 and stop.wait(wait):
            return
        if stop.is_set():
            return
        study.started = time.monotonic() - t0
        done = storescu(port, study.files, ae_title=ae_title)
        study.ended = time.time()
        study.ok = done.returncode == 0
        if not study.ok:
            run.errors.append(f"storescu exit {done.returncode}: {done.stderr.strip()[-200:]}")


def queue_sample(database: Path, t: float) -> Sample:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        jobs = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        sends = dict(db.execute("SELECT state, COUNT(*) FROM sends GROUP BY state").fetchall())
    waiting = sum(n for state, n in sends.items() if state not in ("done", "dead"))
    return Sample(t, jobs.get("pending", 0), jobs.get("running", 0), jobs.get("done", 0), waiting)


def slope_per_minute(samples: Sequence[Sample]) -> float:
    """Least-squares slope of jobs waiting (pending + running) against time, per minute."""
    if len(samples) < 2:
        return math.nan
    xs = [s.t for s in samples]
    ys = [float(s.pending + s.running) for s in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return math.nan
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def results_at(folder: Path) -> dict[str, dict[str, float]]:
    """Study UID -> {modality: mtime} of the SEG and SR files storescp wrote."""
    out: dict[str, dict[str, float]] = {}
    for path in folder.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "StudyInstanceUID"])
        by_kind = out.setdefault(str(ds.StudyInstanceUID), {})
        by_kind[str(ds.Modality)] = path.stat().st_mtime
    return out


def start_node(node: NodeProcess, timeout_s: float = NODE_START_TIMEOUT_S) -> NodeProcess:
    """``dicom-node serve`` until its port answers: the tests' start with a longer limit (the
    warm-up of two models on a loaded machine takes more than their 60 s)."""
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(node.config)],
        cwd=REPO,
        stdout=node.log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise BenchmarkError(f"node exited with {node.proc.returncode}: see {node.log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", node.port)) == 0:
                return node
        time.sleep(0.2)
    node.stop()
    raise BenchmarkError(f"node did not listen within {timeout_s:g} s")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def throughput(args: argparse.Namespace, work: Path) -> str:
    from dicom_node.testing.random_package import make_random_package

    random_model = work / "model" / "random-ct"
    # One structure, as an organ model would have: a random network's speckled masks give
    # one ragged outline per slice and structure, which is what the SR costs.
    make_random_package(random_model, name="random-ct", structures=("heart",))
    started = time.perf_counter()
    schedule = build_schedule(work, args.duration, args.dx_per_hour, args.ct_per_hour)
    print(
        f"wrote {len(schedule)} studies ({sum(s.kind == 'DX' for s in schedule)} DX, "
        f"{sum(s.kind == 'CT' for s in schedule)} CT) in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    scp = StoreSCP(work / "pacs", free_port()).start()
    folder = work / "node"
    settings = node_settings(folder, CXR_ANATOMY, scp.port, log_format="json", log_level="info")
    for key in ("stable_after_s", "release_grace_s"):  # the configuration's defaults
        settings.pop(key)
    settings["workers"] = args.workers
    settings["routes"] = [
        {"name": "chest", "match": {"Modality": ["DX"]}, "model": str(CXR_ANATOMY)}
        | {"send_to": ["pacs"]},
        {"name": "ct", "match": {"Modality": ["CT"]}, "model": str(random_model)}
        | {"send_to": ["pacs"]},
    ]
    try:
        node = start_node(NodeProcess(folder, settings))
    except BaseException:
        scp.stop()
        raise
    database = node.storage / "node.sqlite3"
    run = Run(schedule)
    stop = threading.Event()
    t0 = time.monotonic()
    run.t0_epoch = time.time()
    threads = [
        threading.Thread(
            target=sender,
            args=(node.port, settings["ae_title"], schedule[i :: args.senders], t0, stop, run),
            name=f"sender-{i}",
            daemon=True,
        )
        for i in range(args.senders)
    ]
    for thread in threads:
        thread.start()
    drained_at = math.nan
    try:
        next_sample = 0.0
        while True:
            now = time.monotonic() - t0
            if now >= next_sample:
                run.samples.append(queue_sample(database, now))
                last = run.samples[-1]
                if len(run.samples) % max(1, int(30 / args.sample_s)) == 1:
                    print(
                        f"t={now:5.0f} s: jobs pending {last.pending}, running "
                        f"{last.running}, done {last.done}; sends waiting {last.sends_waiting}",
                        flush=True,
                    )
                next_sample += args.sample_s
            senders_done = not any(t.is_alive() for t in threads)
            if now >= args.duration and senders_done:
                last = run.samples[-1]
                if last.pending + last.running + last.sends_waiting == 0:
                    drained_at = now
                    break
                if now >= args.duration + DRAIN_TIMEOUT_S:
                    break
            time.sleep(min(0.5, args.sample_s))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=150)
        time.sleep(1.0)  # the last files storescp is writing
        node.stop()
        scp.stop()
    return report(args, run, results_at(scp.folder), drained_at)


def report(
    args: argparse.Namespace,
    run: Run,
    results: dict[str, dict[str, float]],
    drained_at: float,
) -> str:
    duration = args.duration
    sent = [s for s in run.studies if s.ok]
    complete = {uid for uid, kinds in results.items() if {"SEG", "SR"} <= set(kinds)}
    rows = []
    for kind in ("DX", "CT"):
        mine = [s for s in sent if s.kind == kind]
        if not any(s.kind == kind for s in run.studies):
            continue
        late = [s.started - s.due for s in mine if s.started is not None]
        done = [s for s in mine if s.study_uid in complete]
        in_window = [
            s
            for s in done
            if max(results[s.study_uid]["SEG"], results[s.study_uid]["SR"]) - run.t0_epoch
            <= duration
        ]
        latencies = [
            max(results[s.study_uid]["SEG"], results[s.study_uid]["SR"]) - s.ended
            for s in done
            if s.ended is not None
        ]
        per_hour = args.dx_per_hour if kind == "DX" else args.ct_per_hour
        rows.append(
            [
                kind,
                f"{per_hour:g}",
                str(len(mine)),
                f"{len(mine) / duration * 3600:.0f}",
                f"{len(in_window) / duration * 3600:.0f}",
                f"{len(done)}/{len(mine)}",
                f"{statistics.median(latencies):.2f}" if latencies else "-",
                f"{percentile(latencies, 0.95):.2f}" if latencies else "-",
                f"{max(late):.1f}" if late else "-",
            ]
        )
    out = (
        f"### Sustained throughput: {args.duration:g} s, {args.senders} senders, "
        f"workers {args.workers}, SQLite, CPU\n\n"
    )
    out += table(
        [
            "study",
            "offered /h",
            "sent",
            "sent /h",
            "results /h (in the window)",
            "results (all)",
            "latency median s",
            "latency p95 s",
            "most late send s",
        ],
        rows,
    )
    half = [s for s in run.samples if s.t >= duration / 2 and s.t <= duration]
    at_end = [s for s in run.samples if s.t <= duration]
    after = [s for s in run.samples if s.t > duration]
    drain = "-"
    if at_end and after and after[-1].t > at_end[-1].t:
        backlog = at_end[-1].pending + at_end[-1].running
        if backlog >= 5:
            rate = (after[-1].done - at_end[-1].done) / (after[-1].t - at_end[-1].t) * 3600
            drain = f"{rate:.0f} (backlog {backlog})"
    waiting = [s.pending + s.running for s in run.samples if s.t <= duration]
    out += "\n\n" + table(
        ["queue (jobs pending + running)", "value"],
        [
            ["max during the run", str(max(waiting) if waiting else 0)],
            ["mean during the run", f"{statistics.fmean(waiting):.2f}" if waiting else "-"],
            ["trend, second half (jobs/min)", f"{slope_per_minute(half):+.3f}"],
            [
                "drained after the senders stopped (s)",
                f"{drained_at - duration:.1f}" if not math.isnan(drained_at) else "not drained",
            ],
            ["jobs done per hour while draining (capacity, when a backlog was left)", drain],
        ],
    )
    every = max(1, int(round(args.duration / 12 / args.sample_s)))
    shown = run.samples[::every]
    out += (
        f"\n\nQueue over time (sampled every {args.sample_s:g} s, every {every}th shown):\n\n"
        + table(
            ["t s", "jobs pending", "running", "done", "sends waiting"],
            [
                [f"{s.t:.0f}", str(s.pending), str(s.running), str(s.done), str(s.sends_waiting)]
                for s in shown
            ],
        )
    )
    if run.errors:
        out += f"\n\n{len(run.errors)} sends failed; first: {run.errors[0]}"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds (default 180)")
    parser.add_argument("--senders", type=int, default=3, help="sender threads (default 3)")
    parser.add_argument(
        "--dx-per-hour", type=float, default=2000.0, help="radiographs offered (default 2000)"
    )
    parser.add_argument(
        "--ct-per-hour", type=float, default=60.0, help="CT series offered (default 60)"
    )
    parser.add_argument("--workers", type=int, default=1, help="node workers (default 1)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="queue sampling (default 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="temporary files' folder")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.senders < 1 or args.workers < 1 or args.sample_s <= 0:
        parser.error("--duration, --senders, --workers and --sample-s must be positive")
    started = time.perf_counter()
    try:
        print("\n".join(machine()), flush=True)
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-", dir=args.workdir) as tmp:
            section = throughput(args, Path(tmp))
    except (BenchmarkError, pytest.fail.Exception, pytest.skip.Exception) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(section)
    print(run_end(started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
