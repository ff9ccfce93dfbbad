"""3D training and evaluation: the NIfTI layout, the three-part split, training a tiny 3D
U-Net end to end with the la-lge config, and evaluating its held-out test cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from dicom_node.common.errors import InputError
from dicom_node.package.manifest import load_package
from dicom_node.training.cli import cmd_evaluate
from dicom_node.training.config import parse_train_config
from dicom_node.training.data import read_split
from dicom_node.training.evaluate import evaluate
from dicom_node.training.train import train
from dicom_node.training.volumes import (
    VolumeAugment,
    list_volume_cases,
    make_volume_split,
    masks_to_model,
    read_volume,
)

REPO = Path(__file__).resolve().parents[2]
LA_CONFIG = REPO / "config" / "train-la-lge.yaml"
N_CASES = 6


def write_case(root: Path, case: str, seed: int) -> None:
    """A 20 x 32 x 36 volume (z, y, x) at 1 mm: a bright ellipsoid (label 1) in noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:20, 0:32, 0:36]
    cz, cy, cx = 10 + rng.integers(-2, 3), 16 + rng.integers(-3, 4), 18 + rng.integers(-3, 4)
    inside = ((zz - cz) / 6) ** 2 + ((yy - cy) / 8) ** 2 + ((xx - cx) / 9) ** 2 <= 1
    image = np.clip(40 + 150 * inside + rng.normal(0, 15, inside.shape), 0, 255).astype(np.uint8)
    (root / case).mkdir(parents=True)
    for name, array in (("image.nii.gz", image), ("label.nii.gz", inside.astype(np.uint8))):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(itk, str(root / case / name))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("la-tiny")
    for i in range(N_CASES):
        write_case(root, f"case{i}", i)
    return root


def tiny_config() -> dict:
    doc = yaml.safe_load(LA_CONFIG.read_text())
    doc["model"]["input"].update(size=[8, 16, 16], spacing_mm=[2.0, 2.0, 2.0])
    doc["model"]["network"] = {"channels": [4, 8], "strides": [2], "num_res_units": 1}
    doc["training"].update(
        epochs=2, max_minutes=None, batch_size=2, validate_every=1, test_fraction=0.2
    )
    return doc


@pytest.fixture(scope="module")
def package_dir(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "la-tiny"
    result = train(volumes, parse_train_config(tiny_config()), out, progress=False)
    assert len(result.history) == 2
    return out


def test_split_holds_out_test_cases_first() -> None:
    cases = [f"c{i:02d}" for i in range(70)]
    split = make_volume_split(
        cases, test_fraction=0.2, test_seed=7, validation_fraction=0.15, seed=1
    )
    assert (len(split.test), len(split.validation), len(split.train)) == (14, 8, 48)
    assert not set(split.test) & (set(split.train) | set(split.validation))
    assert sorted(split.test + split.validation + split.train) == cases
    # The test cases do not depend on how the rest is split, nor on the order given.
    other = make_volume_split(
        cases[::-1], test_fraction=0.2, test_seed=7, validation_fraction=0.3, seed=2
    )
    assert other.test == split.test and other.validation != split.validation
    assert (
        make_volume_split(
            cases, test_fraction=0.2, test_seed=8, validation_fraction=0.15, seed=1
        ).test
        != split.test
    )


def test_layout_errors_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="image.nii.gz"):
        list_volume_cases(tmp_path)
    (tmp_path / "a").mkdir()
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp_path / "a" / "image.nii.gz"))
    with pytest.raises(InputError, match="label.nii.gz"):
        list_volume_cases(tmp_path)


def test_masks_follow_the_image_onto_the_model_grid(volumes: Path, package_dir: Path) -> None:
    package = load_package(package_dir)
    volume = read_volume(volumes, "case0", package)
    assert volume.masks.shape == (1, 20, 32, 36) and volume.spacing_zyx == (1.0, 1.0, 1.0)
    on_grid = masks_to_model(volume.masks, volume.placement)
    assert on_grid.shape == (1, 11, 17, 19)  # 2 mm from the first voxel centre past the last
    # the volume is kept within half a model voxel per side
    ratio = on_grid.sum() * 8 / volume.masks.sum()
    assert 0.85 < ratio < 1.15


def test_tiny_3d_training_writes_a_package_with_held_out_figures(package_dir: Path) -> None:
    package = load_package(package_dir)
    assert package.dims == 3 and package.input_size == (8, 16, 16)
    split = read_split(package_dir)
    assert len(split.test) == 1 and len(split.validation) == 1 and len(split.train) == 4
    doc = yaml.safe_load((package_dir / "model.yaml").read_text())
    metrics = doc["metrics"]
    assert metrics["test_cases"] == 1 and metrics["voxel_mm"] == 1.0
    figures = metrics["structures"]["left_atrium"]
    assert set(figures) >= {"dice", "jaccard", "hd95_mm", "asd_mm"}
    test_json = json.loads((package_dir / "test" / "metrics.json").read_text())
    assert test_json["cases"] == list(split.test)
    card = (package_dir / "MODEL_CARD.md").read_text()
    assert "Held-out test figures" in card and "HD95 (voxels)" in card
    assert (package_dir / "training_curves.png").is_file()


def test_evaluate_defaults_to_validation_and_takes_the_test_split(
    package_dir: Path, volumes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = read_split(package_dir)
    assert evaluate(package_dir, volumes).cases == list(split.validation)
    result = evaluate(package_dir, volumes, split="test")
    assert result.cases == list(split.test)
    assert 0.0 <= result.summary["left_atrium"]["dice"] <= 1.0
    import argparse

    args = argparse.Namespace(
        model=package_dir,
        data=volumes,
        out=None,
        all_cases=False,
        spacing_mm=None,
        no_progress=True,
        json=True,
        split="test",
        log_level="warning",
    )
    capsys.readouterr()
    assert cmd_evaluate(args) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["cases"] == list(split.test)


def test_3d_augment_refuses_2d_keys() -> None:
    doc = tiny_config()
    doc["augment"]["elastic_prob"] = 0.2
    with pytest.raises(Exception, match="elastic_prob"):
        parse_train_config(doc)
    assert VolumeAugment.from_dict({"gamma": [0.8, 1.2]}).gamma == (0.8, 1.2)


LA_STAGE2_CONFIG = REPO / "config" / "train-la-lge-stage2.yaml"


def test_la_lge_stage2_continues_the_shipped_package_on_its_split() -> None:
    """The stage-2 config (a training over several sittings from the shipped weights) draws
    the shipped split (so no stage trains on, or chooses with, a test case), keeps the
    network and input (so ``--init`` copies every tensor) and a newer version. (Its run
    finished into the shipped package, 1.2.0; the size of a committed checkpoint is
    test_resume's.)"""
    from dicom_node.training.config import load_train_config

    shipped = load_package(REPO / "config" / "models" / "la-lge")
    split = read_split(shipped.path)
    stage1, stage2 = load_train_config(LA_CONFIG), load_train_config(LA_STAGE2_CONFIG)
    for config in (stage1, stage2):
        s = config.training
        assert (s.test_fraction, s.test_seed) == (split.test_fraction, split.test_seed)
        assert (s.validation_fraction, s.split_seed) == (split.validation_fraction, split.seed)
    for key in ("name", "dims", "input", "network", "output", "structures"):
        assert stage2.model[key] == stage1.model[key], key

    def version(text: object) -> tuple[int, ...]:
        return tuple(int(p) for p in str(text).split("."))

    assert version(stage2.model["version"]) > version(stage1.model["version"])
    # the run was made as 1.1.0 (the version is part of its checkpoint's fingerprint) and its
    # end shipped as 1.2.0: the shipped package is stage 2's or later
    assert version(shipped.version) >= version(stage2.model["version"])
    assert stage2.training.checkpoint_minutes <= 10
