"""The fixed test part of a split, findings from case ids, and the flat mask layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.common.errors import InputError
from dicom_node.training.data import list_cases, make_split, read_findings, read_masks

CASES = [f"benign_{i:03d}" for i in range(40)] + [f"normal_{i:03d}" for i in range(20)]


def test_test_part_is_stratified_fixed_and_apart() -> None:
    findings = read_findings(Path("/nonexistent"), r"^([a-z]+)_", CASES)
    assert findings["benign_001"] == "benign" and findings["normal_019"] == "normal"
    split = make_split(
        CASES, findings, validation_fraction=0.2, seed=1, test_fraction=0.25, test_seed=5
    )
    test = set(split.test)
    assert sum(c.startswith("benign") for c in test) == 10
    assert sum(c.startswith("normal") for c in test) == 5
    assert not test & (set(split.train) | set(split.validation))
    assert len(test | set(split.train) | set(split.validation)) == len(CASES)
    # with its own seed, the test part does not move when the validation seed or fraction do
    other = make_split(
        CASES, findings, validation_fraction=0.3, seed=7, test_fraction=0.25, test_seed=5
    )
    assert set(other.test) == test
    assert make_split(CASES, findings, seed=1).test == ()


def test_a_pattern_that_does_not_match_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="finding_pattern"):
        read_findings(Path("/nonexistent"), r"^(malignant)_", CASES)


def test_flat_mask_layout_for_one_structure(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:4, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "images" / "a_1.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a_1.png")
    assert list_cases(tmp_path, ["lesion"]) == ["a_1"]
    assert read_masks(tmp_path, "a_1", ["lesion"]).sum() == 6
    Image.fromarray(mask).save(tmp_path / "images" / "a_2.png")
    with pytest.raises(InputError, match="masks missing"):
        list_cases(tmp_path, ["lesion"])
