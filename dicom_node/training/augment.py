"""Data augmentation that respects anatomy, built from MONAI dictionary transforms.

Chest radiographs are never mirrored: the heart is on the patient's left, and the model has
separate channels for the right and left lung and clavicle, so a left/right flip would teach it
the wrong side; ``flip_prob`` (default 0) allows a left/right flip for images without a side,
such as a breast ultrasound frame, whose lesion looks alike mirrored. What varies between real
radiographs is kept: patient position (small rotation, translation, scale, shear), body shape
(mild elastic deformation), exposure and processing (contrast, gamma, brightness) and detector
noise.

The transforms work on ``{"image": (1, H, W), "label": (S, H, W)}`` float tensors on the
network's input grid; the image is in [0, 1] after normalisation. Masks are resampled with
nearest neighbour so that they stay binary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from dicom_node.common.errors import ConfigError

KEYS = ("image", "label")


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentations (``augment:`` in the training config).

    Attributes
    ----------
    rotate_deg
        Maximum in-plane rotation either way, degrees.
    scale
        Maximum relative zoom either way (0.1: 90% to 110%).
    translate
        Maximum shift either way, as a fraction of the image side.
    shear
        Maximum shear either way (tangent).
    affine_prob
        Probability of the affine jitter.
    elastic_prob
        Probability of a mild elastic deformation.
    elastic_magnitude_px
        Range of the elastic displacement, in input pixels.
    gamma
        Range ``[low, high]`` of the random gamma.
    contrast
        Maximum relative intensity scaling either way.
    brightness
        Maximum intensity shift either way (input in [0, 1]).
    noise_std
        Standard deviation of the additive Gaussian noise.
    intensity_prob
        Probability of each intensity augmentation.
    flip_prob
        Probability of a left/right flip (0 by default: never for images with a side).
    """

    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    shear: float = 0.05
    affine_prob: float = 0.8
    elastic_prob: float = 0.2
    elastic_magnitude_px: float = 4.0
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: float = 0.15
    brightness: float = 0.1
    noise_std: float = 0.02
    intensity_prob: float = 0.5
    flip_prob: float = 0.0

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> AugmentConfig:
        """Build from the ``augment:`` mapping; unknown keys are an error that names them."""
        doc = dict(doc or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(f"augment: unknown keys {unknown}; known keys are {sorted(known)}")
        if "gamma" in doc:
            gamma = doc["gamma"]
            if not (
                isinstance(gamma, list | tuple) and len(gamma) == 2 and 0 < gamma[0] <= gamma[1]
            ):
                raise ConfigError(f"augment.gamma: expected [low, high] > 0, got {gamma!r}")
            doc["gamma"] = (float(gamma[0]), float(gamma[1]))
        for name in known - {"gamma"}:
            if name in doc:
                value = doc[name]
                if not isinstance(value, int | float) or value < 0:
                    raise ConfigError(f"augment.{name}: expected a number >= 0, got {value!r}")
                doc[name] = float(value)
        for name in ("affine_prob", "elastic_prob", "intensity_prob", "flip_prob"):
            if name in doc and doc[name] > 1:
                raise ConfigError(f"augment.{name}: a probability in 0..1, got {doc[name]}")
        return cls(**doc)


def build_augmentation(config: AugmentConfig, input_size: tuple[int, ...], seed: int) -> Compose:
    """The training augmentation pipeline; it mirrors the image only with ``flip_prob`` > 0.

    Parameters
    ----------
    config
        Ranges of the augmentations.
    input_size
        ``(rows, cols)`` of the network input, to express translation in pixels.
    seed
        Seed of the transforms' random state (reproducible training).
    """
    rows, cols = int(input_size[0]), int(input_size[1])
    rotate = math.radians(config.rotate_deg)
    modes = ("bilinear", "nearest")
    pads = ("border", "zeros")
    transforms: list[Any] = []
    if config.flip_prob > 0:
        transforms.append(RandFlipd(keys=KEYS, prob=config.flip_prob, spatial_axis=1))
    transforms += [
        RandAffined(
            keys=KEYS,
            prob=config.affine_prob,
            rotate_range=(rotate,),
            scale_range=(config.scale, config.scale),
            translate_range=(config.translate * rows, config.translate * cols),
            shear_range=(config.shear, config.shear),
            mode=modes,
            padding_mode=pads,
        ),
    ]
    if config.elastic_prob > 0:
        transforms.append(
            Rand2DElasticd(
                keys=KEYS,
                prob=config.elastic_prob,
                spacing=(rows // 8, cols // 8),
                magnitude_range=(0.0, config.elastic_magnitude_px),
                mode=modes,
                padding_mode=pads,
            )
        )
    p = config.intensity_prob
    transforms += [
        RandAdjustContrastd(keys="image", prob=p, gamma=config.gamma),
        RandScaleIntensityd(keys="image", prob=p, factors=config.contrast),
        RandShiftIntensityd(keys="image", prob=p, offsets=config.brightness),
        RandGaussianNoised(keys="image", prob=p, std=config.noise_std),
    ]
    pipeline = Compose(transforms)
    pipeline.set_random_state(seed=seed)
    return pipeline
