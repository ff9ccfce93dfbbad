"""Running a model package on a series: probabilities and masks on the source pixel grid.

One code path for CPU and GPU: the network runs under :func:`torch.inference_mode`, and under
:func:`torch.autocast` (fp16) only when the device is CUDA.

* 2D models run on each frame (projection image or slice), batched ``batch_size`` at a time,
  prepared by :func:`~dicom_node.models.preprocess.prepare_image`.
* Projection images are first brought to the package's ``input.orientation`` from their
  Patient Orientation (0020,0020) (:mod:`dicom_node.package.orientation`), and the results
  mapped back exactly onto the stored grid; images outside the package's ``applicability``
  are refused (:mod:`dicom_node.package.applicability`).
* 3D models run :func:`monai.inferers.sliding_window_inference` with ``roi_size`` the package's
  ``input.size`` on the volume resampled to ``input.spacing_mm``, then resample back.
* Multi-input packages (``inputs``) get a channel stack on the reference input's grid
  (:func:`~dicom_node.models.preprocess.stack_inputs`, made by
  :func:`dicom_node.work.segment.segment_case`); one-input packages their series' pixels.

On a CUDA device, forward passes take one of ``gpu_slots`` (:class:`DeviceSlots`, one per node,
shared by every worker thread and model), so that at most that many model runs share the GPU;
on the CPU nothing limits them beyond the workers. A CUDA out-of-memory error
(:class:`torch.cuda.OutOfMemoryError`) is retried with half the batch (2D: frames per pass; 3D:
patches per sliding-window pass) down to 1, then once on the CPU; each step is logged as
``inference.oom`` and recorded in the :class:`InferenceReport` of the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import structlog
import torch
from monai.inferers import sliding_window_inference

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.imaging.series import ImageSeries
from dicom_node.models.networks import load_network
from dicom_node.models.postprocess import postprocess
from dicom_node.models.preprocess import (
    Placement,
    VolumePlacement,
    model_images,
    prepare_image,
    prepare_volume,
    prepare_volume_array,
    restore_probabilities,
    restore_volume,
)
from dicom_node.models.refine import refine_frame
from dicom_node.package.applicability import check_image
from dicom_node.package.manifest import Activation, ColorMode, ModelPackage, Refinement
from dicom_node.package.orientation import Reorientation, frame_datasets, reorientations

log = structlog.get_logger(__name__)

#: Fraction of overlap between neighbouring patches of the sliding window (3D models).
SLIDING_WINDOW_OVERLAP = 0.25

T = TypeVar("T")


class DeviceSlots:
    """At most ``gpu_slots`` model runs at a time on a CUDA device (``Settings.gpu_slots``).

    One instance per node, handed to every :class:`Segmenter`, so the limit holds across
    worker threads and models. Runs on the CPU take no slot.
    """

    def __init__(self, gpu_slots: int = 1) -> None:
        if gpu_slots < 1:
            raise ValueError(f"gpu_slots must be at least 1, got {gpu_slots}")
        self.gpu_slots = gpu_slots
        self._semaphore = threading.BoundedSemaphore(gpu_slots)

    @contextmanager
    def hold(self, device: torch.device) -> Iterator[None]:
        """Hold a slot while the block runs on ``device`` (no slot for the CPU)."""
        if device.type != "cuda":
            yield
            return
        with self._semaphore:
            yield


@dataclass
class InferenceReport:
    """What one model run had to do beyond the plan; the worker logs it with the job.

    Attributes
    ----------
    oom
        One line per CUDA out-of-memory error and what was done about it.
    batch_size
        The batch the run finished with (2D frames or 3D patches per pass).
    device
        The device the run finished on (``"cpu"`` after the fallback).
    """

    oom: list[str] = field(default_factory=list)
    batch_size: int | None = None
    device: str | None = None

    @property
    def degraded(self) -> bool:
        """True when the run needed a smaller batch or the CPU."""
        return bool(self.oom)


def select_device() -> torch.device:
    """Return ``cuda`` when a CUDA device is available, else ``cpu``; call it once at start."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("inference device selected", device=str(device))
    return device


def masks_from_probabilities(probs: np.ndarray, package: ModelPackage) -> np.ndarray:
    """Turn probabilities ``(..., S)`` into boolean masks of the same shape (no postprocessing).

    Sigmoid models: each structure where its probability exceeds ``output.threshold``
    (structures may overlap). Softmax models: each pixel goes to the most probable class, the
    background (``1 - sum``) included, so the structures never overlap.
    """
    if package.activation is Activation.SIGMOID:
        return probs > package.threshold
    background = 1.0 - probs.sum(axis=-1, keepdims=True)
    winner = np.argmax(np.concatenate([background, probs], axis=-1), axis=-1)
    masks: np.ndarray = winner[..., None] == np.arange(1, probs.shape[-1] + 1)
    return masks


def confidence_gate(masks: np.ndarray, probs: np.ndarray, package: ModelPackage) -> np.ndarray:
    """Drop, per frame and structure, a found mask whose mean probability is below the
    package's ``output.min_confidence`` or whose area is below ``output.min_area_fraction`` of
    the image (a faint or tiny, doubtful finding counts as not found: e.g. "no lesion").

    ``masks`` (boolean) and ``probs`` are ``(frames, rows, cols, S)``; returns ``masks``
    unchanged when the package has neither rule.
    """
    min_conf, min_area = package.min_confidence, package.min_area_fraction
    if min_conf is None and min_area is None:
        return masks
    out = masks.copy()
    pixels = masks.shape[1] * masks.shape[2]
    for frame in range(masks.shape[0]):
        for s in range(masks.shape[-1]):
            found = masks[frame, ..., s]
            area = int(found.sum())
            if not area:
                continue
            doubtful = min_area is not None and area < min_area * pixels
            if min_conf is not None and float(probs[frame, ..., s][found].mean()) < min_conf:
                doubtful = True
            if doubtful:
                out[frame, ..., s] = False
    return out


def check_applicability(series: ImageSeries, package: ModelPackage) -> tuple[str, ...]:
    """Notes on what was assumed about ``series`` (see
    :func:`~dicom_node.package.applicability.check_image`), each once.

    Raises
    ------
    NotApplicableError
        When an image is known to be outside the package's ``applicability``.
    """
    notes: dict[str, None] = {}
    for ds in {id(ds): ds for ds in frame_datasets(series)}.values():
        notes.update(dict.fromkeys(check_image(ds, package)))
    return tuple(notes)


class CaseSegmenter(Protocol):
    """What the work stage uses of a loaded model, whatever its format: a
    :class:`Segmenter` (the node's own package, TorchScript, ONNX) or a
    :class:`~dicom_node.models.foreign.ForeignSegmenter` (MONAI bundle, nnU-Net v2).
    :func:`dicom_node.models.formats.load_model` gives one for a route's ``model``."""

    #: The package contract: roles, structures, measurements, what outputs describe.
    package: ModelPackage
    device: torch.device

    def warm_up(self) -> None:
        """Run the model once on a synthetic input; raise when it cannot run."""

    def notes(self, series: ImageSeries) -> tuple[str, ...]:
        """What was assumed about ``series`` and done to it, for the SR."""

    def segment(
        self,
        series: ImageSeries,
        stack: np.ndarray | None = None,
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        """Boolean masks ``(frames, rows, cols, S)`` on the grid of ``series``."""


class Segmenter:
    """A loaded model package, ready to segment series.

    Parameters
    ----------
    package
        The model package; its network is built and its weights loaded once, in eval mode.
    device
        Where the network runs; default :func:`select_device`.
    batch_size
        Frames per forward pass for 2D models; patches per pass for 3D models.
    slots
        The node's :class:`DeviceSlots` (shared by every segmenter); default one of its own
        with one slot.
    """

    def __init__(
        self,
        package: ModelPackage,
        device: torch.device | None = None,
        batch_size: int = 8,
        slots: DeviceSlots | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.package = package
        self.device = device if device is not None else select_device()
        self.batch_size = batch_size
        self.slots = slots if slots is not None else DeviceSlots()
        self.network = load_network(package, self.device)
        self._cpu_network: torch.nn.Module | None = None
        self._cpu_lock = threading.Lock()
        #: the crop stages' networks (``refine``), by stage package folder and device (the CPU
        #: ones made on demand)
        self._crop_networks: dict[tuple[Path, str], torch.nn.Module] = {
            (stage.package.path, str(self.device)): load_network(stage.package, self.device)
            for stage in package.refine
        }

    def warm_up(self) -> None:
        """Run the network once on zeros of its input size (a 2D image, or one 3D patch) on
        its device, so that the first study does not pay torch's first-call costs.

        Raises
        ------
        ModelPackageError
            When the network's output has not one channel per structure of the package
            (a network that cannot run its input size raises its own error).
        """
        shape = (1, self.package.in_channels, *self.package.input_size)

        def forward(network: torch.nn.Module, device: torch.device, batch: int) -> np.ndarray:
            with torch.inference_mode(), self._autocast(device):
                probs = self._activate(network(torch.zeros(shape, device=device)))
                return probs.cpu().numpy()

        probs = self._run(forward, InferenceReport())
        for stage in self.package.refine:
            zeros = torch.zeros((1, stage.package.in_channels, *stage.package.input_size))
            with torch.inference_mode(), self._autocast(self.device):
                logits = self._crop_network(stage, self.device)(zeros.to(self.device))
            if tuple(logits.shape[1:]) != (1, *stage.package.input_size):
                raise ModelPackageError(
                    f"model {self.package.name}: crop stage {stage.package.path.name} gives "
                    f"{tuple(logits.shape[1:])} (channels, size) for an input of "
                    f"{tuple(zeros.shape[1:])}; a crop stage gives one channel, the structure"
                )
        expected = (1, len(self.package.structures), *self.package.input_size)
        if probs.shape != expected:
            raise ModelPackageError(
                f"model {self.package.name}: its network gives {probs.shape[1:]} "
                f"(channels, size) for an input of {shape[1:]}, where the package's "
                f"{len(self.package.structures)} structures need "
                f"{expected[1:]}; check model.yaml (structures, network, output) against "
                "model.pt"
            )

    def _network_on_cpu(self) -> torch.nn.Module:
        """A CPU copy of the network for the out-of-memory fallback (made once)."""
        if self.device.type == "cpu":
            return self.network
        with self._cpu_lock:
            if self._cpu_network is None:
                self._cpu_network = load_network(self.package, torch.device("cpu"))
            return self._cpu_network

    def _run(
        self, forward: Callable[[torch.nn.Module, torch.device, int], T], report: InferenceReport
    ) -> T:
        """``forward(network, device, batch_size)`` with a device slot held; after a CUDA
        out-of-memory error again with half the batch, down to 1, then once on the CPU (with
        the configured batch: host memory is not what ran out)."""
        device, network, batch = self.device, self.network, self.batch_size
        on_cpu_fallback = False
        while True:
            try:
                with self.slots.hold(device):
                    result = forward(network, device, batch)
                report.batch_size, report.device = batch, str(device)
                return result
            except torch.cuda.OutOfMemoryError:
                if on_cpu_fallback:
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if batch > 1:
                    step = f"CUDA out of memory at batch {batch}; retried with batch {batch // 2}"
                    batch //= 2
                else:
                    step = "CUDA out of memory at batch 1; retried once on the CPU"
                    on_cpu_fallback = True
                    device, network = torch.device("cpu"), self._network_on_cpu()
                    batch = self.batch_size
                report.oom.append(step)
                log.warning("inference.oom", model=self.package.name, action=step)

    def _check(self, series: ImageSeries) -> None:
        modalities = self.package.modalities
        if modalities and series.modality not in modalities:
            raise InputError(
                f"model {self.package.name} accepts {', '.join(modalities)} images, not "
                f"{series.modality or 'an unknown modality'}; route this series to another model"
            )

    def _activate(self, logits: torch.Tensor, package: ModelPackage | None = None) -> torch.Tensor:
        """Logits ``(B, C, ...)`` to probabilities ``(B, S, ...)``, background dropped."""
        logits = logits.float()
        if (package or self.package).activation is Activation.SIGMOID:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, 1:]

    def _image_probs(
        self, network: torch.nn.Module, x: torch.Tensor, package: ModelPackage
    ) -> np.ndarray:
        """Probabilities of a batch of prepared 2D inputs ``x`` on ``network`` (call under
        inference mode and autocast): with ``output.flip_tta`` the mean with the mirrored
        images', mirrored back."""
        probs_t = self._activate(network(x), package)
        if package.flip_tta:
            mirrored = self._activate(network(torch.flip(x, dims=(-1,))), package)
            probs_t = (probs_t + torch.flip(mirrored, dims=(-1,))) / 2
        probs: np.ndarray = probs_t.cpu().numpy()
        return probs

    def _crop_network(self, stage: Refinement, device: torch.device) -> torch.nn.Module:
        """The crop stage's network on ``device`` (on the CPU made once, for the fallback after
        a CUDA out-of-memory error)."""
        key = (stage.package.path, str(device))
        if key not in self._crop_networks:
            with self._cpu_lock:
                if key not in self._crop_networks:
                    self._crop_networks[key] = load_network(stage.package, device)
        return self._crop_networks[key]

    @staticmethod
    def _prepare_batch(
        images: Sequence[np.ndarray], package: ModelPackage
    ) -> tuple[torch.Tensor, list[Placement]]:
        """``images`` prepared for ``package`` (:func:`prepare_image`) as one batch ``(B, C,
        *input_size)``, and each one's placement to undo."""
        prepared = [prepare_image(image, package) for image in images]
        stacked = np.stack([image for image, _ in prepared])
        batch = torch.from_numpy(stacked if stacked.ndim == 4 else stacked[:, None])
        return batch, [placement for _, placement in prepared]

    def _crop_probs(
        self,
        stage: Refinement,
        crops: Sequence[np.ndarray],
        device: torch.device,
    ) -> list[np.ndarray]:
        """Probabilities ``(rows, cols)`` of each crop (see :mod:`dicom_node.models.refine`)
        from the crop stage's network on ``device``, in one batch."""
        inputs, placements = self._prepare_batch(crops, stage.package)
        network = self._crop_network(stage, device)
        with torch.inference_mode(), self._autocast(device):
            probs = self._image_probs(network, inputs.to(device), stage.package)
        return [
            restore_probabilities(p, placement)[0]
            for p, placement in zip(probs, placements, strict=True)
        ]

    @staticmethod
    def _autocast(device: torch.device) -> torch.autocast:
        return torch.autocast(
            device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"
        )

    def _predict_2d(
        self,
        images: np.ndarray,
        plans: tuple[Reorientation, ...] = (),
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        """Probabilities ``(frames, rows, cols, S)`` on the stored grid.

        ``images``: ``(frames, rows, cols)``, or ``(frames, rows, cols, C)`` for rgb or
        multi-input models (a channel stack). Frame ``f`` is run in the orientation
        ``plans[f].to_model`` gives (as stored without plans) and its probabilities mapped
        back with ``plans[f].to_source``.
        """
        frames, rows, cols = images.shape[:3]
        out = np.empty((frames, rows, cols, len(self.package.structures)), dtype=np.float32)

        def forward(network: torch.nn.Module, device: torch.device, batch: int) -> np.ndarray:
            def crop_probs(stage: Refinement, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
                return self._crop_probs(stage, crops, device)

            for start in range(0, frames, batch):
                stop = min(start + batch, frames)
                oriented = [
                    plans[f].to_model(images[f]) if plans else images[f] for f in range(start, stop)
                ]
                inputs, placements = self._prepare_batch(oriented, self.package)
                with torch.inference_mode(), self._autocast(device):
                    probs = self._image_probs(network, inputs.to(device), self.package)
                for i, placement in enumerate(placements):
                    frame = np.moveaxis(restore_probabilities(probs[i], placement), 0, -1)
                    if self.package.refine:  # crop stages, in the model's orientation
                        frame = refine_frame(oriented[i], frame, self.package, crop_probs)
                    out[start + i] = plans[start + i].to_source(frame) if plans else frame
            return out

        return self._run(forward, report if report is not None else InferenceReport())

    def _predict_3d(
        self,
        series: ImageSeries,
        stack: np.ndarray | None = None,
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        volume, placement = prepare_volume(series, self.package, stack)
        return self._predict_prepared(volume, placement, report)

    def predict_volume(self, pixels: np.ndarray, placement: VolumePlacement) -> np.ndarray:
        """Probabilities ``(z, y, x, S)`` of one volume given as an array (no DICOM) on the
        source grid of ``placement`` (:func:`~dicom_node.models.preprocess.volume_placement`):
        the path of :meth:`predict` for a 3D series, used by ``evaluate`` and training on
        NIfTI volumes. Only for 3D models."""
        if self.package.dims != 3:
            raise InputError(f"model {self.package.name} is 2D; give it images, not a volume")
        return self._predict_prepared(
            prepare_volume_array(pixels, placement, self.package), placement
        )

    def _predict_prepared(
        self,
        volume: np.ndarray,
        placement: VolumePlacement,
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        tensor = torch.from_numpy(volume)[None]  # (1, C, z, y, x)

        def forward(network: torch.nn.Module, device: torch.device, batch: int) -> np.ndarray:
            with torch.inference_mode(), self._autocast(device):
                logits = sliding_window_inference(
                    tensor.to(device),
                    roi_size=self.package.input_size,
                    sw_batch_size=batch,
                    predictor=network,
                    overlap=SLIDING_WINDOW_OVERLAP,
                    mode="gaussian",
                    cval=float(volume.min()),
                )
                assert isinstance(logits, torch.Tensor)
                return self._activate(logits)[0].cpu().numpy()

        probs = self._run(forward, report if report is not None else InferenceReport())
        return np.ascontiguousarray(np.moveaxis(restore_volume(probs, placement), 0, -1))

    def predict_image(
        self, image: np.ndarray, orientation: Reorientation | None = None
    ) -> np.ndarray:
        """Probabilities ``(rows, cols, S)`` of one 2D image given as an array (no DICOM):
        ``(rows, cols)``, or ``(rows, cols, 3)`` RGB for a package with ``input.color: rgb``.

        The same path as :meth:`predict` for one frame; used by ``evaluate`` and training on
        plain image files, which are in the model's orientation (``orientation`` None), or
        brought to it by ``orientation``. Only for 2D models.
        """
        if self.package.dims != 2:
            raise InputError(f"model {self.package.name} is 3D; give it a series, not an image")
        data = np.asarray(image, dtype=np.float32)
        if self.package.color is ColorMode.RGB and data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=-1)
        plans = () if orientation is None else (orientation,)
        probs: np.ndarray = self._predict_2d(data[None], plans)[0]
        return probs

    def notes(self, series: ImageSeries) -> tuple[str, ...]:
        """What was assumed about ``series`` and done to it before inference, for the SR:
        applicability assumptions, then each distinct reorientation."""
        described = (plan.describe() for plan in reorientations(series, self.package))
        return (*check_applicability(series, self.package), *dict.fromkeys(described))

    def predict(
        self,
        series: ImageSeries,
        stack: np.ndarray | None = None,
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        """Return the probabilities of each structure on the source pixel grid.

        Parameters
        ----------
        series
            The (reference) series: its grid, modality and applicability.
        stack
            Multi-input packages: the channel stack ``(frames, rows, cols, C)`` on the grid
            of ``series`` (:func:`~dicom_node.models.preprocess.stack_inputs`). None: the
            series' own pixels (one input).
        report
            Receives what the run had to do (out-of-memory retries, CPU fallback).

        Returns
        -------
        numpy.ndarray
            ``float32`` array ``(frames, rows, cols, S)``, ``S = len(package.structures)``,
            in the frame order of ``series`` (softmax models: background channel dropped).

        Raises
        ------
        NotApplicableError
            When an image is outside the package's ``applicability`` (View Position
            (0018,5101), Body Part Examined (0018,0015), species).
        InputError
            When the series' Modality (0008,0060) is not among the package's ``modalities``,
            or a 3D model gets a series it cannot resample (see
            :func:`~dicom_node.models.preprocess.prepare_volume`).
        """
        self._check(series)
        check_applicability(series, self.package)
        if stack is None and len(self.package.inputs) > 1:
            raise ValueError(
                f"model {self.package.name} has inputs {', '.join(self.package.roles)}; give "
                "it their channel stack (dicom_node.work.segment.segment_case)"
            )
        if self.package.dims == 3:
            probs = self._predict_3d(series, stack, report)
        else:
            images = model_images(series, self.package) if stack is None else stack
            probs = self._predict_2d(images, reorientations(series, self.package), report)
        log.debug("prediction done", model=self.package.name, frames=probs.shape[0])
        return probs

    def segment(
        self,
        series: ImageSeries,
        stack: np.ndarray | None = None,
        report: InferenceReport | None = None,
    ) -> np.ndarray:
        """Return boolean masks ``(frames, rows, cols, S)`` on the source pixel grid.

        Probabilities from :meth:`predict` are thresholded (sigmoid) or arg-maxed (softmax) by
        :func:`masks_from_probabilities`, then postprocessed per structure: connected
        components per frame for projection images, over the volume for cross-sectional
        series; then :func:`confidence_gate`.
        """
        probs = self.predict(series, stack, report)
        masks = masks_from_probabilities(probs, self.package)
        masks = postprocess(masks, self.package, per_frame=series.is_projection)
        return confidence_gate(masks, probs, self.package)
