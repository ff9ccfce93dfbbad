"""Receive throughput and end-of-send-to-results latency, against DCMTK on loopback.

Run with ``make bench`` (``.venv/bin/python -m benchmarks.receive``). Two parts:

(a) Receive throughput. One synthetic CT series (300 slices of 512 x 512, 16 bit, written
    once) is sent with DCMTK ``storescu`` to DCMTK ``storescp``, to a bare pynetdicom SCP with
    the node's settings that only answers Success (``benchmarks.bare_scp``: the floor of the
    node's stack) and to a ``dicom-node`` whose ``routes`` are empty (it stores and indexes,
    nothing else competes for the CPU). Each repetition uses fresh receivers and rotates which
    one goes first; the time is storescu's wall time, from start to exit (all C-STORE
    responses received, released). The node's C-STORE handler times its steps
    (``dicom_node_receive_step_seconds``, read from its metrics port after the send).

(b) Latency to results. A node with a route to the shipped ``cxr-anatomy`` model receives
    JSRT radiographs (when ``../shared/data`` is there), and one with a random 2D model
    package receives radiographs and a 24-slice 256 x 256 CT series, each with a
    ``storescp`` destination; the time runs from storescu's exit to both the SEG and the SR
    of that study being in storescp's folder. The first study after the node's start is
    reported apart from the median of the next (at least 5). The node's JSON log splits
    each into stages.

The helpers (free ports, storescp, storescu, the node process) are those of the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import (
    NodeProcess,
    StoreSCP,
    free_port,
    node_settings,
    require_tool,
    storescu,
    wait_for,
    wait_port,
)
from tests.factories import JSRT, REPO, ct_series, jsrt_cases, jsrt_dx, write_files

THROUGHPUT_SLICES = 300
THROUGHPUT_SIZE = 512
LATENCY_CT = (24, 256, 256)  # slices, rows, columns
#: The shipped chest radiograph model, the one of the latency goal (<= 1.0 s, issue 10).
CXR_ANATOMY = REPO / "config" / "models" / "cxr-anatomy"
# As config/node.yaml: a series is complete 1 s after its association is released, a DX at
# the release itself (complete_at_release).
RELEASE_GRACE_S = 1.0
STABLE_AFTER_S = 10.0
#: Studies after the first, at least, for the latency medians.
LATENCY_REPEAT_MIN = 5
RESULT_TIMEOUT_S = 180.0

#: Stages of one job: (label, the node log event (JSON, debug level) that ends it). None ends
#: the stage when the SEG and SR are both in storescp's folder (storescp writes a file before
#: it answers, so that is before the node logs ``send.done``).
STAGES: tuple[tuple[str, str | None], ...] = (
    ("series complete (at release, or release grace + tick)", "series.queued"),
    ("job claimed, series loaded", "series loaded"),
    ("inference", "prediction done"),
    ("measurements + SEG built", "segmentation built"),
    ("SR built", "measurement report built"),
    ("outputs written (outbox)", "job.done"),
    ("C-STORE, until both are in storescp's folder", None),
)


class BenchmarkError(Exception):
    """A benchmark step that did not do what it must (send refused, files missing)."""


# -- helpers ---------------------------------------------------------------------------------


def received_files(folder: Path) -> list[Path]:
    """Files storescp wrote (it names them by modality and SOP Instance UID, no extension)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def send(port: int, files: list[Path], ae_title: str) -> float:
    """storescu ``files`` to ``port``; return its wall time in seconds.

    Dirty pages of earlier steps are flushed first, so that no run pays for another's writes.
    """
    os.sync()
    started = time.perf_counter()
    done = storescu(port, files, ae_title=ae_title)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchmarkError(f"storescu to {ae_title} failed ({done.returncode}): {done.stderr}")
    return elapsed


def first_line(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machine() -> list[str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return [
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- nproc: {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), CPU: {cpu}",
        f"- memory: {mem_kb / 1024**2:.1f} GiB, kernel {platform.release()}",
        f"- python {platform.python_version()}, torch {version('torch')}, "
        f"pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}, "
        f"highdicom {version('highdicom')}",
        f"- DCMTK: {first_line([require_tool('storescu'), '--version'])}",
        f"- load average at start: {Path('/proc/loadavg').read_text().split()[:3]}",
    ]


def run_end(started: float) -> str:
    """The last line of a benchmark's report: load average at the end, whole run's time
    (``started``: ``time.perf_counter()`` at the start)."""
    return (
        f"\n- load average at end: {Path('/proc/loadavg').read_text().split()[:3]}; "
        f"whole run {time.perf_counter() - started:.0f} s"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def runs(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# -- (a) receive throughput ------------------------------------------------------------------


class BareSCP:
    """``benchmarks.bare_scp`` as a process: pynetdicom with the node's settings, answering
    Success to every C-STORE and keeping nothing."""

    def __init__(
        self,
        folder: Path,
        port: int,
        ae_title: str = "DICOMNODE",
        durable: bool = False,
        event_driven: bool = False,
    ) -> None:
        self.folder = folder
        self.port = port
        self.ae_title = ae_title
        self.durable = durable  # --durable: fsync, rename, fsync the folder, commit a row
        self.event_driven = event_driven  # --event-driven: the node's reactor hook
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BareSCP:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bare_scp", str(self.port), str(self.folder)]
            + (["--durable"] if self.durable else [])
            + (["--event-driven"] if self.event_driven else []),
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_port(self.port, 60)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def step_seconds(metrics_port: int) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of each step of ``dicom_node_receive_step_seconds``."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "dicom_node_receive_step_seconds":
            continue
        for sample in family.samples:
            step = sample.labels.get("step", "")
            if sample.name.endswith("_sum"):
                out.setdefault(step, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_count"):
                out.setdefault(step, [0.0, 0.0])[1] = sample.value
    return {step: (v[0], v[1]) for step, v in out.items()}


def throughput(work: Path, repeat: int, n_slices: int) -> str:
    from dicom_node.receive.receiver import RECEIVE_STEPS

    started = time.perf_counter()
    series = ct_series(n_slices=n_slices, rows=THROUGHPUT_SIZE, cols=THROUGHPUT_SIZE, shuffle=False)
    files = write_files(series, work / "ct")
    del series
    nbytes = sum(p.stat().st_size for p in files)
    print(
        f"(a) built {len(files)} CT files, {nbytes / 1e6:.1f} MB, "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    times: dict[str, list[float]] = {"storescp": [], "bare": [], "durable": [], "node": []}
    # ms per instance of each handler step, one dict per node repetition
    steps: list[dict[str, float]] = []

    def to_storescp(i: int) -> None:
        scp = StoreSCP(work / f"scp-{i}", free_port()).start()
        try:
            times["storescp"].append(send(scp.port, files, ae_title=scp.ae_title))
        finally:
            scp.stop()
        got = len(received_files(scp.folder))
        shutil.rmtree(scp.folder)
        if got != len(files):
            raise BenchmarkError(f"storescp stored {got} of {len(files)} files")

    def to_bare(i: int, durable: bool = False) -> None:
        name = "durable" if durable else "bare"
        scp = BareSCP(work / f"{name}-{i}", free_port(), durable=durable).start()
        try:
            times[name].append(send(scp.port, files, ae_title=scp.ae_title))
        finally:
            scp.stop()
        kept = len(list((scp.folder / "kept").iterdir()))
        shutil.rmtree(scp.folder)
        if kept != (len(files) if durable else 0):
            raise BenchmarkError(f"the {name} SCP kept {kept} of {len(files)} files")

    def to_durable(i: int) -> None:
        to_bare(i, durable=True)

    def to_node(i: int) -> None:
        folder = work / f"node-a{i}"
        settings = node_settings(
            folder,
            work,
            1,
            destinations={},
            routes=[],
            stable_after_s=3600,
            log_level="info",
            metrics_port=free_port(),
            receivers=1,  # one association: one process (benchmarks.receivers: several)
        )
        node = NodeProcess(folder, settings).start()
        try:
            times["node"].append(send(node.port, files, ae_title=settings["ae_title"]))
            measured = step_seconds(settings["metrics_port"])
        finally:
            node.stop()
        got = len(list((node.storage / "spool").rglob("*.dcm")))
        shutil.rmtree(folder)
        if got != len(files):
            raise BenchmarkError(f"the node stored {got} of {len(files)} files")
        instances = measured.get("total", (0.0, 0.0))[1]
        if instances != len(files):
            raise BenchmarkError(f"the node timed {instances} of {len(files)} C-STOREs")
        steps.append({step: 1000 * total / instances for step, (total, _) in measured.items()})

    receivers = (to_storescp, to_bare, to_durable, to_node)
    for i in range(repeat):
        # Each repetition starts with another receiver, so none always goes first.
        for k in range(len(receivers)):
            receivers[(i + k) % len(receivers)](i)
        print(
            f"(a) repetition {i + 1}/{repeat}: storescp {times['storescp'][-1]:.2f} s, "
            f"bare pynetdicom {times['bare'][-1]:.2f} s, durable bare "
            f"{times['durable'][-1]:.2f} s, node {times['node'][-1]:.2f} s",
            flush=True,
        )

    median = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, label in (
        ("storescp", "DCMTK storescp"),
        ("bare", "bare pynetdicom SCP (answers Success)"),
        ("durable", "durable bare SCP (fsync, rename, fsync folder, SQLite commit)"),
        ("node", "dicom-node (no routes)"),
    ):
        med = median[name]
        rows.append(
            [
                label,
                f"{med:.2f}",
                f"{len(files) / med:.0f}",
                f"{nbytes / 1e6 / med:.1f}",
                f"{med / median['storescp']:.2f}",
                f"{med / median['bare']:.2f}",
                runs(times[name]),
            ]
        )
    title = (
        f"### (a) Receive throughput: {len(files)} CT slices {THROUGHPUT_SIZE}x"
        f"{THROUGHPUT_SIZE}, {nbytes / 1e6:.1f} MB, one association, median of {repeat}"
    )
    out = (
        title
        + "\n\n"
        + table(
            [
                "receiver",
                "median s",
                "instances/s",
                "MB/s",
                "time vs storescp",
                "time vs bare",
                "runs (s)",
            ],
            rows,
        )
    )
    storescp_ratio = median["storescp"] / median["node"]
    bare_ratio = median["bare"] / median["node"]
    out += (
        f"\n\nThroughput ratios (goal, issue 10): node / storescp {storescp_ratio:.2f} "
        f"(goal >= 0.5), node / bare pynetdicom {bare_ratio:.2f} (goal >= 0.9); "
        f"bare pynetdicom / storescp {median['storescp'] / median['bare']:.2f} (the stack's "
        f"ceiling for the first ratio), node / durable bare "
        f"{median['durable'] / median['node']:.2f} (what the node's checks and index cost)."
    )

    per_instance = {name: 1000 * med / len(files) for name, med in median.items()}
    step_ms = {step: statistics.median(s.get(step, 0.0) for s in steps) for step in RECEIVE_STEPS}
    node_ms = per_instance["node"]
    step_rows = [
        [f"{step}: {RECEIVE_STEPS[step]}", f"{step_ms[step]:.2f}", f"{step_ms[step] / node_ms:.0%}"]
        for step in RECEIVE_STEPS
        if step != "total"
    ]
    handler = step_ms["total"]
    step_rows += [
        ["the C-STORE handler in all", f"{handler:.2f}", f"{handler / node_ms:.0%}"],
        [
            "outside the handler: pynetdicom (PDUs, temp file, response), storescu, loopback",
            f"{node_ms - handler:.2f}",
            f"{(node_ms - handler) / node_ms:.0%}",
        ],
        ["the node, storescu's wall time per instance", f"{node_ms:.2f}", "100%"],
        ["for comparison: bare pynetdicom SCP, per instance", f"{per_instance['bare']:.2f}", ""],
        [
            "for comparison: durable bare SCP, per instance",
            f"{per_instance['durable']:.2f}",
            "",
        ],
        ["for comparison: DCMTK storescp, per instance", f"{per_instance['storescp']:.2f}", ""],
    ]
    out += (
        "\n\n### (a) Where the node's time goes: ms per instance, median of the repetitions "
        "(the node's histogram dicom_node_receive_step_seconds, sum / instances)\n\n"
        + table(["step", "ms per instance", "share of the node's time"], step_rows)
    )
    return out


# -- (b) end of send to results --------------------------------------------------------------


@dataclass
class Study:
    label: str
    build: Callable[[int], list[Dataset]]  # repetition -> the study's datasets (new UIDs)
    latencies: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    instances: int = 0


@dataclass
class Setup:
    """One node, one model package, the studies sent to it."""

    label: str
    model: Path
    studies: list[Study]
    started_s: float = 0.0  # NodeProcess.start: spawn until the port answers (warm-up included)
    warm_up_s: dict[str, float] = field(default_factory=dict)  # model -> model.warmed_up seconds


def log_events(log: Path, offset: int) -> list[tuple[str, float]]:
    """(event, epoch seconds) of the node's JSON log lines after byte ``offset``."""
    return [(name, stamp) for name, stamp, _ in log_entries(log, offset)]


def log_entries(log: Path, offset: int) -> list[tuple[str, float, dict[str, object]]]:
    """(event, epoch seconds, the whole entry) of the node's JSON log after byte ``offset``."""
    out = []
    with log.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            try:
                entry = json.loads(raw)
                stamp = dt.datetime.fromisoformat(entry["timestamp"]).timestamp()
            except (ValueError, KeyError, TypeError):
                continue  # the banner line, or a traceback
            out.append((str(entry.get("event", "")), stamp, entry))
    return out


def stage_times(events: list[tuple[str, float]], sent: float, seen: float) -> dict[str, float]:
    """Seconds spent in each of :data:`STAGES`; a stage whose event is missing is left out."""
    last: dict[str, float] = {}
    for name, stamp in events:
        last[name] = stamp  # the last send.done ends the send stage
    out = {}
    previous = sent
    for label, event in STAGES:
        end = seen if event is None else last.get(event)
        if end is None:
            continue
        out[label] = end - previous
        previous = end
    return out


def outputs_of(folder: Path, study_uid: str) -> set[str]:
    found = set()
    for path in received_files(folder):
        try:
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=["Modality", "StudyInstanceUID"]
            )
        except Exception:  # noqa: BLE001 - storescp may be writing it right now
            continue
        if ds.get("StudyInstanceUID") == study_uid:
            found.add(str(ds.get("Modality", "")))
    return found


def run_setup(setup: Setup, work: Path, repeat: int) -> None:
    """Start a node for ``setup``, send each study ``1 + repeat`` times (the first right after
    start, then ``repeat`` more), and record the latencies and stages."""
    scp = StoreSCP(work / f"pacs-{setup.model.name}", free_port()).start()
    folder = work / f"node-{setup.model.name}"
    settings = node_settings(
        folder,
        setup.model,
        scp.port,
        release_grace_s=RELEASE_GRACE_S,
        stable_after_s=STABLE_AFTER_S,
        log_format="json",
        log_level="debug",
    )
    node = NodeProcess(folder, settings)
    started = time.perf_counter()
    node.start()
    setup.started_s = time.perf_counter() - started
    for name, _, entry in log_entries(node.log, 0):
        if name == "model.warmed_up":
            setup.warm_up_s[str(entry.get("model"))] = float(entry.get("seconds", 0.0))  # type: ignore[arg-type]
    try:
        for i in range(repeat + 1):
            for k, study in enumerate(setup.studies):
                datasets = study.build(i)
                study.instances = len(datasets)
                study_uid = str(datasets[0].StudyInstanceUID)
                files = write_files(datasets, work / f"study-{setup.model.name}-{i}-{k}")
                offset = node.log.stat().st_size
                send(node.port, files, ae_title=settings["ae_title"])
                sent = time.time()

                def both_there(uid: str = study_uid) -> bool:
                    return {"SEG", "SR"} <= outputs_of(scp.folder, uid)

                def sends_done(since: int = offset) -> bool:
                    events = log_events(node.log, since)
                    return [e for e, _ in events].count("send.done") >= 2

                wait_for(both_there, RESULT_TIMEOUT_S, f"SEG and SR of {study.label}")
                seen = time.time()
                study.latencies.append(seen - sent)
                # The next study starts once this one's sends are closed in the node.
                wait_for(sends_done, 30, "send.done of the SEG and SR in the node's log")
                study.stages.append(stage_times(log_events(node.log, offset), sent, seen))
                for path in received_files(scp.folder):
                    path.unlink()
                which = "first after start" if i == 0 else f"repetition {i}/{repeat}"
                print(
                    f"(b) {setup.label}, {which}: {study.label}: {study.latencies[-1]:.2f} s",
                    flush=True,
                )
    except BaseException:
        tail = node.log.read_text(errors="replace").splitlines()[-30:]
        print("the node's log ends with:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        node.stop()
        scp.stop()


def latency(work: Path, repeat: int) -> str:
    from dicom_node.testing.random_package import make_random_package

    repeat = max(repeat, LATENCY_REPEAT_MIN)
    random_model = work / "model" / "random-chest"
    make_random_package(random_model)
    n_ct, rows_ct, cols_ct = LATENCY_CT
    have_jsrt = (JSRT / "images").is_dir()
    cases = jsrt_cases()[: max(repeat, 1) + 1] if have_jsrt else []

    def radiograph(label: str) -> Study:
        # One JSRT radiograph per repetition (the first after start, then the others).
        return Study(label, lambda i: [jsrt_dx(cases[i % len(cases)])])

    setups = []
    dx_label = f"DX 1024x1024 (JSRT {cases[0]}..{cases[-1]})" if cases else ""
    if have_jsrt:
        setups.append(Setup("cxr-anatomy (shipped)", CXR_ANATOMY, [radiograph(dx_label)]))
    else:
        print(
            f"(b) JSRT radiographs not found under {JSRT}: the DX studies are skipped "
            "(set DICOM_NODE_SHARED_DATA)",
            flush=True,
        )
    ct = Study(
        f"CT {n_ct} slices {rows_ct}x{cols_ct}",
        lambda i: ct_series(n_slices=n_ct, rows=rows_ct, cols=cols_ct, seed=i),
    )
    setups.append(
        Setup(
            "random 2D U-Net",
            random_model,
            ([radiograph(dx_label)] if have_jsrt else []) + [ct],
        )
    )
    for setup in setups:
        run_setup(setup, work, repeat)

    summary = []
    for setup in setups:
        for s in setup.studies:
            rest = s.latencies[1:]
            summary.append(
                [
                    setup.label,
                    s.label,
                    str(s.instances),
                    f"{s.latencies[0]:.2f}",
                    f"{statistics.median(rest):.2f}",
                    f"{min(rest):.2f}",
                    f"{max(rest):.2f}",
                    runs(rest),
                ]
            )
    out = (
        f"### (b) From storescu's exit to SEG + SR at storescp (CPU, release_grace_s "
        f"{RELEASE_GRACE_S:g}, complete_at_release default): the first study after start, "
        f"then the median of {repeat} more\n\n"
    )
    out += table(
        ["model", "study", "instances", "first s", "median s", "min s", "max s", "runs (s)"],
        summary,
    )
    starts = [
        [
            setup.label,
            f"{setup.started_s:.1f}",
            ", ".join(f"{m} {v:.2f}" for m, v in sorted(setup.warm_up_s.items())) or "-",
        ]
        for setup in setups
    ]
    out += "\n\nNode start (spawn until the DICOM port answers) and its warm-up:\n\n"
    out += table(["model", "start s", "model.warmed_up s"], starts)
    columns = [(setup, s) for setup in setups for s in setup.studies]
    stage_rows = []
    for label, _ in STAGES:
        cells = []
        for _setup, s in columns:
            values = [st[label] for st in s.stages[1:] if label in st]
            first = s.stages[0].get(label) if s.stages else None
            median = f"{statistics.median(values):.2f}" if values else "-"
            cells.append(median + (f" ({first:.2f})" if first is not None else ""))
        stage_rows.append([label, *cells])
    out += (
        "\n\n### (b) Where the time goes: median seconds per stage over the repetitions "
        "(the first study after start in brackets), from the node's log\n\n"
        + table(
            ["stage (ends at)", *[f"{setup.label}: {s.label}" for setup, s in columns]],
            stage_rows,
        )
    )
    return out


# -- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.receive",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--slices",
        type=int,
        default=THROUGHPUT_SLICES,
        help=f"CT slices sent in part (a) (default {THROUGHPUT_SLICES})",
    )
    parser.add_argument("--only", choices=("throughput", "latency"), help="run one part")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the temporary files (default: the system's temp)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.slices < 1:
        parser.error("--repeat and --slices must be at least 1")

    started = time.perf_counter()
    try:
        print("\n".join(machine()), flush=True)
        with tempfile.TemporaryDirectory(prefix="dicom-node-bench-", dir=args.workdir) as tmp:
            work = Path(tmp)
            sections = []
            if args.only in (None, "throughput"):
                sections.append(throughput(work, args.repeat, args.slices))
            if args.only in (None, "latency"):
                sections.append(latency(work, args.repeat))
    except (BenchmarkError, pytest.fail.Exception, pytest.skip.Exception) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print()
    print("\n\n".join(sections))
    print(run_end(started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
