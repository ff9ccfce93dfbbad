"""The shipped chest model on radiographs stored mirrored, rotated, lateral, AP, of an animal.

Issue 6: a radiograph stored mirrored and correctly tagged Patient Orientation (0020,0020)
``R\\F`` got "Right lung" drawn on the patient's left lung and another cardiothoracic ratio;
the ratio was reported for lateral and AP views and for a dog. Here a held-out JSRT case goes
through the node's own path (files -> :func:`segment_series` -> SEG + SR), and the SEG is read
back from its DICOM encoding onto the stored pixels and compared with the expert masks moved
the way the image was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from dicom_node.common.errors import NotApplicableError
from dicom_node.models.inference import Segmenter
from dicom_node.outputs.seg import read_seg_masks, source_frame_keys
from dicom_node.package.manifest import Applicability, load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors, dciodvfy_path
from dicom_node.training.data import read_split
from dicom_node.work.segment import SegmentationResult, segment_series
from tests.conftest import require_shared_data
from tests.factories import JSRT, dx_from_array, jsrt_mask, write_files

PACKAGE = Path(__file__).resolve().parents[2] / "config" / "models" / "cxr-anatomy"
STRUCTURES = ("right_lung", "left_lung", "heart")
MIN_DICE = 0.9
CTR_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    require_shared_data()
    return Segmenter(load_package(PACKAGE), torch.device("cpu"))


@pytest.fixture(scope="module")
def case() -> str:
    return read_split(PACKAGE).validation[0]  # held out from training


@pytest.fixture(scope="module")
def png(case: str) -> np.ndarray:
    require_shared_data()
    return np.asarray(Image.open(JSRT / "images" / f"{case}.png").convert("L"))


def radiograph(
    pixels: np.ndarray, orientation: str | None = "L\\F", **tags: str
) -> pydicom.Dataset:
    ds = dx_from_array(np.ascontiguousarray(pixels))
    if orientation is None:
        del ds.PatientOrientation
    else:
        ds.PatientOrientation = orientation.split("\\")
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def run(
    datasets: list[pydicom.Dataset], segmenter: Segmenter, folder: Path
) -> list[SegmentationResult]:
    return segment_series(write_files(datasets, folder), segmenter)


def seg_masks(result: SegmentationResult) -> dict[str, np.ndarray]:
    """Each segment of the SEG, by Segment Label, on the stored pixel grid."""
    masks = read_seg_masks(result.seg, source_frame_keys(result.series.datasets))[0]
    return {
        str(s.SegmentLabel): masks[..., int(s.SegmentNumber) - 1]
        for s in result.seg.SegmentSequence
    }


def sr_notes(sr: pydicom.Dataset) -> list[str]:
    """The Comments of the SR's Qualitative Evaluations container (UMLS C0034375)."""
    return [
        str(text.TextValue)
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        for text in item.ContentSequence
        if text.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]


def ratio_lines(sr: pydicom.Dataset) -> list[np.ndarray]:
    """The SCOORD lines under the SR's cardiothoracic ratio value: heart, then thorax,
    as ``(2, 2)`` (column, row) points."""

    def walk(items: Sequence[pydicom.Dataset]) -> Iterator[pydicom.Dataset]:
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    (ratio,) = [
        i
        for i in walk(sr.ContentSequence)
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "CTR"
    ]
    return [
        np.asarray(i.GraphicData, dtype=float).reshape(-1, 2)
        for i in ratio.ContentSequence
        if i.ValueType == "SCOORD"
    ]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def ctr(result: SegmentationResult) -> float:
    ratio = result.measurements.cardiothoracic_ratio
    assert ratio is not None, sr_notes(result.sr)
    return ratio.value


@pytest.fixture(scope="module")
def as_displayed(
    png: np.ndarray, segmenter: Segmenter, tmp_path_factory: pytest.TempPathFactory
) -> SegmentationResult:
    (result,) = run([radiograph(png)], segmenter, tmp_path_factory.mktemp("pa"))
    return result


STORED: list[tuple[str, Callable[[np.ndarray], np.ndarray], str, str]] = [
    ("mirrored", lambda a: a[:, ::-1], "R\\F", "flipped left-right"),
    ("rotated a quarter turn", lambda a: np.rot90(a, 1), "F\\R", "transposed"),
]


@pytest.mark.parametrize(
    ("name", "store", "orientation", "done"), STORED, ids=[s[0] for s in STORED]
)
def test_stored_orientation_gives_the_same_anatomy_on_the_stored_pixels(
    name: str,
    store: Callable[[np.ndarray], np.ndarray],
    orientation: str,
    done: str,
    case: str,
    png: np.ndarray,
    segmenter: Segmenter,
    as_displayed: SegmentationResult,
    tmp_path: Path,
) -> None:
    (result,) = run([radiograph(store(png), orientation)], segmenter, tmp_path)
    segments = seg_masks(result)
    expert = {label: store(jsrt_mask(case, label)) for label in STRUCTURES}
    for label, name_ in zip(STRUCTURES, ("Right lung", "Left lung", "Heart"), strict=True):
        assert dice(segments[name_], expert[label]) > MIN_DICE, (name, label)
    if orientation == "R\\F":  # the patient's right is on the image's right
        columns = segments["Right lung"].shape[1]
        assert np.nonzero(segments["Right lung"])[1].mean() > columns / 2
        assert np.nonzero(segments["Left lung"])[1].mean() < columns / 2
    assert ctr(result) == pytest.approx(ctr(as_displayed), abs=CTR_TOLERANCE)
    # The heart's width line in the SR lies on the stored image, across the heart's outermost
    # pixels: horizontal on the patient, so along the columns of the mirrored image and along
    # the rows of the rotated one.
    heart_line = ratio_lines(result.sr)[0]
    rows, cols = np.nonzero(segments["Heart"])
    if orientation == "R\\F":
        assert sorted(heart_line[:, 0]) == [cols.min(), cols.max() + 1]
    else:
        assert sorted(heart_line[:, 1]) == [rows.min(), rows.max() + 1]
    (note,) = [n for n in sr_notes(result.sr) if "Patient Orientation" in n]
    assert done in note and orientation in note and "L\\F" in note and "mapped back" in note
    if dciodvfy_path() is not None:
        path = tmp_path / "sr.dcm"
        result.sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_pa_view_as_displayed_says_so_and_gets_a_ratio(as_displayed: SegmentationResult) -> None:
    assert 0.3 < ctr(as_displayed) < 0.7
    assert sr_notes(as_displayed.sr) == [
        "Patient Orientation (0020,0020) L\\F is the model's orientation; image used as stored"
    ]


def test_missing_orientation_is_assumed_and_said(
    png: np.ndarray, segmenter: Segmenter, tmp_path: Path
) -> None:
    (result,) = run([radiograph(png, None)], segmenter, tmp_path)
    (note,) = sr_notes(result.sr)
    assert "Patient Orientation (0020,0020) is absent" in note and "assumed" in note


def test_lateral_view_is_refused_by_the_chest_model(
    png: np.ndarray, segmenter: Segmenter, tmp_path: Path
) -> None:
    with pytest.raises(NotApplicableError, match="ViewPosition .* not LL"):
        run([radiograph(png, "A\\F", ViewPosition="LL")], segmenter, tmp_path)


def test_lateral_view_gets_no_ratio_and_the_sr_says_why(
    png: np.ndarray, segmenter: Segmenter, tmp_path: Path
) -> None:
    package = segmenter.package
    views = Applicability(("PA", "AP", "LL"), package.applicability.body_parts, ("human",))
    lateral_model = Segmenter(
        dataclasses.replace(package, applicability=views), torch.device("cpu")
    )
    (result,) = run([radiograph(png, "A\\F", ViewPosition="LL")], lateral_model, tmp_path)
    assert result.measurements.cardiothoracic_ratio is None
    notes = sr_notes(result.sr)
    assert any("Cardiothoracic ratio not reported" in n and "lateral view" in n for n in notes)
    assert any("no counterpart" in n for n in notes)  # A of a lateral is not the model's L


def test_ap_view_gets_no_ratio_and_the_sr_says_why(
    png: np.ndarray, segmenter: Segmenter, tmp_path: Path
) -> None:
    (result,) = run([radiograph(png, ViewPosition="AP")], segmenter, tmp_path)
    assert result.measurements.cardiothoracic_ratio is None
    assert any("is AP" in n and "magnifies the heart" in n for n in sr_notes(result.sr))


def test_non_human_radiograph_is_refused_or_gets_no_ratio(
    png: np.ndarray, segmenter: Segmenter, tmp_path: Path
) -> None:
    dog = radiograph(png, PatientSpeciesDescription="Canis lupus familiaris")
    with pytest.raises(NotApplicableError, match="human patients only"):
        run([dog], segmenter, tmp_path / "refused")
    any_species = dataclasses.replace(
        segmenter.package, applicability=Applicability(("PA", "AP"), (), ())
    )
    (result,) = run([dog], Segmenter(any_species, torch.device("cpu")), tmp_path / "accepted")
    assert result.measurements.cardiothoracic_ratio is None
    assert any("Canis lupus familiaris" in n and "for humans" in n for n in sr_notes(result.sr))


def test_lateral_beside_a_pa_in_one_series_is_skipped(
    png: np.ndarray, segmenter: Segmenter, as_displayed: SegmentationResult, tmp_path: Path
) -> None:
    pa = radiograph(png)
    lateral = radiograph(png, "A\\F", ViewPosition="LL")
    lateral.StudyInstanceUID, lateral.SeriesInstanceUID = pa.StudyInstanceUID, pa.SeriesInstanceUID
    (result,) = run([pa, lateral], segmenter, tmp_path)
    assert result.series.sop_instance_uids == (pa.SOPInstanceUID,)
    assert ctr(result) == pytest.approx(ctr(as_displayed), abs=1e-9)
    assert any(
        n.startswith("Not measured") and lateral.SOPInstanceUID in n for n in sr_notes(result.sr)
    )
