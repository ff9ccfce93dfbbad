"""Mask morphology on boolean arrays: connected components and hole filling.

Used by the models' postprocessing (:mod:`dicom_node.models.postprocess`) and by the outlines
the outputs draw (:mod:`dicom_node.outputs.contours`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest connected component of boolean ``mask`` (2D or 3D); empty stays empty."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest: np.ndarray = labels == int(np.argmax(sizes))
    return largest


def fill_frame_holes(frame: np.ndarray) -> np.ndarray:
    """Return 2D boolean ``frame`` with its holes filled: exactly
    :func:`scipy.ndimage.binary_fill_holes` (a hole is background that no 4-connected path
    joins to the image's edge), computed in a few milliseconds instead of about 0.1 s.

    ``binary_fill_holes`` grows the outside by repeated dilation over the whole image, one
    pass per pixel of depth; here the background is labelled once (:func:`ndimage.label`,
    4-connected) inside the bounding box of the mask, widened by one pixel where the image
    allows: that ring is background joined to the edge, so a background part within the box
    reaches the image's edge exactly when it reaches the box's edge.
    """
    frame = np.asarray(frame, dtype=bool)
    rows = np.flatnonzero(frame.any(axis=1))
    if rows.size == 0:
        return frame.copy()
    cols = np.flatnonzero(frame.any(axis=0))
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, frame.shape[0])
    c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, frame.shape[1])
    background, count = ndimage.label(~frame[r0:r1, c0:c1])
    outside = np.zeros(count + 1, dtype=bool)  # label -> joined to the edge (0: the mask)
    outside[0] = True
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    holes = ~outside[background]
    out = frame.copy()
    out[r0:r1, c0:c1] |= holes
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Return boolean ``mask`` ``(frames, rows, cols)`` with the holes of each frame filled."""
    out = np.empty(mask.shape, dtype=bool)
    for f in range(mask.shape[0]):
        out[f] = fill_frame_holes(mask[f])
    return out
