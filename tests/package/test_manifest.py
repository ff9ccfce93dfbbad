"""Model packages: a valid package loads as written; each invalid key is named in the error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.common.errors import ModelPackageError
from dicom_node.package.manifest import (
    MODEL_FILE,
    Activation,
    Applicability,
    Measurement,
    NormalizationKind,
    Postprocess,
    load_package,
)
from dicom_node.testing.random_package import CHEST_STRUCTURES, make_random_package


def test_random_package_round_trip(tmp_path: Path) -> None:
    package = make_random_package(tmp_path)
    assert package.path == tmp_path
    assert package.dims == 2
    assert package.input_size == (64, 64)
    assert package.spacing_mm is None
    assert package.modalities == ("CR", "DX", "CT", "MR")
    assert package.activation is Activation.SIGMOID
    assert package.out_channels == 5
    assert package.normalization.kind is NormalizationKind.PERCENTILE
    assert package.weights == tmp_path / "model.pt" and package.weights.stat().st_size > 0
    assert package.measurements == (Measurement.AREA, Measurement.CARDIOTHORACIC_RATIO)
    assert tuple(s.label for s in package.structures) == CHEST_STRUCTURES
    right_lung, left_lung, heart, right_clavicle, _ = package.structures
    assert right_lung.name == "Right lung"
    assert right_lung.category == codes.SCT.AnatomicalStructure
    assert right_lung.type == Code("39607008", "SCT", "Lung")
    assert right_lung.type_modifier == codes.SCT.Right
    assert left_lung.type_modifier == codes.SCT.Left
    assert heart.type == codes.SCT.Heart and heart.type_modifier is None
    assert right_clavicle.type == codes.SCT.Clavicle
    assert right_lung.postprocess == (Postprocess.LARGEST_COMPONENT, Postprocess.FILL_HOLES)
    colors = [s.color_rgb for s in package.structures]
    assert len(set(colors)) == len(colors)


def test_random_3d_softmax_package(tmp_path: Path) -> None:
    package = make_random_package(
        tmp_path, dims=3, structures=("heart",), activation="softmax", modalities=()
    )
    assert package.dims == 3
    assert package.input_size == (16, 32, 32)
    assert package.spacing_mm == (3.0, 1.5, 1.5)
    assert package.out_channels == 2
    assert package.modalities == ()
    assert package.measurements == (Measurement.VOLUME,)


def test_random_package_rejects_unknown_label(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown structures"):
        make_random_package(tmp_path, structures=("spleen",))


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return edit


def _delete(key: str) -> Edit:
    return lambda doc: doc.pop(key)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_delete("name"), "missing key 'name'"),
        (_delete("version"), "missing key 'version'"),
        (_delete("dims"), "missing key 'dims'"),
        (_delete("structures"), "missing key 'structures'"),
        (_delete("input"), "missing key 'input'"),
        (_set("dims", 4), "dims: must be 2 or 3"),
        (_set("input.size", [64]), "input.size"),
        (_set("input.size", [64, 0]), "input.size"),
        (_set("input.spacing_mm", [1.0, -1.0]), "input.spacing_mm"),
        (_set("input.normalization.kind", "minmax"), "input.normalization.kind"),
        (_set("output.activation", "relu"), "output.activation"),
        (_set("output.threshold", 1.5), "output.threshold"),
        (_set("structures", []), "structures: expected a non-empty list"),
        (_set("structures.0.type", "SCT.NoSuchOrgan"), r"structures\[0\].type"),
        (_set("structures.1.category", 42), r"structures\[1\].category"),
        (_set("structures.0.type_modifier", "XYZ.Right"), r"structures\[0\].type_modifier"),
        (_set("structures.2.color", [255, 0]), r"structures\[2\].color"),
        (_set("structures.2.color", [255, 0, 256]), r"structures\[2\].color"),
        (_set("structures.3.postprocess", ["smooth"]), r"structures\[3\].postprocess"),
        (_set("structures.1.label", "right_lung"), "labels must be unique"),
        (_set("structures.0", "right_lung"), r"structures\[0\]: expected a mapping"),
        (_set("weights", "missing.pt"), "weights: file"),
        (_set("modalities", "CT"), "modalities"),
        (_set("measurements", ["perimeter"]), "measurements"),
        (_set("network", [8, 16]), "network"),
        (_set("input.orientation", ["L"]), "input.orientation"),
        (_set("input.orientation", ["L", "R"]), "input.orientation"),
        (_set("input.orientation", ["X", "F"]), "input.orientation"),
        (_set("input.orientation", "L\\F"), "input.orientation"),
        (_set("applicability", ["PA"]), "applicability: expected a mapping"),
        (_set("applicability", {"view": ["PA"]}), "applicability: unknown key"),
        (_set("applicability", {"views": "PA"}), "applicability.views"),
        (_set("applicability", {"body_parts": [""]}), "applicability.body_parts"),
        (_set("applicability", {"species": [7]}), "applicability.species"),
    ],
)
def test_invalid_key_is_named(tmp_path: Path, edit: Edit, message: str) -> None:
    make_random_package(tmp_path)
    model_file = tmp_path / MODEL_FILE
    doc = yaml.safe_load(model_file.read_text())
    edit(doc)
    model_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelPackageError, match=message) as raised:
        load_package(tmp_path)
    assert str(raised.value).startswith(str(model_file))


def test_orientation_and_applicability_round_trip(tmp_path: Path) -> None:
    make_random_package(tmp_path)
    model_file = tmp_path / MODEL_FILE
    doc = yaml.safe_load(model_file.read_text())
    assert load_package(tmp_path).orientation is None  # optional: images used as stored
    doc["input"]["orientation"] = ["L", "F"]
    doc["applicability"] = {"views": ["pa", "AP"], "body_parts": ["CHEST"], "species": ["Human"]}
    model_file.write_text(yaml.safe_dump(doc))
    package = load_package(tmp_path)
    assert package.orientation == ("L", "F")
    assert package.applicability == Applicability(("PA", "AP"), ("CHEST",), ("human",))


def test_orientation_is_for_2d_models_only(tmp_path: Path) -> None:
    make_random_package(tmp_path, dims=3, structures=("heart",))
    model_file = tmp_path / MODEL_FILE
    doc = yaml.safe_load(model_file.read_text())
    doc["input"]["orientation"] = ["L", "F"]
    model_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelPackageError, match="input.orientation: only 2D models"):
        load_package(tmp_path)


def test_missing_or_unreadable_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="no model.yaml"):
        load_package(tmp_path)
    (tmp_path / MODEL_FILE).write_text("name: [unclosed")
    with pytest.raises(ModelPackageError, match="not valid YAML"):
        load_package(tmp_path)
    (tmp_path / MODEL_FILE).write_text("- a list\n- not a mapping\n")
    with pytest.raises(ModelPackageError, match="mapping at the top level"):
        load_package(tmp_path)


def test_code_as_mapping(tmp_path: Path) -> None:
    make_random_package(tmp_path, structures=("heart",))
    model_file = tmp_path / MODEL_FILE
    doc = yaml.safe_load(model_file.read_text())
    doc["structures"][0]["type"] = {"value": "80891009", "scheme": "SCT", "meaning": "Heart"}
    model_file.write_text(yaml.safe_dump(doc))
    assert load_package(tmp_path).structures[0].type == codes.SCT.Heart


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("input", "256", "input: expected a mapping"),
        ("output", [1], "output: expected a mapping"),
        ("metrics", [1], "metrics: expected a mapping"),
        ("dims", True, "dims: must be 2 or 3"),
    ],
)
def test_malformed_sections_raise_package_errors(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    folder = tmp_path / "pkg"
    make_random_package(folder)
    doc = yaml.safe_load((folder / "model.yaml").read_text())
    doc[key] = value
    (folder / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelPackageError, match=message):
        load_package(folder)


def test_non_numeric_normalization_is_a_package_error(tmp_path: Path) -> None:
    folder = tmp_path / "pkg"
    make_random_package(folder)
    doc = yaml.safe_load((folder / "model.yaml").read_text())
    doc["input"]["normalization"] = {"kind": "percentile", "lower": "abc"}
    (folder / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelPackageError, match="normalization.lower: expected a number"):
        load_package(folder)


def test_duplicate_keys_in_model_yaml_are_refused(tmp_path: Path) -> None:
    make_random_package(tmp_path)
    model_file = tmp_path / MODEL_FILE
    model_file.write_text(model_file.read_text() + "dims: 3\n")
    with pytest.raises(ModelPackageError, match=r"not valid YAML: duplicate key 'dims' on line"):
        load_package(tmp_path)
