"""Patient Orientation (0020,0020) to the model's orientation and back, exact on the pixel grid.

Each of the 8 ways a radiograph can be stored (4 rotations, each possibly mirrored) is made
from a canonical ``L\\F`` image with numpy, tagged with the Patient Orientation that PS3.3
C.7.6.1.1.1 gives it, and must come back to the canonical image, and back again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.package.orientation import parse_orientation, plan, plan_orientation

CANONICAL = ("L", "F")  # PA chest as displayed: rows toward the patient's left, columns to feet

#: How the stored image is made from the canonical one, and its Patient Orientation.
STORED: list[tuple[str, Callable[[np.ndarray], np.ndarray], str]] = [
    ("as displayed", lambda a: a, "L\\F"),
    ("mirrored", lambda a: a[:, ::-1], "R\\F"),
    ("upside down", lambda a: a[::-1], "L\\H"),
    ("rotated 180", lambda a: np.rot90(a, 2), "R\\H"),
    ("rotated 90 counter-clockwise", lambda a: np.rot90(a, 1), "F\\R"),
    ("rotated 90 clockwise", lambda a: np.rot90(a, -1), "H\\L"),
    ("transposed", lambda a: np.swapaxes(a, 0, 1), "F\\L"),
    ("anti-transposed", lambda a: np.swapaxes(np.rot90(a, 2), 0, 1), "H\\R"),
]


def image(po: str | None) -> Dataset:
    ds = Dataset()
    if po is not None:
        ds.PatientOrientation = po.split("\\")
    return ds


@pytest.mark.parametrize(("name", "store", "po"), STORED, ids=[s[0] for s in STORED])
def test_every_stored_orientation_comes_back_exactly(
    name: str, store: Callable[[np.ndarray], np.ndarray], po: str
) -> None:
    canonical = np.arange(5 * 7 * 2).reshape(5, 7, 2)  # rows, cols, channels: not square
    stored = np.ascontiguousarray(store(canonical))
    reorientation = plan_orientation(image(po), CANONICAL)
    assert reorientation.source == tuple(po.split("\\"))
    assert reorientation.result == CANONICAL
    assert np.array_equal(reorientation.to_model(stored), canonical)
    assert np.array_equal(reorientation.to_source(canonical), stored)
    assert reorientation.is_identity == (po == "L\\F")


@pytest.mark.parametrize(("name", "store", "po"), STORED, ids=[s[0] for s in STORED])
def test_points_follow_the_pixels_back_to_the_stored_image(
    name: str, store: Callable[[np.ndarray], np.ndarray], po: str
) -> None:
    """SCOORD points drawn on the model's image (the CTR's width lines) land on the stored
    image where the pixels they were drawn on went: each pixel's centre, and its corners."""
    canonical = np.zeros((5, 7), dtype=bool)
    canonical[1, 5] = True  # one pixel near the top right of the model's image
    stored = np.ascontiguousarray(store(canonical))
    reorientation = plan_orientation(image(po), CANONICAL)
    centre = reorientation.points_to_source(np.array([[5.5, 1.5]]), stored.shape)
    (r,), (c,) = np.nonzero(stored)
    assert np.allclose(centre, [[c + 0.5, r + 0.5]])
    corners = reorientation.points_to_source(np.array([[5, 1], [6, 2]]), stored.shape)
    assert sorted(corners[:, 0]) == [c, c + 1] and sorted(corners[:, 1]) == [r, r + 1]


def test_description_says_what_was_done() -> None:
    text = plan_orientation(image("R\\F"), CANONICAL).describe()
    assert "flipped left-right" in text and "L\\F" in text and "R\\F" in text
    assert "mapped back" in text
    text = plan_orientation(image("F\\R"), CANONICAL).describe()
    assert "transposed" in text and "flipped left-right" in text
    assert "used as stored" in plan_orientation(image("L\\F"), CANONICAL).describe()


def test_refinement_letters_use_the_principal_direction() -> None:
    assert parse_orientation(["LP", "FR"]) == ("L", "F")
    assert parse_orientation("R\\F") == ("R", "F")


@pytest.mark.parametrize(
    "value", [None, [], ["L"], ["L", "R"], ["F", "H"], ["X", "F"], ["L", "F", "A"], ["", "F"]]
)
def test_uninterpretable_orientation_is_none(value: object) -> None:
    assert parse_orientation(value) is None


@pytest.mark.parametrize(("po", "why"), [(None, "absent"), ("L\\R", "could not be interpreted")])
def test_missing_or_bad_orientation_is_taken_as_stored_and_said(po: str | None, why: str) -> None:
    reorientation = plan_orientation(image(po), CANONICAL)
    assert reorientation.source is None and reorientation.is_identity
    text = reorientation.describe()
    assert why in text and "assumed" in text and "L\\F" in text


def test_quadruped_terms_are_not_compared() -> None:
    ds = image("L\\F")
    ds.AnatomicalOrientationType = "QUADRUPED"
    reorientation = plan_orientation(ds, CANONICAL)
    assert reorientation.is_identity and "QUADRUPED" in reorientation.describe()


def test_lateral_keeps_feet_down_and_says_the_other_axis_has_no_counterpart() -> None:
    assert plan(("A", "F"), CANONICAL).is_identity
    turned = plan(("F", "P"), CANONICAL)  # a lateral stored a quarter turn off
    assert turned.transpose and turned.result == ("P", "F")
    assert "no counterpart" in turned.describe()
