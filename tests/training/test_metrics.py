"""Known answers of the segmentation metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dicom_node.training.metrics import (
    batch_dice,
    case_metrics,
    format_table,
    hd95_mm,
    overlap,
    structure_metrics,
    summarize,
)


def _boxes() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((10, 10), dtype=bool)
    truth = np.zeros((10, 10), dtype=bool)
    pred[2:6, 2:6] = True  # 16 pixels
    truth[2:6, 4:8] = True  # 16 pixels, 8 shared
    return pred, truth


def test_overlap_known_answer() -> None:
    pred, truth = _boxes()
    m = overlap(pred, truth)
    assert m["dice"] == pytest.approx(2 * 8 / 32)
    assert m["jaccard"] == pytest.approx(8 / 24)
    assert m["precision"] == pytest.approx(8 / 16)
    assert m["recall"] == pytest.approx(8 / 16)


def test_overlap_precision_and_recall_differ() -> None:
    truth = np.zeros((8, 8), dtype=bool)
    truth[0:4, 0:4] = True  # 16
    pred = np.zeros((8, 8), dtype=bool)
    pred[0:2, 0:4] = True  # 8, all inside truth
    m = overlap(pred, truth)
    assert m["precision"] == 1.0
    assert m["recall"] == 0.5
    assert m["jaccard"] == 0.5
    assert m["dice"] == pytest.approx(2 * 8 / 24)


def test_empty_masks_conventions() -> None:
    empty = np.zeros((5, 5), dtype=bool)
    full = np.ones((5, 5), dtype=bool)
    assert overlap(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0}
    assert hd95_mm(empty, empty, (1.0, 1.0)) == 0.0
    assert overlap(empty, full)["dice"] == 0.0
    assert math.isnan(hd95_mm(empty, full, (1.0, 1.0)))


def test_hd95_is_in_millimetres() -> None:
    a = np.zeros((12, 12), dtype=bool)
    b = np.zeros((12, 12), dtype=bool)
    a[2, 5] = True
    b[5, 5] = True  # 3 rows apart
    assert hd95_mm(a, b, (2.0, 1.0)) == pytest.approx(6.0)
    assert hd95_mm(a, b, (0.35, 0.35)) == pytest.approx(1.05)
    c = np.zeros((12, 12), dtype=bool)
    c[2, 9] = True  # 4 columns apart
    assert hd95_mm(a, c, (2.0, 0.5)) == pytest.approx(2.0)


def test_identical_masks_are_perfect() -> None:
    pred, _ = _boxes()
    m = structure_metrics(pred, pred.copy(), (0.35, 0.35))
    assert m == {
        "dice": 1.0,
        "jaccard": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "hd95_mm": 0.0,
        "asd_mm": 0.0,
    }


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        overlap(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0,))


def test_case_metrics_and_summary_with_groups() -> None:
    pred, truth = _boxes()
    labels = ["right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle"]
    p = np.stack([pred, truth, pred, truth, pred])
    t = np.stack([truth, truth, pred, truth, truth])
    case = case_metrics(p, t, labels, (1.0, 1.0))
    assert case["left_lung"]["jaccard"] == 1.0
    assert case["right_lung"]["jaccard"] == pytest.approx(1 / 3)
    summary = summarize([case, case])
    assert summary["lungs"]["jaccard"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["clavicles"]["jaccard"] == pytest.approx((1 + 1 / 3) / 2)
    assert summary["heart"]["jaccard"] == 1.0
    assert summary["heart"]["jaccard_std"] == 0.0
    table = format_table(summary)
    assert "clavicles" in table and "hd95_mm" in table


def test_summary_skips_nan() -> None:
    cases = [{"x": {"hd95_mm": 2.0}}, {"x": {"hd95_mm": math.nan}}, {"x": {"hd95_mm": 4.0}}]
    assert summarize(cases)["x"]["hd95_mm"] == pytest.approx(3.0)


def test_batch_dice_accumulates_per_structure() -> None:
    pred = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    truth = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    pred[0, 0, :2] = True  # 8 pixels
    truth[0, 0, :1] = True  # 4 pixels, inside pred
    pred[1, 1] = True
    truth[1, 1] = True
    num, den = batch_dice(pred, truth)
    dice = (num / den).tolist()
    assert dice[0] == pytest.approx(2 * 4 / 12)
    assert dice[1] == pytest.approx(1.0)
