"""Training end to end on a few small real radiographs, the split, the config and augmentation."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dicom_node.common.errors import ConfigError, InputError
from dicom_node.models.networks import build_network
from dicom_node.package.manifest import load_package
from dicom_node.training.augment import AugmentConfig, build_augmentation
from dicom_node.training.config import load_train_config, parse_train_config
from dicom_node.training.data import make_split, read_split
from dicom_node.training.evaluate import evaluate
from dicom_node.training.loop import transfer_weights
from dicom_node.training.train import train
from tests.conftest import require_shared_data
from tests.factories import JSRT

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = REPO / "config" / "train-cxr.yaml"
STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
CASES = ("JPCLN001", "JPCLN002", "JPCLN003", "JPCNN002", "JPCNN003", "JPCNN004")

needs_jsrt = pytest.mark.shared_data("jsrt", "images")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six JSRT cases downsampled to 256 x 256 (1.4 mm pixels), with cases.csv."""
    require_shared_data("jsrt", "images")
    root = tmp_path_factory.mktemp("jsrt-tiny")
    (root / "images").mkdir()
    for case in CASES:
        with Image.open(JSRT / "images" / f"{case}.png") as im:
            im.convert("L").resize((256, 256), Image.BILINEAR).save(root / "images" / f"{case}.png")
        for s in STRUCTURES:
            (root / "masks" / s).mkdir(parents=True, exist_ok=True)
            with Image.open(JSRT / "masks" / s / f"{case}.png") as im:
                im.convert("L").resize((256, 256), Image.NEAREST).save(
                    root / "masks" / s / f"{case}.png"
                )
    shutil.copy(JSRT / "cases.csv", root / "cases.csv")
    return root


def tiny_config(epochs: int = 2) -> dict:
    doc = yaml.safe_load(TRAIN_CONFIG.read_text())
    doc["model"]["input"]["size"] = [64, 64]
    doc["model"]["network"] = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
    doc["training"].update(epochs=epochs, batch_size=4, spacing_mm=1.4, max_minutes=None)
    return doc


@pytest.fixture(scope="module")
def tiny_package(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "cxr-tiny"
    torch.manual_seed(0)
    result = train(tiny_data, parse_train_config(tiny_config()), out, progress=False)
    assert len(result.history) == 2
    return out


@needs_jsrt
def test_tiny_training_writes_a_loadable_complete_package(tiny_package: Path) -> None:
    package = load_package(tiny_package)
    assert package.name == "cxr-anatomy"
    assert [s.label for s in package.structures] == list(STRUCTURES)
    assert package.structures[0].type.value == "39607008"  # SCT Lung
    assert package.structures[0].type_modifier is not None
    assert package.structures[0].type_modifier.meaning == "Right"
    assert package.input_size == (64, 64)
    for name in ("MODEL_CARD.md", "training_curves.png", "split.json", "model.pt"):
        assert (tiny_package / name).is_file(), name
    assert package.weights.stat().st_size < 30e6
    state = torch.load(package.weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert set(package.metrics["structures"]) >= set(STRUCTURES)
    card = (tiny_package / "MODEL_CARD.md").read_text()
    assert "Shiraishi" in card and "van Ginneken" in card and "Jaccard" in card
    split = read_split(tiny_package)
    assert not set(split.train) & set(split.validation)
    assert split.test and not set(split.test) & (set(split.train) | set(split.validation))
    assert set(split.train) | set(split.validation) | set(split.test) == set(CASES)
    for part in ("validation", "test"):
        overlays = sorted(p.name for p in (tiny_package / part).glob("overlay_*.png"))
        assert overlays == ["overlay_best.png", "overlay_median.png", "overlay_worst.png"]
    # the test part is evaluated once, last; model.yaml holds its figures and the validation's
    assert package.metrics["test_cases"] == len(split.test)
    assert package.metrics["validation_cases"] == len(split.validation)
    assert set(package.metrics["validation"]) >= set(STRUCTURES)
    assert "## Held-out test figures" in card and "- test: 2 of 6 cases drawn first" in card


@needs_jsrt
def test_evaluate_runs_on_the_package(tiny_package: Path, tiny_data: Path, tmp_path: Path) -> None:
    result = evaluate(tiny_package, tiny_data, tmp_path, all_cases=True)
    assert result.cases == sorted(CASES)
    assert result.spacing_mm == 1.4  # from the package's metrics
    for label in STRUCTURES:
        assert 0.0 <= result.summary[label]["jaccard"] <= 1.0
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "metrics.txt").is_file()
    validation_only = evaluate(tiny_package, tiny_data)
    assert validation_only.cases == list(read_split(tiny_package).validation)
    test_only = evaluate(tiny_package, tiny_data, split="test")
    assert test_only.cases == list(read_split(tiny_package).test)


@needs_jsrt
def test_test_cases_choose_nothing_and_are_evaluated_once(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test-part case is trained on, nor used to choose the epoch (the validation loader),
    the postprocessing or anything else before the final evaluation of the test part."""
    import dicom_node.training.train as train_module

    seen: list[tuple[str, tuple[str, ...]]] = []
    cached, choose, evaluate_ = (
        train_module.CachedCases,
        train_module.select_postprocessing,
        train_module.evaluate,
    )

    def spy_cached(data_dir: Path, cases: Sequence[str], *args: Any, **kw: Any) -> Any:
        seen.append(("cache", tuple(cases)))
        return cached(data_dir, cases, *args, **kw)

    def spy_choose(package: Any, data_dir: Path, cases: Sequence[str], *a: Any, **kw: Any) -> Any:
        seen.append(("postprocessing", tuple(cases)))
        return choose(package, data_dir, cases, *a, **kw)

    def spy_evaluate(*args: Any, **kw: Any) -> Any:
        seen.append(("evaluate", tuple(kw["cases"])))
        return evaluate_(*args, **kw)

    monkeypatch.setattr(train_module, "CachedCases", spy_cached)
    monkeypatch.setattr(train_module, "select_postprocessing", spy_choose)
    monkeypatch.setattr(train_module, "evaluate", spy_evaluate)
    out = tmp_path / "pkg"
    train(tiny_data, parse_train_config(tiny_config(1)), out, progress=False, overlays=False)
    split = read_split(out)
    test = set(split.test)
    assert len(test) == 2
    assert [step for step, _ in seen] == [
        "cache",
        "cache",
        "postprocessing",
        "evaluate",
        "evaluate",
    ]
    before_test = seen[:-1]
    assert all(not set(cases) & test for _, cases in before_test), seen
    assert seen[0][1] == split.train and seen[1][1] == split.validation
    assert seen[2][1] == seen[3][1] == split.validation
    assert seen[-1] == ("evaluate", split.test)


@needs_jsrt
def test_evaluate_command_prints_progress_on_stderr(
    tiny_package: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.app.cli import main

    args = ["evaluate", "--model", str(tiny_package), "--data", str(tiny_data), "--all-cases"]
    assert main(args) == 0
    captured = capsys.readouterr()
    n = len(CASES)
    assert f"evaluate: 1/{n} cases, " in captured.err and "elapsed" in captured.err
    assert f"evaluate: {n}/{n} cases, " in captured.err
    assert "evaluate:" not in captured.out  # the table alone on stdout
    assert main([*args, "--no-progress"]) == 0
    assert "evaluate:" not in capsys.readouterr().err


@needs_jsrt
def test_init_fine_tunes_from_a_package_even_in_place(
    tiny_package: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    in_place = tmp_path / "ft"
    shutil.copytree(tiny_package, in_place)
    start = torch.load(in_place / "model.pt", weights_only=True)
    network = build_network(load_package(in_place))
    assert transfer_weights(network, start) == (len(start), len(start))
    doc = tiny_config(1)
    doc["training"]["seed"] = 1  # another random start than the package's, to tell them apart
    result = train(
        tiny_data,
        parse_train_config(doc),
        in_place,
        init=in_place,  # --init PACKAGE --out PACKAGE: the weights are read before writing
        progress=True,
        overlays=False,
    )
    err = capsys.readouterr().err
    assert "train: 1/1 epochs, " in err and "validation Dice" in err
    assert "train: loop done in " in err
    assert "postprocessing (" in err and "evaluate: " in err and " cases, " in err
    assert "from package cxr-anatomy" in (in_place / "MODEL_CARD.md").read_text()
    tuned = torch.load(result.package.weights, weights_only=True)
    # one epoch at a small learning rate moves the weights a little, not to a new random start
    key = next(k for k, v in start.items() if v.is_floating_point() and v.numel() > 100)
    drift = (tuned[key].float() - start[key].float()).abs().mean()
    assert drift < 0.5 * start[key].float().abs().mean()


def test_shipped_training_config_is_valid() -> None:
    config = load_train_config(TRAIN_CONFIG)
    assert config.model["name"] == "cxr-anatomy"
    assert config.training.spacing_mm == 0.35


def test_config_errors_name_the_key() -> None:
    doc = tiny_config()
    bad = copy.deepcopy(doc)
    bad["training"]["epoch"] = 3
    with pytest.raises(ConfigError, match="epoch"):
        parse_train_config(bad)
    bad = copy.deepcopy(doc)
    bad["augment"]["flip"] = True
    with pytest.raises(ConfigError, match="flip"):
        parse_train_config(bad)
    bad = copy.deepcopy(doc)
    bad["model"]["weights"] = "x.pt"
    with pytest.raises(ConfigError, match="weights"):
        parse_train_config(bad)


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    cases = [f"N{i:03d}" for i in range(50)] + [f"C{i:03d}" for i in range(100)]
    findings = {c: ("nodule" if c.startswith("N") else "no_nodule") for c in cases}
    a = make_split(cases, findings, validation_fraction=0.2, seed=7)
    b = make_split(list(reversed(cases)), findings, validation_fraction=0.2, seed=7)
    assert a == b
    assert len(a.validation) == 30
    assert sum(c.startswith("N") for c in a.validation) == 10
    assert not set(a.train) & set(a.validation)
    assert make_split(cases, findings, seed=8).validation != a.validation
    with pytest.raises(InputError):
        make_split(cases, findings, validation_fraction=1.5)


def _asymmetric_sample(size: int = 64) -> dict[str, torch.Tensor]:
    image = torch.zeros(1, size, size)
    label = torch.zeros(2, size, size)
    image[0, 20:44, 4:22] = 1.0  # a bright block on the image's left
    label[0, 20:44, 4:22] = 1.0
    label[1, 30:40, 40:56] = 1.0  # a second structure on the image's right
    return {"image": image, "label": label}


def test_augmentation_never_mirrors_left_and_right() -> None:
    config = AugmentConfig(
        rotate_deg=15, scale=0.15, translate=0.08, affine_prob=1.0, elastic_prob=1.0
    )
    pipeline = build_augmentation(config, (64, 64), seed=3)
    assert not any("flip" in type(t).__name__.lower() for t in pipeline.transforms)
    cols = torch.arange(64, dtype=torch.float32)
    for _ in range(40):
        out = pipeline(_asymmetric_sample())
        label = torch.as_tensor(out["label"])
        assert set(label.unique().tolist()) <= {0.0, 1.0}  # masks stay binary
        left = (label[0].sum(0) * cols).sum() / label[0].sum()
        right = (label[1].sum(0) * cols).sum() / label[1].sum()
        assert left < 32 < right, "a structure changed sides: augmentation mirrored the image"


def test_augmentation_changes_images_but_keeps_shapes() -> None:
    pipeline = build_augmentation(AugmentConfig(), (64, 64), seed=0)
    sample = _asymmetric_sample()
    outs = [pipeline(dict(sample)) for _ in range(5)]
    assert all(tuple(o["image"].shape) == (1, 64, 64) for o in outs)
    assert any(not np.allclose(np.asarray(o["image"]), sample["image"].numpy()) for o in outs)
