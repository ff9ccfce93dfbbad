"""Accuracy levers of la-lge measured on its VALIDATION cases only (the test cases choose nothing).

``.venv/bin/python -m benchmarks.la_lge_levers [--model config/models/la-lge] [--out F.json]``:
for every validation case of the package's ``split.json`` the probabilities of
:meth:`Segmenter.predict_volume` (the node's 3D path without DICOM) are made once as shipped and
once with the input mirrored along each axis (x, y, z; the output mirrored back), and the masks
of each variant are scored on the source grid (Dice; HD95 in 0.625 mm voxels):

* threshold 0.4 / 0.5 / 0.6 of the plain probabilities;
* test-time flip augmentation: the mean with the x-mirrored run, and with all three;
* Gaussian smoothing of the probabilities (sigma 1 and 2 source voxels) before 0.5;

each raw and with the package's postprocessing (largest component, fill holes). A minimum
component size is not a separate lever for a one-structure model: ``largest_component`` already
removes every smaller component. The seconds of each ``predict_volume`` are reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from dicom_node.models.inference import Segmenter
from dicom_node.models.postprocess import postprocess
from dicom_node.package.manifest import load_package
from dicom_node.training.data import read_split
from dicom_node.training.metrics import case_metrics
from dicom_node.training.volumes import read_volume

FLIPS: dict[str, tuple[int, ...]] = {"x": (4,), "y": (3,), "z": (2,)}


class Mirrored(torch.nn.Module):
    """``network`` run on the input mirrored along ``dims``, its output mirrored back."""

    def __init__(self, network: torch.nn.Module, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.network, self.dims = network, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(torch.flip(x, self.dims))
        return torch.flip(out, self.dims)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("config/models/la-lge"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/la-mri"))
    p.add_argument("--out", type=Path, help="write the table as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    package = load_package(args.model)
    cases = list(read_split(args.model).validation)
    segmenter = Segmenter(package, torch.device("cpu"))
    plain = segmenter.network
    scores: dict[str, list[tuple[float, float]]] = {}
    seconds: dict[str, list[float]] = {name: [] for name in ("none", *FLIPS)}
    for case in cases:
        volume = read_volume(args.data, case, package)
        voxel_mm = float(volume.spacing_zyx[0])
        probs: dict[str, np.ndarray] = {}
        for name in seconds:
            segmenter.network = plain if name == "none" else Mirrored(plain, FLIPS[name])
            start = time.perf_counter()
            probs[name] = segmenter.predict_volume(volume.pixels, volume.placement)[..., 0]
            seconds[name].append(time.perf_counter() - start)
        segmenter.network = plain
        variants: dict[str, np.ndarray] = {}
        for threshold in (0.4, 0.5, 0.6):
            variants[f"threshold {threshold}"] = probs["none"] > threshold
            mean_x = (probs["none"] + probs["x"]) / 2
            variants[f"flip x, threshold {threshold}"] = mean_x > threshold
            mean_xyz = sum(probs.values()) / len(probs)
            variants[f"flip x+y+z, threshold {threshold}"] = mean_xyz > threshold
        for sigma in (1.0, 2.0):
            smooth = ndimage.gaussian_filter(probs["none"], sigma)
            variants[f"smoothed sigma {sigma:g}, threshold 0.5"] = smooth > 0.5
        for name, mask in variants.items():
            for cleaned in (False, True):
                pred = mask[..., None]
                if cleaned:
                    pred = postprocess(pred, package, per_frame=False)
                m = case_metrics(
                    np.moveaxis(pred, -1, 0), volume.masks, ["la"], volume.spacing_zyx
                )["la"]
                key = f"{name}{', cleaned' if cleaned else ''}"
                scores.setdefault(key, []).append((m["dice"], m["hd95_mm"] / voxel_mm))
    table = {
        key: {
            "dice": round(float(np.mean([d for d, _ in v])), 4),
            "hd95_voxels": round(float(np.mean([h for _, h in v])), 2),
        }
        for key, v in scores.items()
    }
    print(f"{package.name} {package.version}, {len(cases)} validation cases")
    for key, row in sorted(table.items(), key=lambda kv: -kv[1]["dice"]):
        print(f"{key:48s} Dice {row['dice']:.4f}  HD95 {row['hd95_voxels']:5.2f} voxels")
    timing = {name: round(float(np.median(v)), 2) for name, v in seconds.items()}
    print("predict_volume seconds (median per run):", timing)
    if args.out is not None:
        result = {"cases": cases, "levers": table, "predict_volume_s": timing}
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
