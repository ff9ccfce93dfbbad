"""The ceiling of a Python receive path outside pynetdicom (issue 19), against DCMTK.

Run with ``.venv/bin/python -m benchmarks.lean_ceiling --repeat 5`` (options: ``--senders``,
``--slices``, ``--one-slices``). In one run, with interleaved repetitions (each starts with
another receiver, all fresh):

- ``--senders`` DCMTK ``storescu`` at once, ``--slices`` CT slices 512 x 512 each (as
  :mod:`benchmarks.receivers`), to: DCMTK ``storescp --fork``; two bare pynetdicom SCPs
  (``benchmarks.bare_scp --event-driven``, half of the senders to each, keeping nothing);
  :mod:`benchmarks.lean_scp` with 2 processes and with 1, each with and without fdatasync;
- one association, ``--one-slices`` slices, to: DCMTK ``storescp``, one bare pynetdicom SCP
  (event-driven) and ``lean_scp`` with 1 process, with and without fdatasync.

Neither DCMTK nor the bare SCPs flush anything to disk: compare them with the ``--no-sync``
rows for the protocol's cost, and the fdatasync rows for what durability adds.

After every ``lean_scp`` run the spool holds one file per instance sent (named by the sent
SOP Instance UIDs), and one of them, read with pydicom, has the sent SOP Instance UID and
pixel bytes. The ratios are of speed (the reference's median time / the receiver's).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread

from benchmarks.receive import (
    THROUGHPUT_SIZE,
    BareSCP,
    BenchmarkError,
    machine,
    received_files,
    run_end,
    runs,
    send,
    table,
)
from benchmarks.receivers import send_at_once, send_to_storescp_fork, send_to_two_bare_scps
from tests.conftest import StoreSCP, free_port, wait_port
from tests.factories import ct_series, write_files

REPO = Path(__file__).resolve().parent.parent
#: The lean runs of the one-association case (the others: the senders at once).
ONE_ASSOCIATION = ("lean", "leanns")
COUNTS = re.compile(r"lean_scp worker \d+: (\d+) associations, (\d+) instances")


class LeanSCP:
    """:mod:`benchmarks.lean_scp` as a process (its workers' counts read at the stop)."""

    def __init__(self, folder: Path, processes: int, sync: bool = True) -> None:
        self.folder = folder
        self.port = free_port()
        self.processes = processes
        self.sync = sync
        self.ae_title = "LEANSCP"
        self.log = folder.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LeanSCP:
        self.folder.mkdir(parents=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.lean_scp", "--port", str(self.port)]
                + ["--folder", str(self.folder), "--processes", str(self.processes)]
                + ([] if self.sync else ["--no-sync"]),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_port(self.port, 60)
        return self

    def stop(self) -> list[tuple[int, int]]:
        """Stop it; (associations, instances) of each worker."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        text = self.log.read_text(errors="replace")
        return [(int(a), int(i)) for a, i in COUNTS.findall(text)]


def check_spool(folder: Path, sent: list[Path], sample: Path, label: str) -> None:
    """One file per sent instance in ``folder``, and ``sample``'s copy equal to what was sent
    (SOP Instance UID and pixel bytes)."""
    got = {p.stem for p in folder.glob("*.dcm")}
    want = {p.stem for p in sent}  # tests.factories.write_files: named by SOP Instance UID
    if got != want:
        raise BenchmarkError(f"{label}: {len(got & want)} of {len(want)} instances in its spool")
    original = dcmread(sample)
    copy = dcmread(folder / f"{original.SOPInstanceUID}.dcm")
    if copy.SOPInstanceUID != original.SOPInstanceUID or copy.PixelData != original.PixelData:
        raise BenchmarkError(f"{label}: the stored instance differs from the sent one")


def bench(work: Path, repeat: int, senders: int, slices: int, one_slices: int) -> str:
    started = time.perf_counter()
    batches = [
        write_files(
            ct_series(slices, THROUGHPUT_SIZE, THROUGHPUT_SIZE, shuffle=False, seed=i),
            work / f"ct{i}",
        )
        for i in range(senders)
    ]
    one = write_files(
        ct_series(one_slices, THROUGHPUT_SIZE, THROUGHPUT_SIZE, shuffle=False, seed=senders),
        work / "ct-one",
    )
    all_sent = [p for b in batches for p in b]
    total = len(all_sent)
    nbytes = sum(p.stat().st_size for p in all_sent)
    one_bytes = sum(p.stat().st_size for p in one)
    print(
        f"built {senders} x {slices} CT files ({nbytes / 1e6:.0f} MB) and {one_slices} "
        f"({one_bytes / 1e6:.0f} MB)",
        flush=True,
    )
    times: dict[str, list[float]] = {
        k: []
        for k in (
            *("fork", "bare2", "lean2", "lean2ns", "lean1", "lean1ns"),
            *("scp", "bare", "lean", "leanns"),
        )
    }
    splits: dict[str, list[str]] = {"lean2": [], "lean2ns": []}

    def to_fork(i: int) -> None:
        times["fork"].append(send_to_storescp_fork(work / f"fork-{i}", batches))

    def to_bare2(i: int) -> None:
        times["bare2"].append(
            send_to_two_bare_scps([work / f"bare2-{i}-{k}" for k in (0, 1)], batches)
        )

    def to_lean(name: str, processes: int, sync: bool, i: int) -> None:
        scp = LeanSCP(work / f"{name}-{i}", processes, sync).start()
        try:
            if name in ONE_ASSOCIATION:
                times[name].append(send(scp.port, one, ae_title=scp.ae_title))
            else:
                times[name].append(send_at_once(scp.port, batches, scp.ae_title))
        finally:
            counts = scp.stop()
        sent = one if name in ONE_ASSOCIATION else all_sent
        sample = sent[(7 * i) % len(sent)]
        check_spool(scp.folder, sent, sample, f"lean_scp ({name})")
        if len(counts) != processes or sum(c[1] for c in counts) != len(sent):
            raise BenchmarkError(f"lean_scp ({name}) workers counted {counts}")
        if name in splits:
            splits[name].append("+".join(str(c[0]) for c in counts))
        shutil.rmtree(scp.folder)

    def to_scp(i: int) -> None:
        scp = StoreSCP(work / f"scp-{i}", free_port()).start()
        try:
            times["scp"].append(send(scp.port, one, ae_title=scp.ae_title))
        finally:
            scp.stop()
        got = len(received_files(scp.folder))
        shutil.rmtree(scp.folder)
        if got != len(one):
            raise BenchmarkError(f"storescp stored {got} of {len(one)} files")

    def to_bare(i: int) -> None:
        scp = BareSCP(work / f"bare-{i}", free_port(), event_driven=True).start()
        try:
            times["bare"].append(send(scp.port, one, ae_title=scp.ae_title))
        finally:
            scp.stop()
        shutil.rmtree(scp.folder, ignore_errors=True)

    targets: list[Callable[[int], None]] = [
        to_fork,
        to_bare2,
        lambda i: to_lean("lean2", 2, True, i),
        lambda i: to_lean("lean2ns", 2, False, i),
        lambda i: to_lean("lean1", 1, True, i),
        lambda i: to_lean("lean1ns", 1, False, i),
        to_scp,
        to_bare,
        lambda i: to_lean("lean", 1, True, i),
        lambda i: to_lean("leanns", 1, False, i),
    ]
    for i in range(repeat):
        for k in range(len(targets)):
            targets[(i + k) % len(targets)](i)
        print(
            f"repetition {i + 1}/{repeat}: "
            + ", ".join(f"{name} {v[-1]:.2f} s" for name, v in times.items())
            + f"; lean2 associations per worker {splits['lean2'][-1]}",
            flush=True,
        )
    median = {name: statistics.median(v) for name, v in times.items()}

    def rows(
        labels: Sequence[tuple[str, str]], count: int, size: int, ref: str, bare: str
    ) -> list[list[str]]:
        return [
            [
                label,
                f"{median[name]:.2f}",
                f"{count / median[name]:.0f}",
                f"{size / 1e6 / median[name]:.0f}",
                f"{median[ref] / median[name]:.2f}",
                f"{median[bare] / median[name]:.2f}",
                runs(times[name]),
            ]
            for name, label in labels
        ]

    head = ["receiver", "median s", "instances/s", "MB/s"]
    many = rows(
        (
            ("fork", "DCMTK storescp --fork"),
            ("bare2", "2 bare pynetdicom SCPs (event-driven, keep nothing)"),
            ("lean2", "lean_scp --processes 2 (fdatasync)"),
            ("lean2ns", "lean_scp --processes 2 --no-sync"),
            ("lean1", "lean_scp --processes 1 (fdatasync)"),
            ("lean1ns", "lean_scp --processes 1 --no-sync"),
        ),
        total,
        nbytes,
        "fork",
        "bare2",
    )
    single = rows(
        (
            ("scp", "DCMTK storescp"),
            ("bare", "bare pynetdicom SCP (event-driven, keeps nothing)"),
            ("lean", "lean_scp --processes 1 (fdatasync)"),
            ("leanns", "lean_scp --processes 1 --no-sync"),
        ),
        len(one),
        one_bytes,
        "scp",
        "bare",
    )
    return (
        f"### {senders} senders x {slices} CT slices {THROUGHPUT_SIZE}x{THROUGHPUT_SIZE} "
        f"({nbytes / 1e6:.0f} MB), all at once, median of {repeat}\n\n"
        + table(head + ["speed vs storescp --fork", "speed vs 2 bare", "runs (s)"], many)
        + f"\n\nlean_scp --processes 2, associations per worker: {', '.join(splits['lean2'])}"
        f" (fdatasync); {', '.join(splits['lean2ns'])} (--no-sync)\n\n"
        f"### One association, {one_slices} CT slices ({one_bytes / 1e6:.0f} MB), "
        f"median of {repeat}\n\n"
        + table(head + ["speed vs storescp", "speed vs bare", "runs (s)"], single)
        + "\n"
        + run_end(started)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--senders", type=int, default=4, help="storescu at once (default 4)")
    parser.add_argument("--slices", type=int, default=75, help="slices per sender (default 75)")
    parser.add_argument(
        "--one-slices", type=int, default=300, help="slices on one association (default 300)"
    )
    args = parser.parse_args(argv)
    print("\n".join(machine()), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        print(bench(Path(tmp), args.repeat, args.senders, args.slices, args.one_slices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
