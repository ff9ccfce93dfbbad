"""Which kind of model a route's ``model:`` names, and loading it: one function for the
worker, ``process`` and ``model check`` (:func:`load_model`).

Formats, told apart by the folder or file itself (:func:`detect_format`):

* ``package``: the node's own, a folder with ``model.yaml`` and ``model.pt`` (a MONAI UNet's
  state_dict);
* ``torchscript`` / ``onnx``: a folder with ``model.yaml`` whose ``network`` is
  ``{kind: torchscript | onnx, file: ...}``, or the ``.ts``/``.pt`` (TorchScript) or ``.onnx``
  file itself with its descriptor (``<stem>.yaml``, else ``model.yaml``) beside it. These run
  as the node's own package (:class:`~dicom_node.models.inference.Segmenter`);
* ``monai-bundle``: a folder with ``configs/metadata.json``, ``configs/inference.json`` (or
  ``.yaml``) and ``models/model.ts`` or ``models/model.pt``;
* ``nnunet``: an nnU-Net v2 trained model folder (``dataset.json``, ``plans.json``,
  ``fold_*/checkpoint_final.pth``) or its zip (``nnUNetv2_export_model_to_zip``).

The last two are *foreign*: a :class:`~dicom_node.models.runner.VolumeRunner` of the format
(:data:`RUNNERS`, ``Runner(path, device, **options)`` with the mapping's ``options``) inside a
:class:`~dicom_node.models.foreign.ForeignSegmenter`, described by the mapping
(``dicom-node.yaml``, :mod:`dicom_node.models.foreign`).

A model that is broken or incomplete fails with one :class:`ModelPackageError` line naming
the missing file or key, when the node starts (never at the first patient).
"""

from __future__ import annotations

import importlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dicom_node.common.errors import ModelPackageError
from dicom_node.config import yamlfile
from dicom_node.models.exported import is_torchscript
from dicom_node.models.foreign import ForeignSegmenter, foreign_package, read_mapping
from dicom_node.models.inference import CaseSegmenter, DeviceSlots, Segmenter
from dicom_node.models.runner import VolumeRunner
from dicom_node.package.manifest import MODEL_FILE, load_package

PACKAGE = "package"
TORCHSCRIPT = "torchscript"
ONNX = "onnx"
MONAI_BUNDLE = "monai-bundle"
NNUNET = "nnunet"

#: Formats the node runs itself (preprocessing, network, postprocessing of ``model.yaml``).
NODE_FORMATS = (PACKAGE, TORCHSCRIPT, ONNX)
#: Foreign format -> ``"module:Class"`` of its runner, called ``Class(path, device,
#: **options)``; imported when a route uses it.
RUNNERS: dict[str, str] = {
    MONAI_BUNDLE: "dicom_node.models.formats.bundle:BundleRunner",
    NNUNET: "dicom_node.models.formats.nnunet:NnUNetRunner",
}
#: Which extra of the Python package brings what a foreign format imports.
EXTRAS = {MONAI_BUNDLE: "monai[fire] (MONAI's bundle API)", NNUNET: "nnunetv2"}

TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".jit", ".torchscript")

KNOWN = (
    "a model package folder (model.yaml + model.pt), a MONAI bundle folder "
    "(configs/metadata.json), an nnU-Net v2 model folder (dataset.json + plans.json) or its "
    "zip, or a TorchScript (.ts/.pt) or ONNX (.onnx) file with its model.yaml beside it"
)


@dataclass(frozen=True)
class Detected:
    """What :func:`detect_format` found.

    Attributes
    ----------
    format
        One of ``package``, ``torchscript``, ``onnx``, ``monai-bundle``, ``nnunet``.
    path
        The model as the route names it.
    descriptor
        Node formats: the ``model.yaml`` (or ``<stem>.yaml``) that describes it.
    network_file
        A TorchScript or ONNX file named directly (the descriptor beside it).
    """

    format: str
    path: Path
    descriptor: Path | None = None
    network_file: Path | None = None

    @property
    def foreign(self) -> bool:
        """True for formats that run through a :class:`VolumeRunner`."""
        return self.format not in NODE_FORMATS


def _network_kind(model_yaml: Path) -> str:
    """``network.kind`` of a ``model.yaml`` (``package`` for a UNet or an unreadable file,
    which :func:`load_package` then explains)."""
    try:
        doc = yamlfile.safe_load(model_yaml.read_text())
    except (yaml.YAMLError, OSError):
        return PACKAGE
    network = doc.get("network") if isinstance(doc, dict) else None
    kind = network.get("kind") if isinstance(network, dict) else None
    return kind if kind in (TORCHSCRIPT, ONNX) else PACKAGE


def _need(folder: Path, what: str, *names: str, fix: str = "copy the whole model folder") -> None:
    """Raise naming ``names`` when none of them is in ``folder``."""
    if not any((folder / name).is_file() for name in names):
        raise ModelPackageError(
            f"{folder}: {what} without {' or '.join(names)}; it is incomplete ({fix})"
        )


def _folder(path: Path) -> Detected:
    if (path / MODEL_FILE).is_file():
        kind = _network_kind(path / MODEL_FILE)
        return Detected(kind, path, path / MODEL_FILE)
    if (path / "configs").is_dir() or (path / "configs" / "metadata.json").is_file():
        what = "a MONAI bundle"
        _need(path, what, "configs/metadata.json")
        _need(path, what, "configs/inference.json", "configs/inference.yaml")
        _need(
            path,
            what,
            "models/model.ts",
            "models/model.pt",
            fix="put its weights there: the bundle's large_files.yml says where they are",
        )
        return Detected(MONAI_BUNDLE, path)
    if any((path / name).is_file() for name in ("dataset.json", "plans.json")) or any(
        path.glob("fold_*")
    ):
        what = "an nnU-Net v2 model"
        _need(path, what, "dataset.json")
        _need(path, what, "plans.json")
        if not any(path.glob("fold_*/checkpoint_final.pth")):
            raise ModelPackageError(
                f"{path}: an nnU-Net v2 model without fold_*/checkpoint_final.pth; train at "
                "least one fold to the end, or name the fold's checkpoint in options"
            )
        return Detected(NNUNET, path)
    raise ModelPackageError(f"{path}: not a model this node knows; a route's model is {KNOWN}")


def _zip(path: Path) -> Detected:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelPackageError(f"{path}: not a readable zip file ({exc})") from exc
    if any(n.endswith("configs/metadata.json") for n in names):
        return Detected(MONAI_BUNDLE, path)
    for needed in ("dataset.json", "plans.json", "checkpoint_final.pth"):
        if not any(n.endswith(needed) for n in names):
            raise ModelPackageError(
                f"{path}: an nnU-Net v2 model zip without {needed}; export it again with "
                "nnUNetv2_export_model_to_zip"
            )
    return Detected(NNUNET, path)


def _network_file(path: Path, kind: str) -> Detected:
    for descriptor in (path.with_suffix(".yaml"), path.with_name(MODEL_FILE)):
        if descriptor.is_file():
            return Detected(kind, path, descriptor, path)
    raise ModelPackageError(
        f"{path}: {'an ONNX' if kind == ONNX else 'a TorchScript'} file without its "
        f"descriptor; write {path.with_suffix('.yaml').name} "
        f"(or {MODEL_FILE}) beside it: dims, input.size, input.normalization, output and "
        "structures, as in a model package's model.yaml (docs/model-package.md)"
    )


def detect_format(path: Path | str) -> Detected:
    """Tell which format the model at ``path`` is, and check that its files are there.

    Raises
    ------
    ModelPackageError
        One line: the path does not exist, is no format the node knows, or lacks a file its
        format needs (named).
    """
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise ModelPackageError(f"{path}: does not exist; a route's model is {KNOWN}")
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return _zip(path)
    if suffix == ".onnx":
        return _network_file(path, ONNX)
    if suffix in TORCHSCRIPT_SUFFIXES:
        if not is_torchscript(path):
            raise ModelPackageError(
                f"{path}: not a TorchScript file (torch.jit.save); a state_dict of a MONAI "
                f"UNet belongs in a model package folder with its {MODEL_FILE}"
            )
        return _network_file(path, TORCHSCRIPT)
    raise ModelPackageError(f"{path}: not a model this node knows; a route's model is {KNOWN}")


def open_runner(detected: Detected, device: torch.device, options: dict[str, Any]) -> VolumeRunner:
    """The :class:`VolumeRunner` of a foreign model: ``Runner(path, device, **options)``.

    Raises
    ------
    ModelPackageError
        One line when the runner cannot be imported or loaded (its own message, first line).
    """
    module_name, _, class_name = RUNNERS[detected.format].partition(":")
    try:
        runner_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ModelPackageError(
            f"{detected.path}: a {detected.format} model needs {EXTRAS.get(detected.format)}, "
            f"which cannot be imported here ({exc}); install it beside dicom-node"
        ) from exc
    try:
        runner: VolumeRunner = runner_class(detected.path, device, **options)
    except ModelPackageError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the format's library raises: one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelPackageError(
            f"{detected.path}: the {detected.format} model cannot be loaded "
            f"({type(exc).__name__}: {first})"
        ) from exc
    return runner


def load_model(
    path: Path | str,
    device: torch.device | None = None,
    *,
    batch_size: int = 8,
    slots: DeviceSlots | None = None,
) -> CaseSegmenter:
    """The model a route names, loaded on ``device`` (default: CUDA when available): the one
    way the worker, ``process`` and ``model check`` load a model of any format.

    Raises
    ------
    ModelPackageError
        One line naming the missing file or key (:func:`detect_format`, ``model.yaml``, the
        runner, the mapping).
    """
    from dicom_node.models.inference import select_device

    detected = detect_format(path)
    device = device if device is not None else select_device()
    slots = slots if slots is not None else DeviceSlots()
    if not detected.foreign:
        assert detected.descriptor is not None
        package = load_package(detected.descriptor, detected.network_file)
        return Segmenter(package, device, batch_size=batch_size, slots=slots)
    _, mapping = read_mapping(detected.path)
    options = dict(mapping.get("options") or {})
    runner = open_runner(detected, device, options)
    return ForeignSegmenter(
        runner,
        foreign_package(runner, detected.path),
        device,
        slots,
        reload=lambda other: open_runner(detected, other, options),
    )
