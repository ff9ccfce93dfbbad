"""Held-out figures of la-lge through the whole DICOM path (an evaluation, not a timing).

``.venv/bin/python -m benchmarks.heldout_la_lge [--cases N]``: a node with the default
config's la-lge route and the shipped package receives every test case of the package's
``split.json`` as a scanner sends it (an oblique single-frame MR series in reverse slice
order, :func:`tests.la_mri.mr_slices`); each returned SEG is decoded onto the source frames
and scored against the expert mask on the 0.625 mm grid (Dice, Jaccard, precision, recall,
HD95 and ASD in mm, :func:`dicom_node.training.metrics.case_metrics`), and the SR's volume
against the expert mask's. Prints the table and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread

from benchmarks.receive import outputs_of, received_files, send
from dicom_node.imaging.series import load_series
from dicom_node.outputs.seg import read_seg_masks
from dicom_node.training.metrics import case_metrics, format_table, summarize
from tests.conftest import NodeProcess, StoreSCP, free_port, node_settings, wait_for
from tests.factories import write_files
from tests.la_mri import LA_PACKAGE, held_out_cases, mr_slices, read_case
from tests.test_la_lge import LA_ROUTE


def sr_volume_ml(path: Path) -> float:
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    for group in report.get_volumetric_roi_measurement_groups():
        for m in group.get_measurements():
            if m.name.meaning == "Volume":
                return float(m.value)
    return float("nan")


def run(work: Path, cases: Sequence[str]) -> dict[str, object]:
    scp = StoreSCP(work / "pacs", free_port()).start()
    settings = node_settings(work / "node", LA_PACKAGE, scp.port, routes=[LA_ROUTE])
    node = NodeProcess(work / "node", settings).start()
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    volumes: dict[str, dict[str, float]] = {}
    try:
        for case in cases:
            image, truth, spacing = read_case(case)
            slices = mr_slices(image, spacing)
            files = write_files(slices, work / case)
            send(node.port, files, ae_title=settings["ae_title"])
            uid = str(slices[0].StudyInstanceUID)
            wait_for(lambda u=uid: {"SEG", "SR"} <= outputs_of(scp.folder, u), 300, case)
            by_modality = {
                str(dcmread(p, stop_before_pixels=True).Modality): p
                for p in received_files(scp.folder)
            }
            series = load_series(files)
            masks = read_seg_masks(dcmread(by_modality["SEG"]), series.frame_keys)[..., 0]
            per_case[case] = case_metrics(masks[None], truth[None], ["left_atrium"], spacing)
            voxel_ml = float(np.prod(spacing)) / 1000.0
            volumes[case] = {
                "sr_ml": sr_volume_ml(by_modality["SR"]),
                "expert_ml": round(int(truth.sum()) * voxel_ml, 2),
            }
            for path in received_files(scp.folder):
                path.unlink()
            m = per_case[case]["left_atrium"]
            print(f"{case}: Dice {m['dice']:.3f}, HD95 {m['hd95_mm']:.2f} mm", flush=True)
    finally:
        node.stop()
        scp.stop()
    return {"per_case": per_case, "volumes": volumes, "summary": summarize(per_case.values())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heldout_la_lge")
    parser.add_argument("--cases", type=int, help="only the first N test cases")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    cases = held_out_cases()[: args.cases]
    with tempfile.TemporaryDirectory(prefix="dicom-node-la-heldout-") as tmp:
        result = run(Path(tmp), cases)
    summary = result["summary"]
    assert isinstance(summary, dict)
    print(format_table(summary))
    voxel = 0.625
    la = summary["left_atrium"]
    print(
        f"{len(cases)} cases; HD95 {la['hd95_mm'] / voxel:.2f} voxels, "
        f"ASD {la['asd_mm'] / voxel:.2f} voxels (0.625 mm)"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
