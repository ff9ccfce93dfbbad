"""``dicom-node evaluate`` for 3D models (``dims: 3``) on NIfTI volumes, and the choice of
their postprocessing.

Evaluation (:func:`evaluate_volumes`) runs :meth:`Segmenter.predict_volume` (normalise,
resample to the model spacing, sliding window, back to the source grid), the package's
threshold and postprocessing, and compares with the expert masks on the source grid:
Dice, Jaccard, precision, recall, HD95 and ASD in mm (and in source voxels in the card).
The data layout and the split are in :mod:`dicom_node.training.volumes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.common.errors import InputError
from dicom_node.models.inference import Segmenter, masks_from_probabilities, select_device
from dicom_node.models.postprocess import postprocess
from dicom_node.package.manifest import ModelPackage, Postprocess
from dicom_node.training.data import Split, read_split
from dicom_node.training.metrics import case_metrics, summarize
from dicom_node.training.progress import ProgressLines
from dicom_node.training.results import (
    EvaluationResult,
    choose_from_measured,
    postprocess_variants,
    with_postprocess,
    write_metrics,
)
from dicom_node.training.volumes import IMAGE_FILE, read_volume


def predict_case_masks(
    segmenter: Segmenter, pixels: np.ndarray, placement: Any, *, raw: bool = False
) -> np.ndarray:
    """Boolean masks ``(S, z, y, x)`` of one volume on its source grid, as the node makes
    them (threshold, then the package's postprocessing over the volume unless ``raw``)."""
    probs = segmenter.predict_volume(pixels, placement)
    masks = masks_from_probabilities(probs, segmenter.package)
    if not raw:
        masks = postprocess(masks, segmenter.package, per_frame=False)
    return np.moveaxis(masks, -1, 0)


def choose_postprocessing(
    package: ModelPackage,
    data_dir: Path,
    cases: Sequence[str],
    candidates: Sequence[Postprocess],
    *,
    min_gain: float,
    min_gain_mm: float,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, list[str]], dict[str, dict[str, dict[str, float]]]]:
    """The 3D counterpart of :func:`~dicom_node.training.evaluate.select_postprocessing`,
    with the same rule, on the validation volumes at full resolution."""
    segmenter = Segmenter(package, device)
    labels = [s.label for s in package.structures]
    variants = postprocess_variants(candidates)
    packages = {v: with_postprocess(package, dict.fromkeys(labels, v)) for v in variants}
    values: dict[tuple[Postprocess, ...], dict[str, list[dict[str, float]]]] = {
        v: {label: [] for label in labels} for v in variants
    }
    lines = ProgressLines("postprocessing", len(cases), "cases", enabled=progress)
    for case in cases:
        volume = read_volume(data_dir, case, package)
        raw = predict_case_masks(segmenter, volume.pixels, volume.placement, raw=True)
        last = np.moveaxis(raw, 0, -1)
        for v in variants:
            pred = np.moveaxis(postprocess(last, packages[v], per_frame=False), -1, 0)
            for label, m in case_metrics(pred, volume.masks, labels, volume.spacing_zyx).items():
                values[v][label].append(m)
        lines.update()
    return choose_from_measured(values, labels, min_gain=min_gain, min_gain_mm=min_gain_mm)


def evaluate_volumes(
    package: ModelPackage,
    data_dir: Path | str,
    out_dir: Path | str | None = None,
    *,
    cases: Sequence[str] | None = None,
    split: str = "test",
    device: torch.device | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate a 3D package on NIfTI cases: by default the **test** cases of its split
    (``split`` ``validation`` for the cases that chose the epoch; explicit ``cases`` win).

    Writes ``metrics.json`` and ``metrics.txt`` into ``out_dir`` when given.
    """
    data_dir = Path(data_dir)
    if cases is None:
        recorded: Split = read_split(package.path)
        cases = list(recorded.test if split == "test" else recorded.validation)
        missing = [c for c in cases if not (data_dir / c / IMAGE_FILE).is_file()]
        if missing:
            raise InputError(
                f"case {missing[0]}: {data_dir / missing[0] / IMAGE_FILE} not found "
                f"({len(missing)} of the {len(cases)} {split} cases of {package.path}/"
                "split.json are not in --data); give --data the folder the model was trained "
                "on, or add --all-cases to evaluate every case of this folder"
            )
    labels = [s.label for s in package.structures]
    segmenter = Segmenter(package, device or select_device())
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    spacing = 1.0
    lines = ProgressLines(f"evaluate ({split})", len(cases), "cases", enabled=progress)
    for case in cases:
        volume = read_volume(data_dir, case, package)
        spacing = volume.spacing_zyx[0]
        pred = predict_case_masks(segmenter, volume.pixels, volume.placement)
        per_case[case] = case_metrics(pred, volume.masks, labels, volume.spacing_zyx)
        lines.update()
    result = EvaluationResult(list(cases), per_case, summarize(per_case.values()), spacing, {})
    if out_dir is not None:
        write_metrics(result, Path(out_dir))
    return result
