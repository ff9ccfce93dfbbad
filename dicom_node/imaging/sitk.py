"""The few SimpleITK calls dicom-node makes, typed with numpy arrays.

SimpleITK's classes (``Image``, ``ResampleImageFilter``) are SWIG wrappers without type
annotations, so a typed caller may not call them (mypy ``--disallow-untyped-calls``). This
module is the one place that does: it handles SimpleITK's objects as ``Any`` and hands out
typed functions. Arrays are numpy order (``(z, y, x)``); sizes, spacings, origins and
directions are SimpleITK order (x, y, z), as in :class:`Grid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import SimpleITK

#: SimpleITK's module, its classes and constants as untyped (``Any``): only this module calls
#: them.
_sitk: Any = SimpleITK

#: A SimpleITK image: values on a grid in patient coordinates (opaque outside this module).
Image: TypeAlias = SimpleITK.Image


@dataclass(frozen=True)
class Grid:
    """A regular grid in patient coordinates, SimpleITK order.

    Attributes
    ----------
    size
        Voxels along x, y (and z).
    spacing_mm
        Distance of voxel centres along each axis.
    origin_mm
        Centre of the first voxel.
    direction
        Row-major D x D matrix whose columns are the directions of the axes.
    """

    size: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    origin_mm: tuple[float, ...]
    direction: tuple[float, ...]


def image_from_array(
    values: np.ndarray,
    *,
    spacing_mm: tuple[float, ...],
    origin_mm: tuple[float, ...],
    direction: tuple[float, ...],
) -> Image:
    """``values`` (``(z, y, x)``, made ``float32``) as an image with the given geometry."""
    image = SimpleITK.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    untyped: Any = image
    untyped.SetSpacing(spacing_mm)
    untyped.SetOrigin(origin_mm)
    untyped.SetDirection(direction)
    return image


def resample(image: Image, onto: Grid, *, default: float, extrapolate: bool = False) -> np.ndarray:
    """``image`` resampled (linear) onto the grid ``onto``, as a ``float32`` array
    (``(z, y, x)``).

    Points outside ``image`` take ``default``, or with ``extrapolate`` the nearest value.
    """
    resampler = _sitk.ResampleImageFilter()
    resampler.SetSize(onto.size)
    resampler.SetOutputSpacing(onto.spacing_mm)
    resampler.SetOutputOrigin(onto.origin_mm)
    resampler.SetOutputDirection(onto.direction)
    resampler.SetInterpolator(_sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(default))
    resampler.SetUseNearestNeighborExtrapolator(extrapolate)
    resampler.SetOutputPixelType(_sitk.sitkFloat32)
    return SimpleITK.GetArrayFromImage(resampler.Execute(image))


def read_image(path: Path | str) -> tuple[np.ndarray, Grid]:
    """The values (``(z, y, x)``, as stored) and the grid of the image file at ``path`` (NIfTI,
    NRRD, MetaImage: whatever SimpleITK reads)."""
    image = SimpleITK.ReadImage(str(path))
    untyped: Any = image
    grid = Grid(
        size=tuple(int(v) for v in untyped.GetSize()),
        spacing_mm=tuple(float(v) for v in untyped.GetSpacing()),
        origin_mm=tuple(float(v) for v in untyped.GetOrigin()),
        direction=tuple(float(v) for v in untyped.GetDirection()),
    )
    return SimpleITK.GetArrayFromImage(image), grid
