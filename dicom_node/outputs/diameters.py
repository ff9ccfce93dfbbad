"""The longest diameter of a 2D mask and the longest diameter perpendicular to it, in mm.

This is how radiologists measure a breast lesion on ultrasound (and bidimensional tumour
measurements generally): the longest diameter of the lesion, then the longest diameter at right
angles to it. On the mask, with physical pixel spacing (rows and columns may differ):

* each mask pixel is the square ``[col, col + 1) x [row, row + 1)`` of the image (the PS3.3
  C.18.6.1.1 convention: (0, 0) is the top-left corner of the top-left pixel), so a 10-pixel
  wide rectangle is 10 column spacings wide;
* the longest diameter is the largest distance, in mm, between two corners of mask pixels (the
  maximum Feret diameter, found on the convex hull of the corners);
* the perpendicular diameter is the longest chord of the mask at right angles to it: on every
  line perpendicular to the longest diameter (sampled finely, see :func:`_longest_chord`),
  from the first to the last point inside the mask; the longest counts. For a convex lesion
  this is its width perpendicular to the long axis, between two border points on one line,
  as a radiologist places the second calliper pair.

Both come with their end points in image coordinates (column, row), for the SR's polylines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull, QhullError


@dataclass(frozen=True)
class Diameters:
    """The two diameters of a mask and where they lie.

    Attributes
    ----------
    longest_mm, perpendicular_mm
        The longest diameter and the longest diameter perpendicular to it, in mm.
    longest_points, perpendicular_points
        ``(2, 2)`` end points of each in image coordinates ``(column, row)`` (pixel corners:
        (0, 0) is the top-left corner of the image).
    spacing_mm
        ``(row spacing, column spacing)`` used, in mm.
    """

    longest_mm: float
    perpendicular_mm: float
    longest_points: np.ndarray
    perpendicular_points: np.ndarray
    spacing_mm: tuple[float, float]

    def describe(self) -> str:
        """The two lines in words, with their image coordinates (for the SR)."""

        def line(points: np.ndarray) -> str:
            (c0, r0), (c1, r1) = points
            return f"({c0:.1f}, {r0:.1f}) to ({c1:.1f}, {r1:.1f})"

        return (
            f"longest diameter {self.longest_mm:.1f} mm from {line(self.longest_points)}, "
            f"perpendicular diameter {self.perpendicular_mm:.1f} mm from "
            f"{line(self.perpendicular_points)} (image column, row; pixel corners)"
        )


def _corners(mask: np.ndarray) -> np.ndarray:
    """Corners ``(n, 2)`` as (column, row) of the mask's pixels that touch its border."""
    padded = np.pad(mask, 1)
    inner = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    rows, cols = np.nonzero(mask & ~inner)
    offsets = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float64)
    points = np.stack([cols, rows], axis=1).astype(np.float64)
    return np.unique((points[:, None, :] + offsets[None]).reshape(-1, 2), axis=0)


def _longest_chord(
    mask: np.ndarray,
    spacing: tuple[float, float],
    origin: np.ndarray,
    axis: np.ndarray,
    normal: np.ndarray,
    points: np.ndarray,
) -> tuple[float, np.ndarray]:
    """The longest chord of ``mask`` along ``normal``, over lines crossing ``axis``.

    Lines at right angles to the axis, every half of the smaller spacing along it, are sampled
    every quarter of the smaller spacing; on each line the chord runs from the first to the
    last sample inside the mask (each end within a quarter spacing of the border, the middle
    of that interval taken). Returns its length in mm and its end points in mm.
    """
    row_mm, col_mm = spacing
    fine = min(row_mm, col_mm) / 4
    along = (points - origin) @ axis
    across = (points - origin) @ normal
    ts = np.arange(float(along.min()), float(along.max()) + fine, 2 * fine)
    ss = np.arange(float(across.min()) - fine, float(across.max()) + 2 * fine, fine)
    best, best_ends = 0.0, np.stack([origin, origin])
    for chunk in range(0, len(ts), 128):
        t = ts[chunk : chunk + 128]
        xy = origin + t[:, None, None] * axis + ss[None, :, None] * normal  # (T, S, 2) mm
        cols = np.floor(xy[..., 0] / col_mm).astype(np.int64)
        rows = np.floor(xy[..., 1] / row_mm).astype(np.int64)
        valid = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
        inside = np.zeros(valid.shape, dtype=bool)
        inside[valid] = mask[rows[valid], cols[valid]]
        hit = inside.any(axis=1)
        if not hit.any():
            continue
        first = np.argmax(inside, axis=1)
        last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
        lengths = np.where(hit, (last - first) * fine + fine, 0.0)
        k = int(np.argmax(lengths))
        if lengths[k] > best:
            best = float(lengths[k])
            low, high = ss[first[k]] - fine / 2, ss[last[k]] + fine / 2
            base = origin + t[k] * axis
            best_ends = np.stack([base + low * normal, base + high * normal])
    return best, best_ends


def measure_diameters(mask: np.ndarray, spacing_mm: tuple[float, float]) -> Diameters | None:
    """The longest and the perpendicular diameter of a 2D boolean ``mask``.

    Parameters
    ----------
    mask
        Boolean ``(rows, cols)``; all its pixels count (several components are measured as
        one finding).
    spacing_mm
        ``(row spacing, column spacing)`` in mm.

    Returns
    -------
    Diameters | None
        None for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (rows, cols), got shape {mask.shape}")
    row_mm, col_mm = float(spacing_mm[0]), float(spacing_mm[1])
    if not (row_mm > 0 and col_mm > 0):
        raise ValueError(f"spacing must be positive, got {spacing_mm}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    image_points = _corners(mask)  # (column, row)
    scale = np.array([col_mm, row_mm])
    mm = image_points * scale
    try:
        hull = mm[ConvexHull(mm).vertices]
    except QhullError:  # all corners on one line cannot happen for pixels; keep all points
        hull = mm
    gaps = hull[:, None, :] - hull[None, :, :]
    distances = np.hypot(gaps[..., 0], gaps[..., 1])
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    longest = float(distances[i, j])
    axis = (hull[j] - hull[i]) / longest
    normal = np.array([-axis[1], axis[0]])
    perpendicular, ends_mm = _longest_chord(mask, (row_mm, col_mm), hull[i], axis, normal, mm)
    return Diameters(
        longest_mm=longest,
        perpendicular_mm=perpendicular,
        longest_points=np.stack([hull[i], hull[j]]) / scale,
        perpendicular_points=ends_mm / scale,
        spacing_mm=(row_mm, col_mm),
    )
