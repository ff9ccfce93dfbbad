"""Input preparation shared by training and inference, and the way back to the source grid.

What the network gets is a *channel stack*: per input role of the package (``inputs``, in
channel order), one channel (``input.color: gray``) or three (``rgb``), channels last
(``(..., C)``, ``C = package.in_channels``). :func:`normalize_inputs` normalises each role's
channels on their own (different MR sequences have different ranges), as
``input.normalization`` says; a role that is all NaN (a missing optional input, see
:func:`stack_inputs`) becomes zeros. A one-input gray package may be given a plain 2D image.

2D models (``dims: 2``): :func:`model_images` picks grayscale or RGB frames as ``input.color``
says; :func:`prepare_image` normalises a plain 2D (or RGB, or channel-stack) array, pads it to
a square (aspect ratio kept, each channel padded with its normalised minimum) and resizes it
to ``input.size``; :func:`restore_probabilities` undoes the geometry of that for the network's
output, so that masks land on the source pixel grid. Training imports the same functions for
its PNGs, so both see identical inputs.

3D models (``dims: 3``): :func:`prepare_volume` resamples the channel stack of a
cross-sectional :class:`~dicom_node.imaging.series.ImageSeries` to ``input.spacing_mm`` with
SimpleITK (the geometry comes from Image Position/Orientation (Patient) and Pixel Spacing);
:func:`restore_volume` resamples probabilities back onto the source grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.common.errors import InputError
from dicom_node.imaging import sitk
from dicom_node.imaging.series import ImageSeries
from dicom_node.package.manifest import ColorMode, ModelPackage, Normalization, NormalizationKind


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


def normalize_inputs(stack: np.ndarray, package: ModelPackage) -> np.ndarray:
    """Normalise a channel stack ``(..., C)`` role by role (see the module text).

    Each group of :attr:`ModelPackage.channels_per_input` channels is normalised together
    with :func:`normalize` (RGB keeps its ratios); a group that is all NaN (a missing optional
    input) becomes zeros. Returns ``float32`` of the same shape.

    Raises
    ------
    ValueError
        When the stack does not have ``package.in_channels`` channels.
    """
    if stack.shape[-1] != package.in_channels:
        raise ValueError(
            f"expected {package.in_channels} channels last ({len(package.inputs)} input(s) "
            f"{', '.join(package.roles)}), got shape {stack.shape}"
        )
    step = package.channels_per_input
    out = np.zeros(stack.shape, dtype=np.float32)
    for start in range(0, stack.shape[-1], step):
        group = np.asarray(stack[..., start : start + step], dtype=np.float32)
        if not np.isnan(group).all():
            out[..., start : start + step] = normalize(group, package.normalization)
    return out


def stack_inputs(images: Sequence[np.ndarray | None], package: ModelPackage) -> np.ndarray:
    """The channel stack ``(frames, rows, cols, C)`` of one image per role, in channel order.

    Each image is ``(frames, rows, cols)`` (gray) or ``(frames, rows, cols, 3)`` (rgb) on one
    grid, as :func:`model_images` gives; ``None`` marks a missing optional role, whose
    channels are NaN here and zeros after :func:`normalize_inputs`.
    """
    if len(images) != len(package.inputs):
        raise ValueError(f"expected {len(package.inputs)} images, got {len(images)}")
    present = [image for image in images if image is not None]
    if not present:
        raise ValueError("at least one input image is needed")
    shape = present[0].shape[:3]
    step = package.channels_per_input
    groups = []
    for image in images:
        if image is None:
            groups.append(np.full((*shape, step), np.nan, dtype=np.float32))
            continue
        group = image if image.ndim == 4 else image[..., None]
        if group.shape != (*shape, step):
            raise ValueError(f"input of shape {image.shape} does not fit {(*shape, step)}")
        groups.append(group.astype(np.float32, copy=False))
    return np.concatenate(groups, axis=-1)


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


def to_input_grid(
    channels: np.ndarray, placement: Placement, pad_value: float | np.ndarray = 0.0
) -> np.ndarray:
    """Pad ``(C, rows, cols)`` to the square of ``placement`` and resize it to its input shape.

    Used for images (by :func:`prepare_image`, ``pad_value`` one value per channel) and, in
    training, for masks (``pad_value=0``; the result is a soft mask in [0, 1]).
    """
    if channels.ndim != 3 or channels.shape[1:] != placement.source_shape:
        raise ValueError(
            f"expected (channels, {placement.source_shape[0]}, {placement.source_shape[1]}), "
            f"got {channels.shape}"
        )
    rows, cols = placement.source_shape
    side = placement.square_side
    square = np.empty((channels.shape[0], side, side), dtype=np.float32)
    square[:] = np.broadcast_to(np.asarray(pad_value, dtype=np.float32), (channels.shape[0],))[
        :, None, None
    ]
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
        rgb`` and one input, ``(rows, cols, 3)`` RGB (e.g. :attr:`ImageSeries.rgb` or an RGB
        PNG); a ``(rows, cols)`` image is then repeated in the three channels. The three
        channels are normalised together (one percentile range, window or mean), which keeps
        their ratios. For a package with several ``inputs``, the channel stack ``(rows, cols,
        C)`` of :func:`stack_inputs`, normalised role by role (:func:`normalize_inputs`).
    package
        Its ``normalization``, ``input_size``, ``color`` and ``inputs`` are used.

    Returns
    -------
    tuple[numpy.ndarray, Placement]
        The ``float32`` network input, of shape ``package.input_size`` (one gray input) or
        ``(C, *package.input_size)``, and the placement to undo with
        :func:`restore_probabilities`.
    """
    channels_in = package.in_channels
    if package.color is ColorMode.RGB and channels_in == 3 and image.ndim == 2:
        image = np.repeat(np.asarray(image)[..., None], 3, axis=-1)
    if image.ndim == 2 and channels_in == 1:
        image = np.asarray(image)[..., None]
    if image.ndim != 3 or image.shape[-1] != channels_in:
        expected = (
            "a 2D image (rows, cols)"
            if channels_in == 1
            else "(rows, cols, 3) RGB"
            if len(package.inputs) == 1
            else f"a channel stack (rows, cols, {channels_in}) of inputs {', '.join(package.roles)}"
        )
        raise ValueError(f"expected {expected}, got shape {image.shape}")
    if package.dims != 2 or len(package.input_size) != 2:
        raise ValueError(f"prepare_image is for 2D models; {package.name} has dims {package.dims}")
    channels = np.moveaxis(normalize_inputs(image, package), -1, 0)
    placement = Placement.for_shape(channels.shape[1:], package.input_size)
    pad_value = _group_minimum(channels, package)
    prepared = to_input_grid(channels, placement, pad_value)
    return (prepared[0] if channels_in == 1 else prepared), placement


def _group_minimum(channels: np.ndarray, package: ModelPackage) -> np.ndarray:
    """Per channel of ``(C, ...)``: the minimum of its role's channels (the padding value)."""
    step = package.channels_per_input
    minima = channels.reshape(len(channels) // step, -1).min(axis=1)
    return np.repeat(minima, step).astype(np.float32)


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

    @property
    def source_grid(self) -> sitk.Grid:
        """The grid of the source volume."""
        return sitk.Grid(self.source_size, self.source_spacing, self.origin, self.direction)

    @property
    def resampled_grid(self) -> sitk.Grid:
        """The grid of the model's input: ``package.spacing_mm``, the same origin and axes."""
        return sitk.Grid(self.resampled_size, self.resampled_spacing, self.origin, self.direction)


def _image(data: np.ndarray, grid: sitk.Grid) -> sitk.Image:
    """``data`` (``(z, y, x)``) as a SimpleITK image on ``grid``."""
    return sitk.image_from_array(
        data, spacing_mm=grid.spacing_mm, origin_mm=grid.origin_mm, direction=grid.direction
    )


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


def grid_placement(grid: sitk.Grid, package: ModelPackage) -> VolumePlacement:
    """:func:`volume_placement` of a 3D ``grid``, e.g. of a NIfTI volume read with
    :func:`dicom_node.imaging.sitk.read_image` in training.

    Raises
    ------
    ValueError
        When ``grid`` is not 3D.
    """
    if not len(grid.size) == len(grid.spacing_mm) == len(grid.origin_mm) == 3:
        raise ValueError(f"expected a 3D grid, got size {grid.size}")
    (x, y, z), (sx, sy, sz), (ox, oy, oz) = grid.size, grid.spacing_mm, grid.origin_mm
    return volume_placement((x, y, z), (sx, sy, sz), (ox, oy, oz), grid.direction, package)


def prepare_volume(
    series: ImageSeries, package: ModelPackage, stack: np.ndarray | None = None
) -> tuple[np.ndarray, VolumePlacement]:
    """Prepare a cross-sectional series as the input of a 3D model.

    Normalises the modality values (role by role, :func:`normalize_inputs`), then resamples
    them (linear) to ``package.spacing_mm`` (z, y, x) when set. The geometry is that of the
    series: ImagePositionPatient (0020,0032) of the first slice, ImageOrientationPatient
    (0020,0037), PixelSpacing (0028,0030) and the slice spacing along the normal.

    Parameters
    ----------
    series
        The reference input: its grid is the source grid.
    package
        Its ``normalization``, ``spacing_mm`` and ``inputs`` are used.
    stack
        The channel stack ``(frames, rows, cols, C)`` on the grid of ``series``
        (:func:`stack_inputs`); default the pixels of ``series`` (one gray input).

    Returns
    -------
    tuple[numpy.ndarray, VolumePlacement]
        ``float32`` volume ``(C, z, y, x)`` and the placement to undo with
        :func:`restore_volume`.

    Raises
    ------
    InputError
        For projection images, single slices, uneven slice gaps or missing pixel spacing.
    """
    placement = _volume_placement(series, package)
    if stack is None:
        stack = series.pixels[..., None]
    return prepare_volume_array(stack, placement, package), placement


def prepare_volume_array(
    pixels: np.ndarray, placement: VolumePlacement, package: ModelPackage
) -> np.ndarray:
    """Normalise ``pixels`` on the source grid of ``placement`` role by role
    (:func:`normalize_inputs`) and resample each channel (linear) onto its resampled grid: the
    one preparation of 3D inputs, for DICOM series and for training volumes.

    ``pixels`` is ``(z, y, x)`` (one gray input) or a channel stack ``(z, y, x, C)``; returns
    ``float32`` ``(C, z, y, x)``."""
    stack = pixels[..., None] if pixels.ndim == 3 else pixels
    normalized = np.moveaxis(normalize_inputs(stack, package), -1, 0)
    if placement.is_identity:
        return np.ascontiguousarray(normalized)
    return np.stack(
        [resample_to_model(channel, placement, float(channel.min())) for channel in normalized]
    )


def resample_to_model(data: np.ndarray, placement: VolumePlacement, default: float) -> np.ndarray:
    """Resample ``data`` ``(z, y, x)`` from the source grid of ``placement`` onto its
    resampled grid (linear; ``default`` outside the source)."""
    source = _image(data, placement.source_grid)
    return sitk.resample(source, placement.resampled_grid, default=default)


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
    out = np.empty((probs.shape[0], *placement.source_size[::-1]), dtype=np.float32)
    for c in range(probs.shape[0]):
        channel = _image(probs[c], placement.resampled_grid)
        out[c] = sitk.resample(channel, placement.source_grid, default=0.0, extrapolate=True)
    return out
