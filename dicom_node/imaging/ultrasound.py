"""Calibration of ultrasound images from the Sequence of Ultrasound Regions (0018,6011).

An ultrasound image has no Pixel Spacing: the scanner describes each rectangular region of
the screen (a B-mode image, a Doppler strip, an M-mode trace) in one item of the Sequence of
Ultrasound Regions (PS3.3 C.8.5.5), with its bounds (Region Location Min X0 / Min Y0 / Max X1 /
Max Y1, inclusive pixel columns and rows) and, for a spatial region, the physical size of one
pixel (Physical Delta X / Y (0018,602C) / (0018,602E)) in Physical Units X / Y Direction
(0018,6024) / (0018,6026); unit 3 is cm.

A calibration is used only inside the region it describes: a structure measured in mm must lie
entirely inside one region whose units are cm in both directions. A structure outside every
such region (e.g. over the on-screen annotations), or inside several such regions that do not
agree on the pixel size, has no physical measurement; :func:`calibration_for` says why in
words for the SR. Nothing here reads patient data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

#: Physical Units X/Y Direction (0018,6024)/(0018,6026) value for centimetres (PS3.3 C.8.5.5.1.15).
UNITS_CM = 3
#: Region Spatial Format (0018,6012) of a 2D (tissue or flow) region.
SPATIAL_FORMAT_2D = 1

_SEQUENCE = "Sequence of Ultrasound Regions (0018,6011)"
_MM_PER_CM = 10.0


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions.

    Attributes
    ----------
    index
        0-based position of the item in the sequence.
    min_col, min_row, max_col, max_row
        Region Location Min X0, Min Y0, Max X1, Max Y1: inclusive pixel bounds.
    units_x, units_y
        Physical Units X / Y Direction (3: cm), None when absent.
    delta_x, delta_y
        Physical Delta X / Y in those units, None when absent or not a positive number.
    spatial_format
        Region Spatial Format (1: 2D), None when absent.
    """

    index: int
    min_col: int
    min_row: int
    max_col: int
    max_row: int
    units_x: int | None
    units_y: int | None
    delta_x: float | None
    delta_y: float | None
    spatial_format: int | None

    @property
    def calibrated_in_cm(self) -> bool:
        """True when the region gives a pixel size in cm in both directions."""
        return (
            self.units_x == UNITS_CM
            and self.units_y == UNITS_CM
            and self.delta_x is not None
            and self.delta_y is not None
            and self.spatial_format in (None, SPATIAL_FORMAT_2D)
        )

    def contains(self, rows: tuple[int, int], cols: tuple[int, int]) -> bool:
        """True when the pixel rows ``rows[0]..rows[1]`` and columns ``cols[0]..cols[1]``
        (inclusive) lie inside the region."""
        return (
            self.min_row <= rows[0]
            and rows[1] <= self.max_row
            and self.min_col <= cols[0]
            and cols[1] <= self.max_col
        )


@dataclass(frozen=True)
class Calibration:
    """The pixel size of an ultrasound region, in mm.

    ``row_mm`` is the distance between adjacent rows (Physical Delta Y), ``col_mm`` between
    adjacent columns (Physical Delta X).
    """

    row_mm: float
    col_mm: float
    region: UltrasoundRegion

    @property
    def spacing_mm(self) -> tuple[float, float]:
        """``(row spacing, column spacing)`` in mm, as Pixel Spacing (0028,0030) orders them."""
        return self.row_mm, self.col_mm

    def describe(self) -> str:
        """The calibration in words (for the SR)."""
        r = self.region
        return (
            f"{_SEQUENCE} item {r.index + 1} (columns {r.min_col}-{r.max_col}, rows "
            f"{r.min_row}-{r.max_row}): Physical Delta X {self.col_mm / _MM_PER_CM:g} cm, "
            f"Physical Delta Y {self.row_mm / _MM_PER_CM:g} cm"
        )


def _int(item: pydicom.Dataset, keyword: str) -> int | None:
    value = item.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _positive(item: pydicom.Dataset, keyword: str) -> float | None:
    value = item.get(keyword)
    try:
        number = abs(float(value))
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def read_regions(ds: pydicom.Dataset) -> tuple[UltrasoundRegion, ...]:
    """The items of the Sequence of Ultrasound Regions of ``ds`` that have bounds.

    Items without all four Region Location attributes are skipped (they describe nothing).
    """
    regions = []
    for index, item in enumerate(ds.get("SequenceOfUltrasoundRegions", None) or []):
        bounds = [
            _int(item, k)
            for k in (
                "RegionLocationMinX0",
                "RegionLocationMinY0",
                "RegionLocationMaxX1",
                "RegionLocationMaxY1",
            )
        ]
        if any(b is None for b in bounds):
            continue
        min_col, min_row, max_col, max_row = (int(b) for b in bounds)  # type: ignore[arg-type]
        regions.append(
            UltrasoundRegion(
                index=index,
                min_col=min_col,
                min_row=min_row,
                max_col=max_col,
                max_row=max_row,
                units_x=_int(item, "PhysicalUnitsXDirection"),
                units_y=_int(item, "PhysicalUnitsYDirection"),
                delta_x=_positive(item, "PhysicalDeltaX"),
                delta_y=_positive(item, "PhysicalDeltaY"),
                spatial_format=_int(item, "RegionSpatialFormat"),
            )
        )
    return tuple(regions)


def calibration_for(ds: pydicom.Dataset, mask: np.ndarray) -> tuple[Calibration | None, str | None]:
    """The calibration that applies to all of ``mask`` on image ``ds``, or None and why not.

    Parameters
    ----------
    ds
        The ultrasound image (its Sequence of Ultrasound Regions is read).
    mask
        Boolean ``(rows, cols)`` mask on the image's grid; it must not be empty.

    Returns
    -------
    tuple[Calibration | None, str | None]
        The calibration of the one region calibrated in cm that contains every pixel of the
        mask (several such regions are fine when they agree on the pixel size), and None; or
        None and the reason, a sentence fragment for the SR.
    """
    if mask.ndim != 2 or not mask.any():
        raise ValueError("calibration_for needs a non-empty 2D mask")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    extent = (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))
    if "SequenceOfUltrasoundRegions" not in ds or not ds.SequenceOfUltrasoundRegions:
        return None, (
            f"the image has no {_SEQUENCE}, so its pixels have no physical size (an "
            "ultrasound image is calibrated only by its regions)"
        )
    calibrated = [r for r in read_regions(ds) if r.calibrated_in_cm]
    if not calibrated:
        return None, (
            f"no region of the {_SEQUENCE} gives Physical Delta X/Y with Physical Units "
            "X/Y Direction 3 (cm)"
        )
    holding = [r for r in calibrated if r.contains(*extent)]
    if not holding:
        return None, (
            f"the finding lies (at least partly) outside every region of the {_SEQUENCE} "
            "calibrated in cm, and a region's calibration holds only inside it"
        )
    sizes = {(r.delta_x, r.delta_y) for r in holding}
    if len(sizes) > 1:
        return None, (
            f"the finding lies inside {len(holding)} regions of the {_SEQUENCE} that give "
            "different pixel sizes"
        )
    region = holding[0]
    assert region.delta_x is not None and region.delta_y is not None
    return (
        Calibration(
            row_mm=region.delta_y * _MM_PER_CM, col_mm=region.delta_x * _MM_PER_CM, region=region
        ),
        None,
    )
