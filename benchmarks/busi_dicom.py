"""Held-out evaluation of a breast ultrasound lesion model through the whole DICOM path.

Run with ``.venv/bin/python -m benchmarks.busi_dicom --model config/models/busi-lesion``.

Each case of the package's fixed test split (``split.json`` ``test``: never trained on, never
used for a choice) is built into realistic DICOM as a scanner sends it: US Image Storage,
colour JPEG baseline (YBR_FULL_422), one Sequence of Ultrasound Regions item over the image
calibrated in cm. All are sent with DCMTK ``storescu`` over one real association to a running
``dicom-node serve`` whose route sends US to the model and the results to DCMTK ``storescp``.
The returned SEGs are read back onto the source grid and scored against the expert masks:
Dice and IoU (Jaccard) per lesion image (benign and malignant), and on normal images whether
any lesion was returned (the false-positive rate). The SRs' areas are checked against the
returned masks and the calibration. Results go to ``--out`` as ``metrics.json`` and
``metrics.md``.

The helpers (free ports, storescp, storescu, the node process) are those of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from dicom_node.outputs.seg import read_seg_masks, source_frame_keys
from dicom_node.training.data import read_split
from tests.conftest import NodeProcess, StoreSCP, free_port, node_settings, storescu, wait_for
from tests.factories import BUSI, busi_mask, busi_us, write_files

#: Physical Delta X/Y (cm) of the regions, cycled over the cases (typical breast probes).
DELTAS_CM = (0.008, 0.01, 0.0125)


def dice_iou(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (1.0 both when both are empty)."""
    inter = float(np.logical_and(found, truth).sum())
    total = float(found.sum() + truth.sum())
    union = float(np.logical_or(found, truth).sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def sr_area_cm2(sr: Any) -> float | None:
    """The Area (SCT 42798000) NUM of the SR, or None when it reports none."""

    def walk(items: Any) -> float | None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "NUM" and name and name[0].CodeValue == "42798000":
                return float(item.MeasuredValueSequence[0].NumericValue)
            found = walk(item.get("ContentSequence", []))
            if found is not None:
                return found
        return None

    return walk(sr.ContentSequence)


def run(model: Path, data: Path, out: Path, limit: int | None, timeout_s: float) -> dict[str, Any]:
    split = read_split(model)
    cases = list(split.test)[:limit] if limit else list(split.test)
    if not cases:
        raise SystemExit(f"{model}/split.json has no test cases")
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    sources: dict[str, tuple[str, Any, float]] = {}  # SOP Instance UID -> case, dataset, delta
    datasets = []
    for i, case in enumerate(cases):
        delta = DELTAS_CM[i % len(DELTAS_CM)]
        ds = busi_us(case, delta_cm=delta)
        sources[str(ds.SOPInstanceUID)] = (case, ds, delta)
        datasets.append(ds)
    files = write_files(datasets, work / "studies")
    scp = StoreSCP(work / "pacs", free_port()).start()
    settings = node_settings(work / "node", model, scp.port, log_level="info")
    settings["routes"] = [
        {
            "name": "breast-us",
            "match": {"Modality": ["US"], "BodyPartExamined": ["BREAST", ""]},
            "model": str(model.resolve()),
            "send_to": ["pacs"],
        }
    ]
    node = NodeProcess(work / "node", settings).start()
    try:
        started = time.monotonic()
        done = storescu(node.port, files, "-xy")  # propose JPEG baseline, as scanners do
        if done.returncode != 0:
            raise SystemExit(f"storescu failed: {done.stderr}")
        sent = time.monotonic()
        print(f"sent {len(files)} images in {sent - started:.1f} s", file=sys.stderr)

        seen = [-1]

        def all_back() -> list[Path] | None:
            found = scp.files()
            if len(found) // 10 != seen[0] // 10:
                print(f"  {len(found)} of {2 * len(files)} results", file=sys.stderr)
            seen[0] = len(found)
            return found if len(found) >= 2 * len(files) else None

        results = wait_for(all_back, timeout_s, "every SEG and SR")
        elapsed = time.monotonic() - sent
    finally:
        node.stop()
        scp.stop()
    segs: dict[str, Any] = {}
    srs: dict[str, Any] = {}
    for path in results:
        ds = dcmread(path)
        ref = ds.ReferencedSeriesSequence if ds.Modality == "SEG" else None
        if ref is not None:
            uid = ref[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            segs[str(uid)] = ds
        else:
            uid = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            uid = uid.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            srs[str(uid)] = ds
    per_case: dict[str, dict[str, Any]] = {}
    for uid, (case, ds, delta) in sources.items():
        masks = read_seg_masks(segs[uid], source_frame_keys([ds]))[0, ..., 0]
        truth = busi_mask(case)
        dice, iou = dice_iou(masks, truth)
        area = sr_area_cm2(srs[uid])
        expected_area = float(masks.sum()) * delta * delta
        per_case[case] = {
            "class": case.split("_")[0],
            "dice": round(dice, 4),
            "iou": round(iou, 4),
            "found": bool(masks.any()),
            "sr_area_cm2": area,
            "mask_area_cm2": round(expected_area, 2),
            "delta_cm": delta,
        }
    lesion = [v for v in per_case.values() if v["class"] != "normal"]
    normal = [v for v in per_case.values() if v["class"] == "normal"]
    area_errors = [
        abs(v["sr_area_cm2"] - v["mask_area_cm2"])
        for v in per_case.values()
        if v["found"] and v["sr_area_cm2"] is not None
    ]
    summary = {
        "cases": len(per_case),
        "lesion_images": len(lesion),
        "normal_images": len(normal),
        "mean_dice": round(statistics.fmean(v["dice"] for v in lesion), 4) if lesion else None,
        "mean_iou": round(statistics.fmean(v["iou"] for v in lesion), 4) if lesion else None,
        "median_dice": round(statistics.median(v["dice"] for v in lesion), 4) if lesion else None,
        "by_class": {
            cls: {
                "n": len(group),
                "mean_dice": round(statistics.fmean(v["dice"] for v in group), 4),
                "mean_iou": round(statistics.fmean(v["iou"] for v in group), 4),
            }
            for cls in ("benign", "malignant")
            if (group := [v for v in lesion if v["class"] == cls])
        },
        "lesion_missed": sum(not v["found"] for v in lesion),
        "normal_false_positive_rate": (
            round(sum(v["found"] for v in normal) / len(normal), 4) if normal else None
        ),
        "sr_area_max_abs_error_cm2": round(max(area_errors), 3) if area_errors else None,
        "seconds_from_end_of_send_to_all_results": round(elapsed, 1),
        "seconds_per_image": round(elapsed / len(per_case), 2),
    }
    doc = {"model": str(model), "data": str(data), "summary": summary, "per_case": per_case}
    (out / "metrics.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "| images | lesion images | mean Dice | mean IoU | median Dice | normal images with a "
        "lesion returned | s per image |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['cases']} | {summary['lesion_images']} | {summary['mean_dice']} | "
        f"{summary['mean_iou']} | {summary['median_dice']} | "
        f"{summary['normal_false_positive_rate']} ({len(normal)} normal) | "
        f"{summary['seconds_per_image']} |",
    ]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("config/models/busi-lesion"))
    parser.add_argument("--data", type=Path, default=BUSI)
    parser.add_argument("--out", type=Path, default=Path("var/busi-dicom-eval"))
    parser.add_argument("--limit", type=int, help="only the first N test cases")
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args(argv)
    doc = run(args.model, args.data, args.out, args.limit, args.timeout_s)
    print(json.dumps(doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
