"""End of send to results for one left-atrium LGE-MRI volume through the shipped la-lge model.

Run with ``make bench`` (or ``.venv/bin/python -m benchmarks.la_lge [--repeat N]``). A node with
the default config's la-lge route (``config/models/la-lge``, CPU unless CUDA is there) and a
DCMTK ``storescp`` destination receives a held-out case of ``../shared/data/la-mri`` (the
first test case of the package's ``split.json``) as a scanner sends it: an oblique
single-frame MR series, slices in reverse order, new UIDs each time. The time runs from
``storescu``'s exit until the SEG and the SR of that study are both in ``storescp``'s folder;
the node's JSON log splits it into stages (those of :mod:`benchmarks.receive`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.receive import (
    RELEASE_GRACE_S,
    RESULT_TIMEOUT_S,
    STABLE_AFTER_S,
    STAGES,
    log_events,
    machine,
    outputs_of,
    received_files,
    run_end,
    runs,
    send,
    stage_times,
    table,
)
from tests.conftest import NodeProcess, StoreSCP, free_port, node_settings, wait_for
from tests.factories import write_files
from tests.la_mri import LA_MRI, LA_PACKAGE, held_out_cases, mr_slices, read_case
from tests.test_la_lge import LA_ROUTE


def latency(work: Path, repeat: int) -> str:
    case = held_out_cases()[0]
    image, _, spacing = read_case(case)
    scp = StoreSCP(work / "pacs", free_port()).start()
    folder = work / "node"
    settings = node_settings(
        folder,
        LA_PACKAGE,
        scp.port,
        routes=[LA_ROUTE],
        release_grace_s=RELEASE_GRACE_S,
        stable_after_s=STABLE_AFTER_S,
        log_format="json",
        log_level="debug",
        device="auto",
    )
    node = NodeProcess(folder, settings).start()
    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    label = f"MR {image.shape[0]} slices {image.shape[1]}x{image.shape[2]} (oblique, reversed)"
    try:
        for i in range(repeat):
            datasets = mr_slices(image, spacing)
            study_uid = str(datasets[0].StudyInstanceUID)
            files = write_files(datasets, work / f"study-{i}")
            offset = node.log.stat().st_size
            send(node.port, files, ae_title=settings["ae_title"])
            sent = time.time()

            def both_there(uid: str = study_uid) -> bool:
                return {"SEG", "SR"} <= outputs_of(scp.folder, uid)

            def sends_done(since: int = offset) -> bool:
                return [e for e, _ in log_events(node.log, since)].count("send.done") >= 2

            wait_for(both_there, RESULT_TIMEOUT_S, f"SEG and SR of {label}")
            seen = time.time()
            latencies.append(seen - sent)
            wait_for(sends_done, 30, "send.done of the SEG and SR in the node's log")
            stages.append(stage_times(log_events(node.log, offset), sent, seen))
            for path in received_files(scp.folder):
                path.unlink()
            print(f"repetition {i + 1}/{repeat}: {latencies[-1]:.2f} s", flush=True)
    except BaseException:
        tail = node.log.read_text(errors="replace").splitlines()[-30:]
        print("the node's log ends with:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        node.stop()
        scp.stop()
    out = (
        f"### la-lge: from storescu's exit to SEG + SR at storescp, median of {repeat} "
        f"(held-out case, {settings['device']})\n\n"
    )
    out += table(
        ["study", "instances", "median s", "min s", "max s", "runs (s)"],
        [
            [
                label,
                str(image.shape[0]),
                f"{statistics.median(latencies):.2f}",
                f"{min(latencies):.2f}",
                f"{max(latencies):.2f}",
                runs(latencies),
            ]
        ],
    )
    rows = []
    for name, _ in STAGES:
        values = [st[name] for st in stages if name in st]
        rows.append([name, f"{statistics.median(values):.2f}" if values else "-"])
    return out + "\n\n" + table(["stage (ends at)", "median s"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.la_lge", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    args = parser.parse_args(argv)
    if not LA_MRI.is_dir():
        print(f"la-lge benchmark skipped: no data at {LA_MRI} (set DICOM_NODE_SHARED_DATA)")
        return 0
    started = time.perf_counter()
    print("\n".join(machine()), flush=True)
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-la-") as tmp:
        section = latency(Path(tmp), args.repeat)
    print()
    print(section)
    print(run_end(started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
