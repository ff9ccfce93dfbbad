"""Crop stages of a 2D package (``refine:`` in ``model.yaml``, :class:`Refinement`): a
structure the package's network found is segmented again, on a square crop around it and at a
finer scale, by a network of its own (e.g. the clavicles of a chest radiograph, which the
whole-image network sees at half resolution).

* Where: :func:`crop_box`, the bounding box of the largest connected component of the
  structure's mask (the parent's probabilities above its threshold), grown to a square of side
  ``longer side * (1 + 2 * margin)`` about its centre and clipped to the image. Nothing found:
  no crop, the parent's probabilities stay.
* What: :func:`cut_crop`, the image inside the box (mirrored left-right for the structures the
  stage lists under ``mirror``), prepared for the crop network like any image
  (:func:`~dicom_node.models.preprocess.prepare_image` with the stage's package).
* Result: :func:`refine_frame`, the crop network's probabilities, mirrored back, replace the
  structure's inside the box; outside it they are 0.

Training cuts its crops from the expert masks with the same two functions
(:mod:`dicom_node.training.crops`), so that a crop network learns the geometry it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dicom_node.imaging.masks import largest_component
from dicom_node.package.manifest import ModelPackage, Refinement

#: ``(stage, crops)`` -> each crop's probabilities ``(rows, cols)`` on its own grid: the
#: stage's network run on crops as :func:`cut_crop` gives them (the caller's device and batch).
CropPredictor = Callable[[Refinement, Sequence[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class CropBox:
    """A box of an image: rows ``top:bottom``, columns ``left:right`` (half-open)."""

    top: int
    left: int
    bottom: int
    right: int


def crop_box(mask: np.ndarray, margin: float) -> CropBox | None:
    """The square crop around the largest connected component of ``mask`` (rows, cols): the
    component's bounding box, its longer side times ``1 + 2 * margin``, about the box's centre,
    clipped to the image; None when the mask is empty."""
    if not mask.any():
        return None
    part = largest_component(mask)
    rows, cols = np.flatnonzero(part.any(axis=1)), np.flatnonzero(part.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(r1 - r0, c1 - c0) * (1.0 + 2.0 * margin)
    top = int(round((r0 + r1) / 2 - side / 2))
    left = int(round((c0 + c1) / 2 - side / 2))
    n = int(round(side))
    return CropBox(
        top=max(top, 0),
        left=max(left, 0),
        bottom=min(top + n, mask.shape[0]),
        right=min(left + n, mask.shape[1]),
    )


def cut_crop(image: np.ndarray, box: CropBox, mirror: bool) -> np.ndarray:
    """The part of ``image`` ((rows, cols) or (rows, cols, C)) inside ``box``, mirrored
    left-right when ``mirror``."""
    crop = image[box.top : box.bottom, box.left : box.right]
    return np.ascontiguousarray(crop[:, ::-1] if mirror else crop)


def refine_frame(
    image: np.ndarray, probs: np.ndarray, package: ModelPackage, predict: CropPredictor
) -> np.ndarray:
    """The probabilities ``(rows, cols, S)`` of one frame after ``package``'s crop stages.

    ``image`` is the frame as the package's network got it (model orientation, before
    normalisation), ``probs`` that network's probabilities on the same grid. Each stage's
    crops of one frame go to ``predict`` together (one batch).
    """
    labels = [s.label for s in package.structures]
    out = probs.copy()
    for stage in package.refine:
        jobs: list[tuple[int, CropBox, bool]] = []
        for label in stage.structures:
            s = labels.index(label)
            box = crop_box(probs[..., s] > package.threshold, stage.margin)
            if box is not None:
                jobs.append((s, box, label in stage.mirror))
        if not jobs:
            continue
        crops = [cut_crop(image, box, mirror) for _, box, mirror in jobs]
        for (s, box, mirror), crop_probs in zip(jobs, predict(stage, crops), strict=True):
            refined = np.zeros(out.shape[:2], dtype=out.dtype)
            refined[box.top : box.bottom, box.left : box.right] = (
                crop_probs[:, ::-1] if mirror else crop_probs
            )
            out[..., s] = refined
    return out
