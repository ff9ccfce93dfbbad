"""Training data for a crop stage (``refine:`` of a model package, :mod:`dicom_node.models.refine`).

::

    dicom-node crops --data DATA --model PACKAGE --structures right_clavicle left_clavicle \\
        --mirror left_clavicle --margin 0.2 --name clavicle --out CROPS

writes, for every training and validation case of the package's ``split.json``::

    CROPS/images/<case>__<structure>.png        the square crop around the expert mask
    CROPS/masks/<name>/<case>__<structure>.png  its mask (0 or 255)
    CROPS/split.json                            train and validation as the package's

cut with the functions the node serves with (:func:`~dicom_node.models.refine.crop_box` on the
expert mask, :func:`~dicom_node.models.refine.cut_crop`), mirrored for the ``--mirror``
structures. The package's test cases are neither read nor written: a crop network trained on
this folder (``dicom-node train``, which takes the folder's ``split.json`` as its split) has
seen nothing of them, and the validation crops come from the cases that chose the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from PIL import Image

from dicom_node.common.errors import InputError
from dicom_node.models.refine import crop_box, cut_crop
from dicom_node.package.manifest import load_package
from dicom_node.training.data import (
    IMAGES_DIR,
    MASKS_DIR,
    Split,
    read_image,
    read_masks,
    read_split,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CropSet:
    """What :func:`write_crops` wrote: the crop ids of each part and the folder."""

    out: Path
    train: tuple[str, ...]
    validation: tuple[str, ...]


def crop_id(case: str, structure: str) -> str:
    """The id of the crop of ``structure`` in ``case``."""
    return f"{case}__{structure}"


def write_crops(
    data_dir: Path,
    model: Path,
    structures: list[str],
    mirror: list[str],
    margin: float,
    name: str,
    out: Path,
) -> CropSet:
    """Write the crop training folder ``out`` (see the module docstring) and return its parts.

    Raises
    ------
    InputError
        When a structure is not one of the package's, a mirrored one is not among
        ``structures``, or ``out`` already holds images.
    """
    package = load_package(model)
    labels = [s.label for s in package.structures]
    unknown = [s for s in structures if s not in labels]
    if unknown or not set(mirror) <= set(structures):
        raise InputError(
            f"crops: --structures must be structures of {package.name} ({labels}) and "
            f"--mirror some of them; got {structures} and {mirror}"
        )
    if (out / IMAGES_DIR).is_dir() and any((out / IMAGES_DIR).iterdir()):
        raise InputError(f"{out}: already holds {IMAGES_DIR}/; give an empty or new folder")
    split = read_split(model)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / MASKS_DIR / name).mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[str]] = {"train": [], "validation": []}
    for part, cases in (("train", split.train), ("validation", split.validation)):
        for case in cases:
            image = read_image(data_dir, case, package.color)
            masks = read_masks(data_dir, case, structures)
            for structure, mask in zip(structures, masks, strict=True):
                box = crop_box(mask, margin)
                if box is None:  # nothing to crop around: the stage keeps the parent's answer
                    continue
                flip = structure in mirror
                ident = crop_id(case, structure)
                Image.fromarray(cut_crop(image, box, flip)).save(out / IMAGES_DIR / f"{ident}.png")
                crop_mask = cut_crop(mask, box, flip).astype(np.uint8) * 255
                Image.fromarray(crop_mask).save(out / MASKS_DIR / name / f"{ident}.png")
                parts[part].append(ident)
    Split(
        train=tuple(parts["train"]),
        validation=tuple(parts["validation"]),
        seed=split.seed,
        validation_fraction=split.validation_fraction,
        stratified_by=None,
    ).write(out)
    log.info(
        "crops written",
        n_train=len(parts["train"]),
        n_validation=len(parts["validation"]),
        n_test_cases_left_out=len(split.test),
    )
    return CropSet(out=out, train=tuple(parts["train"]), validation=tuple(parts["validation"]))
