"""Judge from pixels whether a viewer drew a SEG's masks where they belong, in their colours.

Two screenshots of the same viewport, the segmentation shown and hidden, differ only where the
viewer painted the segments. With the viewer's own image-to-canvas transform (read from
cornerstone in the page), every canvas pixel is mapped back to an image pixel, and:

* inside each segment (its mask eroded by a margin, away from the other segments), nearly
  every canvas pixel must change;
* outside all segments (their union dilated by a margin, and outside the image), nearly none
  may change;
* the change inside a segment must be the blend of the hidden pixel toward that segment's
  colour, closer to it than to any other segment's colour.

A SEG flipped or shifted against its image fails the first two; swapped segments fail the
third. Pure numpy/scipy, so the judge is tested without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Summed absolute RGB change above which a canvas pixel counts as painted.
CHANGED_RGB = 24
#: Fraction of a segment's inner pixels that must change.
MIN_INSIDE_CHANGED = 0.9
#: Fraction of the outer pixels that may change (anti-aliasing, text that re-renders).
MAX_OUTSIDE_CHANGED = 0.01


@dataclass(frozen=True)
class Affine:
    """Canvas position of an image position: ``canvas = origin + col * dcol + row * drow``.

    Image positions are continuous, (0, 0) the top-left corner of the top-left pixel (the
    convention of SCOORD, PS3.3 C.18.6.1.1); canvas positions are CSS pixels of the canvas.
    """

    origin: tuple[float, float]
    dcol: tuple[float, float]
    drow: tuple[float, float]

    def canvas_to_image(self, xy: np.ndarray) -> np.ndarray:
        """``(..., 2)`` canvas positions to ``(..., 2)`` image ``(col, row)`` positions."""
        matrix = np.array([self.dcol, self.drow], dtype=float).T  # columns: dcol, drow
        inverse = np.linalg.inv(matrix)
        return (xy - np.asarray(self.origin)) @ inverse.T


@dataclass(frozen=True)
class SegmentVerdict:
    """What the screenshots show of one segment."""

    number: int
    inside_changed: float  # fraction of its inner canvas pixels that changed
    inside_pixels: int
    nearest_colour: int  # segment number whose colour best explains the change
    alpha: float  # blend weight toward its own colour


@dataclass(frozen=True)
class Verdict:
    """The judgement of one pair of screenshots."""

    segments: tuple[SegmentVerdict, ...]
    outside_changed: float
    outside_pixels: int

    @property
    def failures(self) -> list[str]:
        """Each way the screenshots disagree with the masks, in words; empty when they agree."""
        out = []
        for s in self.segments:
            if s.inside_changed < MIN_INSIDE_CHANGED:
                out.append(
                    f"segment {s.number}: only {s.inside_changed:.1%} of its "
                    f"{s.inside_pixels} inner canvas pixels changed"
                )
            if s.nearest_colour != s.number:
                out.append(
                    f"segment {s.number}: painted nearer to the colour of segment "
                    f"{s.nearest_colour}"
                )
        if self.outside_changed > MAX_OUTSIDE_CHANGED:
            out.append(
                f"{self.outside_changed:.1%} of {self.outside_pixels} canvas pixels outside "
                "every segment changed"
            )
        return out


def judge(
    shown: np.ndarray,
    hidden: np.ndarray,
    transform: Affine,
    masks: np.ndarray,
    colours: np.ndarray,
    *,
    margin_px: int = 2,
) -> Verdict:
    """Compare two ``(H, W, 3)`` screenshots of a viewport with the masks it should show.

    Parameters
    ----------
    shown, hidden
        RGB screenshots of the viewport's canvas, segmentation shown and hidden.
    transform
        The viewer's image-to-canvas transform.
    masks
        Boolean ``(rows, cols, S)`` masks of the displayed image; segment ``i + 1`` is
        ``masks[..., i]``.
    colours
        ``(S, 3)`` RGB display colours of the segments (0-255).
    margin_px
        Image pixels left out on each side of every mask boundary (outlines, interpolation).
    """
    shown = shown[..., :3].astype(float)
    hidden = hidden[..., :3].astype(float)
    height, width = shown.shape[:2]
    rows, cols, n = masks.shape
    ys, xs = np.mgrid[0:height, 0:width]
    image_xy = transform.canvas_to_image(np.stack([xs + 0.5, ys + 0.5], axis=-1))
    col = np.floor(image_xy[..., 0]).astype(int)
    row = np.floor(image_xy[..., 1]).astype(int)
    on_image = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    col_c, row_c = np.clip(col, 0, cols - 1), np.clip(row, 0, rows - 1)
    changed = np.abs(shown - hidden).sum(axis=-1) > CHANGED_RGB
    grow = ndimage.generate_binary_structure(2, 2)
    dilated = np.stack(
        [ndimage.binary_dilation(masks[..., i], grow, iterations=margin_px) for i in range(n)],
        axis=-1,
    )
    outside_image = ~dilated.any(axis=-1)
    outside = ~on_image | (on_image & outside_image[row_c, col_c])
    verdicts = []
    for i in range(n):
        inner = ndimage.binary_erosion(masks[..., i], grow, iterations=margin_px)
        others = np.delete(dilated, i, axis=-1).any(axis=-1) if n > 1 else np.zeros_like(inner)
        inner &= ~others
        on_canvas = on_image & inner[row_c, col_c]
        count = int(on_canvas.sum())
        fraction = float(changed[on_canvas].mean()) if count else 0.0
        nearest, alpha = _nearest_colour(shown[on_canvas], hidden[on_canvas], colours)
        verdicts.append(SegmentVerdict(i + 1, fraction, count, nearest + 1, alpha))
    return Verdict(
        segments=tuple(verdicts),
        outside_changed=float(changed[outside].mean()) if outside.any() else 0.0,
        outside_pixels=int(outside.sum()),
    )


def _nearest_colour(
    shown: np.ndarray, hidden: np.ndarray, colours: np.ndarray
) -> tuple[int, float]:
    """Index of the colour ``c`` for which ``shown ~ hidden + a (c - hidden)`` fits best
    (one blend weight ``a`` for all pixels, least squares), and that weight."""
    if len(shown) == 0:
        return -1, 0.0
    change = shown - hidden
    best, best_alpha, best_residual = -1, 0.0, np.inf
    for k, colour in enumerate(np.asarray(colours, dtype=float)):
        toward = colour - hidden
        alpha = float((change * toward).sum() / max((toward * toward).sum(), 1e-9))
        residual = float(np.square(change - alpha * toward).mean())
        if alpha > 0 and residual < best_residual:
            best, best_alpha, best_residual = k, alpha, residual
    return best, best_alpha


#: Summed |R-G| + |G-B| above which a canvas pixel counts as coloured (annotations on grey).
COLOURED = 60


def drawn_fraction(
    screenshot: np.ndarray, transform: Affine, points: np.ndarray, window_px: int = 3
) -> float:
    """Fraction of ``points`` (image coordinates, ``(n, 2)`` column and row) at which the
    ``screenshot`` has a coloured pixel within ``window_px`` canvas pixels: how much of a
    polyline a viewer drew where it belongs on a grey image."""
    rgb = screenshot[..., :3].astype(int)
    coloured = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) > COLOURED
    near = ndimage.binary_dilation(coloured, np.ones((2 * window_px + 1,) * 2, dtype=bool))
    origin = np.asarray(transform.origin)
    canvas = (
        origin
        + points[:, :1] * np.asarray(transform.dcol)
        + points[:, 1:] * np.asarray(transform.drow)
    )
    x = np.floor(canvas[:, 0]).astype(int)
    y = np.floor(canvas[:, 1]).astype(int)
    inside = (x >= 0) & (x < near.shape[1]) & (y >= 0) & (y < near.shape[0])
    hits = np.zeros(len(points), dtype=bool)
    hits[inside] = near[y[inside], x[inside]]
    return float(hits.mean()) if len(points) else 0.0
