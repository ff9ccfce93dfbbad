"""TID 1500 SR: build, validate with dciodvfy, read back with highdicom, compare with the input."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.measurements import Measurements, measure
from dicom_node.outputs.seg import build_seg, frame_segment_number
from dicom_node.outputs.sr import CARDIOTHORACIC_RATIO, PRIVATE_SCHEME, build_sr
from dicom_node.package.manifest import ModelPackage
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.conftest import require_shared_data, require_tool
from tests.factories import SHARED_DATA

REFERENCE = SHARED_DATA / "reference"

#: Skipped with the reason without dciodvfy; failed under DICOM_NODE_REQUIRE_PEERS=1.
needs_dciodvfy = pytest.mark.needs_tool("dciodvfy")


@dataclass
class Outputs:
    series: ImageSeries
    masks: np.ndarray
    measurements: Measurements
    seg: hd.seg.Segmentation
    sr: hd.sr.Comprehensive3DSR
    path: Path


def make_outputs(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage, folder: Path
) -> Outputs:
    model = (series.series_instance_uid, package.name, package.version)
    seg_uids = output_uids(*model, "seg", series.sop_instance_uids)
    sr_uids = output_uids(*model, "sr", series.sop_instance_uids)
    measurements = measure(series, masks, package)
    seg = build_seg(series, masks, package, series_uid=seg_uids[0], sop_uid=seg_uids[1])
    sr = build_sr(
        series, seg, masks, package, measurements, series_uid=sr_uids[0], sop_uid=sr_uids[1]
    )
    path = folder / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return Outputs(series, masks, measurements, seg, sr, path)


@pytest.fixture(scope="module")
def dx(
    jsrt_case: tuple[ImageSeries, np.ndarray],
    chest_package: ModelPackage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Outputs:
    return make_outputs(*jsrt_case, chest_package, tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def ct(
    ct_case: tuple[ImageSeries, np.ndarray],
    ct_package: ModelPackage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Outputs:
    return make_outputs(*ct_case, ct_package, tmp_path_factory.mktemp("sr"))


# --- one reader for our SRs and the reference SRs ------------------------------------------


@dataclass
class Group:
    """What a measurement group of a TID 1500 report says, as read back by highdicom."""

    template: str
    tracking_id: str | None
    tracking_uid: str | None
    finding_type: tuple[str, str] | None
    reference: str | None  # meaning of the ROI reference, e.g. "Referenced Segment"
    segment_numbers: list[int]
    values: dict[str, tuple[float, str]] = field(default_factory=dict)  # name -> (value, unit)
    comments: dict[str, list[str]] = field(default_factory=dict)  # name -> Comment texts


def _ids(item: pydicom.Dataset) -> tuple[list[int], list[int]]:
    ref = item.ReferencedSOPSequence[0]
    frames = ref.get("ReferencedFrameNumber")
    segments = ref.get("ReferencedSegmentNumber")

    def as_list(v: object) -> list[int]:
        return [int(x) for x in np.atleast_1d(np.asarray(v if v is not None else []))]

    return as_list(frames), as_list(segments)


def read_report(path: Path, seg: pydicom.Dataset | None = None) -> list[Group]:
    """Read every measurement group; segment numbers of frame references via ``seg``."""
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups: list[Group] = []
    found: list[tuple[str, list]] = [
        ("1410", report.get_planar_roi_measurement_groups()),
        ("1411", report.get_volumetric_roi_measurement_groups()),
        ("1501", report.get_image_measurement_groups()),
    ]
    for template, items in found:
        for g in items:
            reference = None
            segments: list[int] = []
            if template != "1501":
                reference = g.reference_type.meaning
                roi = [
                    i
                    for i in g[0].ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue in ("121214", "121191")
                ]
                if roi:
                    frames, segments = _ids(roi[0])
                    if not segments and seg is not None:
                        segments = [frame_segment_number(seg, f) for f in frames]
            finding = g.finding_type
            group = Group(
                template=template,
                tracking_id=g.tracking_identifier,
                tracking_uid=None if g.tracking_uid is None else str(g.tracking_uid),
                finding_type=None
                if finding is None
                else (finding.value, finding.scheme_designator),
                reference=reference,
                segment_numbers=segments,
            )
            for m in g.get_measurements():
                key = m.name.meaning
                group.values.setdefault(key, (float(m.value), m.unit.value))
                group.comments.setdefault(key, []).extend(
                    str(i.TextValue)
                    for i in m[0].get("ContentSequence", [])
                    if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
                )
            groups.append(group)
    return groups


# --- DX ----------------------------------------------------------------------------------------


def segment_groups(groups: list[Group]) -> list[Group]:
    return [g for g in groups if g.reference != "Image Region"]


def region_groups(groups: list[Group]) -> list[Group]:
    return [g for g in groups if g.reference == "Image Region"]


def test_dx_report_has_a_planar_group_per_segment(dx: Outputs, chest_package: ModelPackage) -> None:
    groups = read_report(dx.path, dx.seg)
    planar = segment_groups([g for g in groups if g.template == "1410"])
    assert len(planar) == len(chest_package.structures)
    for number, (group, structure) in enumerate(
        zip(planar, chest_package.structures, strict=True), start=1
    ):
        segment = dx.seg.SegmentSequence[number - 1]
        assert group.tracking_id == structure.name
        assert group.tracking_uid == segment.TrackingUID
        assert group.finding_type == (structure.type.value, structure.type.scheme_designator)
        assert group.reference == "Referenced Segmentation Frame"
        assert group.segment_numbers == [number]
        expected = dx.measurements.for_segment(number)
        assert expected is not None
        value, unit = group.values["Area"]
        assert value == round(expected.value, 1)  # 0.1 cm2
        assert unit == "cm2"
        assert any("ImagerPixelSpacing (0018,1164)" in c for c in group.comments["Area"])


def _polygon_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre (c + 0.5, r + 0.5) lies inside the closed POLYLINE ``points``."""
    from matplotlib.path import Path as PolygonPath

    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=-1)
    return PolygonPath(points).contains_points(centres).reshape(shape)


def test_dx_report_outlines_each_structure_on_the_image(
    dx: Outputs, chest_package: ModelPackage
) -> None:
    """One Image Region per structure, with the segment's Tracking UID: a closed POLYLINE of at
    most 200 points, in SCOORD image coordinates, that encloses the mask's pixels."""
    regions = region_groups(read_report(dx.path, dx.seg))
    assert [g.tracking_uid for g in regions] == [s.TrackingUID for s in dx.seg.SegmentSequence]
    content = hd.sr.srread(dx.path).content
    source = dx.series.datasets[0]
    groups = [
        g
        for g in content.get_planar_roi_measurement_groups()
        if g.reference_type.meaning == "Image Region"
    ]
    for index, group in enumerate(groups):
        region = group.roi
        assert region is not None
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        points = region.value
        assert 4 <= len(points) <= 200
        assert np.array_equal(points[0], points[-1])  # closed
        mask = dx.masks[0, ..., index]
        drawn = _polygon_mask(points, mask.shape)
        iou = (drawn & mask).sum() / (drawn | mask).sum()
        assert iou > 0.95, (chest_package.structures[index].label, iou)
        # Mirrored or transposed coordinates would not overlap the mask like this.
        assert (_polygon_mask(points[:, ::-1], mask.shape) & mask).sum() < 0.9 * mask.sum()


def test_dx_report_values_are_rounded(dx: Outputs) -> None:
    report = pydicom.dcmread(dx.path)
    decimals = {"cm2": 1, "mm": 1, "{ratio}": 2, "ml": 1}

    def walk(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
        items = list(ds.get("ContentSequence", []))
        return items + [i for item in items for i in walk(item)]

    nums = [i for i in walk(report) if i.ValueType == "NUM"]
    assert nums
    for num in nums:
        measured = num.MeasuredValueSequence[0]
        unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
        text = str(measured.get_item("NumericValue").value.decode()).strip()
        fraction = text.split(".")[1] if "." in text else ""
        assert len(fraction) <= decimals[unit], (unit, text)


def test_dx_report_states_the_cardiothoracic_ratio(dx: Outputs) -> None:
    ratio = dx.measurements.cardiothoracic_ratio
    assert ratio is not None
    groups = [g for g in read_report(dx.path, dx.seg) if g.template == "1501"]
    assert len(groups) == 1
    group = groups[0]
    assert group.tracking_id == "Cardiothoracic ratio"
    value, unit = group.values[CARDIOTHORACIC_RATIO.meaning]
    assert value == round(ratio.value, 2)
    assert unit == "{ratio}"
    (comment,) = group.comments[CARDIOTHORACIC_RATIO.meaning]
    assert ratio.heart.describe() in comment and ratio.thorax.describe() in comment
    diameter, unit = group.values["Diameter"]
    assert unit == "mm"
    assert ratio.heart_width_mm is not None
    assert diameter == round(ratio.heart_width_mm, 1)
    # The ratio names the segments it was inferred from: heart, right lung, left lung.
    report = pydicom.dcmread(dx.path)
    assert report.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    num = _find(report, CARDIOTHORACIC_RATIO.value)
    (source,) = [i for i in num.ContentSequence if i.ValueType == "IMAGE"]
    assert source.RelationshipType == "INFERRED FROM"
    assert _ids(source)[1] == [3, 1, 2]
    # The two widths as 2-point lines on the image, across the outer pixel edges.
    lines = [i for i in num.ContentSequence if i.ValueType == "SCOORD"]
    assert [i.RelationshipType for i in lines] == ["INFERRED FROM"] * 2
    for line, extent in zip(lines, (ratio.heart, ratio.thorax), strict=True):
        assert line.GraphicType == "POLYLINE"
        (x0, y0, x1, y1) = [float(v) for v in line.GraphicData]
        assert (x0, x1) == (extent.first_column, extent.last_column + 1)
        assert y0 == y1
        image = line.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == dx.series.datasets[0].SOPInstanceUID


def _find(ds: pydicom.Dataset, code_value: str) -> pydicom.Dataset:
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == code_value:
            return item
        try:
            return _find(item, code_value)
        except LookupError:
            continue
    raise LookupError(code_value)


def test_dx_report_header_and_context(dx: Outputs) -> None:
    report = pydicom.dcmread(dx.path)
    source = dx.series.datasets[0]
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.PatientID == source.PatientID
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, dx.seg.SOPInstanceUID}
    assert (report.CompletionFlag, report.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    procedure = _find(report, "121058").ConceptCodeSequence[0]  # Procedure reported
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == (
        codes.SCT.ChestImaging.value,
        "SCT",
    )
    content = hd.sr.srread(dx.path).content
    assert isinstance(content, hd.sr.MeasurementReport)
    (device,) = content.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = device.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == "dicom-node"
    assert attributes.model_name == "chest-xray-anatomy 1.2.0"


def test_same_input_same_uids(
    jsrt_case: tuple[ImageSeries, np.ndarray],
    chest_package: ModelPackage,
    dx: Outputs,
    tmp_path: Path,
) -> None:
    again = make_outputs(*jsrt_case, chest_package, tmp_path)
    assert again.sr.SOPInstanceUID == dx.sr.SOPInstanceUID
    assert again.seg.SOPInstanceUID == dx.seg.SOPInstanceUID
    assert [g.tracking_uid for g in read_report(again.path)] == [
        g.tracking_uid for g in read_report(dx.path)
    ]


@needs_dciodvfy
@pytest.mark.peers
def test_dx_report_valid(dx: Outputs) -> None:
    assert dciodvfy_errors(dx.path) == []


# --- CT ----------------------------------------------------------------------------------------


def test_ct_report_has_a_volumetric_group_per_segment(
    ct: Outputs, ct_package: ModelPackage
) -> None:
    all_groups = read_report(ct.path, ct.seg)
    # The liver: its outlines and its segment; the empty kidney segment has no group, and
    # the report says it was not found.
    assert [g.template for g in all_groups] == ["1411", "1411"]
    notes = [
        str(text.TextValue)
        for item in pydicom.dcmread(ct.path).ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"  # Qualitative Evaluations
        for text in item.ContentSequence
    ]
    assert notes == ["Left kidney: not found by the model (segment 2 of the SEG is empty)"]
    (outlines,) = region_groups(all_groups)
    groups = segment_groups(all_groups)
    assert outlines.tracking_uid == groups[0].tracking_uid
    assert len(groups) == 1
    for number, group in enumerate(groups, start=1):
        assert group.reference == "Referenced Segment"
        assert group.segment_numbers == [number]
        assert group.tracking_uid == ct.seg.SegmentSequence[number - 1].TrackingUID
        expected = ct.measurements.for_segment(number)
        assert expected is not None
        value, unit = group.values["Volume"]
        assert value == round(expected.value, 1)  # 0.1 ml
        assert unit == "ml"
        assert any("PixelSpacing (0028,0030)" in c for c in group.comments["Volume"])
    # One outline per slice that shows the liver, largest first, each on its own slice.
    content = hd.sr.srread(ct.path).content
    (region_group,) = [
        g
        for g in content.get_volumetric_roi_measurement_groups()
        if g.reference_type.meaning == "Image Region"
    ]
    regions = region_group.roi
    assert regions is not None
    slices = [
        r.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in regions
    ]
    liver_slices = ct.masks[..., 0].any(axis=(1, 2))
    assert sorted(slices) == sorted(
        str(ds.SOPInstanceUID)
        for ds, shown in zip(ct.series.datasets, liver_slices, strict=True)
        if shown
    )
    report = pydicom.dcmread(ct.path)
    procedure = _find(report, "121058").ConceptCodeSequence[0]
    assert procedure.CodeValue == codes.LN.CTUnspecifiedBodyRegion.value
    assert "CodingSchemeIdentificationSequence" not in report


@needs_dciodvfy
@pytest.mark.peers
def test_ct_report_valid(ct: Outputs) -> None:
    assert dciodvfy_errors(ct.path) == []


def test_single_ct_slice_is_planar(make_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.outputs.conftest import CT_STRUCTURES, ct_slice_series

    package = make_package(CT_STRUCTURES, ["area"], dims=2, name="ct-slice")
    series = ct_slice_series()
    masks = np.zeros((1, 64, 64, 2), dtype=bool)
    masks[0, 10:20, 10:20, 0] = True
    out = make_outputs(series, masks, package, tmp_path)
    groups = read_report(out.path, out.seg)
    assert [g.template for g in groups] == ["1410", "1410"]  # outline and segment of the first
    assert segment_groups(groups)[0].values["Area"][0] == round(100 * 0.64 / 100.0, 1)
    require_tool("dciodvfy")
    assert dciodvfy_errors(out.path) == []


def test_one_structure_on_one_image(make_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A SEG of one segment on one image has one frame, whose Segment Identification highdicom
    puts in the Shared Functional Groups: the SR must find it there."""
    from tests.outputs.conftest import CT_STRUCTURES, ct_slice_series

    package = make_package(CT_STRUCTURES[:1], ["area"], dims=2, name="ct-slice-one")
    series = ct_slice_series()
    masks = np.zeros((1, 64, 64, 1), dtype=bool)
    masks[0, 10:20, 10:30, 0] = True
    out = make_outputs(series, masks, package, tmp_path)
    assert "SegmentIdentificationSequence" not in out.seg.PerFrameFunctionalGroupsSequence[0]
    groups = read_report(out.path, out.seg)
    assert [g.template for g in groups] == ["1410", "1410"]
    assert segment_groups(groups)[0].values["Area"][0] == round(200 * 0.64 / 100.0, 1)
    require_tool("dciodvfy")
    assert dciodvfy_errors(out.path) == []


def test_one_structure_in_a_volume(make_package, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A SEG of one segment over a series (la-lge: the left atrium) has its Segment
    Identification in the Shared Functional Groups: the volume's Referenced Segment must
    still name the segment and the source images of its frames."""
    from tests.outputs.conftest import CT_STRUCTURES, ct_volume_series

    package = make_package(CT_STRUCTURES[:1], ["volume"], dims=3, name="ct-one")
    series = ct_volume_series()
    masks = (series.pixels > -500.0)[..., None]
    out = make_outputs(series, masks, package, tmp_path)
    assert "SegmentIdentificationSequence" not in out.seg.PerFrameFunctionalGroupsSequence[0]
    groups = segment_groups(read_report(out.path, out.seg))
    assert [g.segment_numbers for g in groups] == [[1]]
    expected = out.measurements.for_segment(1)
    assert expected is not None and expected.pixel_count == int(masks.sum())
    assert groups[0].values["Volume"] == (round(expected.value, 1), "ml")
    sources = {
        str(ref.ReferencedSOPInstanceUID)
        for g in hd.sr.srread(out.path).content.get_volumetric_roi_measurement_groups()
        if g.reference_type.meaning == "Referenced Segment"
        for item in g.referenced_segment[1:]  # [0]: the SEG; then each source image
        for ref in item.ReferencedSOPSequence
    }
    shown = masks[..., 0].any(axis=(1, 2))
    assert sources == {
        str(ds.SOPInstanceUID) for ds, s in zip(series.datasets, shown, strict=True) if s
    }
    require_tool("dciodvfy")
    assert dciodvfy_errors(out.path) == []


@pytest.mark.parametrize("slices", [1, 8], ids=["one slice", "a series"])
def test_nothing_found_gives_a_report_that_says_so(  # type: ignore[no-untyped-def]
    make_package, tmp_path: Path, slices: int
) -> None:
    """No structure found: one TID 1410 group, the region analysed (the image border) with
    each structure's type Absent, and notes that name what was not found; valid."""
    from tests.outputs.conftest import CT_STRUCTURES, ct_slice_series, ct_volume_series

    package = make_package(
        CT_STRUCTURES, ["area" if slices == 1 else "volume"], dims=2, name="ct-slice"
    )
    series = ct_slice_series() if slices == 1 else ct_volume_series()
    masks = np.zeros((*series.shape, 2), dtype=bool)
    out = make_outputs(series, masks, package, tmp_path)
    content = pydicom.dcmread(out.path).ContentSequence
    (group,) = read_report(out.path, out.seg)
    assert group.template == "1410" and group.tracking_id == "Nothing found by ct-slice"
    report = hd.sr.srread(out.path).content
    (region_group,) = report.get_planar_roi_measurement_groups()
    rows, cols = series.shape[1:]
    region = region_group.roi
    assert region is not None
    assert np.array_equal(region.value, [[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]])
    evaluations = {
        (e.name.meaning, e.value.meaning) for e in region_group.get_qualitative_evaluations()
    }
    assert evaluations == {("Liver", "Absent"), ("Kidney", "Absent")}
    (notes,) = [item for item in content if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert [str(t.TextValue) for t in notes.ContentSequence] == [
        "Liver: not found by the model (segment 1 of the SEG is empty)",
        "Left kidney: not found by the model (segment 2 of the SEG is empty)",
    ]
    require_tool("dciodvfy")
    assert dciodvfy_errors(out.path) == []


def test_masks_must_match_the_seg(dx: Outputs, ct_package: ModelPackage) -> None:
    with pytest.raises(ValueError, match="agree"):
        build_sr(
            dx.series,
            dx.seg,
            dx.masks,
            ct_package,
            dx.measurements,
            series_uid=hd.UID(),
            sop_uid=hd.UID(),
        )


# --- reference SRs through the same reader ------------------------------------------------------


def test_reader_on_dcmqi_report() -> None:
    path = require_shared_data("reference", "dcmqi/sr-example/sr.dcm")
    (group,) = read_report(path, pydicom.dcmread(REFERENCE / "dcmqi/sr-example/seg.dcm"))
    assert group.template == "1411"
    assert group.reference == "Referenced Segment"
    assert group.segment_numbers == [1]
    assert group.values["Volume"] == (pytest.approx(33.5824), "ml")


def test_reader_on_highdicom_reports() -> None:
    single = REFERENCE / "highdicom/sr_document.dcm"
    multiple = REFERENCE / "highdicom/sr_document_with_multiple_groups.dcm"
    require_shared_data("reference", "highdicom/sr_document.dcm")
    require_shared_data("reference", "highdicom/sr_document_with_multiple_groups.dcm")
    (group,) = read_report(single)
    assert group.template == "1410" and group.reference == "Image Region"
    assert group.values["Area of defined region"] == (pytest.approx(1.7), "cm2")
    groups = read_report(multiple)
    assert sorted(g.template for g in groups) == ["1410", "1410", "1411", "1501"]
    volumetric = next(g for g in groups if g.template == "1411")
    assert volumetric.values["Volume"] == (pytest.approx(200.0), "mm3")
