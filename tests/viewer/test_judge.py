"""The pixel judge of the viewer tests, on synthetic screenshots (no browser needed)."""

from __future__ import annotations

import numpy as np

from tests.viewer.judge import Affine, judge

COLOURS = np.array([[220.0, 40.0, 40.0], [40.0, 200.0, 60.0]])
SCALE = 4.0  # canvas pixels per image pixel
OFFSET = (10.0, 6.0)  # canvas position of the image's top-left corner


def masks() -> np.ndarray:
    out = np.zeros((20, 30, 2), dtype=bool)
    out[3:12, 2:10, 0] = True  # upper left
    out[10:18, 18:27, 1] = True  # lower right
    return out


def render(image_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, Affine]:
    """A 'viewer': grey ramp image, each segment blended at alpha 0.5 in its colour."""
    transform = Affine(origin=OFFSET, dcol=(SCALE, 0.0), drow=(0.0, SCALE))
    height, width = 100, 140
    ys, xs = np.mgrid[0:height, 0:width]
    col = np.floor((xs + 0.5 - OFFSET[0]) / SCALE).astype(int)
    row = np.floor((ys + 0.5 - OFFSET[1]) / SCALE).astype(int)
    rows, cols, _ = image_masks.shape
    inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    grey = np.where(inside, 40 + 5 * np.clip(col, 0, cols), 0).astype(float)
    hidden = np.repeat(grey[..., None], 3, axis=-1)
    shown = hidden.copy()
    for i, colour in enumerate(COLOURS):
        on = inside & image_masks[np.clip(row, 0, rows - 1), np.clip(col, 0, cols - 1), i]
        shown[on] = 0.5 * hidden[on] + 0.5 * colour
    return shown.round(), hidden.round(), transform


def test_a_seg_in_place_passes() -> None:
    shown, hidden, transform = render(masks())
    verdict = judge(shown, hidden, transform, masks(), COLOURS)
    assert verdict.failures == []
    assert [s.nearest_colour for s in verdict.segments] == [1, 2]
    assert all(abs(s.alpha - 0.5) < 0.05 for s in verdict.segments)


def test_a_flipped_seg_fails() -> None:
    shown, hidden, transform = render(masks()[:, ::-1])
    failures = judge(shown, hidden, transform, masks(), COLOURS).failures
    assert any("segment 1" in f and "inner" in f for f in failures), failures
    assert any("outside every segment" in f for f in failures), failures


def test_a_seg_shifted_by_three_pixels_fails() -> None:
    shown, hidden, transform = render(np.roll(masks(), 3, axis=0))
    assert judge(shown, hidden, transform, masks(), COLOURS).failures


def test_swapped_colours_fail() -> None:
    shown, hidden, transform = render(masks())
    failures = judge(shown, hidden, transform, masks(), COLOURS[::-1]).failures
    assert any("nearer to the colour of segment" in f for f in failures), failures
