"""Checkpoints of a training run, so that ``dicom-node train --resume`` continues it exactly.

A checkpoint (``checkpoint.pt`` in the package folder being written) holds everything the
loop needs to go on as if it had never stopped: the network's weights (fp32), the optimiser,
the learning-rate schedule and the gradient scaler, every random state (Python ``random``,
NumPy, torch CPU and CUDA, the data loader's generator, the random states of the
augmentation transforms), the epochs done and planned, the history, the best epoch (its
weights in fp16, as the package keeps them) and the seconds spent in each sitting so far.

It is written atomically (a temporary file in the same folder, ``fsync``, then
:func:`os.replace`), so that a run killed while writing leaves the previous checkpoint whole.
It is read with ``torch.load(weights_only=True)``: plain tensors, numbers, strings, lists
and dicts, nothing that runs code (a checkpoint may come from a git commit). Its
``fingerprint`` (:func:`fingerprint`) names the config, split, epochs and starting package it
belongs to; a run of anything else refuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.common.errors import ConfigError
from dicom_node.training.config import TrainConfig
from dicom_node.training.data import Split

#: The checkpoint's file name in the package folder (removed once the package is finished).
CHECKPOINT_FILE = "checkpoint.pt"
#: Version of the checkpoint's layout.
CHECKPOINT_FORMAT = 1
#: Training settings that may change between sittings: they do not change the result
#: (``max_minutes`` is a budget over all sittings together).
SITTING_SETTINGS = frozenset({"max_minutes", "num_threads", "checkpoint_minutes"})
#: Training settings added after checkpoint format 1 was first written. At their default
#: (which keeps the behaviour from before they existed) they are left out of the fingerprint,
#: so that a checkpoint of a run started before them still resumes; set, they count.
LATER_SETTINGS = frozenset(
    {
        "min_area_fraction_candidates",
        "try_flip_tta",
        "epoch_images",
        "pretrained_encoder",
        "cpu_autocast",
        "channels_last",
        "presence_weight",
        "min_presence_candidates",
        "empty_image_weight",
    }
)


def fingerprint(config: TrainConfig, split: Split, epochs: int, init: str | None) -> str:
    """SHA-256 (hex) of what decides a run's result: the model, the training settings (less
    :data:`SITTING_SETTINGS`, and :data:`LATER_SETTINGS` at their defaults), the augmentation,
    the split's cases, the number of epochs and the starting package (``"name version"`` of
    ``--init``, or None)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config.training)}
    settings = {
        k: v
        for k, v in dataclasses.asdict(config.training).items()
        if k not in SITTING_SETTINGS
        and not (k in LATER_SETTINGS and _same(v, defaults.get(k, dataclasses.MISSING)))
    }
    doc = {
        "model": config.model,
        "training": settings,
        "augment": dataclasses.asdict(config.augment),
        "split": {"train": split.train, "validation": split.validation, "test": split.test},
        "epochs": epochs,
        "init": init,
    }
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _same(value: Any, default: Any) -> bool:
    """Whether a setting's value (as :func:`dataclasses.asdict` gives it) is its default."""
    if isinstance(value, list | tuple) and isinstance(default, list | tuple):
        return list(value) == list(default)
    return bool(value == default)


def _walk_random_states(obj: Any, path: str, found: dict[str, Any], seen: set[int]) -> None:
    """Collect the NumPy random states reachable from ``obj`` by attribute, item or element,
    keyed by their path (e.g. ``dataset.transform.transforms[1].R``). Only objects of MONAI
    and of this package are entered, not tensors, arrays or torch internals."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState | np.random.Generator):
        found[path] = obj
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            _walk_random_states(item, f"{path}[{i}]", found, seen)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _walk_random_states(item, f"{path}[{key!r}]", found, seen)
    elif type(obj).__module__.split(".")[0] in ("monai", "dicom_node") and hasattr(obj, "__dict__"):
        for key, item in vars(obj).items():
            _walk_random_states(item, f"{path}.{key}", found, seen)


def random_states_of(obj: object, name: str) -> dict[str, Any]:
    """The NumPy random states (``RandomState`` or ``Generator``) inside ``obj`` (e.g. a
    dataset with its augmentation pipeline), by path from ``name``."""
    found: dict[str, Any] = {}
    _walk_random_states(obj, name, found, set())
    return found


def _numpy_state(rng: np.random.RandomState | np.random.Generator) -> dict[str, Any]:
    state = (
        rng.bit_generator.state
        if isinstance(rng, np.random.Generator)
        else rng.get_state(legacy=False)
    )
    tensors: dict[str, Any] = _to_tensors(state)
    return tensors


def _set_numpy_state(rng: np.random.RandomState | np.random.Generator, state: Any) -> None:
    plain = _from_tensors(state)
    if isinstance(rng, np.random.Generator):
        rng.bit_generator.state = plain
    else:
        rng.set_state(plain)


def _to_tensors(value: Any) -> Any:
    """NumPy arrays to tensors (``weights_only`` loads no arrays), recursively."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.astype(np.int64)), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


def _from_tensors(value: Any) -> Any:
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy().astype(value["dtype"])
    if isinstance(value, dict):
        return {k: _from_tensors(v) for k, v in value.items()}
    return value


def capture_rng(sources: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
    """Every random state of the run: Python, NumPy, torch CPU (and CUDA when present), the
    data loader's ``generator`` and the NumPy states in ``sources`` (by path)."""
    return {
        "python": random.getstate(),
        "numpy": _to_tensors(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": None if generator is None else generator.get_state(),
        "sources": {path: _numpy_state(rng) for path, rng in sources.items()},
    }


def restore_rng(
    states: dict[str, Any], sources: dict[str, Any], generator: torch.Generator | None
) -> None:
    """Set every random state captured by :func:`capture_rng`.

    Raises
    ------
    ConfigError
        When the random states of the checkpoint do not match the run's (another version of
        the augmentation or data loading wrote it).
    """
    if set(states["sources"]) != set(sources) or (states["loader"] is None) != (generator is None):
        raise ConfigError(
            "the checkpoint's random states do not match this version's augmentation; "
            "start afresh without --resume"
        )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_from_tensors(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None:
        generator.set_state(states["loader"])
    for path, rng in sources.items():
        _set_numpy_state(rng, states["sources"][path])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: temporary file, ``fsync``, rename, ``fsync`` of
    the folder. Returns ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read the checkpoint at ``path`` (check it with :func:`check_fingerprint`).

    Raises
    ------
    ConfigError
        One line saying what to do: no checkpoint, or an unreadable one.
    """
    if not path.is_file():
        raise ConfigError(
            f"{path}: no checkpoint to resume from; run without --resume to start training"
        )
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same answer
        raise ConfigError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}); delete it and run "
            "without --resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{path}: not a checkpoint of this version; delete it and run without --resume"
        )
    return state


def check_fingerprint(state: dict[str, Any], expected: str, path: Path) -> None:
    """Refuse a checkpoint that another run wrote.

    Raises
    ------
    ConfigError
        When its fingerprint is not ``expected``: another training config, data split or
        ``--epochs`` (``--init`` is read from the checkpoint).
    """
    if state.get("fingerprint") != expected:
        raise ConfigError(
            f"{path}: written by another training config, data split or --epochs; resume "
            "with the ones of its first sitting, or delete it and run without --resume"
        )


@dataclass(frozen=True)
class PackageRef:
    """The name and version of the package a run started from (``--init``), as a checkpoint
    keeps them."""

    name: str
    version: str


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of a ``state_dict`` with floating tensors in half precision (as the package
    stores its weights)."""
    return {
        k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu().clone()
        for k, v in state.items()
    }
