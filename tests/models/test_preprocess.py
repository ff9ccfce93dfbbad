"""Input preparation and the way back: 2D padding/resizing and 3D resampling."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.common.errors import InputError
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.preprocess import (
    Placement,
    normalize,
    prepare_image,
    prepare_volume,
    restore_probabilities,
    restore_volume,
    to_input_grid,
)
from dicom_node.package.manifest import ModelPackage, Normalization, NormalizationKind
from dicom_node.testing.random_package import make_random_package
from tests.factories import JSRT, ct_series, dx_from_array, jsrt_cases, jsrt_mask
from tests.imaging.test_series import write


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def package_2d(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return make_random_package(tmp_path_factory.mktemp("p2"), input_size=(128, 128))


@pytest.fixture(scope="module")
def package_3d(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return make_random_package(
        tmp_path_factory.mktemp("p3"),
        dims=3,
        spacing_mm=(1.5, 1.2, 1.2),
        normalization={"kind": "window", "center": -480, "width": 1040},  # air 0, tissue 1
    )


def blob_mask(rows: int, cols: int) -> np.ndarray:
    """An off-centre ellipse plus a rectangle: a non-symmetric shape that shows flips."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    ellipse = ((yy - rows * 0.35) / (rows * 0.2)) ** 2 + ((xx - cols * 0.3) / (cols * 0.15)) ** 2
    mask = ellipse <= 1
    mask[int(rows * 0.6) : int(rows * 0.85), int(cols * 0.55) : int(cols * 0.9)] = True
    return mask


# -- normalisation -----------------------------------------------------------------------------


def test_normalize_kinds() -> None:
    image = np.arange(1000, dtype=np.float64).reshape(20, 50)
    pct = normalize(image, Normalization(NormalizationKind.PERCENTILE, lower=1, upper=99))
    assert pct.dtype == np.float32
    assert pct.min() == 0 and pct.max() == 1
    assert np.count_nonzero(pct == 1) == 10  # the top 1 % clipped
    win = normalize(image, Normalization(NormalizationKind.WINDOW, center=500, width=200))
    assert win[0, 0] == 0 and win[-1, -1] == 1
    assert win.ravel()[500] == pytest.approx(0.5)
    z = normalize(image, Normalization(NormalizationKind.ZSCORE))
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1, abs=1e-5)
    flat = normalize(np.full((4, 4), 7.0), Normalization(NormalizationKind.PERCENTILE))
    assert not flat.any()


# -- 2D ----------------------------------------------------------------------------------------


def test_prepare_image_pads_to_square_with_minimum(package_2d: ModelPackage) -> None:
    image = np.full((100, 50), 10.0)
    image[:, :25] = 20.0  # left half bright
    prepared, placement = prepare_image(image, package_2d)
    assert prepared.shape == (128, 128) and prepared.dtype == np.float32
    assert placement == Placement((100, 50), 100, 0, 25, (128, 128))
    # padding at left and right has the minimum; the image sits in the middle half
    assert prepared[:, :30].max() == 0 and prepared[:, -30:].max() == 0
    assert prepared[:, 34:62].min() == pytest.approx(1)
    assert prepared[:, 66:94].max() == pytest.approx(0)


@pytest.mark.parametrize(("rows", "cols"), [(600, 400), (300, 520), (90, 90), (40, 70)])
def test_mask_round_trip_onto_source_grid(package_2d: ModelPackage, rows: int, cols: int) -> None:
    mask = blob_mask(rows, cols)
    _, placement = prepare_image(np.random.default_rng(0).random((rows, cols)), package_2d)
    on_input = to_input_grid(mask[None].astype(np.float32), placement)
    assert on_input.shape == (1, 128, 128)
    back = restore_probabilities(on_input, placement)
    assert back.shape == (1, rows, cols)
    assert iou(back[0] > 0.5, mask) > 0.97


@pytest.mark.shared_data("jsrt", "images")
def test_jsrt_masks_round_trip_cropped_non_square(package_2d: ModelPackage) -> None:
    case = jsrt_cases()[0]
    image = np.asarray(Image.open(JSRT / "images" / f"{case}.png"), dtype=np.float32)
    for structure in ("right_lung", "heart", "left_clavicle"):
        mask = jsrt_mask(case, structure)[100:900, 40:1000]  # 800 x 960
        _, placement = prepare_image(
            image[100:900, 40:1000], replace(package_2d, input_size=(256, 256))
        )
        back = restore_probabilities(
            to_input_grid(mask[None].astype(np.float32), placement), placement
        )
        assert iou(back[0] > 0.5, mask) > 0.9, structure
        if structure != "left_clavicle":  # thin: loses most to 256 px
            assert iou(back[0] > 0.5, mask) > 0.97, structure


def test_restore_rejects_wrong_shapes(package_2d: ModelPackage) -> None:
    _, placement = prepare_image(np.zeros((30, 20)), package_2d)
    with pytest.raises(ValueError, match="expected"):
        restore_probabilities(np.zeros((2, 64, 64), dtype=np.float32), placement)
    with pytest.raises(ValueError, match="2D image"):
        prepare_image(np.zeros((2, 30, 20)), package_2d)


# -- 3D ----------------------------------------------------------------------------------------


def ct_with_box(tmp_path: Path) -> tuple[ImageSeries, np.ndarray]:
    """A CT series (12 x 48 x 40, spacing 2.5 x 0.8 x 0.8) with an off-centre tissue box."""
    datasets = ct_series(n_slices=12, rows=48, cols=40, shuffle=True)
    box = np.zeros((12, 48, 40), dtype=bool)
    box[2:8, 6:30, 20:36] = True
    for ds in datasets:
        k = round((float(ds.ImagePositionPatient[2]) + 100.0) / 2.5)
        hu = np.where(box[k], 40, -1000)
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
    return load_series(write(datasets, tmp_path)), box


def test_volume_round_trip_onto_source_grid(tmp_path: Path, package_3d: ModelPackage) -> None:
    series, box = ct_with_box(tmp_path)
    (volume,), placement = prepare_volume(series, package_3d)  # one input: one channel
    # 12 slices at 2.5 mm -> 27.5 mm / 1.5 mm + 1 = 20 (ceil); 48 rows at 0.8 -> 37.6 / 1.2 + 1 = 33
    assert volume.shape == (20, 33, 27)
    assert placement.resampled_spacing == (1.2, 1.2, 1.5)
    assert placement.source_size == (40, 48, 12)
    assert volume.min() >= 0 and volume.max() <= 1
    back = restore_volume(np.stack([volume, 1 - volume]), placement)
    assert back.shape == (2, 12, 48, 40)
    assert iou(back[0] > 0.5, box) > 0.9
    assert iou(back[1] > 0.5, ~box) > 0.97


def test_volume_without_resampling_is_identity(tmp_path: Path, package_3d: ModelPackage) -> None:
    series, box = ct_with_box(tmp_path)
    (volume,), placement = prepare_volume(series, replace(package_3d, spacing_mm=None))
    assert placement.is_identity
    np.testing.assert_array_equal(volume > 0.5, box)
    np.testing.assert_array_equal(restore_volume(volume[None], placement)[0], volume)


def test_volume_needs_cross_sectional_even_series(tmp_path: Path, package_3d: ModelPackage) -> None:
    dx = load_series(write([dx_from_array(np.zeros((8, 8)))], tmp_path / "dx"))
    with pytest.raises(InputError, match="projection"):
        prepare_volume(dx, package_3d)
    one = load_series(write(ct_series(n_slices=1, rows=8, cols=8), tmp_path / "one"))
    with pytest.raises(InputError, match="at least 2 slices"):
        prepare_volume(one, package_3d)
    uneven = ct_series(n_slices=3, rows=8, cols=8, shuffle=False)
    uneven[2].ImagePositionPatient = [*uneven[2].ImagePositionPatient[:2], 0.0]
    with pytest.raises(InputError, match="uniformly spaced"):
        prepare_volume(load_series(write(uneven, tmp_path / "uneven")), package_3d)
