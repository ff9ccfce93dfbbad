"""3D training data: a folder of NIfTI volumes with label maps, its split, and its cache.

The layout is the one of ``../shared/data/la-mri``::

    DATA/<case>/image.nii.gz     one 3D volume (any pixel type), with its spacing
    DATA/<case>/label.nii.gz     the expert label map on the same grid: 0 background,
                                 i = the i-th structure of the model (1-based)

Volumes are read with SimpleITK (imaging/sitk.py) (arrays are ``(z, y, x)``) and prepared once with
:func:`dicom_node.models.preprocess.prepare_volume_array`, the same function the node runs on
incoming DICOM series (normalisation, then linear resampling to ``input.spacing_mm``); label
maps are resampled per structure with the same resampler and thresholded at 0.5. Both are
cached in memory; training draws patches of ``input.size`` from them
(:class:`PatchCases`).

The split has three parts: a **test** part drawn first, with its own seed, from all cases,
kept out of training and out of every choice (epoch, postprocessing), evaluated once at the
end; and a **validation** part drawn from the remaining cases, which chooses the epoch and
the postprocessing. The split is written into the package (``split.json``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from dicom_node.common.errors import InputError
from dicom_node.imaging import sitk
from dicom_node.models.preprocess import (
    VolumePlacement,
    grid_placement,
    prepare_volume_array,
    resample_to_model,
)
from dicom_node.package.manifest import ModelPackage
from dicom_node.training.data import Split

log = structlog.get_logger(__name__)

IMAGE_FILE = "image.nii.gz"
LABEL_FILE = "label.nii.gz"


def is_volume_folder(data_dir: Path | str) -> bool:
    """True when ``data_dir`` has the 3D layout (``<case>/image.nii.gz``)."""
    return any(Path(data_dir).glob(f"*/{IMAGE_FILE}"))


def list_volume_cases(data_dir: Path | str) -> list[str]:
    """Case ids (folder names) that have an image and a label map, sorted.

    Raises
    ------
    InputError
        When the folder has no case, or a case has an image but no label map.
    """
    root = Path(data_dir)
    cases = sorted(p.parent.name for p in root.glob(f"*/{IMAGE_FILE}"))
    if not cases:
        raise InputError(
            f"{root}: no <case>/{IMAGE_FILE}; expected <case>/{IMAGE_FILE} and "
            f"<case>/{LABEL_FILE} per case"
        )
    missing = [c for c in cases if not (root / c / LABEL_FILE).is_file()]
    if missing:
        raise InputError(
            f"{root}: {len(missing)} of {len(cases)} cases have no {LABEL_FILE} (first: "
            f"{missing[0]}); every volume needs its label map"
        )
    return cases


def make_volume_split(
    cases: Sequence[str],
    *,
    test_fraction: float,
    test_seed: int,
    validation_fraction: float,
    seed: int,
) -> Split:
    """Draw the test cases from all ``cases`` (``test_seed``), then the validation cases from
    the rest (``seed``); the remaining cases train. Reproducible for a given set of cases."""
    if not 0.0 <= test_fraction < 1.0 or not 0.0 < validation_fraction < 1.0:
        raise InputError("test_fraction must be in [0, 1) and validation_fraction in (0, 1)")
    ordered = sorted(cases)
    if len(ordered) < 3:
        raise InputError(f"need at least 3 cases to split, got {len(ordered)}")
    shuffled = list(ordered)
    random.Random(test_seed).shuffle(shuffled)
    test = set(shuffled[: round(len(ordered) * test_fraction)])
    rest = [c for c in ordered if c not in test]
    random.Random(seed).shuffle(rest)
    validation = set(rest[: max(1, round(len(rest) * validation_fraction))])
    return Split(
        train=tuple(c for c in ordered if c not in test and c not in validation),
        validation=tuple(sorted(validation)),
        seed=seed,
        validation_fraction=validation_fraction,
        stratified_by=None,
        test=tuple(sorted(test)),
        test_seed=test_seed,
        test_fraction=test_fraction,
    )


@dataclass(frozen=True)
class Volume:
    """One case on its source grid: intensities and boolean masks ``(S, z, y, x)``."""

    pixels: np.ndarray  # (z, y, x) float32
    masks: np.ndarray  # (S, z, y, x) bool
    placement: VolumePlacement

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        x, y, z = self.placement.source_spacing
        return (z, y, x)


def read_volume(data_dir: Path | str, case: str, package: ModelPackage) -> Volume:
    """Read ``case``: its intensities, one mask per structure of ``package``, and the
    placement of its grid on the model's grid.

    Raises
    ------
    InputError
        When the image or the label map is missing, or the label map is not on the image's
        grid.
    """
    folder = Path(data_dir) / case
    for name in (IMAGE_FILE, LABEL_FILE):
        if not (folder / name).is_file():
            raise InputError(f"case {case}: {folder / name} not found")
    image, grid = sitk.read_image(folder / IMAGE_FILE)
    label, label_grid = sitk.read_image(folder / LABEL_FILE)
    if len(grid.size) != 3:
        raise InputError(f"{folder / IMAGE_FILE}: expected a 3D volume")
    if label_grid.size != grid.size or not np.allclose(label_grid.spacing_mm, grid.spacing_mm):
        raise InputError(
            f"case {case}: {folder / LABEL_FILE} ({' x '.join(map(str, label_grid.size))} "
            f"voxels) is not on the grid of {IMAGE_FILE} ({' x '.join(map(str, grid.size))})"
        )
    placement = grid_placement(grid, package)
    masks = np.stack([label == i + 1 for i in range(len(package.structures))])
    return Volume(image.astype(np.float32), masks, placement)


def masks_to_model(masks: np.ndarray, placement: VolumePlacement) -> np.ndarray:
    """Masks ``(S, z, y, x)`` on the model's grid, resampled as the image was (linear,
    thresholded at 0.5). Returns uint8."""
    if placement.is_identity:
        return masks.astype(np.uint8)
    return np.stack(
        [resample_to_model(m.astype(np.float32), placement, 0.0) >= 0.5 for m in masks]
    ).astype(np.uint8)


class CachedVolumes:
    """Prepared volumes and masks of some cases on the model's grid, in memory."""

    def __init__(self, data_dir: Path | str, cases: Sequence[str], package: ModelPackage) -> None:
        self.cases = list(cases)
        self.images: list[np.ndarray] = []  # (1, z, y, x) float16
        self.masks: list[np.ndarray] = []  # (S, z, y, x) uint8
        for case in self.cases:
            volume = read_volume(data_dir, case, package)
            prepared = prepare_volume_array(volume.pixels, volume.placement, package)
            self.images.append(prepared.astype(np.float16))  # (1, z, y, x): one input
            self.masks.append(masks_to_model(volume.masks, volume.placement))
        log.info("volumes cached", n_cases=len(self.cases), spacing_mm=package.spacing_mm)


@dataclass(frozen=True)
class VolumeAugment:
    """Ranges of the 3D augmentations (``augment:`` of a 3D training config).

    No mirroring: the left atrium (and most anatomy) has a side.
    """

    rotate_deg: float = 10.0
    scale: float = 0.1
    affine_prob: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: float = 0.15
    brightness: float = 0.1
    noise_std: float = 0.02
    intensity_prob: float = 0.5

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> VolumeAugment:
        doc = dict(doc or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(doc) - known)
        if unknown:
            from dicom_node.common.errors import ConfigError

            raise ConfigError(f"augment: unknown keys {unknown} for 3D; known: {sorted(known)}")
        if "gamma" in doc:
            doc["gamma"] = tuple(float(g) for g in doc["gamma"])
        return cls(**doc)


class PatchCases(torch.utils.data.Dataset[list[dict[str, torch.Tensor]]]):
    """Random patches of ``patch`` (z, y, x) from cached volumes, ``samples`` per case per
    item: a fraction ``positive_fraction`` centred on a structure voxel, the rest anywhere,
    then augmented."""

    def __init__(
        self,
        cache: CachedVolumes,
        patch: Sequence[int],
        *,
        samples: int,
        positive_fraction: float,
        augment: VolumeAugment,
        seed: int,
    ) -> None:
        self.cache = cache
        keys = ["image", "label"]
        pos = max(positive_fraction, 1e-3)
        neg = max(1.0 - positive_fraction, 0.0)
        rad = np.deg2rad(augment.rotate_deg)
        transforms: list[Any] = [
            SpatialPadd(keys, spatial_size=list(patch)),
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=list(patch),
                pos=pos,
                neg=neg,
                num_samples=samples,
            ),
        ]
        if augment.affine_prob > 0:
            transforms.append(
                RandAffined(
                    keys,
                    prob=augment.affine_prob,
                    rotate_range=(rad, rad, rad),
                    scale_range=(augment.scale,) * 3,
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                )
            )
        if augment.intensity_prob > 0:
            p = augment.intensity_prob
            transforms += [
                RandAdjustContrastd(["image"], prob=p, gamma=augment.gamma),
                RandScaleIntensityd(["image"], factors=augment.contrast, prob=p),
                RandShiftIntensityd(["image"], offsets=augment.brightness, prob=p),
                RandGaussianNoised(["image"], prob=p, std=augment.noise_std),
            ]
        self.transform = Compose(transforms).set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.cache.cases)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        item = {
            "image": torch.from_numpy(self.cache.images[index].astype(np.float32)),
            "label": torch.from_numpy(self.cache.masks[index].astype(np.float32)),
        }
        out = self.transform(item)
        return [
            {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in s.items()} for s in out
        ]


def collate_patches(items: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stack the patches of several cases into one batch."""
    flat = [s for item in items for s in item]
    return {k: torch.stack([s[k] for s in flat]) for k in ("image", "label")}
