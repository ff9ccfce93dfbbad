"""Inference time per model format on the CPU: the shipped cxr-anatomy as its package, as
TorchScript and as ONNX (onnxruntime), on the same JSRT radiographs.

``.venv/bin/python -m benchmarks.model_formats [--cases N] [--repeats R] [--device cpu]``:
each format is loaded through :func:`dicom_node.models.formats.load_model` (what a route
does), warmed up, then every radiograph (a DX file) is segmented ``R`` times through
:func:`dicom_node.work.segment.segment_series` with the SEG built (read, preprocess,
network, postprocess, SEG); prints the median and the spread of seconds per radiograph, and
the Dice of each format's masks against the package's.

Then (unless ``--no-bundle``) the MONAI spleen_ct_segmentation bundle (its published configs
from ``../shared/data/reference/monai-bundles``, its ``network_def`` with seeded random
weights: the weights cannot be downloaded here, and the time does not depend on them) on the
real Siemens CT (20 x 512 x 512, ``reference/ct-siemens-j2k``) through the same path,
``--bundle-repeats`` times: seconds per volume with the published sliding window (96^3,
overlap 0.5, 4 windows a batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.common.log import configure_logging
from dicom_node.common.output_kinds import OutputKind
from dicom_node.models.formats import detect_format, load_model
from dicom_node.testing.exported import export_package
from dicom_node.work.segment import segment_series
from tests.factories import jsrt_cases, jsrt_dx

PACKAGE = Path(__file__).resolve().parents[1] / "config" / "models" / "cxr-anatomy"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-bundle", action="store_true", help="skip the MONAI bundle")
    parser.add_argument("--bundle-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    device = torch.device(args.device)
    cases = jsrt_cases()[: args.cases]
    if not cases:
        print("no JSRT radiographs under ../shared/data/jsrt/images", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="model-formats-") as tmp:
        work = Path(tmp)
        models = {"package": PACKAGE, **export_package(PACKAGE, work / "exported")}
        models.pop("bare-onnx")
        images = []
        for case in cases:
            path = work / f"{case}.dcm"
            jsrt_dx(case).save_as(path, enforce_file_format=True)
            images.append(path)
        print(
            f"{len(cases)} JSRT radiographs x {args.repeats}, device {device}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        print(
            "| format | load s | first run s | median s / radiograph | min | max "
            "| Dice vs package |"
        )
        print("|---|---|---|---|---|---|---|")
        reference: list[np.ndarray] = []
        for model in models.values():
            started = time.perf_counter()
            segmenter = load_model(model, device)
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            segmenter.warm_up()
            first = time.perf_counter() - started
            seconds: list[float] = []
            masks: list[np.ndarray] = []
            for _ in range(args.repeats):
                for image in images:
                    started = time.perf_counter()
                    (result,) = segment_series([image], segmenter, [OutputKind.SEG])
                    seconds.append(time.perf_counter() - started)
                    masks.append(result.seg.pixel_array.astype(bool))
            if not reference:
                reference = masks
            dice = min(
                2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)
                for a, b in zip(masks, reference, strict=True)
            )
            print(
                f"| {detect_format(model).format} | {loaded:.2f} | {first:.2f} | "
                f"{statistics.median(seconds):.3f} | {min(seconds):.3f} | {max(seconds):.3f} "
                f"| {dice:.4f} |"
            )
        if not args.no_bundle:
            bundle_row(work, device, args.bundle_repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def bundle_row(work: Path, device: torch.device, repeats: int) -> None:
    """Print the spleen bundle's times on the real Siemens CT (see the module's doc)."""
    from tests.models.formats.test_bundle import make_bundle
    from tests.work.test_bundle_route import spleen_ct

    bundle = make_bundle(work, "spleen_ct_segmentation")
    (bundle / "dicom-node.yaml").write_text(
        "modalities: [CT]\nstructures: {spleen: {category: SCT.AnatomicalStructure, "
        "type: SCT.Spleen}}\n"
    )
    series = spleen_ct(work / "ct")
    started = time.perf_counter()
    segmenter = load_model(bundle, device)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    segmenter.warm_up()
    first = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        segment_series(series, segmenter, [OutputKind.SEG])
        seconds.append(time.perf_counter() - started)
    print(f"\nspleen_ct_segmentation on the Siemens CT (20 x 512 x 512) x {repeats}, {device}")
    print("| format | load s | first run s | median s / volume | min | max |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {detect_format(bundle).format} | {loaded:.2f} | {first:.2f} | "
        f"{statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} |"
    )


if __name__ == "__main__":
    raise SystemExit(main())
