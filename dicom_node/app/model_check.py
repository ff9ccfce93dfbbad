"""``dicom-node model check PATH``: what a model is, whether it runs, what a route still needs.

It detects the format (:func:`~dicom_node.models.formats.detect_format`), loads the model as a
route would on the node's device, prints its inputs, labels and spacing, runs it once on a
synthetic input of its declared shape, and lists what the mapping (``dicom-node.yaml``) still
lacks for a route to use it. A model that cannot load fails with the same one line the node's
start would print.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from dicom_node.models.foreign import (
    WARM_UP_SHAPE_ZYX,
    foreign_package,
    mapping_gaps,
    mapping_path,
    read_mapping,
)
from dicom_node.models.formats import Detected, detect_format, open_runner
from dicom_node.models.inference import Segmenter
from dicom_node.models.runner import VolumeGeometry
from dicom_node.package.manifest import ModelPackage, load_package


def _structures(package: ModelPackage) -> str:
    return ", ".join(
        f"{s.label} ({s.type.scheme_designator} {s.type.value} {s.type.meaning}"
        f"{'' if s.type_modifier is None else ', ' + s.type_modifier.meaning})"
        for s in package.structures
    )


def _node_format(detected: Detected, device: torch.device, out: TextIO) -> list[str]:
    assert detected.descriptor is not None
    package = load_package(detected.descriptor, detected.network_file)
    print(f"described by: {detected.descriptor}", file=out)
    print(f"network: {package.weights}", file=out)
    channels = package.channels_per_input
    print(
        "inputs: "
        + ", ".join(
            f"{spec.role} ({channels} channel{'s' if channels > 1 else ''}"
            f"{'' if spec.required else ', optional'})"
            for spec in package.inputs
        ),
        file=out,
    )
    print(f"modalities: {', '.join(package.modalities) or 'any'}", file=out)
    print(f"labels: {_structures(package)}", file=out)
    spacing = "as stored" if package.spacing_mm is None else f"{list(package.spacing_mm)} mm"
    print(
        f"size: {list(package.input_size)} ({package.dims}D), spacing: {spacing}, "
        f"normalization: {package.normalization.kind.value}",
        file=out,
    )
    for stage in package.refine:
        mirrored = f", {', '.join(stage.mirror)} mirrored" if stage.mirror else ""
        print(
            f"crop stage: {', '.join(stage.structures)} again on crops (margin "
            f"{stage.margin}{mirrored}) by {stage.package.path.name}/ "
            f"({stage.package.name} {stage.package.version}, {list(stage.package.input_size)})",
            file=out,
        )
    print(f"device: {device}", file=out)
    segmenter = Segmenter(package, device)
    started = time.perf_counter()
    segmenter.warm_up()
    shape = (package.in_channels, *package.input_size)
    print(f"ran once on zeros {list(shape)}: ok in {time.perf_counter() - started:.2f} s", file=out)
    return []


def _foreign_format(detected: Detected, device: torch.device, out: TextIO) -> list[str]:
    where, mapping = read_mapping(detected.path)
    print(f"mapping: {where}{'' if where.is_file() else ' (none yet)'}", file=out)
    runner = open_runner(detected, device, dict(mapping.get("options") or {}))
    print(f"inputs: {', '.join(runner.channel_names)} (the model's channels)", file=out)
    print(
        "labels: " + ", ".join(f"{value} {name}" for value, name in sorted(runner.labels.items())),
        file=out,
    )
    spacing = getattr(runner, "spacing_zyx_mm", None)
    print(
        f"spacing: {'the model resamples itself' if spacing is None else f'{list(spacing)} mm'}",
        file=out,
    )
    print(f"device: {device}", file=out)
    shape = tuple(getattr(runner, "example_shape_zyx", None) or WARM_UP_SHAPE_ZYX)
    channels = np.zeros((len(runner.channel_names), *shape), dtype=np.float32)
    started = time.perf_counter()
    labels = runner.predict(
        channels, VolumeGeometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    )
    seconds = time.perf_counter() - started
    if np.shape(labels) != shape:
        return [f"the runner gives a label map of {np.shape(labels)} for {shape}: fix the model"]
    print(f"ran once on zeros {list(channels.shape)}: ok in {seconds:.2f} s", file=out)
    gaps = mapping_gaps(runner, detected.path)
    if not gaps:
        package = foreign_package(runner, detected.path)
        print(f"roles: {', '.join(package.roles)} (reference {package.reference})", file=out)
        print(f"structures: {_structures(package)}", file=out)
    return gaps


def check_model(path: Path, device: torch.device, out: TextIO) -> int:
    """Print what ``path`` is and what a route still needs; return the exit status: 0 when a
    route can use it as it is, 1 when its mapping lacks something (listed).

    Raises
    ------
    ModelPackageError
        When the model cannot be detected or loaded (one line).
    """
    detected = detect_format(path)
    print(f"model: {path}", file=out)
    print(f"format: {detected.format}", file=out)
    if detected.foreign:
        gaps = _foreign_format(detected, device, out)
    else:
        gaps = _node_format(detected, device, out)
    if gaps:
        print(f"a route still needs ({mapping_path(detected.path)}):", file=out)
        for gap in gaps:
            print(f"  - {gap}", file=out)
        return 1
    print(f"a route needs nothing more: model: {path}", file=out)
    return 0
