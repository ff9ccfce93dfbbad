"""SEG and SR of a breast lesion on an ultrasound image: calibration, diameters, no lesion.

The image is built as a scanner sends it (US Image Storage, colour JPEG baseline) and read by
the node's own loader; the masks are synthetic ellipses with known size, so the SR's numbers
can be checked against the calibration exactly. dciodvfy checks every object written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.outputs.diameters import measure_diameters
from dicom_node.outputs.measurements import measure
from dicom_node.outputs.seg import build_seg
from dicom_node.outputs.sr import build_sr
from dicom_node.package.manifest import ModelPackage
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.factories import sr_numbers, sr_texts, us_from_array, us_region, write_files
from tests.outputs.conftest import MakePackage

LESION = [
    {
        "label": "lesion",
        "name": "Lesion",
        "category": "SCT.MorphologicallyAbnormalStructure",
        "type": "SCT.Mass",
        "anatomic_region": "SCT.Breast",
        "color": [255, 64, 64],
    }
]
ROWS, COLS = 300, 400
DELTA_X_CM, DELTA_Y_CM = 0.01, 0.015  # anisotropic: swapped axes give other numbers


@pytest.fixture(scope="module")
def lesion_package(make_package: MakePackage) -> ModelPackage:
    return make_package(LESION, ["area", "diameters"], name="busi-lesion", version="1.0.0")


def us_series(tmp_path: Path, regions: list[Dataset] | None) -> ImageSeries:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (ROWS, COLS)).astype(np.uint8)
    (path,) = write_files([us_from_array(picture, regions=regions)], tmp_path)
    return load_series([path])


def ellipse_mask(centre: tuple[int, int] = (150, 200)) -> np.ndarray:
    rows, cols = np.mgrid[0:ROWS, 0:COLS]
    inside = ((cols - centre[1]) / 80.0) ** 2 + ((rows - centre[0]) / 40.0) ** 2 <= 1
    return inside[None, ..., None]  # (frames, rows, cols, structures)


def outputs(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage, folder: Path
) -> tuple[Any, Any, Any]:
    values = measure(series, masks, package)
    seg = build_seg(series, masks, package, series_uid="1.2.3.1", sop_uid="1.2.3.1.1")
    sr = build_sr(
        series,
        seg,
        masks,
        package,
        values,
        series_uid="1.2.3.2",
        sop_uid="1.2.3.2.1",
        notes=values.omitted,
    )
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        ds.save_as(folder / name, enforce_file_format=True)
        assert dciodvfy_errors(folder / name) == [], name
    return values, dcmread(folder / "seg.dcm"), dcmread(folder / "sr.dcm")


AREA, LONG_AXIS, PERPENDICULAR = "42798000", "103339001", "131189007"


def test_calibrated_lesion_area_and_diameters_in_seg_and_sr(
    tmp_path: Path, lesion_package: ModelPackage
) -> None:
    region = us_region((0, 0, COLS - 1, ROWS - 1), (DELTA_X_CM, DELTA_Y_CM))
    series = us_series(tmp_path, [region])
    assert series.is_color and series.pixel_spacing_mm is None  # US: no Pixel Spacing
    masks = ellipse_mask()
    values, seg, sr = outputs(series, masks, lesion_package, tmp_path)

    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"  # Mass
    assert segment.AnatomicRegionSequence[0].CodeValue == "76752008"  # Breast

    row_mm, col_mm = DELTA_Y_CM * 10, DELTA_X_CM * 10
    pixels = int(masks.sum())
    got = sr_numbers(sr)
    assert got[AREA] == pytest.approx(round(pixels * DELTA_X_CM * DELTA_Y_CM, 1))
    # semi-axes 80 columns (8 mm) and 40 rows (6 mm): 16 mm long, 12 mm across
    assert got[LONG_AXIS] == pytest.approx(16.0, abs=0.3)
    assert got[PERPENDICULAR] == pytest.approx(12.0, abs=0.3)
    expected = measure_diameters(masks[0, ..., 0], (row_mm, col_mm))
    assert expected is not None
    assert got[LONG_AXIS] == pytest.approx(round(expected.longest_mm, 1))
    # negative control: the calibration's X and Y swapped gives other diameters
    swapped = measure_diameters(masks[0, ..., 0], (col_mm, row_mm))
    assert swapped is not None
    assert (
        abs(swapped.longest_mm - got[LONG_AXIS]) > 1
        or abs(swapped.perpendicular_mm - got[PERPENDICULAR]) > 1
    )
    assert values.omitted == ()
    assert any("Physical Delta X 0.01 cm" in c for c in sr_texts(sr))
    # the procedure is breast ultrasound
    assert sr.ContentSequence  # the report exists
    procedure = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert procedure and procedure[0].ConceptCodeSequence[0].CodeValue == "47079000"


def test_no_regions_no_physical_measurement_and_the_sr_says_why(
    tmp_path: Path, lesion_package: ModelPackage
) -> None:
    series = us_series(tmp_path, None)
    values, seg, sr = outputs(series, ellipse_mask(), lesion_package, tmp_path)
    assert values.structures == () and values.diameters == ()
    assert not {AREA, LONG_AXIS, PERPENDICULAR} & set(sr_numbers(sr))
    assert any(
        "Lesion: area and diameters not reported" in c and "no Sequence of Ultrasound Regions" in c
        for c in sr_texts(sr)
    )
    assert len(seg.SegmentSequence) == 1  # the lesion is still segmented and outlined


def test_lesion_outside_the_calibrated_region_is_not_measured(
    tmp_path: Path, lesion_package: ModelPackage
) -> None:
    # the region covers the left half; the lesion straddles its edge
    region = us_region((0, 0, COLS // 2 - 1, ROWS - 1), (DELTA_X_CM, DELTA_Y_CM))
    series = us_series(tmp_path, [region])
    _, _, sr = outputs(series, ellipse_mask(), lesion_package, tmp_path)
    assert not {AREA, LONG_AXIS, PERPENDICULAR} & set(sr_numbers(sr))
    assert any("outside every region" in c for c in sr_texts(sr))


def test_no_lesion_found_empty_segment_and_an_sr_that_says_so(
    tmp_path: Path, lesion_package: ModelPackage
) -> None:
    region = us_region((0, 0, COLS - 1, ROWS - 1), (DELTA_X_CM, DELTA_Y_CM))
    series = us_series(tmp_path, [region])
    masks = np.zeros((1, ROWS, COLS, 1), dtype=bool)
    _, seg, sr = outputs(series, masks, lesion_package, tmp_path)
    # the SEG keeps its one segment with one empty frame (what viewers open, docs/viewers.md)
    assert seg.NumberOfFrames == 1 and not seg.pixel_array.any()
    assert any("Lesion: not found by the model" in c for c in sr_texts(sr))
    assert not sr_numbers(sr)
