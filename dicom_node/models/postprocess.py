"""Per-structure mask postprocessing (``structures[].postprocess`` in ``model.yaml``).

Steps run in the order the package lists them:

* ``largest_component``: keep the largest connected component (face connectivity, via
  :func:`scipy.ndimage.label`), per frame for projection images and 2D stacks treated as
  separate images, over the whole volume for cross-sectional series;
* ``fill_holes``: fill holes in each frame (:func:`fill_frame_holes`, what
  :func:`scipy.ndimage.binary_fill_holes` gives), since holes in a slice are what a
  segmentation leaves; a 3D fill would leave any hole open in z.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicom_node.models.package import ModelPackage, Postprocess


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest connected component of boolean ``mask`` (2D or 3D); empty stays empty."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


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


def postprocess(
    masks: np.ndarray, package: ModelPackage, *, per_frame: bool | None = None
) -> np.ndarray:
    """Apply each structure's postprocessing steps to ``masks``.

    Parameters
    ----------
    masks
        Boolean ``(frames, rows, cols, S)`` with ``S = len(package.structures)``.
    package
        Gives the steps of each structure (channel ``s`` is ``package.structures[s]``).
    per_frame
        Whether ``largest_component`` treats each frame as a separate image (projection
        images) rather than the frames as one volume (slices of a cross-sectional series).
        Default: per frame for 2D models, per volume for 3D models.

    Returns
    -------
    numpy.ndarray
        A new boolean array of the same shape.
    """
    if masks.ndim != 4 or masks.shape[-1] != len(package.structures):
        raise ValueError(
            f"expected masks (frames, rows, cols, {len(package.structures)}), got {masks.shape}"
        )
    if per_frame is None:
        per_frame = package.dims == 2
    out = masks.astype(bool, copy=True)
    for s, structure in enumerate(package.structures):
        channel = out[..., s]
        for step in structure.postprocess:
            if step is Postprocess.LARGEST_COMPONENT:
                if per_frame:
                    channel = np.stack([largest_component(frame) for frame in channel])
                else:
                    channel = largest_component(channel)
            elif step is Postprocess.FILL_HOLES:
                channel = fill_holes(channel)
            else:  # pragma: no cover - a new enum member without an implementation
                raise NotImplementedError(f"postprocess step {step.value!r}")
        out[..., s] = channel
    return out
