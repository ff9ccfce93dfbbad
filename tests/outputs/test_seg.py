"""DICOM SEG: build, validate with dciodvfy, read back and compare with what was meant."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import dicom_node
from dicom_node.common.errors import InputError
from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.seg import (
    build_seg,
    code_string,
    read_seg_masks,
    source_frame_keys,
)
from dicom_node.package.manifest import ModelPackage
from dicom_node.testing.dciodvfy import ValidatorNotFoundError, dciodvfy_errors
from tests.conftest import require_shared_data
from tests.factories import SHARED_DATA, dx_from_array
from tests.outputs.conftest import projection_series

REFERENCE = SHARED_DATA / "reference"

#: Skipped with the reason without dciodvfy; failed under DICOM_NODE_REQUIRE_PEERS=1.
needs_dciodvfy = pytest.mark.needs_tool("dciodvfy")


def make_seg(series: ImageSeries, masks: np.ndarray, package: ModelPackage) -> hd.seg.Segmentation:
    series_uid, sop_uid = output_uids(
        series.series_instance_uid, package.name, package.version, "seg", series.sop_instance_uids
    )
    return build_seg(series, masks, package, series_uid=series_uid, sop_uid=sop_uid)


def save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def dx_seg(
    jsrt_case: tuple[ImageSeries, np.ndarray],
    chest_package: ModelPackage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    series, masks = jsrt_case
    return save(make_seg(series, masks, chest_package), tmp_path_factory.mktemp("seg") / "dx.dcm")


@pytest.fixture(scope="module")
def ct_seg(
    ct_case: tuple[ImageSeries, np.ndarray],
    ct_package: ModelPackage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    series, masks = ct_case
    return save(make_seg(series, masks, ct_package), tmp_path_factory.mktemp("seg") / "ct.dcm")


def check_segments(seg: pydicom.Dataset, package: ModelPackage) -> None:
    """Segment Sequence says what the package says."""
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == len(package.structures)
    for number, (item, structure) in enumerate(
        zip(seg.SegmentSequence, package.structures, strict=True), start=1
    ):
        assert item.SegmentNumber == number
        assert item.SegmentLabel == structure.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (
            structure.category.value,
            structure.category.scheme_designator,
        )
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        assert (type_item.CodeValue, type_item.CodingSchemeDesignator) == (
            structure.type.value,
            structure.type.scheme_designator,
        )
        if structure.type_modifier is None:
            assert "SegmentedPropertyTypeModifierCodeSequence" not in type_item
        else:
            modifier = type_item.SegmentedPropertyTypeModifierCodeSequence[0]
            assert modifier.CodeValue == structure.type_modifier.value
            assert modifier.CodeMeaning == structure.type_modifier.meaning
        expected_lab = hd.color.CIELabColor.from_rgb(*structure.color_rgb).value
        assert tuple(item.RecommendedDisplayCIELabValue) == tuple(expected_lab)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == package.name
        assert algorithm.AlgorithmVersion == package.version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert item.TrackingID == structure.label
    assert seg.Manufacturer == "dicom-node"
    assert seg.SoftwareVersions == dicom_node.__version__
    assert seg.ContentLabel == code_string(package.name)


def referenced_instances(seg: pydicom.Dataset) -> list[str]:
    return [
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    ]


# --- DX: the JSRT radiograph with its five overlapping expert masks -----------------------


def test_dx_seg_round_trip(
    dx_seg: Path, jsrt_case: tuple[ImageSeries, np.ndarray], chest_package: ModelPackage
) -> None:
    series, masks = jsrt_case
    seg = pydicom.dcmread(dx_seg)
    check_segments(seg, chest_package)
    assert int(seg.NumberOfFrames) == 5  # one frame per segment, none omitted
    assert referenced_instances(seg) == list(series.sop_instance_uids)
    assert seg.PatientOrientation == series.datasets[0].PatientOrientation
    assert "FrameOfReferenceUID" not in seg
    back = read_seg_masks(seg, source_frame_keys(series.datasets))
    assert back.shape == masks.shape
    for segment in range(masks.shape[-1]):
        assert np.array_equal(back[..., segment], masks[..., segment]), segment
    assert (masks.sum(axis=-1) > 1).any()  # the test data does overlap


def test_dx_seg_agrees_with_highdicom_reader(
    dx_seg: Path, jsrt_case: tuple[ImageSeries, np.ndarray]
) -> None:
    """highdicom's own reader reads the SEG of a radiograph (no Slice Thickness, so no Pixel
    Measures Sequence) as written."""
    series, masks = jsrt_case
    seg = hd.seg.segread(dx_seg)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), combine_segments=False
    )
    assert np.array_equal(pixels.astype(bool), masks)


def test_same_input_same_uids(
    jsrt_case: tuple[ImageSeries, np.ndarray], chest_package: ModelPackage
) -> None:
    series, masks = jsrt_case
    first, second = (make_seg(series, masks, chest_package) for _ in range(2))
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.DimensionOrganizationSequence[0].DimensionOrganizationUID == (
        second.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )
    assert [s.TrackingUID for s in first.SegmentSequence] == [
        s.TrackingUID for s in second.SegmentSequence
    ]
    assert len({s.TrackingUID for s in first.SegmentSequence}) == 5
    assert first.SeriesNumber == 1001  # 1000 + the source's Series Number


@needs_dciodvfy
@pytest.mark.peers
def test_dx_seg_valid(dx_seg: Path) -> None:
    assert dciodvfy_errors(dx_seg) == []


def test_dx_seg_has_a_plane_orientation(dx_seg: Path) -> None:
    """OHIF's SEG loader reads Image Orientation (Patient) from the Plane Orientation
    functional group, which highdicom leaves out without a Frame of Reference."""
    seg = pydicom.dcmread(dx_seg)
    assert "FrameOfReferenceUID" not in seg
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@needs_dciodvfy
@pytest.mark.peers
def test_dciodvfy_reports_missing_patient_orientation(dx_seg: Path, tmp_path: Path) -> None:
    """The validator finds what highdicom alone leaves out on a DX SEG: Patient Orientation,
    Type 2C when no Image Orientation (Patient) is given (neither at the top level nor in the
    Plane Orientation functional group)."""
    ds = pydicom.dcmread(dx_seg)
    del ds.PatientOrientation
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    errors = dciodvfy_errors(save(ds, tmp_path / "broken.dcm"))
    assert any("PatientOrientation" in e for e in errors), errors


# --- CT: a synthetic series, one segment filled, one empty -----------------------------------


def test_ct_seg_round_trip(
    ct_seg: Path, ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    seg = pydicom.dcmread(ct_seg)
    check_segments(seg, ct_package)
    assert sorted(referenced_instances(seg)) == sorted(series.sop_instance_uids)
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    # Empty frames are omitted: one frame per slice where the liver is, none for the kidney.
    assert int(seg.NumberOfFrames) == int(masks[..., 0].any(axis=(1, 2)).sum())
    back = read_seg_masks(seg, source_frame_keys(series.datasets))
    assert np.array_equal(back, masks)
    reader = hd.seg.segread(ct_seg)
    pixels = reader.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids),
        combine_segments=False,
        skip_overlap_checks=True,
    )
    assert np.array_equal(pixels.astype(bool), masks)


def test_all_empty_masks_still_make_a_seg(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    empty = np.zeros_like(masks)
    seg = make_seg(series, empty, ct_package)
    assert np.array_equal(read_seg_masks(seg, source_frame_keys(series.datasets)), empty)


def test_masks_must_match(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    with pytest.raises(ValueError, match="shape"):
        make_seg(series, masks[..., :1], ct_package)
    with pytest.raises(ValueError, match="boolean"):
        make_seg(series, masks.astype(np.uint8), ct_package)


@needs_dciodvfy
@pytest.mark.peers
def test_ct_seg_valid(ct_seg: Path) -> None:
    assert dciodvfy_errors(ct_seg) == []


def test_several_projection_images_are_refused(chest_package: ModelPackage) -> None:
    study, series_uid = hd.UID(), hd.UID()
    images = [
        dx_from_array(np.zeros((32, 32)), study_uid=study, series_uid=series_uid) for _ in range(2)
    ]
    series = projection_series(images, "ImagerPixelSpacing")
    with pytest.raises(InputError, match="one projection image at a time"):
        make_seg(series, np.zeros((2, 32, 32, 5), dtype=bool), chest_package)


def test_code_string() -> None:
    assert code_string("chest-xray-anatomy") == "CHEST_XRAY_ANATO"
    assert code_string("") == "SEGMENTATION"


def test_validator_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValidatorNotFoundError, match="dicom3tools"):
        dciodvfy_errors(tmp_path / "x.dcm")


# --- reference SEGs from dcmqi and highdicom through the same reader ----------------------


def _sources(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


REFERENCE_SEGS = [
    ("dcmqi/segmentations/liver.dcm", "dcmqi/segmentations/ct-3slice"),
    ("dcmqi/segmentations/partial_overlaps.dcm", "dcmqi/segmentations/ct-3slice"),
    ("dcmqi/segmentations/23x38x3/seg/label.seg", "dcmqi/segmentations/23x38x3/image"),
    ("highdicom/seg_image_ct_binary_single_frame.dcm", "highdicom/ct_image.dcm"),
    ("highdicom/seg_image_ct_binary_overlap.dcm", None),
    ("dcmqi/sr-example/seg.dcm", None),
]


@pytest.mark.parametrize(("seg_path", "source_path"), REFERENCE_SEGS)
def test_reader_agrees_with_highdicom_on_reference_segs(
    seg_path: str, source_path: str | None
) -> None:
    path = require_shared_data("reference", seg_path)
    seg = pydicom.dcmread(path)
    if source_path is None:  # sources not shipped: the referenced instances, one frame each
        uids = referenced_instances(seg)
    else:
        source = REFERENCE / source_path
        datasets = _sources(source) if source.is_dir() else [pydicom.dcmread(source)]
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        assert sorted(referenced_instances(seg)) == sorted(uids)
    ours = read_seg_masks(seg, [(uid, 1) for uid in uids])
    theirs = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        combine_segments=False,
        skip_overlap_checks=True,
        ignore_spatial_locations=True,
    )
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs.astype(bool))
    assert ours.any()


def test_reader_rejects_fractional() -> None:
    path = require_shared_data("reference", "highdicom/seg_image_ct_true_fractional.dcm")
    with pytest.raises(ValueError, match="BINARY"):
        read_seg_masks(pydicom.dcmread(path), [])
