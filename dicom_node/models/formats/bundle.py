"""MONAI Model Zoo bundles as volume runners, read and run with MONAI's own bundle API.

A bundle folder holds ``configs/metadata.json`` (what goes in and comes out), ``configs/
inference.json`` (or ``.yaml``: the network, preprocessing, inferer and postprocessing as
MONAI config) and its weights, ``models/model.pt`` (a state dict for ``network_def``) or
``models/model.ts`` (TorchScript). :class:`BundleRunner` parses the inference config with
:class:`monai.bundle.ConfigParser` and runs exactly the bundle's own objects, the way the
bundle's ``evaluator`` (a :class:`monai.engines.SupervisedEvaluator`) would: its
``preprocessing`` Compose on a data dict, collate, its ``inferer`` with its network (AMP as
the evaluator says), decollate, its ``postprocessing`` Compose (whose ``Invertd`` takes the
prediction back to the input's grid). Only two things differ from ``monai.bundle run``:

- the volume comes from memory, not from a file: the bundle's ``LoadImaged`` is given a
  reader that hands it the node's volume as the NIfTI image the same voxels would be in a
  file (array ``(x, y, z)``, RAS affine as NIfTI stores it), through MONAI's own
  :class:`~monai.data.NibabelReader`; so everything the loader does after reading (dtype,
  metadata, channel handling) is the bundle's own;
- ``SaveImaged`` steps are left out of the postprocessing: the label map is returned.

Several input channels (e.g. BraTS: T1c, T1, T2, FLAIR) are given to the loader as several
files, as a bundle's datalist lists them, so ``LoadImaged`` stacks them channel first.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader

from dicom_node.common.errors import ModelPackageError
from dicom_node.models.runner import VolumeGeometry

#: The format's name, as routes and ``model check`` print it.
FORMAT = "monai-bundle"

#: What LoadImaged is asked to read: marks the node's in-memory volume (never a real path).
_MEMORY_PREFIX = "dicom-node-volume-"

#: NIfTI's RAS from DICOM's LPS: x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: How bundles name channel 0 where the label map's values are the output channels' indices.
_BACKGROUND_NAMES = frozenset({"background", "bg", "_background_", "background (0)"})

_PathLike = str | os.PathLike[str]

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


def _fail(path: Path, what: str) -> ModelPackageError:
    return ModelPackageError(f"MONAI bundle {path}: {what}")


def _config_file(path: Path) -> Path:
    for name in _CONFIG_NAMES:
        candidate = path / "configs" / name
        if candidate.is_file():
            return candidate
    raise _fail(path, "missing configs/inference.json (or inference.yaml)")


def _load_config(path: Path, file: Path) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    try:
        content: Any = ConfigParser.load_config_file(file)
    except (OSError, ValueError) as error:
        raise _fail(path, f"cannot read {file.relative_to(path)}: {error}") from error
    if not isinstance(content, dict):
        raise _fail(path, f"{file.relative_to(path)} is not a JSON/YAML object")
    return content


def _channel_def(path: Path, section: Mapping[str, Any], where: str) -> dict[int, str] | None:
    channel_def = section.get("channel_def")
    if channel_def is None:
        return None
    if not isinstance(channel_def, Mapping):
        raise _fail(path, f"configs/metadata.json {where}.channel_def is not an object")
    try:
        return {int(k): str(v) for k, v in channel_def.items()}
    except ValueError as error:
        raise _fail(path, f"configs/metadata.json {where}.channel_def: {error}") from error


def _single(path: Path, data_format: Mapping[str, Any], side: str, key: str) -> tuple[str, Any]:
    sections = data_format.get(side)
    if not isinstance(sections, Mapping) or not sections:
        raise _fail(path, f"configs/metadata.json has no network_data_format.{side}")
    name = key if key in sections else next(iter(sections))
    section = sections[name]
    if not isinstance(section, Mapping):
        raise _fail(path, f"configs/metadata.json network_data_format.{side}.{name} is no object")
    return str(name), section


class _MemoryReader(ImageReader):
    """A MONAI image reader that "reads" the node's volumes: NIfTI images built in memory.

    ``LoadImage`` tries its registered readers last first; this one answers only for names
    that start with :data:`_MEMORY_PREFIX` and hands the images to a :class:`NibabelReader`
    (the bundle's own one, with its options, where the loader has it) for ``get_data``.
    """

    def __init__(self, nibabel_reader: Any) -> None:
        self._nibabel = nibabel_reader
        self._volumes: dict[str, Any] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def holding(self, token: str, images: Sequence[Any]) -> Iterator[list[str]]:
        """Make ``images`` readable under names made from ``token`` while in the block."""
        names = [f"{_MEMORY_PREFIX}{token}-{i}" for i in range(len(images))]
        with self._lock:
            self._volumes.update(zip(names, images, strict=True))
        try:
            yield names
        finally:
            with self._lock:
                for name in names:
                    self._volumes.pop(name, None)

    def verify_suffix(self, filename: Sequence[_PathLike] | _PathLike) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return bool(names) and all(str(n).startswith(_MEMORY_PREFIX) for n in names)

    def read(self, data: Sequence[_PathLike] | _PathLike, **kwargs: Any) -> Any:
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        with self._lock:
            images = [self._volumes[str(n)] for n in names]
        # NibabelReader.get_data pairs the images with the names its read() was given.
        self._nibabel.filenames = tuple(str(n) for n in names)
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> Any:
        return self._nibabel.get_data(img)


def _nifti_images(channels: np.ndarray, geometry: VolumeGeometry) -> list[Any]:
    """Each channel as the NIfTI image a file of it would hold (SimpleITK/dcm2niix style)."""
    import nibabel

    nib: Any = nibabel  # untyped
    # NIfTI keeps the affine (sform) as float32: round it so as to read as from a file.
    affine = (_LPS_TO_RAS @ geometry.affine_lps()).astype(np.float32).astype(np.float64)
    images = []
    for channel in channels:
        data_xyz = np.asarray(channel, dtype=np.float32).transpose(2, 1, 0)
        image: Any = nib.Nifti1Image(data_xyz, affine)
        image.header.set_sform(affine, code=1)
        image.header.set_qform(affine, code=1)
        images.append(image)
    return images


def _find_loader(preprocessing: Any) -> Any:
    from monai.transforms import Compose, LoadImaged

    composed: Any = preprocessing if isinstance(preprocessing, Compose) else None
    transforms = composed.flatten().transforms if composed is not None else ()
    for transform in transforms:
        if isinstance(transform, LoadImaged):
            return transform
    return None


def _without_savers(postprocessing: Any) -> Any:
    from monai.transforms import Compose, SaveImage, SaveImaged

    if not isinstance(postprocessing, Compose):
        return postprocessing
    composed: Any = postprocessing
    kept = [t for t in composed.flatten().transforms if not isinstance(t, (SaveImaged, SaveImage))]
    return Compose(
        kept,
        map_items=postprocessing.map_items,
        unpack_items=postprocessing.unpack_items,
        lazy=postprocessing.lazy,
    )


class BundleRunner:
    """A MONAI Model Zoo bundle folder, loaded on ``device``, as a
    :class:`~dicom_node.models.runner.VolumeRunner`.

    Parameters
    ----------
    path
        The bundle folder: ``configs/metadata.json``, ``configs/inference.json`` (or
        ``.yaml``), and ``models/model.pt`` (state dict for ``network_def``; the file the
        config's ``checkpointloader`` names, where it names one) or ``models/model.ts``.
    device
        Where the network and the inferer run.
    sw_batch_size
        Overrides the inferer's ``sw_batch_size`` (windows per forward pass), e.g. to fit a
        small GPU.
    overrides
        Further config overrides, id -> value as ``monai.bundle run`` takes them (e.g.
        ``{"displayable_configs#highres": False}`` for the whole-body CT bundle's 3 mm
        model, ``{"inferer#overlap": 0.25}``).
    labels
        Label value -> name of the label map the bundle's postprocessing writes. Default:
        ``network_data_format.outputs.pred.channel_def`` of the metadata without its
        background (channel 0 named ``background``), which holds where the postprocessing
        takes the argmax over those channels. Required where the metadata names overlapping
        (sigmoid) output channels without a background (e.g. BraTS), whose postprocessing
        writes values the metadata does not say.
    amp
        Mixed precision on CUDA devices; default: the bundle's ``evaluator#amp``.

    Raises
    ------
    ModelPackageError
        One line naming the missing or broken file or key.
    """

    format = FORMAT

    def __init__(
        self,
        path: Path,
        device: torch.device,
        *,
        sw_batch_size: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        labels: Mapping[int, str] | None = None,
        amp: bool | None = None,
    ) -> None:
        from monai.bundle import ConfigParser

        self.path = Path(path)
        self.device = torch.device(device)
        if not self.path.is_dir():
            raise _fail(self.path, "not a folder")
        meta_file = self.path / "configs" / "metadata.json"
        if not meta_file.is_file():
            raise _fail(self.path, "missing configs/metadata.json")
        metadata = _load_config(self.path, meta_file)
        config = _load_config(self.path, _config_file(self.path))
        for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
            if key not in config:
                raise _fail(self.path, f"configs/inference.json has no {key!r}")

        data_format = metadata.get("network_data_format")
        if not isinstance(data_format, Mapping):
            raise _fail(self.path, "configs/metadata.json has no network_data_format")
        self._image_key = str(config.get("image_key", "image"))
        self.channel_names, self.labels = self._read_metadata(data_format, labels)

        parser: Any = ConfigParser(config)
        parser["bundle_root"] = str(self.path)
        device_expression = f"$torch.device({str(self.device)!r})"
        parser["device"] = device_expression
        inferer_config = config["inferer"]
        if isinstance(inferer_config, Mapping):
            for key in ("device", "sw_device"):
                if key in inferer_config:
                    parser[f"inferer#{key}"] = device_expression
        if sw_batch_size is not None:
            parser["inferer#sw_batch_size"] = int(sw_batch_size)
        for key, value in (overrides or {}).items():
            parser[key] = value
        self._parser = parser

        self._preprocessing = self._parsed("preprocessing")
        self.inferer = self._parsed("inferer")
        self._postprocessing = _without_savers(self._parsed("postprocessing"))
        loader = _find_loader(self._preprocessing)
        if loader is None:
            raise _fail(self.path, "preprocessing has no LoadImaged to give the volume to")
        self._reader = self._memory_reader(loader)
        self.network = self._load_network()
        self.amp = bool(self._evaluator_amp() if amp is None else amp)
        self._lock = threading.Lock()
        self._calls = 0

    # -- reading the bundle ------------------------------------------------------------

    def _parsed(self, key: str) -> Any:
        try:
            return self._parser.get_parsed_content(key)
        except Exception as error:  # MONAI wraps config errors in several types
            causes = [error]
            while causes[-1].__cause__ is not None and len(causes) < 20:
                causes.append(causes[-1].__cause__)  # type: ignore[arg-type]
            root = next((c for c in causes if isinstance(c, ImportError)), causes[-1])
            first = next(iter(str(root).strip().splitlines()), "").rstrip(".")
            if isinstance(root, ImportError):  # MONAI's OptionalImportError: "import x (...)"
                raise _fail(self.path, f"{key!r} needs a package not installed: {first}") from error
            raise _fail(
                self.path, f"cannot build {key!r}: {type(root).__name__}: {first}"
            ) from error

    def _read_metadata(
        self, data_format: Mapping[str, Any], labels: Mapping[int, str] | None
    ) -> tuple[tuple[str, ...], dict[int, str]]:
        name, inputs = _single(self.path, data_format, "inputs", self._image_key)
        where = f"network_data_format.inputs.{name}"
        channel_def = _channel_def(self.path, inputs, where)
        count = inputs.get("num_channels")
        if channel_def is not None:
            channel_names = tuple(channel_def[k] for k in sorted(channel_def))
        elif count == 1:
            channel_names = (name,)
        else:
            raise _fail(self.path, f"configs/metadata.json {where} has no channel_def")
        if isinstance(count, int) and count != len(channel_names):
            raise _fail(
                self.path,
                f"configs/metadata.json {where}: num_channels {count} but "
                f"{len(channel_names)} channel_def entries",
            )
        if labels is not None:
            try:
                chosen = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
            except (TypeError, ValueError, AttributeError) as error:
                raise _fail(
                    self.path, f"the labels option must map integers to names: {error}"
                ) from error
            if not chosen:
                raise _fail(self.path, "the labels option names no label other than 0")
            return channel_names, chosen
        out_name, outputs = _single(self.path, data_format, "outputs", "pred")
        where = f"network_data_format.outputs.{out_name}"
        out_def = _channel_def(self.path, outputs, where)
        if out_def is None:
            raise _fail(self.path, f"configs/metadata.json {where} has no channel_def")
        if out_def.get(0, "").strip().lower() not in _BACKGROUND_NAMES or len(out_def) < 2:
            named = ", ".join(out_def[k] for k in sorted(out_def))
            raise _fail(
                self.path,
                f"configs/metadata.json {where}.channel_def names output channels ({named}) "
                "without a background, so not the label values the postprocessing writes: "
                "give them as the labels option",
            )
        return channel_names, {k: v for k, v in sorted(out_def.items()) if k != 0}

    def _memory_reader(self, loader: Any) -> _MemoryReader:
        from monai.data import NibabelReader

        # A copy of the loader's own NibabelReader (its options), reading from memory.
        own = [r for r in loader._loader.readers if isinstance(r, NibabelReader)]
        nibabel_reader = copy.copy(own[-1]) if own else NibabelReader()
        nibabel_reader.to_gpu = False
        reader = _MemoryReader(nibabel_reader)
        loader.register(reader)
        return reader

    def _checkpoint_path(self) -> Path:
        """The weights file the config's CheckpointLoader names, else ``models/model.pt``."""
        config = self._parser.get()
        ids: list[str] = []
        if isinstance(config.get("checkpointloader"), Mapping):
            ids.append("checkpointloader#load_path")
        handlers = config.get("handlers")
        if isinstance(handlers, list):
            ids += [
                f"handlers#{i}#load_path"
                for i, h in enumerate(handlers)
                if isinstance(h, Mapping)
                and str(h.get("_target_", "")).endswith("CheckpointLoader")
            ]
        for config_id in ids:
            try:
                value = self._parser.get_parsed_content(config_id)
            except Exception:  # noqa: BLE001 - a load_path we cannot evaluate: try the next
                continue
            if isinstance(value, (str, Path)):
                return Path(value)
        return self.path / "models" / "model.pt"

    def _load_network(self) -> torch.nn.Module:
        state_path = self._checkpoint_path()
        script_path = self.path / "models" / "model.ts"
        if state_path.is_file():
            network: Any = self._parsed("network_def")
            if not isinstance(network, torch.nn.Module):
                raise _fail(self.path, "network_def does not build a torch.nn.Module")
            try:
                state: Any = torch.load(state_path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise _fail(self.path, f"cannot read {state_path.name}: {error}") from error
            if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
                state = state["model"]
            try:
                network.load_state_dict(state, strict=True)
            except (RuntimeError, TypeError, AttributeError) as error:
                first = str(error).strip().splitlines()[0]
                raise _fail(
                    self.path, f"{state_path.name} does not fit network_def: {first}"
                ) from error
            module: torch.nn.Module = network.to(self.device)
        elif script_path.is_file():
            try:
                jit: Any = torch.jit  # untyped
                module = jit.load(str(script_path), map_location=self.device)
            except Exception as error:
                raise _fail(self.path, f"cannot load models/model.ts: {error}") from error
        else:
            inside = state_path.is_relative_to(self.path)
            expected = str(state_path.relative_to(self.path) if inside else state_path)
            raise _fail(self.path, f"missing the weights: neither {expected} nor models/model.ts")
        module.eval()
        return module

    def _evaluator_amp(self) -> bool:
        evaluator = self._parser.get().get("evaluator")
        if not isinstance(evaluator, Mapping) or "amp" not in evaluator:
            return False
        try:
            return bool(self._parser.get_parsed_content("evaluator#amp"))
        except Exception:  # noqa: BLE001 - an evaluator setting we cannot read: no AMP
            return False

    # -- running -----------------------------------------------------------------------

    def predict(self, channels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
        """Segment one case with the bundle's own pipeline.

        Parameters
        ----------
        channels
            ``float32 (C, z, y, x)``, ``C = len(channel_names)``, on the grid ``geometry``.
        geometry
            Where the voxels lie (LPS).

        Returns
        -------
        numpy.ndarray
            Label map ``(z, y, x)`` on the same grid (``uint8``, or ``uint16`` past 255).
        """
        from monai.data import list_data_collate
        from monai.engines.utils import default_prepare_batch, engine_apply_transform
        from monai.networks.utils import eval_mode
        from monai.transforms import Decollated

        channels = np.asarray(channels, dtype=np.float32)
        if channels.ndim != 4 or channels.shape[0] != len(self.channel_names):
            raise ValueError(
                f"expected ({len(self.channel_names)}, z, y, x) channels "
                f"{self.channel_names}, got shape {channels.shape}"
            )
        images = _nifti_images(channels, geometry)
        with self._lock:
            self._calls += 1
            token = str(self._calls)
            with self._reader.holding(token, images) as names:
                source: Any = names[0] if len(names) == 1 else names
                item = self._preprocessing({self._image_key: source})
            batch: Any = list_data_collate([item])
            inputs, _ = default_prepare_batch(batch, self.device)
            output: dict[str, Any] = {"image": inputs, "label": None}
            with eval_mode(self.network):
                if self.amp and self.device.type == "cuda":
                    with torch.autocast("cuda"):
                        output["pred"] = self.inferer(inputs, self.network)
                else:
                    output["pred"] = self.inferer(inputs, self.network)
            decollate: Any = Decollated(keys=None, detach=True)
            batch_items, output_items = decollate(batch), decollate(output)
            _, result = engine_apply_transform(
                batch_items[0], output_items[0], self._postprocessing
            )
        return self._label_map(result, channels.shape[1:])

    def _label_map(self, result: Any, shape_zyx: tuple[int, ...]) -> np.ndarray:
        if not isinstance(result, Mapping) or "pred" not in result:
            raise _fail(self.path, "postprocessing did not return a 'pred'")
        pred: Any = result["pred"]
        values = np.asarray(pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else pred)
        if values.ndim == 4 and values.shape[0] == 1:
            values = values[0]
        expected_xyz = tuple(reversed(shape_zyx))
        if values.shape != expected_xyz:
            raise _fail(
                self.path,
                f"postprocessing gave {values.shape}, not a label map on the input grid "
                f"{expected_xyz} (x, y, z): it needs an argmax and an Invertd",
            )
        labels = np.rint(values).astype(np.int64).transpose(2, 1, 0)
        unknown = sorted(set(np.unique(labels).tolist()) - set(self.labels) - {0})
        if unknown:
            raise _fail(
                self.path,
                f"postprocessing wrote label values {unknown} that the labels "
                f"{sorted(self.labels)} do not name: give them as the labels option",
            )
        dtype = np.uint8 if max(self.labels, default=0) <= 255 else np.uint16
        return np.ascontiguousarray(labels, dtype=dtype)
