"""Outlines of masks as SR spatial coordinates (SCOORD POLYLINE), for viewers to draw.

A mask's outline is the outer boundary of its largest connected part (holes filled), traced
with scikit-image's marching squares at level 0.5 of the 0/1 mask, so it runs along the pixel
edges between inside and outside, then simplified (Douglas-Peucker) to at most
:data:`MAX_POINTS` points and closed by repeating its first point (a closed POLYLINE,
PS3.3 C.18.6.1.2). The simplification is GEOS's (shapely): scikit-image's
``approximate_polygon`` loops in Python and took seconds on the ragged outline of a speckled
mask, where this takes milliseconds. Filling and tracing work on the bounding box of the part
(one pixel wider), which gives the very same points as the whole image in a fraction of the
time (a 1024 x 1024 radiograph's five outlines: 0.7 s before, see docs/benchmarks.md).

Coordinates are SCOORD image coordinates (PS3.3 C.18.6.1.1 and C.10.5.1.2): column then row,
(0, 0) the top-left corner of the top-left pixel, so the centre of pixel (row r, column c) is
(c + 0.5, r + 0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
from scipy import ndimage
from shapely import LineString
from skimage import measure

from dicom_node.imaging.masks import fill_frame_holes

#: scikit-image's marching squares, typed here (scikit-image has no annotations): the
#: contours of a 2D image at a level, each ``(points, 2)`` (row, column).
_find_contours = cast(Callable[[np.ndarray, float], list[np.ndarray]], measure.find_contours)

#: Most points of one outline, the closing point included.
MAX_POINTS = 200
#: Douglas-Peucker tolerance in pixels to start with; doubled until the outline is short enough.
_TOLERANCE_PX = 0.5


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a 2D boolean ``mask``, holes filled (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    part = labels == int(np.argmax(sizes)) + 1
    return fill_frame_holes(part)


def outline(mask: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray | None:
    """Closed outline of the largest part of a 2D ``mask`` in SCOORD image coordinates.

    Parameters
    ----------
    mask
        Boolean ``(rows, cols)``.
    max_points
        Most points of the result (at least 4: a triangle and its closing point).

    Returns
    -------
    numpy.ndarray | None
        ``(n, 2)`` float32 ``(column, row)`` points, ``n <= max_points``, the last equal to the
        first; None for an empty mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (rows, cols), got shape {mask.shape}")
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    part = largest_part(mask)
    rows = np.flatnonzero(part.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(part.any(axis=0))
    box = part[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    padded = np.pad(box, 1).astype(np.float32)  # closed contours at the image border too
    traced = max(_find_contours(padded, 0.5), key=len)  # (row, col) in padded box indices
    traced += (rows[0], cols[0])  # -> padded image indices (exact: integers and halves)
    line = LineString(traced)
    tolerance = _TOLERANCE_PX
    points = _simplified(line, tolerance)
    while len(points) > max_points:
        tolerance *= 2
        points = _simplified(line, tolerance)
    # Padded index -> pixel index: -1; pixel index (centre) -> SCOORD: +0.5.
    scoord = points[:, ::-1] - 0.5
    if not np.array_equal(scoord[0], scoord[-1]):
        scoord = np.vstack([scoord, scoord[:1]])
    return np.asarray(scoord, dtype=np.float32)


def _simplified(line: LineString, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of ``line`` at ``tolerance`` pixels: its ``(n, 2)`` points."""
    return np.asarray(line.simplify(tolerance, preserve_topology=False).coords)


def horizontal_line(first_column: int, last_column: int, row: float) -> np.ndarray:
    """A 2-point POLYLINE across columns ``first_column..last_column`` (both included), along
    their outer pixel edges, at the centre of pixel row ``row``: ``(2, 2)`` float32."""
    y = row + 0.5
    return np.array([[first_column, y], [last_column + 1, y]], dtype=np.float32)
