"""nnU-Net v2 trained models as a :class:`~dicom_node.models.runner.VolumeRunner`.

A site's nnU-Net v2 model is the folder nnU-Net's training writes
(``nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/``: ``dataset.json``,
``plans.json``, ``fold_*/checkpoint_final.pth``) or the zip ``nnUNetv2_export_model_to_zip``
writes of it (unpacked into a private temporary folder that lives as long as the runner).

It runs with nnunetv2's own :class:`~nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`
(``initialize_from_trained_model_folder``, ``predict_single_npy_array``): nnU-Net's own
preprocessing (cropping, resampling to the plans' spacing, intensity normalisation), sliding
window with Gaussian weighting, test-time mirroring, the ensemble of the folds and the
resampling back, so the label map equals what ``nnUNetv2_predict`` writes for the same volume.

Axis order: nnU-Net's default reader (``SimpleITKIO``, named in ``plans.json``) gives an array
``(z, y, x)`` and the spacing in that order, which is what the node hands a runner; a model
planned with ``NibabelIOWithReorient`` (volumes reoriented to RAS first) is refused.

nnunetv2 finds a checkpoint's trainer class by importing nnunetv2's trainer modules in turn;
its Primus trainers come first and need ``timm``, which this node does not install (``timm``
pulls PyPI's torchvision, which does not load beside a local torch build; see the Makefile).
:func:`_find_trainer_class` therefore searches the other trainer folders when that import
fails, so models trained with nnunetv2's variant trainers (e.g. ``nnUNetTrainer_250epochs``)
load without ``timm``; Primus models need ``timm`` installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.models.runner import VolumeGeometry

#: What a trained model folder holds, for error messages.
_LAYOUT = (
    "an nnU-Net v2 trained model folder holds dataset.json, plans.json and fold_*/<checkpoint>"
)
#: Readers whose array is not the file's voxel order ``(z, y, x)``.
_REORIENTING_READERS = frozenset({"NibabelIOWithReorient"})
#: Packages that only nnunetv2's Primus trainers import (see the module docstring).
_PRIMUS_ONLY_MODULES = frozenset({"timm", "torchvision"})
#: Serialises the temporary redirection of nnunetv2's trainer lookup.
_TRAINER_LOOKUP_LOCK = threading.Lock()


class NnUNetRunner:
    """An nnU-Net v2 trained model, run with nnunetv2's own predictor.

    Parameters
    ----------
    path
        The trained model folder (``dataset.json``, ``plans.json``,
        ``fold_*/checkpoint_final.pth``) or the zip ``nnUNetv2_export_model_to_zip`` wrote of
        one such folder.
    device
        Where the network runs (``cpu`` or ``cuda``).
    folds
        The folds to ensemble (``0``..``4`` or ``"all"``); ``None`` takes every ``fold_*``
        folder that holds ``checkpoint``.
    use_mirroring
        Test-time mirroring along the axes the model was trained to allow (nnU-Net's default).
    step_size
        Sliding-window step as a fraction of the patch size (nnU-Net's default 0.5).
    checkpoint
        The checkpoint file name in each fold folder.

    Raises
    ------
    ModelPackageError
        With one line naming the missing file or key, when the model is incomplete,
        unreadable or of a kind this runner does not serve.
    """

    format = "nnunet-v2"

    def __init__(
        self,
        path: Path,
        device: torch.device,
        *,
        folds: tuple[int | str, ...] | None = None,
        use_mirroring: bool = True,
        step_size: float = 0.5,
        checkpoint: str = "checkpoint_final.pth",
    ) -> None:
        self.source = Path(path)
        self.device = device
        if not 0 < step_size <= 1:
            raise ModelPackageError(
                f"nnU-Net step_size must be in (0, 1], not {step_size}: it is the sliding "
                "window's step as a fraction of the patch size"
            )
        self.model_dir = self._model_folder(self.source)
        dataset_json = _read_json(self.model_dir / "dataset.json")
        plans = _read_json(self.model_dir / "plans.json")
        self.channel_names: tuple[str, ...] = _channel_names(dataset_json, self.model_dir)
        self.labels: dict[int, str] = _labels(dataset_json, self.model_dir)
        reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
        if reader in _REORIENTING_READERS:
            raise ModelPackageError(
                f"{self.model_dir / 'plans.json'}: image_reader_writer {reader} reorients "
                "volumes to RAS, which this node does not reproduce; plan the model with "
                "SimpleITKIO or NibabelIO"
            )
        self.folds: tuple[int | str, ...] = _folds(self.model_dir, folds, checkpoint)
        self.checkpoint = checkpoint
        self._predictor = _load_predictor(
            self.model_dir,
            self.folds,
            checkpoint,
            device=device,
            use_mirroring=use_mirroring,
            step_size=step_size,
        )
        #: The nnU-Net configuration the checkpoints were trained with, e.g. ``3d_fullres``.
        self.configuration: str = _configuration_name(self._predictor)
        #: The spacing nnU-Net resamples to, in its axis order (``z, y, x`` for SimpleITKIO).
        self.spacing_mm: tuple[float, ...] = tuple(
            float(s) for s in self._predictor.configuration_manager.spacing
        )
        self._predict_lock = threading.Lock()

    def _model_folder(self, path: Path) -> Path:
        """``path`` itself, or the one trained model folder of a zip unpacked privately."""
        if path.is_dir():
            return path
        if not path.exists():
            raise ModelPackageError(f"nnU-Net model not found: {path} ({_LAYOUT})")
        if not zipfile.is_zipfile(path):
            raise ModelPackageError(
                f"{path} is neither a folder nor a zip; {_LAYOUT}, or give the zip "
                "nnUNetv2_export_model_to_zip writes"
            )
        unpacked = Path(tempfile.mkdtemp(prefix="dicom-node-nnunet-"))  # mode 0700
        self._cleanup = weakref.finalize(self, shutil.rmtree, unpacked, ignore_errors=True)
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(unpacked)  # zipfile drops absolute and ".." parts
        except (OSError, zipfile.BadZipFile) as error:
            self._cleanup()
            raise ModelPackageError(f"{path}: cannot unpack: {_one_line(error)}") from error
        found = sorted(p.parent for p in unpacked.rglob("plans.json"))
        if len(found) != 1:
            self._cleanup()
            if not found:
                raise ModelPackageError(f"{path}: the zip holds no plans.json; {_LAYOUT}")
            names = ", ".join(str(p.relative_to(unpacked)) for p in found)
            raise ModelPackageError(
                f"{path}: the zip holds {len(found)} trained models ({names}); export or "
                "unpack one configuration and name its folder"
            )
        return found[0]

    def predict(self, channels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
        """Segment one case with nnU-Net's predictor (see :class:`VolumeRunner`).

        Parameters
        ----------
        channels
            ``float32`` ``(C, z, y, x)``, ``C = len(channel_names)``, in ``channel_names``
            order.
        geometry
            The grid of ``channels``; nnU-Net uses its spacing (``z, y, x``, its own axis
            order for volumes read with SimpleITK).

        Returns
        -------
        numpy.ndarray
            The label map ``(z, y, x)``, values in ``labels`` or 0.

        Raises
        ------
        InputError
            When ``channels`` is not ``(C, z, y, x)`` with this model's number of channels.
        """
        array = np.asarray(channels)
        if array.ndim != 4 or array.shape[0] != len(self.channel_names):
            raise InputError(
                f"nnU-Net model {self.source.name} takes {len(self.channel_names)} channel(s) "
                f"{list(self.channel_names)} as (C, z, y, x); got shape {array.shape}"
            )
        properties = {"spacing": [float(s) for s in geometry.spacing_zyx_mm]}
        with self._predict_lock:  # one predictor, its network and weights, per runner
            segmentation = self._predictor.predict_single_npy_array(
                array.astype(np.float32, copy=False), properties
            )
        return np.asarray(segmentation)


def _load_predictor(
    model_dir: Path,
    folds: tuple[int | str, ...],
    checkpoint: str,
    *,
    device: torch.device,
    use_mirroring: bool,
    step_size: float,
) -> Any:
    """nnunetv2's predictor, initialised from ``model_dir`` (its prints kept off stdout)."""
    quiet = io.StringIO()  # nnunetv2 prints its notes (unset nnUNet_* paths, CPU) to stdout
    try:
        with contextlib.redirect_stdout(quiet):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as error:
        raise ModelPackageError(
            f"nnU-Net model {model_dir}: nnunetv2 is not installed ({_one_line(error)}); "
            "`make install` installs it"
        ) from error
    with contextlib.redirect_stdout(quiet):
        predictor = nnUNetPredictor(
            tile_step_size=step_size,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
    try:
        with contextlib.redirect_stdout(quiet), _trainer_lookup_without_timm():
            predictor.initialize_from_trained_model_folder(
                str(model_dir), use_folds=folds, checkpoint_name=checkpoint
            )
    except ModelPackageError:
        raise
    except KeyError as error:
        raise ModelPackageError(
            f"nnU-Net model {model_dir}: {checkpoint} or plans.json lacks the key {error}"
        ) from error
    except Exception as error:  # noqa: BLE001 - any load failure must name the model, in one line
        raise ModelPackageError(
            f"nnU-Net model {model_dir}: cannot load {checkpoint} of folds {list(folds)}: "
            f"{type(error).__name__}: {_one_line(error)}"
        ) from error
    return predictor


@contextlib.contextmanager
def _trainer_lookup_without_timm() -> Iterator[None]:
    """Let the predictor's trainer lookup skip nnunetv2's Primus trainers when timm is absent."""
    from nnunetv2.inference import predict_from_raw_data

    with _TRAINER_LOOKUP_LOCK:
        original = predict_from_raw_data.recursive_find_trainer_class_by_name
        predict_from_raw_data.recursive_find_trainer_class_by_name = _find_trainer_class
        try:
            yield
        finally:
            predict_from_raw_data.recursive_find_trainer_class_by_name = original


def _find_trainer_class(trainer_name: str) -> Any:
    """nnunetv2's trainer class ``trainer_name``, found without importing its Primus trainers.

    nnunetv2's own lookup first; when that fails on a missing ``timm``/``torchvision`` (its
    Primus trainers, imported before the variant trainers), every other trainer folder.
    """
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(trainer_name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in _PRIMUS_ONLY_MODULES:
            raise
    trainers = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    for folder in sorted(trainers.iterdir()):
        if folder.name == "primus" or not (folder / "__init__.py").is_file():
            continue
        found = recursive_find_python_class(
            str(folder), trainer_name, f"nnunetv2.training.nnUNetTrainer.{folder.name}"
        )
        if found is not None:
            return found
    raise ModelPackageError(
        f"nnU-Net trainer {trainer_name} is not among nnunetv2's trainers that load without "
        "timm; a Primus model needs timm and torchvision installed"
    )


def _configuration_name(predictor: Any) -> str:
    """The name in ``plans.json`` of the configuration the predictor was initialised with."""
    plans_manager, loaded = predictor.plans_manager, predictor.configuration_manager.configuration
    for name in plans_manager.available_configurations:
        if plans_manager.get_configuration(name).configuration == loaded:
            return str(name)
    return "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`ModelPackageError` naming the file otherwise."""
    if not path.is_file():
        raise ModelPackageError(f"{path} is missing; {_LAYOUT}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{path}: not readable JSON: {_one_line(error)}") from error
    if not isinstance(value, dict):
        raise ModelPackageError(f"{path}: not a JSON object")
    return value


def _channel_names(dataset_json: dict[str, Any], model_dir: Path) -> tuple[str, ...]:
    """``dataset.json``'s ``channel_names`` (older: ``modality``), in channel order."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    where = model_dir / "dataset.json"
    if not isinstance(names, dict) or not names:
        raise ModelPackageError(f"{where} has no 'channel_names' (channel index -> name)")
    try:
        ordered = sorted((int(index), str(name)) for index, name in names.items())
    except ValueError as error:
        raise ModelPackageError(
            f"{where}: 'channel_names' keys must be channel indices 0..n-1"
        ) from error
    if [index for index, _ in ordered] != list(range(len(ordered))):
        raise ModelPackageError(f"{where}: 'channel_names' keys must be channel indices 0..n-1")
    return tuple(name for _, name in ordered)


def _labels(dataset_json: dict[str, Any], model_dir: Path) -> dict[int, str]:
    """Label value -> name, background and nnU-Net's ``ignore`` label left out.

    Region-based models (labels whose values are lists, e.g. BraTS' whole tumour) write the
    value ``regions_class_order[i]`` for the ``i``-th region, as nnU-Net's label manager does.
    """
    where = model_dir / "dataset.json"
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelPackageError(f"{where} has no 'labels' (name -> value)")
    foreground = [
        (str(name), value)
        for name, value in labels.items()
        if name not in ("background", "ignore") and value != 0
    ]
    if any(isinstance(value, list) for _, value in foreground):
        order = dataset_json.get("regions_class_order")
        if not isinstance(order, list) or len(order) != len(foreground):
            raise ModelPackageError(
                f"{where}: region-based 'labels' need 'regions_class_order' with one value "
                "per region"
            )
        return {int(value): name for (name, _), value in zip(foreground, order, strict=True)}
    try:
        return {int(value): name for name, value in foreground}
    except (TypeError, ValueError) as error:
        raise ModelPackageError(f"{where}: 'labels' values must be integers") from error


def _folds(
    model_dir: Path, folds: tuple[int | str, ...] | None, checkpoint: str
) -> tuple[int | str, ...]:
    """The folds to load: ``folds`` checked, or every ``fold_*`` that holds ``checkpoint``."""
    if folds is None:
        found: list[int | str] = []
        for folder in sorted(model_dir.glob("fold_*")):
            if (folder / checkpoint).is_file():
                suffix = folder.name.removeprefix("fold_")
                found.append(int(suffix) if suffix.isdigit() else suffix)
        if not found:
            raise ModelPackageError(f"{model_dir / 'fold_*' / checkpoint} is missing; {_LAYOUT}")
        return tuple(found)
    if not folds:
        raise ModelPackageError(f"nnU-Net model {model_dir}: folds is empty")
    for fold in folds:
        path = model_dir / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ModelPackageError(f"{path} is missing; {_LAYOUT}")
    return tuple(folds)


def _one_line(error: BaseException) -> str:
    """The first line of ``error``'s message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
