"""The shipped default model: its split keeps the test part apart, nothing was chosen on it,
and it still reaches its model card's figures on real cases.

The training run that wrote ``config/models/cxr-anatomy`` drew a test part first (its own
seed), chose the epoch and the postprocessing on the validation cases only, and then
evaluated the test part once: every case's figures are in ``validation/metrics.json`` and
``test/metrics.json``, their means in ``model.yaml`` and the model card. Here a few of those
cases are segmented again through the node's inference path and must reproduce them within a
small tolerance (other CPUs and BLAS libraries round differently).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dicom_node.package.manifest import load_package
from dicom_node.training.card import CARD_FILE
from dicom_node.training.config import load_train_config
from dicom_node.training.data import list_cases, read_split
from dicom_node.training.evaluate import evaluate
from dicom_node.training.results import METRICS_FILE
from dicom_node.training.train import draw_split
from tests.factories import JSRT

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "config" / "models" / "cxr-anatomy"
#: The training stages of the whole-image network, in order: each ``--init`` from the package of
#: the one before; the last wrote the shipped package's network (1.2.0).
STAGE_CONFIGS = (
    REPO / "config" / "train-cxr-base.yaml",
    REPO / "config" / "train-cxr.yaml",
    REPO / "config" / "train-cxr-stage2.yaml",
)
#: The crop stages (``refine:``) added in 1.3.0 and 1.4.0, trained on crops of the same split:
#: their structures and training configs.
CROP_CONFIGS = {
    ("right_clavicle", "left_clavicle"): REPO / "config" / "train-cxr-clavicle-crop.yaml",
    ("heart",): REPO / "config" / "train-cxr-heart-crop.yaml",
}
#: The package version the crop stages made of the last stage's.
SHIPPED_VERSION = "1.4.0"
N_CASES = 4
JACCARD_TOLERANCE = 0.01
HD95_TOLERANCE_MM = 1.0

#: The shipped model is checked against real held-out cases of ../shared/data/jsrt.
needs_jsrt = pytest.mark.shared_data("jsrt", "images")


def _recorded(part: str) -> dict:
    return json.loads((PACKAGE / part / METRICS_FILE).read_text())


def _training() -> dict:
    """The ``training:`` record of ``model.yaml`` (what ``dicom-node train`` wrote)."""
    return yaml.safe_load((PACKAGE / "model.yaml").read_text())["training"]


def test_package_is_complete_and_consistent() -> None:
    package = load_package(PACKAGE)
    assert package.name == "cxr-anatomy"
    assert set(package.modalities) == {"CR", "DX"}
    assert package.weights.stat().st_size < 30e6
    assert (PACKAGE / CARD_FILE).is_file()
    split = read_split(PACKAGE)
    validation, test = _recorded("validation"), _recorded("test")
    assert validation["cases"] == list(split.validation)
    assert test["cases"] == list(split.test)
    # model.yaml: the test figures are the package's figures, the validation ones beside them
    assert package.metrics["test_cases"] == len(split.test)
    assert package.metrics["validation_cases"] == len(split.validation)
    for label, figures in package.metrics["structures"].items():
        assert figures["jaccard"] == pytest.approx(test["summary"][label]["jaccard"], abs=1e-4)
    for label, figures in package.metrics["validation"].items():
        assert figures["jaccard"] == pytest.approx(
            validation["summary"][label]["jaccard"], abs=1e-4
        )
    card = (PACKAGE / CARD_FILE).read_text()
    test_section = card.split("## Held-out test figures", 1)[1].split("## Validation figures")[0]
    for group in ("lungs", "heart", "clavicles"):
        jaccard = package.metrics["structures"][group]["jaccard"]
        assert f"| {group} | {jaccard:.3f} ± " in test_section


def test_test_part_is_apart_from_training_and_validation() -> None:
    """No test case in training or validation, in the shipped split and in the split that the
    configs of every training stage draw (the earlier stages, the ``--init`` packages, trained
    on the same training part, so none saw a test case either)."""
    split = read_split(PACKAGE)
    test = set(split.test)
    assert len(test) >= 40
    assert not test & set(split.train), sorted(test & set(split.train))
    assert not test & set(split.validation), sorted(test & set(split.validation))
    assert not set(split.train) & set(split.validation)
    before = load_train_config(STAGE_CONFIGS[-2]).model
    assert _training()["init"] == f"{before['name']} {before['version']}"
    shipped = load_package(PACKAGE)
    assert load_train_config(STAGE_CONFIGS[-1]).model["version"] == "1.2.0"
    assert shipped.version == SHIPPED_VERSION and shipped.refine
    for path in STAGE_CONFIGS:
        s = load_train_config(path).training
        assert (s.test_fraction, s.test_seed) == (split.test_fraction, split.test_seed), path
        assert (s.validation_fraction, s.split_seed) == (split.validation_fraction, split.seed)


@needs_jsrt
def test_recorded_split_is_the_one_the_config_draws() -> None:
    """The test part was drawn first with its own seed from all cases of the folder: the
    config redraws exactly the recorded parts (so no case moved between them by hand)."""
    split = read_split(PACKAGE)
    settings = load_train_config(STAGE_CONFIGS[1]).training
    labels = [s.label for s in load_package(PACKAGE).structures]
    cases = list_cases(JSRT, labels)
    assert set(split.train) | set(split.validation) | set(split.test) == set(cases)
    drawn = draw_split(JSRT, labels, settings)
    assert drawn.test == split.test
    assert (drawn.train, drawn.validation) == (split.train, split.validation)


def test_the_crop_stages_saw_no_test_case() -> None:
    """Each crop stage trained on crops of the package's training cases and chose its epoch on
    crops of its validation cases; no test case was cropped."""
    package = load_package(PACKAGE)
    assert {stage.structures for stage in package.refine} == set(CROP_CONFIGS)
    split = read_split(PACKAGE)
    for stage in package.refine:
        crops = read_split(stage.package.path)
        assert crops.test == ()
        assert {c.split("__")[0] for c in crops.train} == set(split.train)
        assert {c.split("__")[0] for c in crops.validation} == set(split.validation)
        config = load_train_config(CROP_CONFIGS[stage.structures])
        assert config.model["name"] == stage.package.name
    clavicles = next(s for s in package.refine if "left_clavicle" in s.structures)
    assert clavicles.mirror == ("left_clavicle",)
    # the card's validation figure for the stage is what validation/metrics.json holds
    card = (PACKAGE / CARD_FILE).read_text()
    clavicles = _recorded("validation")["summary"]["clavicles"]["jaccard"]
    assert f"cases reach clavicles {clavicles:.3f}" in card


def test_card_choices_were_measured_on_validation_cases_only() -> None:
    """The postprocessing table of the card was measured on the validation cases: for each
    structure, the row of the kept combination is the validation mean Jaccard of
    ``validation/metrics.json`` (evaluated on exactly ``split.validation``), not the test one;
    and the best epoch was chosen by validation Dice (``history.json``). The table is the
    whole-image network's: the structures a crop stage refines are not compared (their
    validation figures are the crop stage's, see the test above)."""
    package = load_package(PACKAGE)
    refined = {label for stage in package.refine for label in stage.structures}
    card = (PACKAGE / CARD_FILE).read_text()
    validation, test = _recorded("validation"), _recorded("test")
    labels = [s.label for s in package.structures]
    rows = {}
    for line in card.splitlines():
        found = re.match(r"^\| ([a-z_+]+) \| (\d\.\d{5} / .*)\|$", line)
        if found:
            cells = [c.strip() for c in found.group(2).split("|")]
            rows[found.group(1)] = [float(c.split(" / ")[0]) for c in cells]
    assert "none" in rows, "postprocessing table missing from the card"
    for i, structure in enumerate(package.structures):
        if structure.label in refined:
            continue
        kept = "+".join(p.value for p in structure.postprocess) or "none"
        measured = rows[kept][i]
        assert measured == pytest.approx(validation["summary"][labels[i]]["jaccard"], abs=2e-5), (
            structure.label
        )
        assert measured != pytest.approx(test["summary"][labels[i]]["jaccard"], abs=2e-5)
    history = json.loads((PACKAGE / "history.json").read_text())
    scores = [sum(h["val_dice"].values()) / len(h["val_dice"]) for h in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i)) + 1
    assert _training()["best_epoch"] == best == package.metrics["best_epoch"]


def test_dicom_path_figures_are_the_test_cases() -> None:
    """``test/dicom_path.json`` (``benchmarks.heldout_cxr``) scored exactly the test part, and
    its figures are the card's DICOM-path figures."""
    doc = json.loads((PACKAGE / "test" / "dicom_path.json").read_text())
    assert doc["cases"] == list(read_split(PACKAGE).test)
    card = (PACKAGE / CARD_FILE).read_text()
    for group in ("lungs", "heart", "clavicles"):
        assert f"{doc['summary'][group]['jaccard']:.3f}" in card, group


@needs_jsrt
@pytest.mark.parametrize("part", ["validation", "test"])
def test_shipped_model_reproduces_its_figures(part: str) -> None:
    recorded = _recorded(part)
    split = read_split(PACKAGE)
    chosen = list(split.validation if part == "validation" else split.test)
    step = max(1, len(chosen) // N_CASES)
    cases = chosen[::step][:N_CASES]
    result = evaluate(PACKAGE, JSRT, cases=cases)
    for case in cases:
        for label, figures in result.per_case[case].items():
            expected = recorded["per_case"][case][label]
            assert figures["jaccard"] == pytest.approx(
                expected["jaccard"], abs=JACCARD_TOLERANCE
            ), (case, label)
            assert figures["hd95_mm"] == pytest.approx(expected["hd95_mm"], abs=HD95_TOLERANCE_MM)
