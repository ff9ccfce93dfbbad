"""Series loading: ordering, modality values, polarity, spacing, compression and errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.common.errors import InputError
from dicom_node.imaging.series import ImageSeries, load_series
from tests.factories import JSRT, ct_series, dx_from_array, jsrt_cases, jsrt_dx


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Save ``datasets`` as DICOM files under ``folder``; return their paths in list order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stored_hu(ds: Dataset) -> np.ndarray:
    """HU of a factory CT slice, computed from its raw bytes, independently of pydicom."""
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)
    return raw.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def noise_image(rows: int = 48, cols: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, cols))


# -- cross-sectional ---------------------------------------------------------------------------


def test_shuffled_ct_comes_out_sorted_with_hu(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=8, rows=40, cols=48, shuffle=True, seed=3)
    z_given = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z_given != sorted(z_given), "the factory should shuffle"

    series = load_series(write(datasets, tmp_path))

    z_loaded = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    assert z_loaded == sorted(z_given)
    assert series.pixels.dtype == np.float32
    assert series.pixels.shape == (8, 40, 48)
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    np.testing.assert_array_equal(series.pixels, np.stack([stored_hu(ds) for ds in by_z]))
    # the phantom: soft tissue (40 HU) in the centre, air (-1000 HU) in the corner
    assert abs(float(series.pixels[4, 20, 24]) - 40) < 50
    assert abs(float(series.pixels[4, 0, 0]) + 1000) < 50
    assert series.is_projection is False
    assert series.pixel_spacing_mm == (0.8, 0.8)
    assert series.spacing_source == "PixelSpacing"
    assert series.slice_spacing_mm == pytest.approx(2.5)
    assert series.modality == "CT"
    assert series.series_instance_uid == datasets[0].SeriesInstanceUID
    assert series.study_instance_uid == datasets[0].StudyInstanceUID
    np.testing.assert_allclose(series.orientation, np.eye(3))  # type: ignore[arg-type]


def test_sagittal_series_sorted_along_normal(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=5, rows=16, cols=16, shuffle=True, seed=4)
    for ds in datasets:
        k = float(ds.ImagePositionPatient[2]) + 100.0  # 0, 2.5, 5, ...
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # normal = row x col = (-1, 0, 0)
        ds.ImagePositionPatient = [k, -10.0, 20.0]
    series = load_series(write(datasets, tmp_path))
    x = [float(ds.ImagePositionPatient[0]) for ds in series.datasets]
    assert x == sorted(x, reverse=True)  # increasing along the normal = decreasing x
    assert series.slice_spacing_mm == pytest.approx(2.5)


def test_uneven_slice_gaps_give_no_slice_spacing(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=4, rows=16, cols=16, shuffle=False)
    datasets[3].ImagePositionPatient = [*datasets[3].ImagePositionPatient[:2], 0.0]
    series = load_series(write(datasets, tmp_path))
    assert series.slice_spacing_mm is None
    assert series.shape == (4, 16, 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("size", "different sizes"),
        ("orientation", "different ImageOrientationPatient"),
        ("duplicate", "share one ImagePositionPatient"),
        ("series", "belong to 2 series"),
        ("spacing", "different PixelSpacing"),
        ("geometry", "only some instances"),
        ("color", "mixes colour and grayscale"),
    ],
)
def test_inconsistent_cross_sectional_series_rejected(
    tmp_path: Path, change: str, message: str
) -> None:
    datasets = ct_series(n_slices=4, rows=16, cols=16, shuffle=False)
    odd = datasets[2]
    if change == "size":
        odd.Rows, odd.Columns = 8, 32
    elif change == "orientation":
        odd.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    elif change == "duplicate":
        odd.ImagePositionPatient = datasets[1].ImagePositionPatient
        odd.SOPInstanceUID = generate_uid()
    elif change == "series":
        odd.SeriesInstanceUID = generate_uid()
    elif change == "spacing":
        odd.PixelSpacing = [0.5, 0.5]
    elif change == "geometry":
        del odd.ImagePositionPatient
    elif change == "color":
        odd.SamplesPerPixel = 3
        odd.PhotometricInterpretation = "RGB"
    with pytest.raises(InputError, match=message):
        load_series(write(datasets, tmp_path))


def test_same_instance_twice_is_used_once(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=3, rows=16, cols=16)
    paths = write(datasets, tmp_path)
    series = load_series([*paths, paths[0]])
    assert series.shape == (3, 16, 16)


def test_no_files_and_not_dicom_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no instances"):
        load_series([])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InputError, match="junk.dcm"):
        load_series([junk])


# -- projection --------------------------------------------------------------------------------


def test_monochrome1_equals_monochrome2(tmp_path: Path) -> None:
    image = noise_image(60, 44)
    mono2 = load_series(write([dx_from_array(image)], tmp_path / "m2"))
    mono1 = load_series(write([dx_from_array(image, monochrome1=True)], tmp_path / "m1"))
    assert mono1.datasets[0].PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=1.0)
    # and polarity really is normal: the brightest input pixel is the brightest output pixel
    assert np.argmax(mono1.pixels) == np.argmax(image)


def test_projection_geometry_and_spacing_source(tmp_path: Path) -> None:
    ds = dx_from_array(noise_image(30, 50), spacing_mm=0.2)  # uncalibrated PixelSpacing too
    series = load_series(write([ds], tmp_path / "a"))
    assert series.is_projection is True
    assert series.shape == (1, 30, 50)
    assert series.spacing_source == "ImagerPixelSpacing"
    assert series.pixel_spacing_mm == (0.2, 0.2)
    assert series.slice_spacing_mm is None
    assert series.orientation is None and series.origin_mm is None

    ds.PixelSpacing = [0.18, 0.17]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    series = load_series(write([ds], tmp_path / "b"))
    assert (series.spacing_source, series.pixel_spacing_mm) == ("PixelSpacing", (0.18, 0.17))

    del ds.ImagerPixelSpacing, ds.PixelSpacingCalibrationType
    series = load_series(write([ds], tmp_path / "c"))
    assert series.spacing_source == "PixelSpacing"

    del ds.PixelSpacing
    series = load_series(write([ds], tmp_path / "d"))
    assert (series.spacing_source, series.pixel_spacing_mm) == (None, None)


def test_projection_instances_stacked_by_instance_number(tmp_path: Path) -> None:
    uid = generate_uid()
    images = [noise_image(20, 30, seed=s) for s in range(3)]
    datasets = [dx_from_array(im, series_uid=uid) for im in images]
    for number, ds in zip((3, 1, 2), datasets, strict=True):
        ds.InstanceNumber = number
    series = load_series(write(datasets, tmp_path))
    assert [int(ds.InstanceNumber) for ds in series.datasets] == [1, 2, 3]
    assert series.shape == (3, 20, 30)
    assert np.argmax(series.pixels[0]) == np.argmax(images[1])


def test_projection_images_of_different_sizes_not_supported(tmp_path: Path) -> None:
    uid = generate_uid()
    datasets = [dx_from_array(noise_image(20, 30), series_uid=uid)]
    datasets.append(dx_from_array(noise_image(30, 20), series_uid=uid))
    with pytest.raises(InputError, match="not supported yet"):
        load_series(write(datasets, tmp_path))


@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored", "signed"),
    [(8, 8, False), (16, 10, False), (16, 12, True), (16, 16, True), (16, 16, False)],
)
def test_bit_depths_and_rescale(
    tmp_path: Path, bits_allocated: int, bits_stored: int, signed: bool
) -> None:
    rng = np.random.default_rng(bits_stored)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1)) if signed else (0, 2**bits_stored)
    stored = rng.integers(lo, hi, size=(12, 10))
    dtype = {8: np.uint8, 16: np.int16 if signed else np.uint16}[bits_allocated]
    ds = dx_from_array(noise_image(12, 10))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.PixelData = stored.astype(dtype).tobytes()
    series = load_series(write([ds], tmp_path))
    np.testing.assert_array_equal(series.pixels[0], stored * 2.0 - 10)


# -- compression -------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_lossless_compression_decodes_identically(tmp_path: Path, syntax: str) -> None:
    dx = dx_from_array(noise_image(50, 36), monochrome1=True)
    ct = ct_series(n_slices=3, rows=32, cols=40, shuffle=False)  # J2K: >= 32 px
    plain_dx = load_series(write([dx], tmp_path / "dx"))
    plain_ct = load_series(write(ct, tmp_path / "ct"))
    dx.compress(syntax)
    for ds in ct:
        ds.compress(syntax)
        assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(
        load_series(write([dx], tmp_path / "dx_c")).pixels, plain_dx.pixels
    )
    np.testing.assert_array_equal(load_series(write(ct, tmp_path / "ct_c")).pixels, plain_ct.pixels)


def test_deflated_dataset_decodes_identically(tmp_path: Path) -> None:
    ct = ct_series(n_slices=2, rows=16, cols=16, shuffle=False)
    plain = load_series(write(ct, tmp_path / "plain"))
    for ds in ct:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = load_series(write(ct, tmp_path / "deflated"))
    assert deflated.datasets[0].file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(deflated.pixels, plain.pixels)


def _jpeg_baseline(image: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """An 8-bit DX encoded as JPEG baseline by Pillow, and Pillow's own decoding of it."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    ds = dx_from_array(image, bits_stored=8)
    ds.BitsAllocated = 8
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32)
    return ds, decoded


def test_jpeg_baseline_decodes(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:48]
    image = np.clip(yy * 3 + xx * 2, 0, 255).astype(np.uint8)
    ds, expected = _jpeg_baseline(image)
    series = load_series(write([ds], tmp_path))
    np.testing.assert_allclose(series.pixels[0], expected, atol=2)


def test_undecodable_pixel_data_is_input_error(tmp_path: Path) -> None:
    ds = dx_from_array(noise_image(16, 16))
    ds.PixelData = encapsulate([b"\x00\x01garbage, not a JPEG 2000 codestream" * 4])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    with pytest.raises(InputError, match="could not be decoded"):
        load_series(write([ds], tmp_path))


def test_missing_pixel_data_is_input_error(tmp_path: Path) -> None:
    ds = dx_from_array(noise_image(16, 16))
    del ds.PixelData
    with pytest.raises(InputError, match="no Pixel Data"):
        load_series(write([ds], tmp_path))


# -- real radiograph ---------------------------------------------------------------------------


@pytest.mark.shared_data("jsrt", "images")
def test_jsrt_radiograph_loads_in_normal_polarity(tmp_path: Path) -> None:
    case = jsrt_cases()[0]
    png = np.asarray(Image.open(JSRT / "images" / f"{case}.png").convert("L"), dtype=np.float64)
    series: ImageSeries = load_series(write([jsrt_dx(case, monochrome1=True)], tmp_path))
    assert series.shape == (1, 1024, 1024)
    assert np.corrcoef(series.pixels[0].ravel(), png.ravel())[0, 1] > 0.999
