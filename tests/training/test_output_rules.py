"""Choosing the output rules on validation cases: the confidence and area rules that drop a
doubtful finding ("no lesion"), and the mirrored test-time pass only when it pays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dicom_node.models import inference
from dicom_node.package.manifest import load_package
from dicom_node.training.evaluate import select_output_rules

PACKAGE = Path(__file__).resolve().parents[2] / "config" / "models" / "busi-lesion"
SIZE = 40


def _folder(root: Path) -> Path:
    """Two normals (empty masks) and two lesions (a 12 x 12 square)."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for case in ("normal_1", "normal_2", "benign_1", "benign_2"):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if case.startswith("benign"):
            mask[10:22, 10:22] = 255
        Image.fromarray(mask).save(root / "masks" / f"{case}.png")
        Image.fromarray(mask // 2 + 20).save(root / "images" / f"{case}.png")
    return root


def test_the_area_rule_is_chosen_where_normals_show_small_confident_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []

    def predict_image(self: inference.Segmenter, image: np.ndarray) -> np.ndarray:
        calls.append(self.package.flip_tta)
        probs = np.zeros((SIZE, SIZE, 1), np.float32)
        if image.max() > 100:  # a lesion image: the lesion, found confidently
            probs[10:22, 10:22] = 0.95
        else:  # a normal: a small (9 pixels, 0.6% of the image) confident blob
            probs[30:33, 30:33] = 0.95
        return probs

    monkeypatch.setattr(inference.Segmenter, "predict_image", predict_image)
    package = replace(load_package(PACKAGE), min_confidence=None)
    rules = select_output_rules(
        package,
        _folder(tmp_path / "data"),
        ["normal_1", "normal_2", "benign_1", "benign_2"],
        [0.5, 0.9],
        [0.001, 0.01, 0.2],
        try_flip=True,
        device=torch.device("cpu"),
    )
    # 0.01 of 1600 pixels = 16 > 9: the normals' blobs go, the 144-pixel lesions stay; 0.001
    # keeps the blobs, 0.2 drops the lesions; no confidence threshold separates them
    assert rules.min_area_fraction == 0.01 and rules.min_confidence is None
    assert rules.scores["flip=false conf=none area=0.01"] == 1.0
    assert rules.scores["flip=false conf=none area=none"] == 0.5
    assert rules.scores["flip=false conf=none area=0.2"] == 0.5
    assert len(rules.scores) == 2 * 3 * 4  # every combination was measured
    # the mirrored pass was measured but gains nothing here: not kept
    assert calls.count(True) == 4 and not rules.flip_tta
    assert set(rules.ms_per_image) == {"plain", "flip"}
