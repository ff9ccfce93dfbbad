"""Held-out figures of cxr-anatomy through the whole DICOM path (an evaluation, not a timing).

``.venv/bin/python -m benchmarks.heldout_cxr [--cases N] [--out FILE]``: a node with the
shipped package (route CR/DX) receives every test case of the package's ``split.json`` (drawn
first with its own seed: never trained on, never used for a choice) as a DX radiograph in one
of the encodings of issue 8 item 5, cycled over the cases (:data:`tests.factories.DX_VARIANTS`:
MONOCHROME1, 12- and 16-bit, JPEG-LS and JPEG 2000 lossless, a non-square detector). Each
encoding goes over one real DCMTK ``storescu`` association proposing its transfer syntax.
Each returned SEG is decoded onto the source pixels and scored against the expert masks
(cropped alike) at 0.35 mm: Dice, Jaccard, precision, recall, HD95
(:func:`dicom_node.training.metrics.case_metrics`), per structure and per group, over all
cases and per encoding. Prints the tables and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from benchmarks.receive import received_files
from dicom_node.outputs.seg import read_seg_masks, source_frame_keys
from dicom_node.training.data import read_split
from dicom_node.training.metrics import case_metrics, format_table, summarize
from tests.conftest import NodeProcess, StoreSCP, free_port, node_settings, storescu, wait_for
from tests.factories import (
    DX_VARIANTS,
    JSRT_SPACING_MM,
    JSRT_STRUCTURES,
    DxVariant,
    jsrt_dx_variant,
    write_files,
)

PACKAGE = Path(__file__).resolve().parents[1] / "config" / "models" / "cxr-anatomy"


def _referenced_instance(ds: Any) -> str:
    """The source SOP Instance UID a returned SEG or SR refers to."""
    if ds.Modality == "SEG":
        instance = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        return str(instance.ReferencedSOPInstanceUID)
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return str(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def run(work: Path, model: Path, cases: Sequence[str], timeout_s: float = 1800) -> dict[str, Any]:
    """Send ``cases`` (encodings cycled) to a node running ``model``; score the SEGs."""
    sources: dict[str, tuple[str, DxVariant, Any, np.ndarray]] = {}
    groups: dict[str | None, list[Path]] = {}
    for i, case in enumerate(cases):
        variant = DX_VARIANTS[i % len(DX_VARIANTS)]
        ds, truth = jsrt_dx_variant(case, variant)
        sources[str(ds.SOPInstanceUID)] = (case, variant, ds, truth)
        groups.setdefault(variant.storescu_flag, []).extend(
            write_files([ds], work / "studies" / case)
        )
    scp = StoreSCP(work / "pacs", free_port()).start()
    settings = node_settings(work / "node", model.resolve(), scp.port, log_level="info")
    node = NodeProcess(work / "node", settings).start()
    try:
        started = time.monotonic()
        for flag, files in groups.items():
            done = storescu(node.port, files, *([flag] if flag else []))
            if done.returncode != 0:
                raise SystemExit(f"storescu {flag or ''} failed: {done.stderr}")
        sent = time.monotonic()
        print(f"sent {len(sources)} radiographs in {sent - started:.1f} s", file=sys.stderr)

        def all_back() -> list[Path] | None:
            found = received_files(scp.folder)
            return found if len(found) >= 2 * len(sources) else None

        wait_for(all_back, timeout_s, "every SEG and SR")
        elapsed = time.monotonic() - sent
        time.sleep(1.0)  # storescp may still be writing the last file
        results = received_files(scp.folder)
    finally:
        node.stop()
        scp.stop()
    segs: dict[str, Any] = {}
    for path in results:
        ds = dcmread(path)
        if ds.Modality == "SEG":
            segs[_referenced_instance(ds)] = ds
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    encoding: dict[str, str] = {}
    for uid, (case, variant, ds, truth) in sources.items():
        masks = read_seg_masks(segs[uid], source_frame_keys([ds]))[0]  # (rows, cols, S)
        found = np.moveaxis(masks, -1, 0)
        per_case[case] = case_metrics(
            found, truth, list(JSRT_STRUCTURES), (JSRT_SPACING_MM, JSRT_SPACING_MM)
        )
        encoding[case] = variant.name
    by_encoding = {
        v.name: summarize([per_case[c] for c in per_case if encoding[c] == v.name])
        for v in DX_VARIANTS
        if v.name in encoding.values()
    }
    return {
        "model": str(model),
        "cases": list(cases),
        "encoding": encoding,
        "seconds_from_end_of_send_to_all_results": round(elapsed, 1),
        "summary": summarize(per_case.values()),
        "by_encoding": by_encoding,
        "per_case": per_case,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heldout_cxr")
    parser.add_argument("--model", type=Path, default=PACKAGE)
    parser.add_argument("--cases", type=int, help="only the first N test cases")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args(argv)
    cases = list(read_split(args.model).test)[: args.cases]
    if not cases:
        raise SystemExit(f"{args.model}/split.json has no test cases")
    with tempfile.TemporaryDirectory(prefix="dicom-node-cxr-heldout-") as tmp:
        result = run(Path(tmp), args.model, cases, args.timeout_s)
    print(f"{len(cases)} test cases through the DICOM path:")
    print(format_table(result["summary"]))
    for name, summary in result["by_encoding"].items():
        group = ", ".join(
            f"{g} {summary[g]['jaccard']:.3f}" for g in ("lungs", "heart", "clavicles")
        )
        n = sum(e == name for e in result["encoding"].values())
        print(f"{name} ({n} cases): Jaccard {group}")
    print(f"{result['seconds_from_end_of_send_to_all_results']} s from end of send to all results")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
