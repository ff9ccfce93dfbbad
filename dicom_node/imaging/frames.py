"""Per-frame geometry and Modality LUT of single- and multi-frame instances.

A single-frame instance (and a classic multi-frame one, e.g. an ultrasound cine) says its
geometry at the top level: Image Position (Patient) (0020,0032), Image Orientation (Patient)
(0020,0037) and Pixel Spacing (0028,0030). Enhanced and Legacy Converted Enhanced CT/MR/PET
objects say it per frame in Functional Groups: each frame's item of the Per-frame Functional
Groups Sequence (5200,9230), else the Shared Functional Groups Sequence (5200,9229), holds

* Plane Position Sequence (0020,9113) > Image Position (Patient),
* Plane Orientation Sequence (0020,9116) > Image Orientation (Patient),
* Pixel Measures Sequence (0028,9110) > Pixel Spacing,
* Pixel Value Transformation Sequence (0028,9145) > Rescale Slope/Intercept.

:func:`frame_geometries` gives one :class:`FrameGeometry` per frame in the instance's own
frame order (frame number ``i + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from dicom_node.common.errors import InputError
from dicom_node.imaging.pixels import number_of_frames


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies; positions are None for frames without patient geometry.

    Attributes
    ----------
    position_mm
        Image Position (Patient) of the frame's first pixel centre, or None.
    orientation
        Image Orientation (Patient): row then column direction cosines (6 numbers), or None.
    pixel_spacing_mm
        Pixel Spacing ``(row spacing, column spacing)``, or None.
    """

    position_mm: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing_mm: tuple[float, float] | None


def _functional_item(ds: pydicom.Dataset, frame: int, keyword: str) -> pydicom.Dataset | None:
    """The item of ``keyword`` for frame ``frame`` (0-based): per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        value = per_frame[frame].get(keyword)
        if value:
            item: pydicom.Dataset = value[0]
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        value = shared[0].get(keyword)
        if value:
            shared_item: pydicom.Dataset = value[0]
            return shared_item
    return None


def has_functional_groups(ds: pydicom.Dataset) -> bool:
    """True for enhanced (and legacy converted enhanced) objects with Functional Groups."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _numbers(value: object, count: int, what: str) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise InputError(f"{what} holds {value!r}, not {count} numbers") from None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise InputError(f"{what} must hold {count} finite numbers, got {value!r}")
    return numbers


def _spacing(value: object) -> tuple[float, float] | None:
    try:
        numbers = _numbers(value, 2, "PixelSpacing (0028,0030)")
    except InputError:
        return None
    if numbers is None or min(numbers) <= 0:
        return None
    return numbers[0], numbers[1]


def frame_geometries(ds: pydicom.Dataset) -> list[FrameGeometry]:
    """Geometry of each frame of ``ds``, in its own frame order.

    Enhanced objects: from the Functional Groups (per-frame item, else shared). Others: the
    top-level attributes; a classic multi-frame instance has positions only when it has one
    frame (a single Image Position (Patient) cannot place several frames), otherwise its
    frames are treated as projection frames.

    Raises
    ------
    InputError
        When a position or orientation is present but not 3 or 6 finite numbers.
    """
    frames = number_of_frames(ds)
    if has_functional_groups(ds):
        out = []
        for f in range(frames):
            position = _functional_item(ds, f, "PlanePositionSequence")
            orientation = _functional_item(ds, f, "PlaneOrientationSequence")
            measures = _functional_item(ds, f, "PixelMeasuresSequence")
            where = f"frame {f + 1}: "
            out.append(
                FrameGeometry(
                    position_mm=_numbers(  # type: ignore[arg-type]
                        None if position is None else position.get("ImagePositionPatient"),
                        3,
                        where + "ImagePositionPatient (0020,0032)",
                    ),
                    orientation=_numbers(
                        None if orientation is None else orientation.get("ImageOrientationPatient"),
                        6,
                        where + "ImageOrientationPatient (0020,0037)",
                    ),
                    pixel_spacing_mm=(
                        None if measures is None else _spacing(measures.get("PixelSpacing"))
                    ),
                )
            )
        return out
    top_position = _numbers(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient (0020,0032)")
    top_orientation = _numbers(
        ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient (0020,0037)"
    )
    single = frames == 1
    geometry = FrameGeometry(
        position_mm=top_position if single else None,  # type: ignore[arg-type]
        orientation=top_orientation if single else None,
        pixel_spacing_mm=_spacing(ds.get("PixelSpacing")),
    )
    return [geometry] * frames


def frame_modality_luts(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """One dataset per frame holding the frame's Modality LUT Module attributes.

    Enhanced objects: Rescale Slope (0028,1053), Rescale Intercept (0028,1052) and Rescale
    Type (0028,1054) of the frame's Pixel Value Transformation Sequence (0028,9145) item
    (per-frame, else shared); frames without one use the top level. Others: ``ds`` itself
    (Rescale Slope/Intercept or Modality LUT Sequence (0028,3000)).
    """
    frames = number_of_frames(ds)
    if not has_functional_groups(ds):
        return [ds] * frames
    out: list[pydicom.Dataset] = []
    for f in range(frames):
        item = _functional_item(ds, f, "PixelValueTransformationSequence")
        if item is None or "RescaleSlope" not in item or "RescaleIntercept" not in item:
            out.append(ds)
            continue
        lut = pydicom.Dataset()
        lut.RescaleSlope = item.RescaleSlope
        lut.RescaleIntercept = item.RescaleIntercept
        out.append(lut)
    return out
