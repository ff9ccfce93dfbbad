"""Series to image stack with exact geometry.

:func:`load_series` reads the instances of one series and returns an :class:`ImageSeries`: the
decoded frames (by :mod:`dicom_node.imaging.pixels`: modality values in MONOCHROME2 polarity,
or RGB with its luminance for colour images) with the pixel spacing and, for cross-sectional
series, the frames sorted along the slice normal. Each frame remembers the instance and the
frame number it came from (:attr:`ImageSeries.frame_sources`).

Instances may be single-frame or multi-frame: Enhanced and Legacy Converted Enhanced CT/MR/PET
objects place each frame with their Functional Groups, read by :mod:`dicom_node.imaging.frames`;
classic multi-frame objects (ultrasound cine, secondary capture) are projection frames.

Two kinds of series are supported:

* cross-sectional (CT, MR, PT, ...): every frame has Image Position (Patient) (0020,0032) and
  Image Orientation (Patient) (0020,0037); the frames are sorted by their position along the
  normal of the image plane (the cross product of the row and column direction cosines);
* projection (CR, DX, MG, XA, US, secondary capture, ...): frames without that geometry, of
  one size, stacked in Instance Number (0020,0013) order, then frame number.

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

from dicom_node.common.errors import InputError
from dicom_node.imaging.frames import FrameGeometry, frame_geometries, frame_modality_luts
from dicom_node.imaging.header import drop_implausible_spacings
from dicom_node.imaging.pixels import (
    COLOR,
    PALETTE,
    check_pixel_module,
    decode_instance,
    image_size,
    number_of_frames,
)

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
        The source instances (full datasets, pixel data included), in the order their first
        frame appears; for single-frame instances this is frame order.
    pixels
        ``float32`` array of shape ``(frames, rows, cols)``: modality values after Rescale
        Slope/Intercept (or the Modality LUT), always in MONOCHROME2 polarity (MONOCHROME1
        frames are inverted within the range of their stored values); for colour images the
        ITU-R BT.601 luminance of :attr:`rgb`.
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
    rgb
        Colour images (RGB, YBR_*, PALETTE COLOR): ``float32 (frames, rows, cols, 3)`` RGB in
        0..255, in frame order; None for grayscale series.
    frame_sources
        Per frame, ``(index into datasets, frame number)``; frame numbers start at 1 (always 1
        for single-frame instances). Default: every frame of every dataset in order.
    positions_mm
        Cross-sectional: ``(frames, 3)`` Image Position (Patient) of each frame; default from
        the datasets (single-frame). None for projection images.
    direction_cosines
        Cross-sectional: Image Orientation (Patient) (6 numbers) shared by all frames; default
        from the first dataset. None for projection images.
    """

    datasets: tuple[pydicom.Dataset, ...]
    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    slice_spacing_mm: float | None
    is_projection: bool
    rgb: np.ndarray | None = None
    frame_sources: tuple[tuple[int, int], ...] = ()
    positions_mm: np.ndarray | None = None
    direction_cosines: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.frame_sources:
            sources = tuple(
                (i, f)
                for i, ds in enumerate(self.datasets)
                for f in range(1, number_of_frames(ds) + 1)
            )
            object.__setattr__(self, "frame_sources", sources)
        if len(self.frame_sources) != self.pixels.shape[0]:
            raise ValueError(
                f"{len(self.frame_sources)} frame sources for {self.pixels.shape[0]} frames"
            )
        if self.rgb is not None and self.rgb.shape != (*self.pixels.shape, 3):
            raise ValueError(f"rgb {self.rgb.shape} does not match pixels {self.pixels.shape}")
        if self.is_projection:
            return
        if self.direction_cosines is None:
            iop = np.asarray(self.datasets[0].ImageOrientationPatient, dtype=np.float64)
            object.__setattr__(self, "direction_cosines", tuple(float(v) for v in iop))
        if self.positions_mm is None:
            positions = [
                np.asarray(self.datasets[i].ImagePositionPatient, dtype=np.float64)
                for i, _ in self.frame_sources
            ]
            object.__setattr__(self, "positions_mm", np.stack(positions))

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
        """SOP Instance UID (0008,0018) of each dataset, in :attr:`datasets` order (for a
        series of single-frame instances: of each frame, in frame order)."""
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)

    @property
    def frame_keys(self) -> tuple[tuple[str, int], ...]:
        """``(SOP Instance UID, frame number)`` of each frame, in frame order: what a SEG's
        Derivation Image Sequence (0008,9124) and an SR's source image references name."""
        uids = self.sop_instance_uids
        return tuple((uids[i], f) for i, f in self.frame_sources)

    @property
    def is_color(self) -> bool:
        """True for colour images (:attr:`rgb` is set)."""
        return self.rgb is not None

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
        if self.is_projection or self.direction_cosines is None:
            return None
        row_dir, col_dir = _unit_cosines(self.direction_cosines)
        return np.stack([row_dir, col_dir, np.cross(row_dir, col_dir)])

    @property
    def origin_mm(self) -> np.ndarray | None:
        """Cross-sectional: Image Position (Patient) (0020,0032) of the first frame's top-left
        pixel centre. None for projection images."""
        if self.is_projection or self.positions_mm is None:
            return None
        return np.asarray(self.positions_mm[0], dtype=np.float64)


@dataclass(frozen=True)
class _Frame:
    dataset: int  # index into the list of unique datasets as read
    number: int  # 1-based frame number within its instance
    geometry: FrameGeometry


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _unit_cosines(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(iop, dtype=np.float64)
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise InputError("ImageOrientationPatient (0020,0037) must hold 6 finite numbers")
    row_dir, col_dir = values[:3], values[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 1e-6:
        raise InputError("ImageOrientationPatient (0020,0037) has a zero direction cosine")
    return row_dir / norms[0], col_dir / norms[1]


def decode_frame(ds: pydicom.Dataset) -> np.ndarray:
    """Decode the single frame of ``ds`` as modality values in MONOCHROME2 polarity (the
    luminance for colour images); see :func:`dicom_node.imaging.pixels.decode_instance`.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(Rows, Columns)``.

    Raises
    ------
    InputError
        When the pixel data cannot be decoded, or ``ds`` has several frames.
    """
    frames = number_of_frames(ds)
    if frames != 1:
        raise InputError(f"decode_frame decodes single frames; the instance has {frames}")
    frame: np.ndarray = decode_instance(ds, frame_modality_luts(ds)).gray[0]
    return frame


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
    try:
        if value is None or len(value) != 2:
            return None
        row, col = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
        return None
    return row, col


def _instance_number(ds: pydicom.Dataset) -> int:
    value = ds.get("InstanceNumber")
    try:
        return 0 if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return 0


def _sort_cross_sectional(frames: list[_Frame]) -> tuple[list[_Frame], float | None]:
    """Sort by position along the slice normal; return the sorted frames and slice spacing."""
    first = frames[0].geometry.orientation
    assert first is not None
    row_dir, col_dir = _unit_cosines(first)
    for frame in frames[1:]:
        assert frame.geometry.orientation is not None
        r, c = _unit_cosines(frame.geometry.orientation)
        if not (
            np.allclose(r, row_dir, atol=ORIENTATION_TOLERANCE)
            and np.allclose(c, col_dir, atol=ORIENTATION_TOLERANCE)
        ):
            raise InputError(
                "the frames have different ImageOrientationPatient (0020,0037); a series "
                "must be one stack of parallel slices (split localizers and reformats apart)"
            )
    normal = np.cross(row_dir, col_dir)
    positions = [float(np.asarray(f.geometry.position_mm) @ normal) for f in frames]
    order = np.argsort(positions, kind="stable")
    ordered = np.asarray(positions)[order]
    gaps = np.diff(ordered)
    if gaps.size and gaps.min() < DUPLICATE_POSITION_MM:
        raise InputError(
            "two or more frames share one ImagePositionPatient (0020,0032) along the slice "
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
    return [frames[i] for i in order], spacing


def _check_consistent(datasets: list[pydicom.Dataset], is_projection: bool) -> None:
    sizes = {image_size(ds) for ds in datasets}
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
    kinds = {str(ds.PhotometricInterpretation).strip() in (*COLOR, PALETTE) for ds in datasets}
    if len(kinds) != 1:
        raise InputError(
            "the series mixes colour and grayscale images (PhotometricInterpretation "
            "(0028,0004)); send them as separate series"
        )
    if not is_projection:
        missing = [ds for ds in datasets if not ds.get("FrameOfReferenceUID")]
        if missing:
            raise InputError(
                f"{len(missing)} instance(s) with ImagePositionPatient (0020,0032) have no "
                "FrameOfReferenceUID (0020,0052), which places them in the patient; the "
                "sender must fill it in"
            )


def load_series(paths: Sequence[Path]) -> ImageSeries:
    """Read the instances in ``paths`` (one series) and decode them into an :class:`ImageSeries`.

    Parameters
    ----------
    paths
        DICOM files of one series (Series Instance UID (0020,000E)), in any order, single- or
        multi-frame. Instances received twice (same SOP Instance UID (0008,0018)) are used once.

    Returns
    -------
    ImageSeries
        Frames sorted along the slice normal (cross-sectional) or by Instance Number
        (0020,0013) and frame number (projection).

    Raises
    ------
    InputError
        When the files are not one series of images of one size and one kind (colour or
        grayscale), with, for cross-sectional series, one orientation, a Frame of Reference
        and no duplicate positions; or when the pixel data cannot be decoded (see
        :func:`dicom_node.imaging.pixels.check_pixel_module`). The message says what is wrong.
    """
    if not paths:
        raise InputError("no instances given; a series needs at least one image")
    unique: dict[str, pydicom.Dataset] = {}
    for path in paths:
        ds = _read(Path(path))
        drop_implausible_spacings(ds)
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
    frames: list[_Frame] = []
    for index, ds in enumerate(datasets):
        check_pixel_module(ds)
        frames.extend(
            _Frame(index, number, geometry)
            for number, geometry in enumerate(frame_geometries(ds), start=1)
        )
    has_geometry = [
        f.geometry.position_mm is not None and f.geometry.orientation is not None for f in frames
    ]
    if any(has_geometry) and not all(has_geometry):
        raise InputError(
            "only some instances or frames have ImagePositionPatient (0020,0032) and "
            "ImageOrientationPatient (0020,0037); a series must be all cross-sectional or all "
            "projection images"
        )
    is_projection = not all(has_geometry)
    _check_consistent(datasets, is_projection)

    slice_spacing: float | None = None
    if is_projection:
        frames.sort(key=lambda f: (_instance_number(datasets[f.dataset]), f.dataset, f.number))
        found = {_projection_spacing(ds) for ds in datasets}
        if len(found) == 1:
            pixel_spacing, source = found.pop()
        else:
            log.warning("projection images with different pixel spacings; spacing not used")
            pixel_spacing, source = None, None
    else:
        frames, slice_spacing = _sort_cross_sectional(frames)
        spacings = {f.geometry.pixel_spacing_mm for f in frames}
        if len(spacings) != 1:
            raise InputError(
                "the slices of this series have different PixelSpacing (0028,0030); "
                "a cross-sectional series must have one pixel spacing"
            )
        pixel_spacing = spacings.pop()
        source = None if pixel_spacing is None else "PixelSpacing"

    # Datasets in the order of their first frame; frames point into that order.
    order: dict[int, int] = {}
    for frame in frames:
        order.setdefault(frame.dataset, len(order))
    decoded = {i: decode_instance(datasets[i], frame_modality_luts(datasets[i])) for i in order}
    pixels = np.stack([decoded[f.dataset].gray[f.number - 1] for f in frames])
    color = all(d.rgb is not None for d in decoded.values())
    rgb = (
        np.stack([decoded[f.dataset].rgb[f.number - 1] for f in frames])  # type: ignore[index]
        if color
        else None
    )
    series = ImageSeries(
        datasets=tuple(datasets[i] for i in order),
        pixels=pixels,
        pixel_spacing_mm=pixel_spacing,
        spacing_source=source,
        slice_spacing_mm=slice_spacing,
        is_projection=is_projection,
        rgb=rgb,
        frame_sources=tuple((order[f.dataset], f.number) for f in frames),
        positions_mm=(
            None
            if is_projection
            else np.array([f.geometry.position_mm for f in frames], dtype=np.float64)
        ),
        direction_cosines=None if is_projection else frames[0].geometry.orientation,
    )
    log.debug(
        "series loaded",
        modality=series.modality,
        instances=len(series.datasets),
        frames=pixels.shape[0],
        rows=pixels.shape[1],
        cols=pixels.shape[2],
        projection=is_projection,
        color=color,
    )
    return series
