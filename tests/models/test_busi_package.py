"""The shipped breast ultrasound package: complete, its test split apart, its card true."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dicom_node.package.manifest import Measurement, load_package
from dicom_node.training.card import CARD_FILE
from dicom_node.training.data import read_split

PACKAGE = Path(__file__).resolve().parents[2] / "config" / "models" / "busi-lesion"


def test_package_codes_and_measurements() -> None:
    package = load_package(PACKAGE)
    assert package.name == "busi-lesion" and package.modalities == ("US",)
    (lesion,) = package.structures
    assert (lesion.category.value, lesion.type.value) == ("49755003", "4147007")
    assert lesion.anatomic_region is not None and lesion.anatomic_region.value == "76752008"
    assert set(package.measurements) == {Measurement.AREA, Measurement.DIAMETERS}
    assert package.weights.stat().st_size < 10e6


def test_test_split_is_apart_and_stratified() -> None:
    split = read_split(PACKAGE)
    train, validation, test = set(split.train), set(split.validation), set(split.test)
    assert not (train & test) and not (validation & test) and not (train & validation)
    assert len(train | validation | test) == 634
    by_class = Counter(c.split("_")[0] for c in test)
    assert by_class == {"benign": 54, "malignant": 24, "normal": 17}  # 15% of each class


def test_card_reports_the_held_out_dicom_figures() -> None:
    summary = json.loads((PACKAGE / "test" / "metrics.json").read_text())["summary"]
    split = read_split(PACKAGE)
    assert summary["cases"] == len(split.test)
    card = (PACKAGE / CARD_FILE).read_text()
    assert f"{summary['mean_dice']:.3f}" in card
    assert f"{summary['mean_iou']:.3f}" in card
    assert f"{summary['normal_false_positive_rate']:.0%}" in card
