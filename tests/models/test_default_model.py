"""The shipped default model still reaches its model card's figures on real validation cases.

The training run that wrote ``config/models/cxr-anatomy`` recorded every validation case's
figures in ``validation/metrics.json`` and their means in ``model.yaml`` and the model card.
Here five of those held-out cases are segmented again through the node's inference path and
must reproduce them within a small tolerance (other CPUs and BLAS libraries round differently).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.models.package import load_package
from dicom_node.training.card import CARD_FILE
from dicom_node.training.data import read_split
from dicom_node.training.evaluate import METRICS_FILE, evaluate
from tests.factories import JSRT

PACKAGE = Path(__file__).resolve().parents[2] / "config" / "models" / "cxr-anatomy"
N_CASES = 5
JACCARD_TOLERANCE = 0.01
HD95_TOLERANCE_MM = 1.0

needs_jsrt = pytest.mark.skipif(
    not (JSRT / "images").is_dir(),
    reason=f"JSRT radiographs not found at {JSRT}: the shipped model is checked against real "
    "validation cases from ../shared/data/jsrt (or set DICOM_NODE_SHARED_DATA)",
)


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((PACKAGE / "validation" / METRICS_FILE).read_text())


def test_package_is_complete_and_consistent(recorded: dict) -> None:
    package = load_package(PACKAGE)
    assert package.name == "cxr-anatomy"
    assert set(package.modalities) == {"CR", "DX"}
    assert package.weights.stat().st_size < 30e6
    assert (PACKAGE / CARD_FILE).is_file()
    validation = read_split(PACKAGE).validation
    assert recorded["cases"] == list(validation)
    for label, figures in package.metrics["structures"].items():
        assert figures["jaccard"] == pytest.approx(recorded["summary"][label]["jaccard"], abs=1e-4)
    card = (PACKAGE / CARD_FILE).read_text()
    lungs = package.metrics["structures"]["lungs"]["jaccard"]
    assert f"{lungs:.3f}" in card


@needs_jsrt
def test_shipped_model_reproduces_its_figures_on_validation_cases(recorded: dict) -> None:
    validation = list(read_split(PACKAGE).validation)
    step = max(1, len(validation) // N_CASES)
    cases = validation[::step][:N_CASES]
    result = evaluate(PACKAGE, JSRT, cases=cases)
    for case in cases:
        for label, figures in result.per_case[case].items():
            expected = recorded["per_case"][case][label]
            assert figures["jaccard"] == pytest.approx(
                expected["jaccard"], abs=JACCARD_TOLERANCE
            ), (
                case,
                label,
            )
            assert figures["hd95_mm"] == pytest.approx(expected["hd95_mm"], abs=HD95_TOLERANCE_MM)
