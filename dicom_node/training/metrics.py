"""Segmentation metrics per structure: Dice, Jaccard, precision, recall, HD95 and ASD in mm.

Overlap metrics are counted on boolean masks; the 95th-percentile symmetric Hausdorff distance
and the average symmetric surface distance are MONAI's
(:func:`monai.metrics.compute_hausdorff_distance`,
:func:`monai.metrics.compute_average_surface_distance`) with the pixel (voxel) spacing, so that
they are in millimetres, in 2D and 3D. Conventions for empty masks: two empty masks agree
perfectly (Dice, Jaccard, precision and recall 1, HD95 and ASD 0); when only one is empty the
overlap metrics are 0 and HD95 and ASD are NaN (undefined), and summaries skip NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

#: Metric names, in table order.
METRICS = ("dice", "jaccard", "precision", "recall", "hd95_mm", "asd_mm")

#: Structures reported together against published figures: group -> member labels.
GROUPS = {
    "lungs": ("right_lung", "left_lung"),
    "heart": ("heart",),
    "clavicles": ("right_clavicle", "left_clavicle"),
}


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, Jaccard, precision and recall of boolean masks of the same shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth differ in shape: {pred.shape} vs {truth.shape}")
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    tp = float(np.count_nonzero(p & t))
    n_pred = float(np.count_nonzero(p))
    n_truth = float(np.count_nonzero(t))
    union = n_pred + n_truth - tp
    if n_pred == 0 and n_truth == 0:
        return {"dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0}
    return {
        "dice": 2 * tp / (n_pred + n_truth),
        "jaccard": tp / union,
        "precision": tp / n_pred if n_pred else 0.0,
        "recall": tp / n_truth if n_truth else 0.0,
    }


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in mm.

    Parameters
    ----------
    pred, truth
        Boolean masks of the same shape (2D or 3D).
    spacing_mm
        Pixel spacing along each axis of the masks, in mm (for DICOM images: Pixel Spacing
        (0028,0030) or Imager Pixel Spacing (0018,1164), row spacing first).
    """
    return _surface_distance(compute_hausdorff_distance, pred, truth, spacing_mm, percentile=95)


def asd_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Average symmetric surface distance between mask surfaces, in mm (conventions of
    :func:`hd95_mm` for empty masks)."""
    return _surface_distance(
        compute_average_surface_distance, pred, truth, spacing_mm, symmetric=True
    )


def _surface_distance(
    compute: Callable[..., torch.Tensor],
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    **options: Any,
) -> float:
    """One of MONAI's surface distances between two masks, in mm: 0 when both are empty, NaN
    when only one is (no surface to measure from)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if len(spacing_mm) != p.ndim:
        raise ValueError(f"spacing_mm has {len(spacing_mm)} values for {p.ndim}D masks")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.nan
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes a deprecated argument to itself (always_return_as_numpy)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        value = compute(
            torch.from_numpy(p[None, None]),
            torch.from_numpy(t[None, None]),
            include_background=True,
            spacing=[float(s) for s in spacing_mm],
            **options,
        )
    return float(value.reshape(-1)[0])


def structure_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]
) -> dict[str, float]:
    """All of :data:`METRICS` for one structure of one case."""
    out = overlap(pred, truth)
    out["hd95_mm"] = hd95_mm(pred, truth, spacing_mm)
    out["asd_mm"] = asd_mm(pred, truth, spacing_mm)
    return out


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[str],
    spacing_mm: Sequence[float],
    *,
    distances: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics of every structure of one case.

    Parameters
    ----------
    pred, truth
        Boolean masks (S, rows, cols), one per structure in the order of ``labels``.
    distances
        Whether to compute HD95 too (the slow one); overlap metrics only when False.
    """
    if pred.shape != truth.shape or pred.shape[0] != len(labels):
        raise ValueError(
            f"expected masks (S={len(labels)}, ...) of one shape, got {pred.shape}, {truth.shape}"
        )
    out = {}
    for i, label in enumerate(labels):
        out[label] = (
            structure_metrics(pred[i], truth[i], spacing_mm)
            if distances
            else overlap(pred[i], truth[i])
        )
    return out


def summarize(
    per_case: Iterable[Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric per structure over cases (NaN skipped).

    Returns ``{structure: {metric: mean, metric + "_std": std}}`` plus one entry per group of
    :data:`GROUPS` whose members are all present (the mean of its members' case values).
    """
    values: dict[str, dict[str, list[float]]] = {}
    for case in per_case:
        for label, metrics in case.items():
            for name, value in metrics.items():
                values.setdefault(label, {}).setdefault(name, []).append(float(value))
        for group, members in GROUPS.items():
            if group in case or not all(m in case for m in members):
                continue
            for name in case[members[0]]:
                mean = float(np.mean([case[m][name] for m in members]))
                values.setdefault(group, {}).setdefault(name, []).append(mean)
    out: dict[str, dict[str, float]] = {}
    for label, per_metric in values.items():
        out[label] = {}
        for name, vals in per_metric.items():
            arr = np.asarray(vals, dtype=float)
            arr = arr[~np.isnan(arr)]
            out[label][name] = float(arr.mean()) if arr.size else math.nan
            out[label][name + "_std"] = float(arr.std()) if arr.size else math.nan
    return out


def format_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of a :func:`summarize` result, one row per structure or group."""
    header = f"{'structure':<16}" + "".join(f"{m:>18}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for label, metrics in summary.items():
        cells = []
        for name in METRICS:
            if name not in metrics:
                cells.append(f"{'-':>18}")
                continue
            mean, std = metrics[name], metrics.get(name + "_std", math.nan)
            digits = 2 if name.endswith("_mm") else 3
            cells.append(f"{mean:>11.{digits}f} ±{std:>5.{digits}f}")
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)


def batch_dice(pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-structure Dice numerators and denominators summed over a batch.

    ``pred`` and ``truth`` are boolean or {0, 1} tensors (B, S, ...); returns two tensors (S,)
    ``2 * |P & T|`` and ``|P| + |T|`` to be accumulated over batches (fast validation during
    training, on the network's input grid).
    """
    p = pred.bool()
    t = truth.bool()
    dims = [0, *range(2, p.ndim)]
    inter = (p & t).sum(dim=dims).double()
    total = p.sum(dim=dims).double() + t.sum(dim=dims).double()
    return 2 * inter, total
