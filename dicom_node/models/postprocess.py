"""Per-structure mask postprocessing (``structures[].postprocess`` in ``model.yaml``).

Steps run in the order the package lists them:

* ``largest_component``: keep the largest connected component (face connectivity, via
  :func:`scipy.ndimage.label`), per frame for projection images and 2D stacks treated as
  separate images, over the whole volume for cross-sectional series;
* ``fill_holes``: fill holes in each frame (:func:`dicom_node.imaging.masks.fill_frame_holes`, what
  :func:`scipy.ndimage.binary_fill_holes` gives), since holes in a slice are what a
  segmentation leaves; a 3D fill would leave any hole open in z.
"""

from __future__ import annotations

import numpy as np

from dicom_node.imaging.masks import fill_holes, largest_component
from dicom_node.package.manifest import ModelPackage, Postprocess


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
