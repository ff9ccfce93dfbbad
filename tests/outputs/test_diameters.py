"""The longest and perpendicular diameters of masks with known answers, in physical units.

The spacings are anisotropic on purpose, so that a measurement that swapped rows and columns,
or ignored one of the spacings, gives another answer and fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.outputs.diameters import measure_diameters

ROW_MM, COL_MM = 0.3, 0.1


def ellipse(
    shape: tuple[int, int],
    centre: tuple[float, float],
    radii_mm: tuple[float, float],
    angle_deg: float = 0.0,
    spacing: tuple[float, float] = (ROW_MM, COL_MM),
) -> np.ndarray:
    """Pixels whose centres lie in the ellipse with semi-axes ``radii_mm`` (along x rotated by
    ``angle_deg``, and perpendicular), in mm on a grid of ``spacing``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    y = (rows + 0.5 - centre[0]) * spacing[0]
    x = (cols + 0.5 - centre[1]) * spacing[1]
    a = math.radians(angle_deg)
    u = x * math.cos(a) + y * math.sin(a)
    v = -x * math.sin(a) + y * math.cos(a)
    return (u / radii_mm[0]) ** 2 + (v / radii_mm[1]) ** 2 <= 1


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_ellipse_axes_in_mm_at_any_angle(angle: float) -> None:
    mask = ellipse((200, 600), (100, 300), (20.0, 8.0), angle)  # 40 x 16 mm
    d = measure_diameters(mask, (ROW_MM, COL_MM))
    assert d is not None
    # within about one pixel (0.3 mm) of the true axes
    assert d.longest_mm == pytest.approx(40.0, abs=0.45)
    assert d.perpendicular_mm == pytest.approx(16.0, abs=0.45)
    # the long axis lies along the ellipse's major axis
    (c0, r0), (c1, r1) = d.longest_points
    direction = math.degrees(math.atan2((r1 - r0) * ROW_MM, (c1 - c0) * COL_MM)) % 180
    assert min(abs(direction - angle % 180), 180 - abs(direction - angle % 180)) < 3
    # and the perpendicular one at right angles to it
    (p0, q0), (p1, q1) = d.perpendicular_points
    long_v = np.array([(c1 - c0) * COL_MM, (r1 - r0) * ROW_MM])
    perp_v = np.array([(p1 - p0) * COL_MM, (q1 - q0) * ROW_MM])
    assert abs(long_v @ perp_v) / (np.linalg.norm(long_v) * np.linalg.norm(perp_v)) < 1e-6


def test_rectangle_exact_diagonal_and_perpendicular_chord() -> None:
    mask = np.zeros((100, 300), dtype=bool)
    mask[20:60, 50:250] = True  # 40 rows x 200 columns
    a, b = 200 * COL_MM, 40 * ROW_MM  # 20 mm wide, 12 mm high
    d = measure_diameters(mask, (ROW_MM, COL_MM))
    assert d is not None
    diagonal = math.hypot(a, b)
    assert d.longest_mm == pytest.approx(diagonal, abs=1e-9)  # corner to corner, exactly
    # the longest chord at right angles to the diagonal: b * diagonal / a (for a > b)
    assert d.perpendicular_mm == pytest.approx(b * diagonal / a, abs=0.3)


def test_swapped_axes_or_a_missing_spacing_factor_give_other_answers() -> None:
    mask = ellipse((200, 600), (100, 300), (20.0, 8.0), 0.0)
    right = measure_diameters(mask, (ROW_MM, COL_MM))
    swapped = measure_diameters(mask, (COL_MM, ROW_MM))
    isotropic = measure_diameters(mask, (COL_MM, COL_MM))
    assert right is not None and swapped is not None and isotropic is not None
    assert right.longest_mm == pytest.approx(40.0, abs=0.45)
    for wrong in (swapped, isotropic):
        assert abs(wrong.longest_mm - 40.0) > 2 or abs(wrong.perpendicular_mm - 16.0) > 2


def test_empty_mask_has_no_diameters_and_bad_input_is_refused() -> None:
    assert measure_diameters(np.zeros((10, 10), bool), (1.0, 1.0)) is None
    with pytest.raises(ValueError, match="2D"):
        measure_diameters(np.zeros((2, 10, 10), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        measure_diameters(np.ones((10, 10), bool), (0.0, 1.0))


def test_single_pixel_is_one_pixel_wide() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 3] = True
    d = measure_diameters(mask, (ROW_MM, COL_MM))
    assert d is not None
    assert d.longest_mm == pytest.approx(math.hypot(ROW_MM, COL_MM))
