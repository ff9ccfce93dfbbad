"""Outlines of masks as SCOORD polylines: coordinates, closing, simplification."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from scipy import ndimage
from shapely import LineString
from skimage.measure import find_contours

from dicom_node.outputs.contours import MAX_POINTS, horizontal_line, largest_part, outline


def pixels_inside(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre (column + 0.5, row + 0.5) lies inside the polygon."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=-1)
    return PolygonPath(points).contains_points(centres).reshape(shape)


def test_a_rectangle_is_outlined_along_its_pixel_edges() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:10, 6:21] = True  # rows 4..9, columns 6..20
    points = outline(mask)
    assert points is not None
    assert np.array_equal(points[0], points[-1])  # closed
    # SCOORD: (0, 0) is the top-left corner of the top-left pixel; edges at 6..21 and 4..10,
    # corners cut by at most half a pixel.
    assert points[:, 0].min() == pytest.approx(6.0, abs=0.5)
    assert points[:, 0].max() == pytest.approx(21.0, abs=0.5)
    assert points[:, 1].min() == pytest.approx(4.0, abs=0.5)
    assert points[:, 1].max() == pytest.approx(10.0, abs=0.5)
    assert np.array_equal(pixels_inside(points, mask.shape), mask)


def test_a_mask_at_the_image_border_is_closed() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :4] = True
    points = outline(mask)
    assert points is not None
    assert np.array_equal(points[0], points[-1])
    assert points[:, 0].min() == pytest.approx(0.0, abs=0.5)
    assert np.array_equal(pixels_inside(points, mask.shape), mask)


def test_a_ragged_mask_is_simplified() -> None:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:512, 0:512]
    radius = 150 + 20 * rng.standard_normal(360).cumsum() / 30
    angle = (np.degrees(np.arctan2(rows - 256, cols - 256)).astype(int) + 360) % 360
    mask = np.hypot(rows - 256, cols - 256) < np.clip(radius[angle], 50, 240)
    points = outline(mask)
    assert points is not None
    assert 4 <= len(points) <= MAX_POINTS
    drawn = pixels_inside(points, mask.shape)
    assert (drawn & mask).sum() / (drawn | mask).sum() > 0.97


def test_the_largest_part_with_holes_filled() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a hole
    mask[15:18, 15:18] = True  # a smaller part
    part = largest_part(mask)
    assert part[5:8, 5:8].all() and not part[15:18, 15:18].any()


def test_empty_and_invalid() -> None:
    assert outline(np.zeros((5, 5), dtype=bool)) is None
    with pytest.raises(ValueError, match="2D"):
        outline(np.zeros((1, 5, 5), dtype=bool))
    with pytest.raises(ValueError, match="at least 4"):
        outline(np.ones((5, 5), dtype=bool), max_points=3)


def test_horizontal_line_spans_the_outer_edges() -> None:
    line = horizontal_line(10, 19, 7.0)
    assert line.tolist() == [[10.0, 7.5], [20.0, 7.5]]  # 10 columns wide


def whole_image_outline(mask: np.ndarray) -> np.ndarray:
    """The outline traced over the whole padded image, as before :func:`outline` worked on
    the part's bounding box: the reference the box must reproduce point for point."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    part = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    traced = max(find_contours(np.pad(part, 1).astype(np.float32), 0.5), key=len)
    line = LineString(traced)
    tolerance = 0.5
    points = np.asarray(line.simplify(tolerance, preserve_topology=False).coords)
    while len(points) > MAX_POINTS:
        tolerance *= 2
        points = np.asarray(line.simplify(tolerance, preserve_topology=False).coords)
    scoord = points[:, ::-1] - 0.5
    if not np.array_equal(scoord[0], scoord[-1]):
        scoord = np.vstack([scoord, scoord[:1]])
    return np.asarray(scoord, dtype=np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_the_outline_on_the_bounding_box_is_the_whole_image_outline(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = (96, 160)
    mask = ndimage.gaussian_filter(rng.random(size), 1 + seed) > 0.5  # blobs, some at edges
    mask |= rng.random(size) < 0.02  # specks and ragged edges
    if seed % 2:
        mask[:, :3] = True  # a part along the image's left edge
    assert np.array_equal(outline(mask), whole_image_outline(mask))
