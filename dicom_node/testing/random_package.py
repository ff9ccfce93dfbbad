"""Complete model packages with randomly initialised weights, for tests and benchmarks.

The node's routing and outputs (SEG segments, SR measurements) depend only on ``model.yaml``,
never on the weights, so a random package exercises everything but the quality of the masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from dicom_node.models.networks import build_network
from dicom_node.package.manifest import MODEL_FILE, Activation, ModelPackage, load_package

#: The default chest radiograph structures (SCR masks of the JSRT images).
CHEST_STRUCTURES: tuple[str, ...] = (
    "right_lung",
    "left_lung",
    "heart",
    "right_clavicle",
    "left_clavicle",
)

_SMOOTH = ["largest_component", "fill_holes"]

#: ``structures[]`` entries of ``model.yaml`` by label: SNOMED CT codes from pydicom's
#: dictionaries (category Anatomical Structure, type and laterality modifier), display colour.
KNOWN_STRUCTURES: dict[str, dict[str, Any]] = {
    "right_lung": {
        "name": "Right lung",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Lung",
        "type_modifier": "SCT.Right",
        "color": [128, 174, 128],
        "postprocess": _SMOOTH,
    },
    "left_lung": {
        "name": "Left lung",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Lung",
        "type_modifier": "SCT.Left",
        "color": [111, 184, 210],
        "postprocess": _SMOOTH,
    },
    "heart": {
        "name": "Heart",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Heart",
        "color": [206, 110, 84],
        "postprocess": _SMOOTH,
    },
    "right_clavicle": {
        "name": "Right clavicle",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Clavicle",
        "type_modifier": "SCT.Right",
        "color": [241, 214, 145],
        "postprocess": ["largest_component"],
    },
    "left_clavicle": {
        "name": "Left clavicle",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Clavicle",
        "type_modifier": "SCT.Left",
        "color": [230, 160, 60],
        "postprocess": ["largest_component"],
    },
}


def make_random_package(
    folder: Path,
    *,
    dims: int = 2,
    structures: Sequence[str] = CHEST_STRUCTURES,
    input_size: tuple[int, ...] | None = None,
    channels: tuple[int, ...] = (8, 16, 32),
    seed: int = 0,
    modalities: Sequence[str] = ("CR", "DX", "CT", "MR"),
    activation: Activation | str = Activation.SIGMOID,
    spacing_mm: tuple[float, ...] | None = None,
    normalization: Mapping[str, Any] | None = None,
    fp16: bool = False,
    name: str = "random-chest",
    version: str = "0.0.0",
    color: str = "gray",
    inputs: Sequence[str | Mapping[str, Any]] = (),
    reference: str | None = None,
    registered: bool = False,
) -> ModelPackage:
    """Write a complete model package with random weights into ``folder`` and load it.

    Parameters
    ----------
    folder
        Created if needed; receives ``model.yaml`` and ``model.pt``.
    dims
        2 (per image, batched) or 3 (sliding window on the resampled volume).
    structures
        Labels from :data:`KNOWN_STRUCTURES`, one output channel each.
    input_size
        Network input (2D: rows, cols) or patch (3D: z, y, x); each divisible by
        ``2 ** (len(channels) - 1)``. Default ``(64, 64)`` for 2D, ``(16, 32, 32)`` for 3D.
    channels
        Feature channels of the U-Net levels (strides of 2 between them).
    seed
        Seed of :func:`torch.manual_seed` for the weights.
    modalities
        Modality (0008,0060) values the package accepts; empty accepts any.
    activation
        ``sigmoid`` (multi-label) or ``softmax`` (exclusive, with a background channel).
    spacing_mm
        3D only: resampling spacing (z, y, x); default ``(3.0, 1.5, 1.5)``.
    normalization
        ``input.normalization`` mapping; default percentile 0.5 to 99.5.
    fp16
        Save the weights in half precision (the loader casts them to fp32).
    color
        ``input.color``: ``gray`` (one input channel) or ``rgb`` (three; 2D only).
    inputs
        ``inputs``: role names (or ``{role, required}`` mappings) in channel order; empty:
        the one role ``image``.
    reference
        ``reference``: the role the others are resampled onto; default the first.
    registered
        ``registered``: the site guarantees the inputs are registered.

    Raises
    ------
    ValueError
        For a label not in :data:`KNOWN_STRUCTURES` or a dims other than 2 or 3.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    unknown = [label for label in structures if label not in KNOWN_STRUCTURES]
    if unknown:
        raise ValueError(f"unknown structures {unknown}; known: {sorted(KNOWN_STRUCTURES)}")
    if input_size is None:
        input_size = (64, 64) if dims == 2 else (16, 32, 32)
    if dims == 3 and spacing_mm is None:
        spacing_mm = (3.0, 1.5, 1.5)
    labels = set(structures)
    measurements = ["volume"] if dims == 3 else ["area"]
    if dims == 2 and {"heart", "right_lung", "left_lung"} <= labels:
        measurements.append("cardiothoracic_ratio")
    doc: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": "Randomly initialised weights for tests; not a trained model.",
        "dims": dims,
        "modalities": list(modalities),
        "input": {
            "size": list(input_size),
            "color": color,
            "normalization": dict(
                normalization or {"kind": "percentile", "lower": 0.5, "upper": 99.5}
            ),
        },
        "output": {"activation": Activation(activation).value, "threshold": 0.5},
        "network": {
            "channels": list(channels),
            "strides": [2] * (len(channels) - 1),
            "num_res_units": 1,
        },
        "weights": "model.pt",
        "structures": [{"label": label, **KNOWN_STRUCTURES[label]} for label in structures],
        "measurements": measurements,
        "metrics": {},
    }
    if spacing_mm is not None:
        doc["input"]["spacing_mm"] = list(spacing_mm)
    if inputs:
        doc["inputs"] = [{"role": i} if isinstance(i, str) else dict(i) for i in inputs]
    if reference is not None:
        doc["reference"] = reference
    if registered:
        doc["registered"] = True
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    weights = folder / "model.pt"
    weights.touch()  # load_package checks that the file exists; filled below
    package = load_package(folder)
    torch.manual_seed(seed)
    state = build_network(package).state_dict()
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, weights)
    return package
