"""Running a model package on a series: probabilities and masks on the source pixel grid.

One code path for CPU and GPU: the network runs under :func:`torch.inference_mode`, and under
:func:`torch.autocast` (fp16) only when the device is CUDA.

* 2D models run on each frame (projection image or slice), batched ``batch_size`` at a time,
  prepared by :func:`~dicom_node.models.preprocess.prepare_image`.
* Projection images are first brought to the package's ``input.orientation`` from their
  Patient Orientation (0020,0020) (:mod:`dicom_node.models.orientation`), and the results
  mapped back exactly onto the stored grid; images outside the package's ``applicability``
  are refused (:mod:`dicom_node.models.applicability`).
* 3D models run :func:`monai.inferers.sliding_window_inference` with ``roi_size`` the package's
  ``input.size`` on the volume resampled to ``input.spacing_mm``, then resample back.
"""

from __future__ import annotations

import numpy as np
import structlog
import torch
from monai.inferers import sliding_window_inference

from dicom_node.errors import InputError
from dicom_node.imaging.series import ImageSeries
from dicom_node.models.applicability import check_image
from dicom_node.models.orientation import Reorientation, frame_datasets, reorientations
from dicom_node.models.package import Activation, ColorMode, ModelPackage
from dicom_node.models.postprocess import postprocess
from dicom_node.models.preprocess import (
    model_images,
    prepare_image,
    prepare_volume,
    restore_probabilities,
    restore_volume,
)
from dicom_node.models.unet import load_network

log = structlog.get_logger(__name__)

#: Fraction of overlap between neighbouring patches of the sliding window (3D models).
SLIDING_WINDOW_OVERLAP = 0.25


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
    return winner[..., None] == np.arange(1, probs.shape[-1] + 1)


def confidence_gate(masks: np.ndarray, probs: np.ndarray, package: ModelPackage) -> np.ndarray:
    """Drop, per frame and structure, a found mask whose mean probability is below the
    package's ``output.min_confidence`` (a faint, doubtful finding counts as not found).

    ``masks`` (boolean) and ``probs`` are ``(frames, rows, cols, S)``; returns ``masks``
    unchanged when the package has no ``min_confidence``.
    """
    if package.min_confidence is None:
        return masks
    out = masks.copy()
    for frame in range(masks.shape[0]):
        for s in range(masks.shape[-1]):
            found = masks[frame, ..., s]
            if found.any() and float(probs[frame, ..., s][found].mean()) < package.min_confidence:
                out[frame, ..., s] = False
    return out


def check_applicability(series: ImageSeries, package: ModelPackage) -> tuple[str, ...]:
    """Notes on what was assumed about ``series`` (see
    :func:`~dicom_node.models.applicability.check_image`), each once.

    Raises
    ------
    NotApplicableError
        When an image is known to be outside the package's ``applicability``.
    """
    notes: dict[str, None] = {}
    for ds in {id(ds): ds for ds in frame_datasets(series)}.values():
        notes.update(dict.fromkeys(check_image(ds, package)))
    return tuple(notes)


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
    """

    def __init__(
        self, package: ModelPackage, device: torch.device | None = None, batch_size: int = 8
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.package = package
        self.device = device if device is not None else select_device()
        self.batch_size = batch_size
        self.network = load_network(package, self.device)

    def _check(self, series: ImageSeries) -> None:
        modalities = self.package.modalities
        if modalities and series.modality not in modalities:
            raise InputError(
                f"model {self.package.name} accepts {', '.join(modalities)} images, not "
                f"{series.modality or 'an unknown modality'}; route this series to another model"
            )

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, ...)`` to probabilities ``(B, S, ...)``, background dropped."""
        logits = logits.float()
        if self.package.activation is Activation.SIGMOID:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, 1:]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            device_type=self.device.type,
            dtype=torch.float16,
            enabled=self.device.type == "cuda",
        )

    def _predict_2d(self, images: np.ndarray, plans: tuple[Reorientation, ...] = ()) -> np.ndarray:
        """Probabilities ``(frames, rows, cols, S)`` on the stored grid.

        ``images``: ``(frames, rows, cols)``, or ``(frames, rows, cols, 3)`` for rgb models.
        Frame ``f`` is run in the orientation ``plans[f].to_model`` gives (as stored without
        plans) and its probabilities mapped back with ``plans[f].to_source``.
        """
        frames, rows, cols = images.shape[:3]
        out = np.empty((frames, rows, cols, len(self.package.structures)), dtype=np.float32)
        for start in range(0, frames, self.batch_size):
            stop = min(start + self.batch_size, frames)
            prepared = [
                prepare_image(plans[f].to_model(images[f]) if plans else images[f], self.package)
                for f in range(start, stop)
            ]
            stacked = np.stack([image for image, _ in prepared])
            batch = torch.from_numpy(stacked if stacked.ndim == 4 else stacked[:, None])
            with torch.inference_mode(), self._autocast():
                probs = self._activate(self.network(batch.to(self.device))).cpu().numpy()
            for i, (_, placement) in enumerate(prepared):
                frame = np.moveaxis(restore_probabilities(probs[i], placement), 0, -1)
                out[start + i] = plans[start + i].to_source(frame) if plans else frame
        return out

    def _predict_3d(self, series: ImageSeries) -> np.ndarray:
        volume, placement = prepare_volume(series, self.package)
        tensor = torch.from_numpy(volume)[None, None].to(self.device)
        with torch.inference_mode(), self._autocast():
            logits = sliding_window_inference(
                tensor,
                roi_size=self.package.input_size,
                sw_batch_size=self.batch_size,
                predictor=self.network,
                overlap=SLIDING_WINDOW_OVERLAP,
                mode="gaussian",
                cval=float(volume.min()),
            )
            assert isinstance(logits, torch.Tensor)
            probs = self._activate(logits)[0].cpu().numpy()
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
        return self._predict_2d(data[None], plans)[0]

    def notes(self, series: ImageSeries) -> tuple[str, ...]:
        """What was assumed about ``series`` and done to it before inference, for the SR:
        applicability assumptions, then each distinct reorientation."""
        described = (plan.describe() for plan in reorientations(series, self.package))
        return (*check_applicability(series, self.package), *dict.fromkeys(described))

    def predict(self, series: ImageSeries) -> np.ndarray:
        """Return the probabilities of each structure on the source pixel grid.

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
        if self.package.dims == 3:
            probs = self._predict_3d(series)
        else:
            probs = self._predict_2d(
                model_images(series, self.package), reorientations(series, self.package)
            )
        log.debug("prediction done", model=self.package.name, frames=probs.shape[0])
        return probs

    def segment(self, series: ImageSeries) -> np.ndarray:
        """Return boolean masks ``(frames, rows, cols, S)`` on the source pixel grid.

        Probabilities from :meth:`predict` are thresholded (sigmoid) or arg-maxed (softmax) by
        :func:`masks_from_probabilities`, then postprocessed per structure: connected
        components per frame for projection images, over the volume for cross-sectional
        series; then :func:`confidence_gate`.
        """
        probs = self.predict(series)
        masks = masks_from_probabilities(probs, self.package)
        masks = postprocess(masks, self.package, per_frame=series.is_projection)
        return confidence_gate(masks, probs, self.package)
