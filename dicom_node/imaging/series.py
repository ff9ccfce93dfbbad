"""Series to image stack with exact geometry: the one place where pixel data is decoded.

:func:`load_series` reads the instances of one series and returns an :class:`ImageSeries`:
the decoded frames as modality values (Rescale Slope (0028,1053) and Rescale Intercept
(0028,1052), or the Modality LUT Sequence (0028,3000), applied) in MONOCHROME2 polarity, with the
pixel spacing and, for cross-sectional series, the slices sorted along the slice normal.

Two kinds of series are supported:

* cross-sectional (CT, MR, PT, ...): every instance has Image Position (Patient) (0020,0032) and
  Image Orientation (Patient) (0020,0037); the slices are sorted by their position along the
  normal of the image plane (the cross product of the row and column direction cosines);
* projection (CR, DX, MG, XA, secondary capture, ...): instances without that geometry, of one
  size, stacked as frames in Instance Number (0020,0013) order.

Compressed transfer syntaxes are decoded by pydicom's pixel data handlers with the pylibjpeg,
openjpeg, libjpeg and pyjpegls plugins (JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE);
deflated datasets are inflated by :func:`pydicom.dcmread`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixel_array

from dicom_node.errors import InputError

log = structlog.get_logger(__name__)

#: Tolerance on direction cosines when checking that all slices share one orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Two slices closer than this along the normal are duplicates (another phase or echo).
DUPLICATE_POSITION_MM = 1e-3
#: Relative deviation of a slice gap from the mean gap beyond which spacing is non-uniform.
UNIFORM_SPACING_TOLERANCE = 0.01


@dataclass(frozen=True, eq=False)
class ImageSeries:
    """The decoded frames of one series and their geometry.

    Attributes
    ----------
    datasets
        The source instances in frame order (full datasets, pixel data included).
    pixels
        ``float32`` array of shape ``(frames, rows, cols)``: modality values after Rescale
        Slope/Intercept (or the Modality LUT), always in MONOCHROME2 polarity (MONOCHROME1
        frames are inverted within the range of their stored values).
    pixel_spacing_mm
        ``(row spacing, column spacing)`` in mm, i.e. the distance between the centres of
        adjacent rows and of adjacent columns, or None when the instances do not say.
    spacing_source
        The keyword of the attribute the spacing came from: ``"PixelSpacing"`` (0028,0030),
        ``"ImagerPixelSpacing"`` (0018,1164), i.e. at the detector, not corrected for
        magnification, or ``"NominalScannedPixelSpacing"`` (0018,2010); None with no spacing.
    slice_spacing_mm
        Cross-sectional series with two or more uniformly spaced slices: the distance between
        adjacent slices along the normal, from Image Position (Patient); None otherwise.
    is_projection
        True for projection images (no Image Position/Orientation (Patient)).
    """

    datasets: tuple[pydicom.Dataset, ...]
    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    slice_spacing_mm: float | None
    is_projection: bool

    @property
    def modality(self) -> str:
        """Modality (0008,0060) of the series."""
        return str(self.datasets[0].get("Modality", ""))

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID (0020,000E)."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID (0020,000D)."""
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str | None:
        """Frame of Reference UID (0020,0052), None for projection images without one."""
        value = self.datasets[0].get("FrameOfReferenceUID")
        return None if value is None else str(value)

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOP Instance UID (0008,0018) of each frame's source instance, in frame order."""
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(frames, rows, cols)``."""
        frames, rows, cols = self.pixels.shape
        return int(frames), int(rows), int(cols)

    @property
    def orientation(self) -> np.ndarray | None:
        """Cross-sectional: 3x3 array whose rows are the row direction (increasing column
        index), the column direction (increasing row index) and the slice normal, from Image
        Orientation (Patient) (0020,0037). None for projection images."""
        if self.is_projection:
            return None
        row_dir, col_dir = _orientation(self.datasets[0])
        return np.stack([row_dir, col_dir, np.cross(row_dir, col_dir)])

    @property
    def origin_mm(self) -> np.ndarray | None:
        """Cross-sectional: Image Position (Patient) (0020,0032) of the first frame's top-left
        pixel centre. None for projection images."""
        if self.is_projection:
            return None
        return np.asarray(self.datasets[0].ImagePositionPatient, dtype=np.float64)


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _orientation(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise InputError("ImageOrientationPatient (0020,0037) must hold 6 finite numbers")
    row_dir, col_dir = iop[:3], iop[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 1e-6:
        raise InputError("ImageOrientationPatient (0020,0037) has a zero direction cosine")
    return row_dir / norms[0], col_dir / norms[1]


def _check_pixel_module(ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError("float pixel data is not supported yet; send integer Pixel Data")
        raise InputError("an instance has no Pixel Data (7FE0,0010); send image instances only")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(
            f"SamplesPerPixel (0028,0002) is {ds.SamplesPerPixel}; only grayscale images "
            "(MONOCHROME1/MONOCHROME2) are supported"
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"PhotometricInterpretation (0028,0004) {photometric!r} is not supported; "
            "send MONOCHROME1 or MONOCHROME2 images"
        )
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16):
        raise InputError(
            f"BitsAllocated (0028,0100) is {bits}; only 8 and 16 bit images are supported"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InputError(
            f"multi-frame instances (NumberOfFrames (0028,0008) = {frames}) are not supported "
            "yet; send single-frame instances"
        )


def _stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def decode_frame(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the single frame of ``ds`` as modality values in MONOCHROME2 polarity.

    The stored values are decoded by pydicom's pixel data handlers (the plugin is chosen by
    Transfer Syntax UID (0002,0010)), mapped through the Modality LUT (Rescale Slope (0028,1053)
    and Rescale Intercept (0028,1052), or Modality LUT Sequence (0028,3000)) and, for
    PhotometricInterpretation (0028,0004) MONOCHROME1, inverted: ``lo + hi - value`` where
    ``lo..hi`` is the range of modality values the stored bits can hold.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(Rows, Columns)``.

    Raises
    ------
    InputError
        When the pixel data cannot be decoded or its shape is not ``(Rows, Columns)``.
    """
    _check_pixel_module(ds)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = decode_pixel_array(ds)
    except Exception as exc:  # every decoder plugin raises its own exception types
        name = getattr(syntax, "name", syntax)
        raise InputError(
            f"pixel data with transfer syntax {name!r} could not be decoded ({exc}); "
            "send it uncompressed or in a supported compression"
        ) from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    if stored.shape != (rows, cols):
        raise InputError(
            f"decoded pixel data has shape {stored.shape}, expected (Rows, Columns) = "
            f"{(rows, cols)}"
        )
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        ends = np.asarray(apply_modality_lut(np.array(_stored_range(ds)), ds), dtype=np.float64)
        values = float(ends.min()) + float(ends.max()) - values
    return values.astype(np.float32)


def _projection_spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """Spacing of a projection image and the keyword it came from.

    PixelSpacing (0028,0030) is used when it is calibrated (PixelSpacingCalibrationType
    (0028,0A02) present) or when there is no ImagerPixelSpacing (0018,1164); otherwise
    ImagerPixelSpacing, i.e. the spacing at the detector, is used.
    """
    calibrated = "PixelSpacing" in ds and "PixelSpacingCalibrationType" in ds
    order = (
        ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
        if calibrated or "ImagerPixelSpacing" not in ds
        else ("ImagerPixelSpacing", "PixelSpacing", "NominalScannedPixelSpacing")
    )
    for keyword in order:
        spacing = _spacing(ds, keyword)
        if spacing is not None:
            return spacing, keyword
    return None, None


def _spacing(ds: pydicom.Dataset, keyword: str) -> tuple[float, float] | None:
    value = ds.get(keyword)
    if value is None or len(value) != 2:
        return None
    row, col = float(value[0]), float(value[1])
    if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
        return None
    return row, col


def _instance_number(ds: pydicom.Dataset) -> int:
    value = ds.get("InstanceNumber")
    return 0 if value is None or value == "" else int(value)


def _sort_cross_sectional(
    datasets: list[pydicom.Dataset],
) -> tuple[list[pydicom.Dataset], float | None]:
    """Sort by position along the slice normal; return the sorted list and the slice spacing."""
    row_dir, col_dir = _orientation(datasets[0])
    for ds in datasets[1:]:
        r, c = _orientation(ds)
        if not (
            np.allclose(r, row_dir, atol=ORIENTATION_TOLERANCE)
            and np.allclose(c, col_dir, atol=ORIENTATION_TOLERANCE)
        ):
            raise InputError(
                "the instances have different ImageOrientationPatient (0020,0037); a series "
                "must be one stack of parallel slices (split localizers and reformats apart)"
            )
    normal = np.cross(row_dir, col_dir)
    positions = []
    for ds in datasets:
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
            raise InputError("ImagePositionPatient (0020,0032) must hold 3 finite numbers")
        positions.append(float(ipp @ normal))
    order = np.argsort(positions, kind="stable")
    ordered = np.asarray(positions)[order]
    gaps = np.diff(ordered)
    if gaps.size and gaps.min() < DUPLICATE_POSITION_MM:
        raise InputError(
            "two or more instances share one ImagePositionPatient (0020,0032) along the slice "
            "normal (several phases, echoes or acquisitions in one series); send one stack"
        )
    spacing: float | None = None
    if gaps.size:
        mean_gap = float(gaps.mean())
        if np.all(np.abs(gaps - mean_gap) <= UNIFORM_SPACING_TOLERANCE * mean_gap):
            spacing = mean_gap
        else:
            log.warning(
                "non-uniform slice spacing",
                min_gap_mm=round(float(gaps.min()), 3),
                max_gap_mm=round(float(gaps.max()), 3),
            )
    return [datasets[i] for i in order], spacing


def load_series(paths: Sequence[Path]) -> ImageSeries:
    """Read the instances in ``paths`` (one series) and decode them into an :class:`ImageSeries`.

    Parameters
    ----------
    paths
        DICOM files of one series (Series Instance UID (0020,000E)), in any order. Instances
        received twice (same SOP Instance UID (0008,0018)) are used once.

    Returns
    -------
    ImageSeries
        Frames sorted along the slice normal (cross-sectional) or by Instance Number
        (0020,0013) (projection).

    Raises
    ------
    InputError
        When the files are not one series of grayscale single-frame images of one size and, for
        cross-sectional series, one orientation without duplicate positions; or when the pixel
        data cannot be decoded. The message says what is wrong.
    """
    if not paths:
        raise InputError("no instances given; a series needs at least one image")
    unique: dict[str, pydicom.Dataset] = {}
    for path in paths:
        ds = _read(Path(path))
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise InputError(f"{Path(path).name}: no SOPInstanceUID (0008,0018)")
        unique.setdefault(uid, ds)
    datasets = list(unique.values())
    if len(datasets) < len(paths):
        log.info("duplicate instances ignored", count=len(paths) - len(datasets))

    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1 or "" in series_uids:
        raise InputError(
            f"the instances belong to {len(series_uids)} series (SeriesInstanceUID (0020,000E)); "
            "load one series at a time"
        )
    for ds in datasets:
        _check_pixel_module(ds)
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}

    has_geometry = [
        "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets
    ]
    if any(has_geometry) and not all(has_geometry):
        raise InputError(
            "only some instances have ImagePositionPatient (0020,0032) and "
            "ImageOrientationPatient (0020,0037); a series must be all cross-sectional or all "
            "projection images"
        )
    is_projection = not all(has_geometry)

    if len(sizes) != 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        if is_projection:
            raise InputError(
                f"the projection images of this series have different sizes ({shown} "
                "Rows x Columns); series of images of different sizes are not supported yet"
            )
        raise InputError(
            f"the slices of this series have different sizes ({shown} Rows x Columns); "
            "a cross-sectional series must have one size"
        )

    slice_spacing: float | None = None
    if is_projection:
        datasets.sort(key=_instance_number)
        found = {_projection_spacing(ds) for ds in datasets}
        if len(found) == 1:
            pixel_spacing, source = found.pop()
        else:
            log.warning("projection images with different pixel spacings; spacing not used")
            pixel_spacing, source = None, None
    else:
        datasets, slice_spacing = _sort_cross_sectional(datasets)
        spacings = {_spacing(ds, "PixelSpacing") for ds in datasets}
        if len(spacings) != 1:
            raise InputError(
                "the slices of this series have different PixelSpacing (0028,0030); "
                "a cross-sectional series must have one pixel spacing"
            )
        pixel_spacing = spacings.pop()
        source = None if pixel_spacing is None else "PixelSpacing"

    pixels = np.stack([decode_frame(ds) for ds in datasets])
    log.debug(
        "series loaded",
        modality=str(datasets[0].get("Modality", "")),
        frames=pixels.shape[0],
        rows=pixels.shape[1],
        cols=pixels.shape[2],
        projection=is_projection,
    )
    return ImageSeries(
        datasets=tuple(datasets),
        pixels=pixels,
        pixel_spacing_mm=pixel_spacing,
        spacing_source=source,
        slice_spacing_mm=slice_spacing,
        is_projection=is_projection,
    )
