"""Crop stages (``refine:``): the crop geometry, the manifest's checks, and a package whose
crop stage replaces a structure's probabilities inside its crop, mirrored where it says.

The networks are TorchScript modules whose answers are known from their input, so that each
assertion says where the probabilities must be, pixel by pixel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.models.inference import Segmenter
from dicom_node.models.refine import CropBox, crop_box, cut_crop, refine_frame
from dicom_node.package.manifest import load_package
from dicom_node.training.config import TrainSettings
from dicom_node.training.crops import write_crops
from dicom_node.training.data import Split, read_split
from dicom_node.training.train import draw_split


class Bright(torch.nn.Module):
    """Every output channel: "found" where the (normalised) input is bright."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 0.5).repeat(1, self.channels, 1, 1) * 40


class LeftHalf(torch.nn.Module):
    """One channel: "found" on the left half of the input, whatever it shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(x.shape[-1], device=x.device)
        left = (cols < x.shape[-1] // 2).to(x.dtype) * 2 - 1
        return (left * 20).expand(x.shape[0], 1, x.shape[-2], x.shape[-1]).contiguous()


def _torchscript_package(folder: Path, module: torch.nn.Module, doc: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    torch.jit.script(module).save(str(folder / "model.ts"))
    base = {
        "name": folder.name,
        "version": "1.0.0",
        "dims": 2,
        "input": {"size": [64, 64], "normalization": {"kind": "percentile"}},
        "network": {"kind": "torchscript", "file": "model.ts"},
        "output": {"activation": "sigmoid", "threshold": 0.5},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump({**base, **doc}))
    return folder


def _structure(label: str) -> dict[str, Any]:
    return {
        "label": label,
        "name": label,
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Clavicle",
    }


REFINE = [{"structures": ["a", "b"], "package": "crop", "mirror": ["b"], "margin": 0.1}]


def _cascade(tmp_path: Path, refine: Any = REFINE, sub: dict[str, Any] | None = None) -> Path:
    """A parent finding ``a``, ``b`` and ``c`` where the image is bright, with the crop stage
    ``refine`` (its package ``crop``: the left half of every crop)."""
    parent = tmp_path / "parent"
    _torchscript_package(
        parent,
        Bright(3),
        {"structures": [_structure("a"), _structure("b"), _structure("c")], "refine": refine},
    )
    _torchscript_package(
        parent / "crop",
        LeftHalf(),
        {"input": {"size": [32, 32]}, "structures": [_structure("crop")], **(sub or {})},
    )
    return parent


def _image() -> np.ndarray:
    """128 x 128: a bright bar (rows 40-60, columns 30-90) and a small bright square far from it."""
    image = np.zeros((128, 128), np.float32)
    image[40:61, 30:91] = 255
    image[100:106, 100:106] = 255
    return image


def test_the_crop_is_a_square_about_the_largest_component_clipped_to_the_image() -> None:
    mask = np.zeros((128, 128), bool)
    mask[40:61, 30:91] = True  # 21 x 61
    mask[100:103, 100:103] = True  # smaller: not what the crop is about
    # side 61 * 1.2 = 73.2 -> 73, about the centre (50.5, 60.5)
    assert crop_box(mask, 0.1) == CropBox(top=14, left=24, bottom=87, right=97)
    # at the border: clipped, not shifted
    edge = np.zeros((128, 128), bool)
    edge[0:10, 0:40] = True
    assert crop_box(edge, 0.5) == CropBox(top=0, left=0, bottom=45, right=60)  # side 80
    assert crop_box(np.zeros((8, 8), bool), 0.2) is None

    image = np.arange(16.0).reshape(4, 4)
    box = CropBox(1, 0, 3, 3)
    assert cut_crop(image, box, False).tolist() == [[4, 5, 6], [8, 9, 10]]
    assert cut_crop(image, box, True).tolist() == [[6, 5, 4], [10, 9, 8]]


def test_refine_frame_replaces_inside_the_crop_and_mirrors_back() -> None:
    image = _image()
    probs = np.repeat((image > 0)[..., None], 3, axis=-1).astype(np.float32)
    seen: list[np.ndarray] = []

    def predict(stage: Any, crops: Any) -> list[np.ndarray]:
        seen.extend(crops)
        out = []
        for crop in crops:
            left = np.zeros(crop.shape, np.float32)
            left[:, : crop.shape[1] // 2] = 1
            out.append(left)
        return out

    class Stage:
        structures, mirror, margin = ("a", "b"), ("b",), 0.1

    class Package:
        structures = tuple(type("S", (), {"label": x})() for x in "abc")
        threshold = 0.5
        refine = (Stage(),)

    refined = refine_frame(image, probs, Package(), predict)  # type: ignore[arg-type]
    box = CropBox(top=14, left=24, bottom=87, right=97)  # as above
    # both crops went to the network in one call, b's mirrored
    assert len(seen) == 2
    assert np.array_equal(seen[0], image[14:87, 24:97])
    assert np.array_equal(seen[1], image[14:87, 24:97][:, ::-1])
    a, b, c = refined[..., 0], refined[..., 1], refined[..., 2]
    assert a[50, 30] == 1 and a[50, 90] == 0 and b[50, 30] == 0 and b[50, 90] == 1
    # outside the crop nothing is left of a and b; c was not refined
    assert a[103, 103] == 0 and b[103, 103] == 0 and c[103, 103] == 1
    assert a[box.top - 1, 30] == 0 and a.sum() == 73 * 36
    assert np.array_equal(c, probs[..., 2])


def test_a_package_with_a_crop_stage_runs_it_on_the_node_path(tmp_path: Path) -> None:
    parent = _cascade(tmp_path)
    package = load_package(parent)
    assert [s.structures for s in package.refine] == [("a", "b")]
    segmenter = Segmenter(package, torch.device("cpu"))
    segmenter.warm_up()
    probs = segmenter.predict_image(_image())
    a, b, c = probs[..., 0], probs[..., 1], probs[..., 2]
    # box rows 14-86, columns 24-96: a on its left half, b (mirrored) on its right half
    assert a[50, 35] > 0.9 and a[50, 85] < 0.1 and a[20, 35] > 0.9
    assert b[50, 35] < 0.1 and b[50, 85] > 0.9
    assert a[103, 103] < 0.1 and b[103, 103] < 0.1 and a[5, 35] < 0.1
    # c is the parent's alone: the bar and the square, nothing else
    assert c[103, 103] > 0.9 and c[50, 35] > 0.9 and c[20, 35] < 0.1


def test_a_crop_network_with_more_than_one_channel_fails_its_warm_up(tmp_path: Path) -> None:
    parent = _cascade(tmp_path)
    torch.jit.script(Bright(2)).save(str(parent / "crop" / "model.ts"))
    segmenter = Segmenter(load_package(parent), torch.device("cpu"))
    with pytest.raises(ModelPackageError, match=r"crop stage crop gives \(2, 32, 32\)"):
        segmenter.warm_up()


@pytest.mark.parametrize(
    ("refine", "sub", "words"),
    [
        ([{"structures": ["x"], "package": "crop"}], None, "not structures of this package"),
        ([{"structures": ["a"], "package": "crop", "mirror": ["b"]}], None, "mirror"),
        ([{"structures": ["a"], "package": "../parent"}], None, "sub-folder"),
        ([{"structures": ["a"], "package": "crop", "margin": 3}], None, "margin"),
        ([{"structures": ["a"], "package": "crop", "pad": 1}], None, "unknown keys"),
        (
            [{"structures": ["a"], "package": "crop"}, {"structures": ["a"], "package": "crop"}],
            None,
            "one stage only",
        ),
        (
            [{"structures": ["a"], "package": "crop"}],
            {"structures": [_structure("x"), _structure("y")]},
            "one structure",
        ),
        ([{"structures": ["a"], "package": "crop"}], {"dims": 3}, "input.size"),
        ([], None, "non-empty list"),
    ],
)
def test_a_bad_crop_stage_is_refused_with_what_to_fix(
    tmp_path: Path, refine: Any, sub: dict[str, Any] | None, words: str
) -> None:
    parent = _cascade(tmp_path, refine, sub)
    with pytest.raises(ModelPackageError, match=words):
        load_package(parent)


def _jsrt_like(folder: Path) -> Path:
    """A data folder of 6 cases with an 'a' and a 'b' mask; case 5 has no 'b'."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / "masks" / label).mkdir(parents=True)
    (folder / "images").mkdir()
    for i in range(6):
        image = rng.integers(0, 256, (96, 96), dtype=np.uint8)
        Image.fromarray(image).save(folder / "images" / f"case{i}.png")
        a = np.zeros((96, 96), np.uint8)
        a[10:20, 10:40] = 255
        b = np.zeros((96, 96), np.uint8)
        if i != 5:
            b[10:20, 60:90] = 255
        Image.fromarray(a).save(folder / "masks" / "a" / f"case{i}.png")
        Image.fromarray(b).save(folder / "masks" / "b" / f"case{i}.png")
    return folder


def test_crops_keep_the_package_split_and_leave_its_test_cases_out(tmp_path: Path) -> None:
    data = _jsrt_like(tmp_path / "data")
    model = _cascade(tmp_path / "m", refine=None)
    Split(
        train=("case0", "case1", "case5"),
        validation=("case2",),
        seed=0,
        validation_fraction=0.25,
        stratified_by=None,
        test=("case3", "case4"),
    ).write(model)
    crops = write_crops(data, model, ["a", "b"], ["b"], 0.1, "crop", tmp_path / "crops")
    assert crops.train == ("case0__a", "case0__b", "case1__a", "case1__b", "case5__a")
    assert crops.validation == ("case2__a", "case2__b")
    written = sorted(p.stem for p in (tmp_path / "crops" / "images").glob("*.png"))
    assert not any(p.startswith(("case3", "case4")) for p in written)
    # the crop of b is the image's, mirrored, and its mask came along
    image = np.asarray(Image.open(data / "images" / "case0.png"))
    mask = np.asarray(Image.open(data / "masks" / "b" / "case0.png")) > 127
    box = crop_box(mask, 0.1)
    assert box is not None
    crop = np.asarray(Image.open(tmp_path / "crops" / "images" / "case0__b.png"))
    assert np.array_equal(crop, image[box.top : box.bottom, box.left : box.right][:, ::-1])
    crop_mask = np.asarray(Image.open(tmp_path / "crops" / "masks" / "crop" / "case0__b.png"))
    assert crop_mask.max() == 255 and crop_mask.shape == crop.shape
    # training takes the folder's split, whatever the config's fractions say
    split = draw_split(tmp_path / "crops", ["crop"], TrainSettings(validation_fraction=0.5))
    assert split.train == crops.train and split.validation == crops.validation
    assert read_split(tmp_path / "crops").test == ()

    # a split.json naming a case the folder does not have is refused, not half-used
    bad = json.loads((tmp_path / "crops" / "split.json").read_text())
    bad["validation"] = [*bad["validation"], "case9__a"]
    (tmp_path / "crops" / "split.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="lists cases without an image"):
        draw_split(tmp_path / "crops", ["crop"], TrainSettings())

    with pytest.raises(InputError, match="already holds"):
        write_crops(data, model, ["a"], [], 0.1, "crop", tmp_path / "crops")
    with pytest.raises(InputError, match="--structures"):
        write_crops(data, model, ["z"], [], 0.1, "crop", tmp_path / "other")


def test_model_check_names_the_crop_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.app.cli import main

    parent = _cascade(tmp_path)
    assert main(["model", "check", str(parent), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "crop stage: a, b again on crops (margin 0.1, b mirrored) by crop/ (crop 1.0.0" in out
    assert "ran once on zeros [1, 64, 64]: ok" in out
