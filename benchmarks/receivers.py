"""Receive with several senders at once: the node with N receiver processes vs one, vs DCMTK.

Run with ``.venv/bin/python -m benchmarks.receivers`` (options: ``--repeat``, ``--senders``,
``--slices``). Each of ``--senders`` DCMTK ``storescu`` processes sends its own CT series
(``--slices`` slices of 512 x 512, 16 bit) at the same moment to: the node with
``receivers: 2``, the node with ``receivers: 1`` (no routes: it stores and indexes, nothing
else competes for the CPU), DCMTK ``storescp --fork`` (a process per association, the
bar), and two bare pynetdicom SCPs (``benchmarks.bare_scp``, event-driven, half of the senders
to each: what two processes of the node's stack reach when they keep nothing, the floor of
N=2). The time runs from the senders' start until the last one exited (every C-STORE
answered, released). Every repetition starts fresh receivers and rotates which one goes first;
the report gives the medians and their ratios (issue 19: N=2 >= 1.6x N=1, >= 0.5x
``storescp --fork``; the floor says how much of that pynetdicom itself allows).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.receive import (
    THROUGHPUT_SIZE,
    BareSCP,
    BenchmarkError,
    machine,
    received_files,
    run_end,
    runs,
    table,
)
from tests.conftest import PEER_ENV, NodeProcess, free_port, node_settings, require_tool, wait_port
from tests.factories import ct_series, write_files


def send_at_once(port: int | Sequence[int], batches: list[list[Path]], called: str) -> float:
    """Each batch by its own ``storescu`` (calling AE ``SENDER<i>``), all at once, to ``port``
    (several ports: batch i to port i modulo their number); the wall time until the last
    exits, in seconds."""
    ports = [port] if isinstance(port, int) else list(port)
    exe = require_tool("storescu")
    os.sync()  # no run pays for another's dirty pages
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [exe, "-aet", f"SENDER{i}", "-aec", called, "127.0.0.1", str(ports[i % len(ports)])]
            + [str(f) for f in files],
            env=PEER_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, files in enumerate(batches)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise BenchmarkError(f"storescu exit codes {codes} sending to {called}")
    return elapsed


def send_to_storescp_fork(folder: Path, batches: list[list[Path]]) -> float:
    """Seconds for ``batches`` sent at once (:func:`send_at_once`) to a fresh DCMTK
    ``storescp --fork`` writing into ``folder`` (made, then removed); raises
    :class:`BenchmarkError` unless it stored every file."""
    folder.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("storescp"), "--fork", "-aet", "STORESCP", "-od", str(folder), "-uf"]
        + [str(port)],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        seconds = send_at_once(port, batches, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    got, total = len(received_files(folder)), sum(len(b) for b in batches)
    shutil.rmtree(folder)
    if got != total:
        raise BenchmarkError(f"storescp --fork stored {got} of {total} files")
    return seconds


def send_to_two_bare_scps(folders: list[Path], batches: list[list[Path]]) -> float:
    """Seconds for ``batches`` sent at once to two fresh bare pynetdicom SCPs, the floor of
    N=2 (the node's settings and reactor, an answer of Success and nothing kept), half of the
    senders to each; their ``folders`` are removed after."""
    scps = [BareSCP(folder, free_port(), event_driven=True).start() for folder in folders]
    try:
        return send_at_once([scp.port for scp in scps], batches, scps[0].ae_title)
    finally:
        for scp in scps:
            scp.stop()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def bench(work: Path, repeat: int, senders: int, slices: int) -> str:
    started = time.perf_counter()
    batches = [
        write_files(
            ct_series(slices, THROUGHPUT_SIZE, THROUGHPUT_SIZE, shuffle=False, seed=i),
            work / f"ct{i}",
        )
        for i in range(senders)
    ]
    total = sum(len(b) for b in batches)
    nbytes = sum(p.stat().st_size for b in batches for p in b)
    print(f"built {senders} x {slices} CT files, {nbytes / 1e6:.0f} MB", flush=True)
    times: dict[str, list[float]] = {"n2": [], "n1": [], "fork": [], "bare2": []}

    def to_node(name: str, count: int, i: int) -> None:
        folder = work / f"{name}-{i}"
        settings = node_settings(
            folder,
            work,
            1,
            destinations={},
            routes=[],
            stable_after_s=3600,
            log_level="info",
            receivers=count,
        )
        node = NodeProcess(folder, settings).start()
        try:
            times[name].append(send_at_once(node.port, batches, settings["ae_title"]))
        finally:
            node.stop()
        got = len(list((node.storage / "spool").rglob("*.dcm")))
        shutil.rmtree(folder)
        if got != total:
            raise BenchmarkError(f"the node ({name}) stored {got} of {total} files")

    def to_fork(i: int) -> None:
        times["fork"].append(send_to_storescp_fork(work / f"fork-{i}", batches))

    def to_bare(i: int) -> None:
        times["bare2"].append(
            send_to_two_bare_scps([work / f"bare-{i}-{k}" for k in (0, 1)], batches)
        )

    targets: list[Callable[[int], None]] = [
        lambda i: to_node("n2", 2, i),
        lambda i: to_node("n1", 1, i),
        to_fork,
        to_bare,
    ]
    for i in range(repeat):
        for k in range(len(targets)):
            targets[(i + k) % len(targets)](i)
        print(
            f"repetition {i + 1}/{repeat}: N=2 {times['n2'][-1]:.2f} s, N=1 "
            f"{times['n1'][-1]:.2f} s, storescp --fork {times['fork'][-1]:.2f} s, "
            f"2 bare pynetdicom {times['bare2'][-1]:.2f} s",
            flush=True,
        )
    median = {name: statistics.median(v) for name, v in times.items()}
    rows = [
        [
            label,
            f"{median[name]:.2f}",
            f"{total / median[name]:.0f}",
            f"{nbytes / 1e6 / median[name]:.0f}",
            runs(times[name]),
        ]
        for name, label in (
            ("n2", "dicom-node, receivers: 2"),
            ("n1", "dicom-node, receivers: 1"),
            ("fork", "DCMTK storescp --fork"),
            ("bare2", "2 bare pynetdicom SCPs (floor of N=2)"),
        )
    ]
    out = (
        f"### {senders} senders x {slices} CT slices {THROUGHPUT_SIZE}x{THROUGHPUT_SIZE} "
        f"({nbytes / 1e6:.0f} MB), all at once, median of {repeat}\n\n"
        + table(["receiver", "median s", "instances/s", "MB/s", "runs (s)"], rows)
        + f"\n\nRatios (goal, issue 19): N=2 / N=1 {median['n1'] / median['n2']:.2f} "
        f"(goal >= 1.6), N=2 / storescp --fork {median['fork'] / median['n2']:.2f} "
        f"(goal >= 0.5); N=1 / storescp --fork {median['fork'] / median['n1']:.2f}. The floor: "
        f"2 bare pynetdicom / storescp --fork {median['fork'] / median['bare2']:.2f}, "
        f"N=2 / 2 bare pynetdicom {median['bare2'] / median['n2']:.2f}."
    )
    return out + run_end(started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--senders", type=int, default=4, help="storescu at once (default 4)")
    parser.add_argument("--slices", type=int, default=75, help="slices per sender (default 75)")
    args = parser.parse_args(argv)
    print("\n".join(machine()), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-receivers-") as tmp:
        print(bench(Path(tmp), args.repeat, args.senders, args.slices), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
