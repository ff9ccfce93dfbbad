"""Colour, 32-bit and multi-frame instances from other producers (pydicom's test files,
highdicom's legacy conversion, a Siemens CT), and what is still refused."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.tag import Tag
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.common.errors import InputError
from dicom_node.imaging.pixels import BT601
from dicom_node.imaging.series import ImageSeries, load_series
from tests.conftest import require_shared_data
from tests.factories import SHARED_DATA, ct_series, write_files

SIEMENS_CT = SHARED_DATA / "reference" / "ct-siemens-j2k"


def pydicom_file(name: str) -> Path:
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


def load(name: str) -> ImageSeries:
    return load_series([pydicom_file(name)])


# -- colour ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "max_diff", "mean_diff"),
    [
        ("SC_rgb_rle.dcm", 0.0, 0.0),  # RGB, RLE
        ("SC_ybr_full_422_uncompressed.dcm", 8.0, 1.0),  # YBR_FULL_422 native: chroma halved
        ("SC_rgb_rle_16bit.dcm", 0.0, 0.0),  # 16 bit RGB, scaled to 0..255
        ("SC_rgb_rle_32bit.dcm", 1e-3, 1e-3),  # BitsAllocated 32
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 255.0, 4.0),  # YBR_FULL_422 JPEG baseline, lossy
        ("SC_rgb_jpeg_gdcm.dcm", 0.0, 0.0),  # RGB JPEG lossless (GDCM)
        ("SC_rgb_gdcm_KY.dcm", 0.0, 0.0),  # JPEG 2000 (GDCM)
    ],
)
def test_colour_images_decode_to_the_same_rgb(name: str, max_diff: float, mean_diff: float) -> None:
    """The same picture from several producers and encodings gives one RGB in 0..255."""
    reference = load("SC_rgb_rle.dcm").rgb
    series = load(name)
    assert series.is_color and series.rgb is not None and reference is not None
    assert series.rgb.shape == (1, 100, 100, 3) and series.rgb.dtype == np.float32
    diff = np.abs(series.rgb - reference)
    assert float(diff.max()) <= max_diff
    assert float(diff.mean()) <= mean_diff
    # pixels stays the grayscale view: ITU-R BT.601 luminance
    np.testing.assert_allclose(series.pixels, series.rgb @ BT601, rtol=1e-6)
    assert series.pixels.shape == (1, 100, 100)


def test_ybr_rct_of_jpeg_2000_is_rgb() -> None:
    series = load("examples_jpeg2k.dcm")  # US, YBR_RCT
    assert series.datasets[0].PhotometricInterpretation == "YBR_RCT"
    expected = pixel_array(series.datasets[0])  # the decoder undoes the RCT
    assert series.rgb is not None
    np.testing.assert_array_equal(series.rgb[0], expected.astype(np.float32))


def test_palette_colour_goes_through_its_lut() -> None:
    series = load("examples_palette.dcm")
    ds = series.datasets[0]
    lut = apply_color_lut(pixel_array(ds), ds).astype(np.float32)
    scale = 255.0 / np.iinfo(apply_color_lut(pixel_array(ds), ds).dtype).max
    assert series.rgb is not None
    np.testing.assert_allclose(series.rgb[0], lut * scale, rtol=1e-6)
    assert series.rgb.max() <= 255.0


def test_32_bit_grayscale_keeps_its_values() -> None:
    series = load("rtdose_1frame.dcm")  # BitsAllocated 32, no rescale
    np.testing.assert_array_equal(series.pixels[0], pixel_array(series.datasets[0]))
    assert series.pixels.max() > 2**20  # beyond what 16 bits hold


# -- multi-frame -----------------------------------------------------------------------------


def enhanced_mr(tmp_path: Path, n_slices: int = 6) -> tuple[Path, list[Path]]:
    """A Legacy Converted Enhanced MR Image (highdicom) from shuffled single-frame slices,
    and the single-frame slices themselves."""
    slices = ct_series(n_slices=n_slices, rows=24, cols=20, shuffle=True, seed=3)
    for ds in slices:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 2  # per-frame Pixel Value Transformation
        ds.ImagePositionPatient = [round(float(v), 4) for v in ds.ImagePositionPatient]  # DS <= 16
    singles = write_files(slices, tmp_path / "singles")
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=copy.deepcopy(slices),
        series_instance_uid=slices[0].SeriesInstanceUID,
        series_number=7,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = tmp_path / "enhanced.dcm"
    mf.save_as(path, enforce_file_format=True)
    return path, singles


def test_enhanced_mr_reads_like_its_single_frames(tmp_path: Path) -> None:
    path, singles = enhanced_mr(tmp_path)
    multi, single = load_series([path]), load_series(singles)
    assert multi.shape == single.shape == (6, 24, 20)
    np.testing.assert_array_equal(multi.pixels, single.pixels)  # rescale applied per frame
    np.testing.assert_allclose(multi.positions_mm, single.positions_mm)  # type: ignore[arg-type]
    np.testing.assert_allclose(multi.origin_mm, single.origin_mm)  # type: ignore[arg-type]
    np.testing.assert_allclose(multi.orientation, single.orientation)  # type: ignore[arg-type]
    assert multi.slice_spacing_mm == pytest.approx(single.slice_spacing_mm)
    assert multi.pixel_spacing_mm == single.pixel_spacing_mm
    assert not multi.is_projection
    # One instance; each sorted frame says which of its frames it is.
    assert len(multi.datasets) == 1 and multi.sop_instance_uids == (
        multi.datasets[0].SOPInstanceUID,
    )
    numbers = [f for _, f in multi.frame_sources]
    assert sorted(numbers) == list(range(1, 7)) and numbers != list(range(1, 7))
    mf = multi.datasets[0]
    for (_, number), position in zip(multi.frame_sources, multi.positions_mm, strict=True):  # type: ignore[arg-type]
        item = mf.PerFrameFunctionalGroupsSequence[number - 1]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, position)
    # Single-frame series keep their old meaning.
    assert single.frame_sources == tuple((i, 1) for i in range(6))
    assert single.frame_keys == tuple((uid, 1) for uid in single.sop_instance_uids)


def test_siemens_ct_as_legacy_converted_enhanced_ct(tmp_path: Path) -> None:
    """20 real JPEG 2000 slices, converted by highdicom into one multi-frame object."""
    require_shared_data("reference", "ct-siemens-j2k")
    paths = sorted(SIEMENS_CT.glob("*.dcm"))
    slices = [pydicom.dcmread(p) for p in paths]
    series_uid = generate_uid()
    for ds in slices:
        ds.decompress()
        # UIDs were emptied in these test files; give them back.
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
    singles = write_files(slices, tmp_path / "singles")
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices,
        series_instance_uid=series_uid,
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    multi, single = load_series([tmp_path / "ct.dcm"]), load_series(singles)
    np.testing.assert_array_equal(multi.pixels, single.pixels)
    np.testing.assert_allclose(multi.positions_mm, single.positions_mm)  # type: ignore[arg-type]
    assert multi.slice_spacing_mm == pytest.approx(single.slice_spacing_mm)


def test_multi_frame_ultrasound_cine_is_projection_frames() -> None:
    series = load("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422 JPEG, no geometry
    assert series.is_projection and series.shape == (30, 240, 320)
    assert series.frame_sources == tuple((0, f) for f in range(1, 31))
    assert series.rgb is not None and series.rgb.shape == (30, 240, 320, 3)


def test_two_frame_rgb_secondary_capture() -> None:
    series = load("SC_rgb_rle_2frame.dcm")
    assert series.shape == (2, 100, 100)
    assert series.rgb is not None and not np.array_equal(series.rgb[0], series.rgb[1])


# -- refused, with a reason -------------------------------------------------------------------


def test_one_bit_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"BitsAllocated \(0028,0100\) is 1; images of 8, 16"):
        load("liver_1frame.dcm")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("float", "float pixel data"),
        ("rows", r"Rows \(0028,0010\) and Columns"),
        ("frame_of_reference", r"no FrameOfReferenceUID \(0020,0052\)"),
        ("frames", r"NumberOfFrames \(0028,0008\) is not a valid"),
        ("photometric", "'HSV' is not supported"),
    ],
)
def test_unsupported_input_says_why(tmp_path: Path, change: str, message: str) -> None:
    datasets = ct_series(n_slices=2, rows=8, cols=8)
    ds = datasets[0]
    if change == "float":
        ds.FloatPixelData = np.zeros(64, dtype=np.float32).tobytes()
        del ds.PixelData
    elif change == "rows":
        del ds.Rows
    elif change == "frame_of_reference":
        del ds.FrameOfReferenceUID
    elif change == "frames":
        tag = Tag("NumberOfFrames")  # as received: bytes pydicom cannot read as IS
        ds[tag] = RawDataElement(tag, "IS", 2, b"x ", 0, False, True)
    elif change == "photometric":
        ds.PhotometricInterpretation = "HSV"
    with pytest.raises(InputError, match=message):
        load_series(write_files(datasets, tmp_path))
