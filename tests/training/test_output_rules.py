"""Choosing the output rules on validation cases: the confidence and area rules that drop a
doubtful finding ("no lesion"), and the mirrored test-time pass only when it pays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dicom_node.models import inference
from dicom_node.package.manifest import load_package
from dicom_node.training.evaluate import select_output_rules

PACKAGE = Path(__file__).resolve().parents[2] / "config" / "models" / "busi-lesion"
SIZE = 40
CASES = ["normal_1", "normal_2", "benign_1", "benign_2"]


def _ungated() -> Any:
    """The shipped package with no output rule of its own."""
    return replace(load_package(PACKAGE), min_confidence=None)


def _folder(root: Path) -> Path:
    """Two normals (empty masks) and two lesions (a 12 x 12 square)."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for case in CASES:
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
    rules = select_output_rules(
        _ungated(),
        _folder(tmp_path / "data"),
        CASES,
        [0.5, 0.9],
        [0.001, 0.01, 0.2],
        try_flip=True,
        device=torch.device("cpu"),
    )
    # 0.01 of 1600 pixels = 16 > 9: the normals' blobs go, the 144-pixel lesions stay; 0.001
    # keeps the blobs, 0.2 drops the lesions; no confidence threshold separates them
    assert rules.min_area_fraction == 0.01 and rules.min_confidence is None
    assert rules.scores["flip=false presence=none conf=none area=0.01"] == 1.0
    assert rules.scores["flip=false presence=none conf=none area=none"] == 0.5
    assert rules.scores["flip=false presence=none conf=none area=0.2"] == 0.5
    assert len(rules.scores) == 2 * 3 * 4  # every combination was measured
    # the mirrored pass was measured but gains nothing here: not kept
    assert calls.count(True) == 4 and not rules.flip_tta
    assert set(rules.ms_per_image) == {"plain", "flip"}


def test_the_presence_gate_is_chosen_with_the_network_run_at_each_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gates: list[float | None] = []

    def predict_image(self: inference.Segmenter, image: np.ndarray) -> np.ndarray:
        # the network's presence head says 0.3 on normals and 0.8 on lesions; its gate
        # (output.min_presence) empties the map where the presence is below it
        gates.append(self.package.min_presence)
        presence = 0.8 if image.max() > 100 else 0.3
        probs = np.zeros((SIZE, SIZE, 1), np.float32)
        if image.max() > 100:
            probs[10:22, 10:22] = 0.95
        else:  # a large, confident false lesion: no confidence or area rule removes it
            probs[2:20, 20:38] = 0.95
        if self.package.min_presence is not None and presence < self.package.min_presence:
            probs[:] = 0.0
        return probs

    def init(self: inference.Segmenter, package: Any, device: torch.device) -> None:
        self.package = package  # the shipped package has no presence head to load

    monkeypatch.setattr(inference.Segmenter, "__init__", init)
    monkeypatch.setattr(inference.Segmenter, "predict_image", predict_image)
    rules = select_output_rules(
        _ungated(),
        _folder(tmp_path / "data"),
        CASES,
        [0.5],
        presence_candidates=[0.2, 0.5, 0.9],
        device=torch.device("cpu"),
    )
    # 0.2 keeps the normals' false lesions, 0.9 drops the lesions: 0.5 alone separates them
    assert rules.min_presence == 0.5 and rules.min_confidence is None
    assert rules.scores["flip=false presence=0.5 conf=none area=none"] == 1.0
    assert rules.scores["flip=false presence=0.2 conf=none area=none"] == 0.5
    assert rules.scores["flip=false presence=0.9 conf=none area=none"] == 0.5
    assert rules.scores["flip=false presence=none conf=0.5 area=none"] == 0.5
    # the network ran once per image at each candidate, and once without the gate
    assert sorted(gates, key=lambda g: g or 0.0) == [None] * 4 + [0.2] * 4 + [0.5] * 4 + [0.9] * 4


def test_min_confidence_alone_drops_faint_findings_with_its_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.training.evaluate import select_min_confidence

    def predict_image(self: inference.Segmenter, image: np.ndarray) -> np.ndarray:
        probs = np.zeros((SIZE, SIZE, 1), np.float32)
        if image.max() > 100:
            probs[10:22, 10:22] = 0.95  # the lesion, found confidently
        else:
            probs[2:20, 20:38] = 0.6  # a large but faint false lesion on a normal
        return probs

    monkeypatch.setattr(inference.Segmenter, "predict_image", predict_image)
    chosen, table = select_min_confidence(
        _ungated(),
        _folder(tmp_path / "data"),
        CASES,
        [0.5, 0.8, 0.99],
        device=torch.device("cpu"),
    )
    assert chosen == 0.8
    assert table == {"none": 0.5, "0.5": 0.5, "0.8": 1.0, "0.99": 0.5}
