"""Calibration of ultrasound images from their Sequence of Ultrasound Regions."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.imaging.ultrasound import calibration_for, read_regions
from tests.factories import us_region


def image(*regions: Dataset) -> Dataset:
    ds = Dataset()
    ds.Modality = "US"
    if regions:
        ds.SequenceOfUltrasoundRegions = list(regions)
    return ds


def lesion(rows: slice, cols: slice, shape: tuple[int, int] = (400, 600)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def test_region_inside_gives_its_calibration_rows_from_delta_y() -> None:
    ds = image(us_region((100, 50, 500, 380), (0.02, 0.03)))
    calibration, reason = calibration_for(ds, lesion(slice(100, 200), slice(200, 300)))
    assert reason is None and calibration is not None
    assert calibration.row_mm == pytest.approx(0.3)  # Physical Delta Y, cm -> mm
    assert calibration.col_mm == pytest.approx(0.2)  # Physical Delta X
    assert calibration.spacing_mm == pytest.approx((0.3, 0.2))
    assert "item 1" in calibration.describe()


def test_no_regions_no_calibration_and_a_reason() -> None:
    calibration, reason = calibration_for(image(), lesion(slice(10, 20), slice(10, 20)))
    assert calibration is None
    assert reason is not None and "no Sequence of Ultrasound Regions" in reason


def test_lesion_outside_or_across_the_region_edge_is_not_calibrated() -> None:
    ds = image(us_region((100, 50, 500, 380), (0.02, 0.02)))
    for mask in (
        lesion(slice(0, 40), slice(10, 60)),  # over the annotations above the region
        lesion(slice(300, 390), slice(200, 300)),  # crosses the lower edge (row 380)
    ):
        calibration, reason = calibration_for(ds, mask)
        assert calibration is None
        assert reason is not None and "outside" in reason
    # the bounds are inclusive: the last row and column of the region still count
    calibration, _ = calibration_for(ds, lesion(slice(370, 381), slice(490, 501)))
    assert calibration is not None


def test_regions_that_disagree_give_no_measurement_and_agreeing_ones_do() -> None:
    mask = lesion(slice(100, 150), slice(100, 150))
    disagree = image(
        us_region((0, 0, 599, 399), (0.02, 0.02)), us_region((50, 50, 300, 300), (0.01, 0.01))
    )
    calibration, reason = calibration_for(disagree, mask)
    assert calibration is None and reason is not None and "different pixel sizes" in reason
    agree = image(
        us_region((0, 0, 599, 399), (0.02, 0.02)), us_region((50, 50, 300, 300), (0.02, 0.02))
    )
    calibration, _ = calibration_for(agree, mask)
    assert calibration is not None and calibration.col_mm == pytest.approx(0.2)


def test_only_regions_in_cm_calibrate() -> None:
    seconds = us_region((0, 0, 599, 399), (0.02, 0.02), units=4)  # 4: seconds (M-mode, Doppler)
    calibration, reason = calibration_for(image(seconds), lesion(slice(10, 20), slice(10, 20)))
    assert calibration is None and reason is not None and "3 (cm)" in reason
    # a cm region beside a time region: the lesion in the cm one is measured
    both = image(seconds, us_region((0, 0, 299, 399), (0.01, 0.01)))
    calibration, _ = calibration_for(both, lesion(slice(10, 20), slice(10, 20)))
    assert calibration is not None and calibration.region.index == 1


def test_regions_without_bounds_or_with_a_zero_delta_are_ignored() -> None:
    broken = us_region((0, 0, 599, 399), (0.0, 0.02))
    no_bounds = us_region((0, 0, 599, 399), (0.02, 0.02))
    del no_bounds.RegionLocationMaxY1
    ds = image(broken, no_bounds)
    assert [r.index for r in read_regions(ds)] == [0]
    calibration, reason = calibration_for(ds, lesion(slice(10, 20), slice(10, 20)))
    assert calibration is None and reason is not None
