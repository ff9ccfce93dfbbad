"""Header values the worker and the writers rely on, checked and normalised in one place.

A received instance may carry values that are syntactically numbers but physically nonsense:
a Pixel Spacing (0028,0030) of 0, of -0.2, of NaN or of 1e300 mm. The readers already ignore
such a spacing, but the writers copy the source's attributes (highdicom copies Pixel Spacing
into the SEG's Pixel Measures), so a nonsense value would make an invalid output. Here such
spacings are removed from the source dataset when it is read, as if the sender had not sent
them: the image is processed without a physical size, which the outputs then say.
"""

from __future__ import annotations

import math

import pydicom
import structlog

log = structlog.get_logger(__name__)

#: The largest in-plane spacing taken as physical, in mm: 10 cm per pixel is already far
#: beyond any imaging modality (PET voxels are a few mm; a whole-body scout about 1 mm).
MAX_SPACING_MM = 100.0

#: In-plane spacing attributes: Pixel Spacing (0028,0030), Imager Pixel Spacing (0018,1164),
#: Nominal Scanned Pixel Spacing (0018,2010).
SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def spacing_pair(value: object) -> tuple[float, float] | None:
    """Two in-plane spacings in mm, or None when ``value`` is not two plausible ones.

    Parameters
    ----------
    value : object
        The value of a DS attribute of multiplicity 2 (row spacing, column spacing).

    Returns
    -------
    tuple of float or None
        ``(row_mm, column_mm)`` when both are finite and in ``(0, MAX_SPACING_MM]``.
    """
    try:
        numbers = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(numbers) != 2:
        return None
    if not all(math.isfinite(n) and 0 < n <= MAX_SPACING_MM for n in numbers):
        return None
    return numbers[0], numbers[1]


def drop_implausible_spacings(ds: pydicom.Dataset) -> list[str]:
    """Remove in-plane spacing attributes of ``ds`` that are not two plausible spacings.

    Returns the keywords removed (logged, without their values).
    """
    removed = []
    for keyword in SPACING_KEYWORDS:
        if keyword not in ds:
            continue
        try:
            value = ds[keyword].value
        except Exception:  # noqa: BLE001 - an undecodable value is as good as none
            value = None
        if spacing_pair(value) is None:
            del ds[keyword]
            removed.append(keyword)
    if removed:
        log.info("implausible spacing ignored", attributes=removed)
    return removed
