"""Area, volume and cardiothoracic ratio on synthetic masks with known answers and on JSRT."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.measurements import (
    Extent,
    cardiothoracic_ratio,
    column_extent,
    measure,
)
from dicom_node.package.manifest import Measurement, ModelPackage
from tests.factories import dx_from_array
from tests.outputs.conftest import (
    CHEST_STRUCTURES,
    CT_STRUCTURES,
    MakePackage,
    ct_slice_series,
    projection_series,
)

ROWS, COLS = 100, 120


def chest_masks() -> np.ndarray:
    """Right lung cols 10..39, left lung cols 70..99, heart cols 35..74 (overlapping both)."""
    masks = np.zeros((1, ROWS, COLS, 5), dtype=bool)
    masks[0, 20:80, 10:40, 0] = True  # right lung (image left): 60 x 30
    masks[0, 30:90, 70:100, 1] = True  # left lung (image right): 60 x 30
    masks[0, 50:70, 40:70, 2] = True  # heart body 20 x 30
    masks[0, 60, 35:40, 2] = True  # heart widest to the image left on row 60
    masks[0, 65, 70:75, 2] = True  # ... and to the image right on row 65
    masks[0, 5:10, 15:35, 3] = True  # right clavicle 5 x 20
    return masks


def dx_series(spacing_source: str | None = "ImagerPixelSpacing") -> ImageSeries:
    return projection_series([dx_from_array(np.zeros((ROWS, COLS)))], spacing_source)


def test_column_extent_finds_outermost_columns_and_their_rows() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2, 3:6] = True
    mask[7, 5:10] = True
    assert column_extent(mask) == Extent(first_column=3, first_row=2, last_column=9, last_row=7)
    assert column_extent(mask).width_px == 7  # type: ignore[union-attr]
    assert column_extent(np.zeros((4, 4), dtype=bool)) is None
    with pytest.raises(ValueError, match="2D"):
        column_extent(np.zeros((1, 4, 4), dtype=bool))


def test_area_is_pixel_count_times_spacing_and_names_the_attribute(
    chest_package: ModelPackage,
) -> None:
    series = dx_series()
    masks = chest_masks()
    result = measure(series, masks, chest_package)
    assert [m.label for m in result.structures] == [s["label"] for s in CHEST_STRUCTURES]
    assert [m.segment_number for m in result.structures] == [1, 2, 3, 4, 5]
    right_lung = result.structures[0]
    assert right_lung.kind is Measurement.AREA
    assert right_lung.unit == "cm2"
    assert right_lung.pixel_count == 60 * 30
    assert right_lung.value == pytest.approx(60 * 30 * 0.35 * 0.35 / 100.0)
    assert right_lung.spacing_mm == (0.35, 0.35)
    assert right_lung.spacing_source == "ImagerPixelSpacing"
    assert "ImagerPixelSpacing (0018,1164)" in right_lung.describe()
    assert "1800 pixels" in right_lung.describe()
    assert result.structures[4].value == 0.0  # empty left clavicle
    assert result.for_segment(4) is result.structures[3]
    assert result.for_segment(9) is None


def test_area_with_pixel_spacing_says_so(chest_package: ModelPackage) -> None:
    result = measure(dx_series("PixelSpacing"), chest_masks(), chest_package)
    assert result.structures[0].spacing_source == "PixelSpacing"
    assert "PixelSpacing (0028,0030)" in result.structures[0].describe()


def test_no_spacing_no_area(chest_package: ModelPackage) -> None:
    result = measure(dx_series(None), chest_masks(), chest_package)
    assert result.structures == ()
    assert result.cardiothoracic_ratio is not None  # a ratio needs no spacing
    assert result.cardiothoracic_ratio.heart_width_mm is None


def test_cardiothoracic_ratio_of_known_extents(chest_package: ModelPackage) -> None:
    ratio = measure(dx_series(), chest_masks(), chest_package).cardiothoracic_ratio
    assert ratio is not None
    assert ratio.heart == Extent(first_column=35, first_row=60, last_column=74, last_row=65)
    assert ratio.thorax == Extent(first_column=10, first_row=20, last_column=99, last_row=30)
    assert ratio.value == pytest.approx(40 / 90)
    assert ratio.heart_width_mm == pytest.approx(40 * 0.35)
    assert ratio.thorax_width_mm == pytest.approx(90 * 0.35)
    assert ratio.view_position == "PA"
    text = ratio.describe()
    assert "columns 35 (row 60) to 74 (row 65), 40 px" in text
    assert "columns 10 (row 20) to 99 (row 30), 90 px" in text


def test_cardiothoracic_ratio_function_needs_both_masks() -> None:
    heart = np.zeros((5, 5), dtype=bool)
    lung = np.zeros((5, 5), dtype=bool)
    lung[1, 0:5] = True
    assert cardiothoracic_ratio(heart, lung, lung) is None
    heart[2, 1:3] = True
    ratio = cardiothoracic_ratio(heart, lung, np.zeros_like(lung))
    assert ratio is not None and ratio.value == pytest.approx(2 / 5)


@pytest.mark.parametrize("empty", [0, 1, 2])
def test_no_ratio_when_heart_or_a_lung_is_empty(chest_package: ModelPackage, empty: int) -> None:
    masks = chest_masks()
    masks[..., empty] = False
    assert measure(dx_series(), masks, chest_package).cardiothoracic_ratio is None


def test_no_ratio_unless_the_package_asks(make_package: MakePackage) -> None:
    package = make_package(CHEST_STRUCTURES, ["area"])
    result = measure(dx_series(), chest_masks(), package)
    assert result.cardiothoracic_ratio is None
    assert len(result.structures) == 5


def test_no_ratio_without_the_three_structures(make_package: MakePackage) -> None:
    package = make_package(CHEST_STRUCTURES[:2] + CHEST_STRUCTURES[3:], ["cardiothoracic_ratio"])
    masks = np.delete(chest_masks(), 2, axis=-1)
    result = measure(dx_series(), masks, package)
    assert result.cardiothoracic_ratio is None
    assert result.structures == ()  # area not asked for


def test_several_projection_images_are_not_measured(chest_package: ModelPackage) -> None:
    images = [dx_from_array(np.zeros((ROWS, COLS))) for _ in range(2)]
    series = projection_series(images, "ImagerPixelSpacing")
    masks = np.concatenate([chest_masks(), chest_masks()])
    result = measure(series, masks, chest_package)
    assert result.structures == ()
    assert result.cardiothoracic_ratio is None


def test_volume_is_voxel_count_times_spacing(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, _ = ct_case
    masks = np.zeros((*series.shape, 2), dtype=bool)
    masks[2:6, 10:15, 20:26, 0] = True  # 4 x 5 x 6 voxels
    result = measure(series, masks, ct_package)
    liver, kidney = result.structures
    assert liver.kind is Measurement.VOLUME and liver.unit == "ml"
    assert liver.pixel_count == 120
    assert liver.value == pytest.approx(120 * 2.5 * 0.8 * 0.8 / 1000.0)
    assert liver.spacing_mm == (2.5, 0.8, 0.8)
    assert "PixelSpacing (0028,0030)" in liver.describe()
    assert "2.5 mm slice spacing" in liver.describe()
    assert kidney.value == 0.0
    assert result.cardiothoracic_ratio is None


def test_volume_of_the_synthetic_ellipsoid(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    liver = measure(series, masks, ct_package).structures[0]
    # ct_series: semi-axes 8 / 2.5 slices, 64 / 3 rows and 64 / 3 columns.
    expected_ml = 4 / 3 * np.pi * (8 / 2.5 * 2.5) * (64 / 3 * 0.8) ** 2 / 1000.0
    assert liver.value == pytest.approx(expected_ml, rel=0.05)


def test_no_volume_without_slice_spacing(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    uneven = ImageSeries(
        datasets=series.datasets,
        pixels=series.pixels,
        pixel_spacing_mm=series.pixel_spacing_mm,
        spacing_source=series.spacing_source,
        slice_spacing_mm=None,
        is_projection=False,
    )
    assert measure(uneven, masks, ct_package).structures == ()


def test_single_slice_is_measured_by_area(make_package: MakePackage) -> None:
    package = make_package(CT_STRUCTURES, ["area", "volume"], dims=2, name="ct-slice")

    series = ct_slice_series()
    masks = np.zeros((1, 64, 64, 2), dtype=bool)
    masks[0, :10, :10, 0] = True
    liver = measure(series, masks, package).structures[0]
    assert liver.kind is Measurement.AREA
    assert liver.value == pytest.approx(100 * 0.64 / 100.0)


def test_masks_must_match_series_and_package(chest_package: ModelPackage) -> None:
    series = dx_series()
    with pytest.raises(ValueError, match="shape"):
        measure(series, chest_masks()[..., :4], chest_package)
    with pytest.raises(ValueError, match="boolean"):
        measure(series, chest_masks().astype(np.uint8), chest_package)


def test_jsrt_normal_chest(
    jsrt_case: tuple[ImageSeries, np.ndarray], chest_package: ModelPackage
) -> None:
    series, masks = jsrt_case
    result = measure(series, masks, chest_package)
    ratio = result.cardiothoracic_ratio
    assert ratio is not None
    assert 0.38 <= ratio.value <= 0.52  # a normal heart on a PA view: about 0.4 to 0.5
    # The heart lies between the outer borders of the lungs.
    assert ratio.thorax.first_column < ratio.heart.first_column
    assert ratio.heart.last_column < ratio.thorax.last_column
    assert 200.0 < ratio.thorax_width_mm < 380.0  # type: ignore[operator]
    areas = {m.label: m.value for m in result.structures}
    assert 80.0 < areas["right_lung"] < 400.0
    assert 80.0 < areas["left_lung"] < 400.0
    assert areas["left_lung"] < areas["right_lung"]  # the heart takes room on the left
    assert 5.0 < areas["right_clavicle"] < 40.0


# --- which images get a ratio, and along which axis ----------------------------------------


def test_ratio_is_taken_across_the_patient_whatever_the_stored_orientation(
    jsrt_case: tuple[ImageSeries, np.ndarray], chest_package: ModelPackage
) -> None:
    series, masks = jsrt_case
    oriented = dataclasses.replace(chest_package, orientation=("L", "F"))
    expected = measure(series, masks, oriented).cardiothoracic_ratio
    assert expected is not None and expected.oriented_to is None
    ds = copy.deepcopy(series.datasets[0])
    ds.PatientOrientation = ["F", "R"]  # stored a quarter turn counter-clockwise
    turned = dataclasses.replace(
        series, datasets=(ds,), pixels=np.ascontiguousarray(np.rot90(series.pixels, 1, (1, 2)))
    )
    turned_masks = np.ascontiguousarray(np.rot90(masks, 1, (1, 2)))
    ratio = measure(turned, turned_masks, oriented).cardiothoracic_ratio
    assert ratio is not None and ratio.value == expected.value
    assert ratio.heart_width_mm == expected.heart_width_mm
    assert "as oriented to L\\F" in ratio.describe()
    # A package without a declared orientation measures along the stored columns.
    unoriented = measure(turned, turned_masks, chest_package).cardiothoracic_ratio
    assert unoriented is not None and abs(unoriented.value - expected.value) > 0.05


@pytest.mark.parametrize(
    ("tags", "why"),
    [
        ({"ViewPosition": "AP"}, "magnifies the heart"),
        ({"ViewPosition": "LL"}, "lateral view"),
        ({"ViewPosition": "LATERAL"}, "lateral view"),
        ({"ViewPosition": ""}, "View Position (0018,5101) is absent"),
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, "for humans"),
    ],
)
def test_ratio_only_on_pa_views_of_humans(
    jsrt_case: tuple[ImageSeries, np.ndarray],
    chest_package: ModelPackage,
    tags: dict[str, str],
    why: str,
) -> None:
    series, masks = jsrt_case
    ds = copy.deepcopy(series.datasets[0])
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    values = measure(dataclasses.replace(series, datasets=(ds,)), masks, chest_package)
    assert values.cardiothoracic_ratio is None
    (reason,) = values.omitted
    assert reason.startswith("Cardiothoracic ratio not reported") and why in reason
    assert values.structures  # areas are still reported
