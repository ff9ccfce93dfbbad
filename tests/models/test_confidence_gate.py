"""The confidence gate (``output.min_confidence``): doubtful findings count as not found."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicom_node.common.errors import ModelPackageError
from dicom_node.models.inference import confidence_gate
from dicom_node.package.manifest import load_package
from dicom_node.training.config import load_train_config, parse_train_config

PACKAGE = Path(__file__).resolve().parents[2] / "config" / "models" / "busi-lesion"


def test_gate_drops_a_faint_finding_and_keeps_a_confident_one() -> None:
    package = replace(load_package(PACKAGE), min_confidence=0.7)
    probs = np.zeros((2, 20, 20, 1), dtype=np.float32)
    probs[0, 5:10, 5:10, 0] = 0.6  # faint: dropped
    probs[1, 5:10, 5:10, 0] = 0.9  # confident: kept
    masks = probs > 0.5
    gated = confidence_gate(masks, probs, package)
    assert not gated[0].any()
    assert np.array_equal(gated[1], masks[1])
    assert masks[0].any()  # the input is not modified
    # without a gate nothing changes
    assert np.array_equal(
        confidence_gate(masks, probs, replace(package, min_confidence=None)), masks
    )


def test_min_confidence_is_validated(tmp_path: Path) -> None:
    doc = yaml.safe_load((PACKAGE / "model.yaml").read_text())
    doc["weights"] = str(PACKAGE / "model.pt")
    for bad in (1.5, "high", True):
        doc["output"]["min_confidence"] = bad
        (tmp_path / "model.yaml").write_text(yaml.safe_dump(doc))
        with pytest.raises(ModelPackageError, match="min_confidence"):
            load_package(tmp_path)


def test_shipped_package_gate_and_training_config_agree() -> None:
    package = load_package(PACKAGE)
    assert package.min_confidence == pytest.approx(0.675)  # 2.1.0, chosen on validation
    assert package.min_presence is None  # its presence gate was measured, not chosen
    config_path = Path(__file__).resolve().parents[2] / "config" / "train-busi-stage2.yaml"
    config = load_train_config(config_path)
    assert config.model["version"] == package.version
    assert package.min_confidence in config.training.min_confidence_candidates
    with pytest.raises(Exception, match="min_confidence_candidates"):
        parse_train_config({"model": config.model, "training": {"min_confidence_candidates": [2]}})


def test_area_rule_drops_a_tiny_finding_and_keeps_a_large_one() -> None:
    package = replace(load_package(PACKAGE), min_confidence=None, min_area_fraction=0.05)
    probs = np.zeros((2, 20, 20, 1), dtype=np.float32)
    probs[0, 5:8, 5:8, 0] = 0.9  # 9 of 400 pixels (2%): dropped
    probs[1, 5:10, 5:10, 0] = 0.9  # 25 of 400 (6%): kept
    masks = probs > 0.5
    gated = confidence_gate(masks, probs, package)
    assert not gated[0].any() and np.array_equal(gated[1], masks[1])
    # both rules together: a large but faint finding goes too
    both = replace(package, min_confidence=0.95)
    assert not confidence_gate(masks, probs, both).any()


def test_min_area_fraction_and_flip_tta_are_validated(tmp_path: Path) -> None:
    doc = yaml.safe_load((PACKAGE / "model.yaml").read_text())
    doc["weights"] = str(PACKAGE / "model.pt")
    for key, bad in (("min_area_fraction", 1.0), ("min_area_fraction", "x"), ("flip_tta", 1)):
        output = {**doc["output"], key: bad}
        (tmp_path / "model.yaml").write_text(yaml.safe_dump({**doc, "output": output}))
        with pytest.raises(ModelPackageError, match=key):
            load_package(tmp_path)
    output = {**doc["output"], "min_area_fraction": 0.01, "flip_tta": True}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**doc, "output": output}))
    package = load_package(tmp_path)
    assert package.min_area_fraction == 0.01 and package.flip_tta


def test_flip_tta_averages_the_mirrored_pass() -> None:
    import torch

    from dicom_node.models.inference import Segmenter

    package = replace(load_package(PACKAGE), min_confidence=None)
    image = np.random.default_rng(0).uniform(0, 255, (120, 150)).astype(np.float32)
    plain = Segmenter(package, torch.device("cpu")).predict_image(image)
    mirrored = Segmenter(package, torch.device("cpu")).predict_image(image[:, ::-1].copy())
    tta = Segmenter(replace(package, flip_tta=True), torch.device("cpu")).predict_image(image)
    np.testing.assert_allclose(tta, (plain + mirrored[:, ::-1]) / 2, atol=2e-3)
    assert not np.allclose(tta, plain, atol=2e-3)
