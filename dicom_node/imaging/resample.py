"""One series' values on another series' grid, in patient coordinates (SimpleITK).

The secondary inputs of a multi-input model are brought onto the reference input's grid
before they become channels: each reference frame is a plane in patient coordinates (Image
Position (Patient) (0020,0032) of the frame, Image Orientation (Patient) (0020,0037), Pixel
Spacing (0028,0030)), and the secondary series is a regular volume in the same coordinates
(its first frame's position, the same orientation attributes, its slice spacing along the
normal). SimpleITK samples the volume at every reference pixel centre (linear); points
outside the secondary volume take ``default``.

This is only meaningful when both series share one patient coordinate system: the same Frame
of Reference UID (0020,0052), or a site that says its inputs are registered. The caller
checks that (:func:`dicom_node.work.segment.segment_case`).
"""

from __future__ import annotations

import numpy as np

from dicom_node.common.errors import InputError
from dicom_node.imaging import sitk
from dicom_node.imaging.series import ImageSeries

#: Positions and spacings that agree within this (mm) are the same grid: no resampling.
SAME_GRID_TOLERANCE_MM = 1e-3


def _check_geometry(series: ImageSeries, role: str) -> tuple[np.ndarray, np.ndarray]:
    """The orientation (3x3, rows: row, column, normal directions) and positions of
    ``series``, or an InputError saying why it has no grid in patient coordinates."""
    if series.is_projection or series.orientation is None or series.positions_mm is None:
        raise InputError(
            f"input {role!r} consists of projection images, which have no position in "
            "patient coordinates; a multi-input model needs cross-sectional series here "
            "(or inputs of one grid with registered: true in model.yaml)"
        )
    if series.pixel_spacing_mm is None:
        raise InputError(f"input {role!r} has no PixelSpacing (0028,0030); it cannot be resampled")
    return series.orientation, np.asarray(series.positions_mm, dtype=np.float64)


def same_grid(a: ImageSeries, b: ImageSeries) -> bool:
    """True when ``a`` and ``b`` have the same pixel grid in patient coordinates."""
    if a.shape != b.shape or a.is_projection or b.is_projection:
        return False
    if a.pixel_spacing_mm is None or a.pixel_spacing_mm != b.pixel_spacing_mm:
        return False
    assert a.orientation is not None and b.orientation is not None
    assert a.positions_mm is not None and b.positions_mm is not None
    return bool(
        np.allclose(a.orientation, b.orientation, atol=1e-6)
        and np.allclose(a.positions_mm, b.positions_mm, atol=SAME_GRID_TOLERANCE_MM)
    )


def _volume(values: np.ndarray, series: ImageSeries, role: str) -> sitk.Image:
    """``values`` ``(frames, rows, cols)`` as a SimpleITK image on the grid of ``series``."""
    orientation, positions = _check_geometry(series, role)
    frames = values.shape[0]
    if frames > 1 and series.slice_spacing_mm is None:
        raise InputError(
            f"input {role!r} has unevenly spaced slices (ImagePositionPatient (0020,0032)); "
            "it cannot be resampled onto the reference input; send an evenly spaced series"
        )
    assert series.pixel_spacing_mm is not None
    row_mm, col_mm = series.pixel_spacing_mm
    return sitk.image_from_array(
        values,
        spacing_mm=(col_mm, row_mm, series.slice_spacing_mm or 1.0),
        origin_mm=tuple(float(v) for v in positions[0]),
        direction=tuple(float(v) for v in orientation.T.ravel()),
    )


def resample_onto(
    values: np.ndarray,
    source: ImageSeries,
    reference: ImageSeries,
    *,
    default: float,
    role: str = "secondary",
) -> np.ndarray:
    """``values`` on the grid of ``source``, resampled (linear) onto the grid of ``reference``.

    Parameters
    ----------
    values
        ``(frames, rows, cols)`` or ``(frames, rows, cols, 3)`` (RGB) in the frame order of
        ``source`` (e.g. its :attr:`~ImageSeries.pixels`).
    source, reference
        Cross-sectional series in one patient coordinate system.
    default
        The value of reference pixels outside the source volume.
    role
        The input's role, for messages.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(frames, rows, cols[, 3])`` in the frame order of ``reference``; a copy
        of ``values`` when both grids are the same.

    Raises
    ------
    InputError
        When either series has no grid in patient coordinates (projection images, no Pixel
        Spacing) or ``source`` has uneven slice gaps.
    """
    if same_grid(source, reference):
        return values.astype(np.float32, copy=True)
    if values.ndim == 4:
        channels = [
            resample_onto(values[..., c], source, reference, default=default, role=role)
            for c in range(values.shape[-1])
        ]
        return np.stack(channels, axis=-1)
    moving = _volume(values, source, role)
    orientation, positions = _check_geometry(reference, "reference")
    assert reference.pixel_spacing_mm is not None
    row_mm, col_mm = reference.pixel_spacing_mm
    frames, rows, cols = reference.shape
    direction = tuple(float(v) for v in orientation.T.ravel())
    out = np.empty((frames, rows, cols), dtype=np.float32)
    for f in range(frames):  # frame by frame: the reference's slices need not be even
        plane = sitk.Grid(
            size=(cols, rows, 1),
            spacing_mm=(col_mm, row_mm, 1.0),
            origin_mm=tuple(float(v) for v in positions[f]),
            direction=direction,
        )
        out[f] = sitk.resample(moving, plane, default=default)[0]
    return out
