"""A model the node did not train (a :class:`~dicom_node.models.runner.VolumeRunner`), made to
look like :class:`~dicom_node.models.inference.Segmenter` to the work stage.

The runner brings its own preprocessing, inferer and postprocessing; the node brings the rest:
the case's roles resampled onto the reference grid (:func:`dicom_node.work.segment.segment_case`,
unchanged), masks per structure, SEG, SR and overlay. What the format does not say comes from a
short **mapping**, ``dicom-node.yaml`` in the model's folder (or ``<name>.dicom-node.yaml``
beside a model file or folder; see ``docs/model-package.md``)::

    name: spleen-ct            # default: the model's file or folder name
    version: "0.5.3"           # default: the runner's version, else "1"
    modalities: [CT]           # default: any
    inputs:                    # only for several channels: channel (the model's name) -> role
      - {channel: T1c, role: t1c}
      - {channel: FLAIR, role: flair, required: false}
    reference: t1c             # default: the first input
    structures:                # each label of the model, by its name: as in model.yaml
      spleen: {category: SCT.AnatomicalStructure, type: SCT.Spleen, color: [255, 0, 0]}
    measurements: [volume]
    options: {step_size: 0.5}  # keyword arguments of the format's runner

From the runner and this mapping a :class:`~dicom_node.package.manifest.ModelPackage` is made
(:func:`foreign_package`), so outputs read the same contract as for the node's own models.
:func:`mapping_gaps` lists what the mapping still lacks (``dicom-node model check``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import yaml

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.config import yamlfile
from dicom_node.imaging.series import ImageSeries
from dicom_node.models.inference import (
    DeviceSlots,
    InferenceReport,
    check_applicability,
)
from dicom_node.models.postprocess import postprocess
from dicom_node.models.runner import VolumeGeometry, VolumeRunner
from dicom_node.package.manifest import (
    DEFAULT_ROLE,
    Activation,
    Applicability,
    InputSpec,
    Measurement,
    ModelPackage,
    Normalization,
    NormalizationKind,
    parse_applicability,
    parse_structure,
)

log = structlog.get_logger(__name__)

#: The mapping's file name, in the model's folder.
MAPPING_FILE = "dicom-node.yaml"
#: Keys the mapping may have.
MAPPING_KEYS = (
    "name",
    "version",
    "description",
    "modalities",
    "dims",
    "inputs",
    "reference",
    "registered",
    "structures",
    "measurements",
    "applicability",
    "options",
)
#: The synthetic volume ``(z, y, x)`` of :meth:`ForeignSegmenter.warm_up` when the runner
#: declares none (``example_shape_zyx``).
WARM_UP_SHAPE_ZYX = (16, 64, 64)


def mapping_path(model: Path) -> Path:
    """Where the mapping of ``model`` is: ``dicom-node.yaml`` in its folder when there is
    one, else ``<name>.dicom-node.yaml`` beside it (``name`` without a ``.zip`` suffix)."""
    inside = model / MAPPING_FILE
    if model.is_dir() and inside.is_file():
        return inside
    stem = model.name[: -len(".zip")] if model.name.lower().endswith(".zip") else model.name
    beside = model.with_name(f"{stem}.{MAPPING_FILE}")
    return beside if beside.is_file() or not model.is_dir() else inside


def read_mapping(model: Path) -> tuple[Path, dict[str, Any]]:
    """The mapping file of ``model`` and its content (empty when there is none).

    Raises
    ------
    ModelPackageError
        When the file is not a YAML mapping or has unknown keys.
    """
    path = mapping_path(model)
    if not path.is_file():
        return path, {}
    try:
        doc = yamlfile.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelPackageError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None:
        return path, {}
    if not isinstance(doc, dict):
        raise ModelPackageError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(doc) - set(MAPPING_KEYS))
    if unknown:
        raise ModelPackageError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(MAPPING_KEYS)}"
        )
    options = doc.get("options", {})
    if not isinstance(options, dict):
        raise ModelPackageError(f"{path}: options: expected a mapping of the runner's arguments")
    return path, doc


def _channel_roles(
    runner: VolumeRunner, doc: Mapping[str, Any], where: str
) -> tuple[tuple[InputSpec, ...], list[str]]:
    """The input roles in the runner's channel order, and what is missing to know them."""
    channels = tuple(runner.channel_names)
    items = doc.get("inputs")
    if items is None:
        if len(channels) == 1:
            return (InputSpec(DEFAULT_ROLE),), []
        return (), [
            f"{where}: inputs: missing; the model has {len(channels)} channels "
            f"({', '.join(channels)}): give each a case role, e.g. "
            f"inputs: [{{channel: {channels[0]}, role: {channels[0].lower()}}}, ...]"
        ]
    if not isinstance(items, list):
        raise ModelPackageError(f"{where}: inputs: expected a list of {{channel, role}}")
    by_channel: dict[str, InputSpec] = {}
    for i, item in enumerate(items):
        key = f"{where}: inputs[{i}]"
        if not isinstance(item, dict) or not {"channel", "role"} <= item.keys():
            raise ModelPackageError(f"{key}: expected {{channel, role}}, got {item!r}")
        unknown = set(item) - {"channel", "role", "required"}
        if unknown:
            raise ModelPackageError(
                f"{key}: unknown key(s) {', '.join(sorted(unknown))}; known: channel, role, "
                "required"
            )
        channel = str(item["channel"])
        if channel not in channels:
            raise ModelPackageError(
                f"{key}.channel: {channel!r} is not a channel of the model ({', '.join(channels)})"
            )
        required = item.get("required", True)
        if not isinstance(required, bool):
            raise ModelPackageError(f"{key}.required: expected true or false, got {required!r}")
        by_channel[channel] = InputSpec(str(item["role"]), required)
    missing = [c for c in channels if c not in by_channel]
    if missing:
        return (), [
            f"{where}: inputs: channel(s) {', '.join(missing)} of the model have no role; "
            "give each channel a role"
        ]
    return tuple(by_channel[c] for c in channels), []


def mapping_gaps(runner: VolumeRunner, model: Path) -> list[str]:
    """What the mapping of ``model`` still lacks for ``runner``, one line each (empty when a
    route can use it).

    Raises
    ------
    ModelPackageError
        When the mapping has a key that is wrong (not merely missing).
    """
    where, doc = read_mapping(model)
    _, gaps = _channel_roles(runner, doc, str(where))
    structures = doc.get("structures") or {}
    if not isinstance(structures, dict):
        raise ModelPackageError(f"{where}: structures: expected label name -> description")
    for value, label in sorted(runner.labels.items()):
        if label not in structures:
            gaps.append(
                f"{where}: structures.{label}: missing (label {value} of the model); give its "
                "category and type, e.g. {category: SCT.AnatomicalStructure, type: SCT.Spleen}"
            )
    return gaps


def foreign_package(runner: VolumeRunner, model: Path) -> ModelPackage:
    """The :class:`ModelPackage` of ``runner`` and the mapping of ``model``.

    Raises
    ------
    ModelPackageError
        The first line of :func:`mapping_gaps`, or a wrong key of the mapping.
    """
    where, doc = read_mapping(model)
    gaps = mapping_gaps(runner, model)
    if gaps:
        raise ModelPackageError(gaps[0])
    inputs, _ = _channel_roles(runner, doc, str(where))
    roles = [spec.role for spec in inputs]
    reference = str(doc.get("reference", roles[0]))
    if reference not in roles or not inputs[roles.index(reference)].required:
        raise ModelPackageError(
            f"{where}: reference: {reference!r} is not one of the required roles {roles}"
        )
    structures_doc = doc.get("structures") or {}
    unknown = sorted(set(structures_doc) - set(runner.labels.values()))
    if unknown:
        raise ModelPackageError(
            f"{where}: structures: {', '.join(unknown)} not label(s) of the model "
            f"({', '.join(runner.labels.values())})"
        )
    structures = tuple(
        parse_structure(
            {"label": label, "name": label.replace("_", " ").capitalize(), **structures_doc[label]},
            i,
            str(where),
        )
        for i, (_, label) in enumerate(sorted(runner.labels.items()))
    )
    modalities = doc.get("modalities", [])
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise ModelPackageError(f"{where}: modalities: expected a list of strings, e.g. [CT]")
    dims = doc.get("dims", 3)
    if dims not in (2, 3) or isinstance(dims, bool):
        raise ModelPackageError(f"{where}: dims: must be 2 or 3, got {dims!r}")
    measurements = doc.get("measurements", ["volume" if dims == 3 else "area"])
    try:
        measured = tuple(Measurement(m) for m in measurements)
    except (ValueError, TypeError):
        allowed = ", ".join(m.value for m in Measurement)
        raise ModelPackageError(f"{where}: measurements: each one of {allowed}") from None
    registered = doc.get("registered", False)
    if not isinstance(registered, bool):
        raise ModelPackageError(f"{where}: registered: expected true or false")
    name = model.name[: -len(".zip")] if model.name.lower().endswith(".zip") else model.name
    return ModelPackage(
        path=model,
        name=str(doc.get("name", name)),
        version=str(doc.get("version", getattr(runner, "version", None) or "1")),
        dims=int(dims),
        modalities=tuple(modalities),
        input_size=(1, 1, 1) if dims == 3 else (1, 1),  # the runner's own business
        spacing_mm=None,
        normalization=Normalization(NormalizationKind.PERCENTILE),  # the runner's own too
        activation=Activation.SOFTMAX,  # a label map: the structures never overlap
        threshold=0.5,
        network={},
        weights=model,
        structures=structures,
        measurements=measured,
        applicability=(
            parse_applicability(doc, str(where)) if "applicability" in doc else Applicability()
        ),
        description=str(doc.get("description", f"{runner.format} model {name}")),
        inputs=inputs,
        reference=reference,
        registered=registered,
    )


def volume_geometry(series: ImageSeries) -> VolumeGeometry:
    """The grid of ``series`` in patient coordinates: for projection images a unit grid
    (pixel spacing where known, origin 0, identity directions)."""
    if series.is_projection or series.orientation is None or series.positions_mm is None:
        row_mm, col_mm = series.pixel_spacing_mm or (1.0, 1.0)
        return VolumeGeometry((1.0, row_mm, col_mm), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    orientation = series.orientation
    positions = np.asarray(series.positions_mm, dtype=np.float64)
    slice_mm = series.slice_spacing_mm
    if slice_mm is None and len(positions) > 1:  # unevenly spaced: their median step
        slice_mm = float(np.median(np.abs(np.diff(positions @ orientation[2]))))
    if not slice_mm:
        slice_mm = float(series.datasets[0].get("SliceThickness") or 1.0)
    row_mm, col_mm = series.pixel_spacing_mm or (1.0, 1.0)
    return VolumeGeometry(
        spacing_zyx_mm=(float(slice_mm), float(row_mm), float(col_mm)),
        origin_mm=(float(positions[0][0]), float(positions[0][1]), float(positions[0][2])),
        direction=tuple(float(v) for v in orientation.T.ravel()),
    )


@dataclass
class ForeignSegmenter:
    """A :class:`VolumeRunner` with its :class:`ModelPackage`, as the work stage uses a
    :class:`~dicom_node.models.inference.Segmenter`.

    Parameters
    ----------
    runner
        The loaded model on ``device``.
    package
        From :func:`foreign_package`.
    device
        Where the runner runs.
    slots
        The node's :class:`DeviceSlots`: a run on CUDA holds one.
    reload
        ``reload(device)`` gives the same runner on another device: after a CUDA
        out-of-memory error the run is retried once on the CPU (made once, then kept).
    """

    runner: VolumeRunner
    package: ModelPackage
    device: torch.device
    slots: DeviceSlots = field(default_factory=DeviceSlots)
    reload: Callable[[torch.device], VolumeRunner] | None = None
    _cpu_runner: VolumeRunner | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    #: One run at a time per runner: format runners keep state between calls (a bundle's
    #: workflow, nnU-Net's predictor), and worker threads share the loaded model.
    _run_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _on_cpu(self) -> VolumeRunner:
        if self.device.type == "cpu":
            return self.runner
        if self.reload is None:
            raise ModelPackageError(f"model {self.package.name}: cannot be loaded on the CPU")
        with self._lock:
            if self._cpu_runner is None:
                self._cpu_runner = self.reload(torch.device("cpu"))
            return self._cpu_runner

    def _predict(
        self, channels: np.ndarray, geometry: VolumeGeometry, report: InferenceReport
    ) -> np.ndarray:
        """The runner's label map, with a slot held; after CUDA out of memory once on the CPU."""
        try:
            with self._run_lock, self.slots.hold(self.device):
                labels = self.runner.predict(channels, geometry)
            report.device = str(self.device)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            step = "CUDA out of memory; retried once on the CPU"
            report.oom.append(step)
            log.warning("inference.oom", model=self.package.name, action=step)
            cpu_runner = self._on_cpu()
            with self._run_lock:
                labels = cpu_runner.predict(channels, geometry)
            report.device = "cpu"
        return np.asarray(labels)

    def warm_up(self) -> None:
        """Run the runner once on zeros of ``runner.example_shape_zyx`` (default
        :data:`WARM_UP_SHAPE_ZYX`, one slice of it for ``dims: 2``), one channel each.

        Raises
        ------
        ModelPackageError
            When the label map it gives is not of the input's shape.
        """
        default = WARM_UP_SHAPE_ZYX if self.package.dims == 3 else (1, *WARM_UP_SHAPE_ZYX[1:])
        shape = tuple(getattr(self.runner, "example_shape_zyx", None) or default)
        channels = np.zeros((len(self.runner.channel_names), *shape), dtype=np.float32)
        geometry = VolumeGeometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        labels = self._predict(channels, geometry, InferenceReport())
        if labels.shape != shape:
            raise ModelPackageError(
                f"model {self.package.name}: its {self.runner.format} runner gives a label map "
                f"of shape {labels.shape} for a volume of {shape}; it must give the input's grid"
            )

    def notes(self, series: ImageSeries) -> tuple[str, ...]:
        """Applicability assumptions about ``series``, for the SR."""
        return check_applicability(series, self.package)

    def segment(
        self,
        series: ImageSeries,
        stack: np.ndarray | None = None,
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        """Boolean masks ``(frames, rows, cols, S)`` on the grid of ``series``.

        ``stack``: the channel stack ``(frames, rows, cols, C)`` of a multi-input case (stored
        values after the Modality LUT, a missing optional role NaN, given to the runner as
        zeros); None: the series' own values, one channel.

        Raises
        ------
        InputError
            When the series' Modality (0008,0060) is not among the mapping's ``modalities``.
        ModelPackageError
            When the runner gives a label map of another shape than the input.
        """
        package = self.package
        if package.modalities and series.modality not in package.modalities:
            raise InputError(
                f"model {package.name} accepts {', '.join(package.modalities)} images, not "
                f"{series.modality or 'an unknown modality'}; route this series to another model"
            )
        check_applicability(series, package)
        if stack is None:
            if len(self.runner.channel_names) != 1:
                raise ValueError(
                    f"model {package.name} has inputs {', '.join(package.roles)}; give it their "
                    "channel stack (dicom_node.work.segment.segment_case)"
                )
            channels = series.pixels[None]
        else:
            channels = np.nan_to_num(np.moveaxis(stack, -1, 0), nan=0.0)
        channels = np.ascontiguousarray(channels, dtype=np.float32)
        labels = self._predict(channels, volume_geometry(series), report or InferenceReport())
        if labels.shape != series.shape:
            raise ModelPackageError(
                f"model {package.name}: its {self.runner.format} runner gives a label map of "
                f"shape {labels.shape} for a series of {series.shape}; it must give the "
                "input's grid"
            )
        values = np.array(sorted(self.runner.labels), dtype=np.int64)
        masks = labels[..., None].astype(np.int64) == values
        return postprocess(masks, package, per_frame=series.is_projection)
