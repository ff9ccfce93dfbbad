"""Input preparation shared by training and inference, and the way back to the source grid.

2D models (``dims: 2``): :func:`model_images` picks grayscale or RGB frames as ``input.color``
says; :func:`prepare_image` normalises a plain 2D (or RGB) array as
``input.normalization`` says, pads it to a square (aspect ratio kept, padded with the minimum of
the normalised image) and resizes it to ``input.size``; :func:`restore_probabilities` undoes the
geometry of that for the network's output, so that masks land on the source pixel grid.
Training imports the same functions for its PNGs, so both see identical inputs.

3D models (``dims: 3``): :func:`prepare_volume` resamples a cross-sectional
:class:`~dicom_node.imaging.series.ImageSeries` to ``input.spacing_mm`` with SimpleITK (the
geometry comes from Image Position/Orientation (Patient) and Pixel Spacing);
:func:`restore_volume` resamples probabilities back onto the source grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dicom_node.errors import InputError
from dicom_node.imaging.series import ImageSeries
from dicom_node.models.package import ColorMode, ModelPackage, Normalization, NormalizationKind


def normalize(image: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Return ``image`` with intensities normalised as ``input.normalization`` says.

    * ``percentile``: clip to the ``lower`` and ``upper`` percentiles of the image and scale to
      [0, 1];
    * ``window``: clip to ``center -+ width / 2`` (in modality values, e.g. HU) and scale to
      [0, 1];
    * ``zscore``: subtract the mean, divide by the standard deviation.

    A constant image becomes all zeros. Returns ``float32`` of the same shape.
    """
    data = np.asarray(image, dtype=np.float32)
    kind = normalization.kind
    if kind is NormalizationKind.ZSCORE:
        std = float(data.std())
        return ((data - float(data.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
    if kind is NormalizationKind.PERCENTILE:
        lo, hi = (float(v) for v in np.percentile(data, [normalization.lower, normalization.upper]))
    else:
        lo = normalization.center - normalization.width / 2
        hi = normalization.center + normalization.width / 2
    if hi <= lo:
        return np.zeros_like(data)
    return ((np.clip(data, lo, hi) - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True)
class Placement:
    """How a 2D image was put on the network input grid, to undo it.

    The source image of ``source_shape`` (rows, cols) was padded by ``pad_top`` rows and
    ``pad_left`` columns (and as many as needed at the bottom and right) to a square of
    ``square_side`` pixels, which was resized to ``input_shape`` (rows, cols).
    """

    source_shape: tuple[int, int]
    square_side: int
    pad_top: int
    pad_left: int
    input_shape: tuple[int, int]

    @classmethod
    def for_shape(cls, source_shape: tuple[int, int], input_shape: tuple[int, ...]) -> Placement:
        """The placement of an image of ``source_shape`` on a network input of ``input_shape``."""
        rows, cols = int(source_shape[0]), int(source_shape[1])
        if rows < 1 or cols < 1:
            raise InputError(f"image of shape {source_shape} is empty")
        if len(input_shape) != 2:
            raise ValueError(f"input_shape must be (rows, cols), got {input_shape}")
        side = max(rows, cols)
        return cls(
            source_shape=(rows, cols),
            square_side=side,
            pad_top=(side - rows) // 2,
            pad_left=(side - cols) // 2,
            input_shape=(int(input_shape[0]), int(input_shape[1])),
        )


def _resize(channels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize ``(C, rows, cols)`` to ``(C, *shape)``: bilinear, antialiased when shrinking."""
    if channels.shape[1:] == shape:
        return channels.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None]
    shrinking = shape[0] < channels.shape[1] or shape[1] < channels.shape[2]
    out = F.interpolate(
        tensor, size=shape, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return out[0].numpy()


def to_input_grid(channels: np.ndarray, placement: Placement, pad_value: float = 0.0) -> np.ndarray:
    """Pad ``(C, rows, cols)`` to the square of ``placement`` and resize it to its input shape.

    Used for images (by :func:`prepare_image`) and, in training, for masks (``pad_value=0``;
    the result is a soft mask in [0, 1]).
    """
    if channels.ndim != 3 or channels.shape[1:] != placement.source_shape:
        raise ValueError(
            f"expected (channels, {placement.source_shape[0]}, {placement.source_shape[1]}), "
            f"got {channels.shape}"
        )
    rows, cols = placement.source_shape
    side = placement.square_side
    square = np.full((channels.shape[0], side, side), pad_value, dtype=np.float32)
    top, left = placement.pad_top, placement.pad_left
    square[:, top : top + rows, left : left + cols] = channels
    return _resize(square, placement.input_shape)


def model_images(series: ImageSeries, package: ModelPackage) -> np.ndarray:
    """The frames of ``series`` as a 2D model with ``package``'s ``input.color`` takes them.

    ``gray``: :attr:`ImageSeries.pixels` ``(frames, rows, cols)`` (modality values, or the
    luminance of colour images). ``rgb``: :attr:`ImageSeries.rgb` ``(frames, rows, cols, 3)``
    in 0..255; a grayscale series repeats its values in R, G and B.
    """
    if package.color is ColorMode.GRAY:
        return series.pixels
    if series.rgb is not None:
        return series.rgb
    return np.repeat(series.pixels[..., None], 3, axis=-1)


def prepare_image(image: np.ndarray, package: ModelPackage) -> tuple[np.ndarray, Placement]:
    """Prepare one 2D image (a frame, slice or PNG) as the input of a 2D model.

    Parameters
    ----------
    image
        ``(rows, cols)`` array of any numeric type in normal (MONOCHROME2) polarity; for DICOM
        the modality values of :attr:`ImageSeries.pixels`. For a package with ``input.color:
        rgb``, ``(rows, cols, 3)`` RGB (e.g. :attr:`ImageSeries.rgb` or an RGB PNG); a
        ``(rows, cols)`` image is then repeated in the three channels. The three channels are
        normalised together (one percentile range, window or mean), which keeps their ratios.
    package
        Its ``normalization``, ``input_size`` and ``color`` are used.

    Returns
    -------
    tuple[numpy.ndarray, Placement]
        The ``float32`` network input, of shape ``package.input_size`` (gray) or ``(3,
        *package.input_size)`` (rgb), and the placement to undo with
        :func:`restore_probabilities`.
    """
    rgb = package.color is ColorMode.RGB
    if rgb and image.ndim == 2:
        image = np.repeat(np.asarray(image)[..., None], 3, axis=-1)
    if (image.ndim, image.shape[-1] if rgb else 0) != ((3, 3) if rgb else (2, 0)):
        expected = "(rows, cols, 3) RGB" if rgb else "a 2D image (rows, cols)"
        raise ValueError(f"expected {expected}, got shape {image.shape}")
    if package.dims != 2 or len(package.input_size) != 2:
        raise ValueError(f"prepare_image is for 2D models; {package.name} has dims {package.dims}")
    normalized = normalize(image, package.normalization)
    channels = np.moveaxis(normalized, -1, 0) if rgb else normalized[None]
    placement = Placement.for_shape(channels.shape[1:], package.input_size)
    pad_value = float(normalized.min())
    prepared = to_input_grid(channels, placement, pad_value)
    return (prepared if rgb else prepared[0]), placement


def restore_probabilities(probs: np.ndarray, placement: Placement) -> np.ndarray:
    """Put network outputs ``(C, in_rows, in_cols)`` back onto the source image grid.

    Resizes (bilinear) to the padded square at full source resolution and crops the padding.

    Returns
    -------
    numpy.ndarray
        ``float32`` array ``(C, rows, cols)`` with ``(rows, cols) = placement.source_shape``.
    """
    if probs.ndim != 3 or probs.shape[1:] != placement.input_shape:
        raise ValueError(
            f"expected (channels, {placement.input_shape[0]}, {placement.input_shape[1]}), "
            f"got {probs.shape}"
        )
    side = placement.square_side
    square = _resize(probs, (side, side))
    rows, cols = placement.source_shape
    top, left = placement.pad_top, placement.pad_left
    return np.ascontiguousarray(square[:, top : top + rows, left : left + cols])


@dataclass(frozen=True)
class VolumePlacement:
    """Source and resampled grids of a 3D model input (SimpleITK order: x, y, z)."""

    source_size: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major, columns: row, column and normal directions
    resampled_size: tuple[int, int, int]
    resampled_spacing: tuple[float, float, float]

    @property
    def is_identity(self) -> bool:
        """True when no resampling is needed."""
        return (
            self.resampled_size == self.source_size
            and self.resampled_spacing == self.source_spacing
        )


def _on_grid(image: sitk.Image, placement: VolumePlacement, resampled: bool) -> sitk.Image:
    """Give ``image`` the geometry of the resampled or the source grid of ``placement``."""
    image.SetSpacing(placement.resampled_spacing if resampled else placement.source_spacing)
    image.SetOrigin(placement.origin)
    image.SetDirection(placement.direction)
    return image


def _samples(count: int, spacing: float, new_spacing: float) -> int:
    """Samples at ``new_spacing`` that reach the centre of the last of ``count`` source voxels."""
    return max(1, math.ceil((count - 1) * spacing / new_spacing - 1e-6) + 1)


def _volume_placement(series: ImageSeries, package: ModelPackage) -> VolumePlacement:
    if series.is_projection:
        raise InputError(
            f"model {package.name} is 3D and needs a cross-sectional series (CT, MR); "
            f"this {series.modality} series consists of projection images"
        )
    frames, rows, cols = series.shape
    if frames < 2:
        raise InputError(f"model {package.name} is 3D and needs at least 2 slices, got 1")
    if series.slice_spacing_mm is None:
        raise InputError(
            f"model {package.name} is 3D and needs uniformly spaced slices; the positions "
            "along the slice normal (ImagePositionPatient (0020,0032)) have uneven gaps"
        )
    if series.pixel_spacing_mm is None:
        raise InputError(
            f"model {package.name} is 3D and needs PixelSpacing (0028,0030), which is missing"
        )
    orientation, origin = series.orientation, series.origin_mm
    assert orientation is not None and origin is not None  # cross-sectional
    spacing = (series.pixel_spacing_mm[1], series.pixel_spacing_mm[0], series.slice_spacing_mm)
    return volume_placement(
        (cols, rows, frames),
        spacing,
        (float(origin[0]), float(origin[1]), float(origin[2])),
        tuple(float(v) for v in orientation.T.ravel()),
        package,
    )


def volume_placement(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: tuple[float, ...],
    package: ModelPackage,
) -> VolumePlacement:
    """The placement of a volume of ``size`` and ``spacing`` (x, y, z, SimpleITK order) with
    ``origin`` and ``direction`` (3x3 row-major, columns: row, column and normal directions)
    on the grid of ``package.spacing_mm`` (z, y, x); the same grid whether the volume came
    from DICOM (:func:`prepare_volume`) or from a NIfTI file in training."""
    if package.spacing_mm is None:
        new_spacing, new_size = spacing, size
    else:
        z, y, x = package.spacing_mm
        new_spacing = (x, y, z)
        new_size = (
            _samples(size[0], spacing[0], x),
            _samples(size[1], spacing[1], y),
            _samples(size[2], spacing[2], z),
        )
    return VolumePlacement(
        source_size=(int(size[0]), int(size[1]), int(size[2])),
        source_spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin=origin,
        direction=tuple(float(v) for v in direction),
        resampled_size=new_size,
        resampled_spacing=(float(new_spacing[0]), float(new_spacing[1]), float(new_spacing[2])),
    )


def _resample(
    image: sitk.Image, reference: sitk.Image, default: float, extrapolate: bool
) -> np.ndarray:
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(default)
    resampler.SetUseNearestNeighborExtrapolator(extrapolate)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def prepare_volume(
    series: ImageSeries, package: ModelPackage
) -> tuple[np.ndarray, VolumePlacement]:
    """Prepare a cross-sectional series as the input of a 3D model.

    Normalises the modality values, then resamples them (linear) to ``package.spacing_mm``
    (z, y, x) when set. The geometry is that of the series: ImagePositionPatient (0020,0032) of
    the first slice, ImageOrientationPatient (0020,0037), PixelSpacing (0028,0030) and the slice
    spacing along the normal.

    Returns
    -------
    tuple[numpy.ndarray, VolumePlacement]
        ``float32`` volume ``(z, y, x)`` and the placement to undo with :func:`restore_volume`.

    Raises
    ------
    InputError
        For projection images, single slices, uneven slice gaps or missing pixel spacing.
    """
    placement = _volume_placement(series, package)
    return prepare_volume_array(series.pixels, placement, package), placement


def prepare_volume_array(
    pixels: np.ndarray, placement: VolumePlacement, package: ModelPackage
) -> np.ndarray:
    """Normalise ``pixels`` ``(z, y, x)`` on the source grid of ``placement`` as
    ``input.normalization`` says and resample them (linear) onto its resampled grid: the one
    preparation of 3D inputs, for DICOM series and for training volumes."""
    normalized = normalize(pixels, package.normalization)
    if placement.is_identity:
        return normalized
    return resample_to_model(normalized, placement, float(normalized.min()))


def resample_to_model(data: np.ndarray, placement: VolumePlacement, default: float) -> np.ndarray:
    """Resample ``data`` ``(z, y, x)`` from the source grid of ``placement`` onto its
    resampled grid (linear; ``default`` outside the source)."""
    source = _on_grid(
        sitk.GetImageFromArray(np.ascontiguousarray(data, dtype=np.float32)),
        placement,
        resampled=False,
    )
    reference = _on_grid(
        sitk.Image(placement.resampled_size, sitk.sitkFloat32), placement, resampled=True
    )
    return _resample(source, reference, default, False)


def restore_volume(probs: np.ndarray, placement: VolumePlacement) -> np.ndarray:
    """Resample probabilities ``(C, z, y, x)`` on the resampled grid back onto the source grid.

    Linear interpolation; voxels beyond the last resampled sample take the nearest value.

    Returns
    -------
    numpy.ndarray
        ``float32`` array ``(C, frames, rows, cols)``.
    """
    expected = placement.resampled_size[::-1]
    if probs.ndim != 4 or probs.shape[1:] != expected:
        raise ValueError(f"expected (channels, {', '.join(map(str, expected))}), got {probs.shape}")
    if placement.is_identity:
        return probs.astype(np.float32, copy=False)
    reference = _on_grid(
        sitk.Image(placement.source_size, sitk.sitkFloat32), placement, resampled=False
    )
    out = np.empty((probs.shape[0], *placement.source_size[::-1]), dtype=np.float32)
    for c in range(probs.shape[0]):
        channel = sitk.GetImageFromArray(np.ascontiguousarray(probs[c], dtype=np.float32))
        out[c] = _resample(_on_grid(channel, placement, resampled=True), reference, 0.0, True)
    return out
