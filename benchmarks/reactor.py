"""What pynetdicom's 1 ms polling costs one association: the bare pynetdicom SCP
(``benchmarks.bare_scp``) as shipped against the same SCP with the node's reactor hook
(``--event-driven``, :mod:`dicom_node.receive.reactor`).

Each repetition sends the same CT series with DCMTK ``storescu`` to each, in rotating order;
prints storescu's wall times, medians, and the ratios of the medians.

Usage: ``PYTHONPATH=. python -m benchmarks.reactor [--slices 300] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.receive import THROUGHPUT_SIZE, BareSCP, send
from tests.conftest import free_port
from tests.factories import ct_series, write_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"polling": [], "event_driven": []}
    with tempfile.TemporaryDirectory(prefix="reactor-") as tmp:
        work = Path(tmp)
        series = ct_series(
            n_slices=args.slices, rows=THROUGHPUT_SIZE, cols=THROUGHPUT_SIZE, shuffle=False
        )
        files = write_files(series, work / "ct")
        del series
        for i in range(args.repeat):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for name in order:
                scp = BareSCP(work / f"{name}-{i}", free_port(), event_driven=name != "polling")
                scp.start()
                try:
                    times[name].append(send(scp.port, files, ae_title=scp.ae_title))
                finally:
                    scp.stop()
                shutil.rmtree(scp.folder, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "slices": args.slices,
                "runs_s": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
                "median_s": {k: round(v, 2) for k, v in medians.items()},
                "event_driven_speedup": round(medians["polling"] / medians["event_driven"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
