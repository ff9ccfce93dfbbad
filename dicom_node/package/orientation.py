"""Bring a projection image to the orientation a 2D model was trained in, and back.

Patient Orientation (0020,0020) of a projection image (PS3.3 C.7.6.1.1.1) has two values: the
patient direction of the rows (from the first to the last pixel of a row, i.e. increasing
column index) and of the columns (increasing row index), each with its principal direction
first: ``A``/``P`` (anterior, posterior), ``R``/``L`` (the patient's right, left), ``H``/``F``
(head, feet). A PA chest radiograph displayed as usual, the patient's right on the viewer's
left, is ``L\\F``; the same image stored mirrored is ``R\\F``; rotated a quarter turn
clockwise it is ``F\\R``... and ``A\\F`` or ``P\\F`` is a lateral view.

A package declares its orientation as ``input.orientation`` (e.g. ``[L, F]``).
:func:`plan_orientation` compares an image's Patient Orientation with it and returns a
:class:`Reorientation`: a transpose (quarter turns swap the axes) followed by flips, exact on
the pixel grid, with its exact inverse for masks and probabilities. An axis whose patient
direction lies on another body axis than the model's (e.g. ``A`` of a lateral view against the
model's ``L``) is left as stored. A missing or uninterpretable Patient Orientation leaves the
image as stored and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pydicom

from dicom_node.imaging.series import ImageSeries


class OrientedModel(Protocol):
    """What :func:`reorientations` reads of a model package (:class:`~.manifest.ModelPackage`)."""

    @property
    def dims(self) -> int: ...

    @property
    def orientation(self) -> tuple[str, str] | None: ...


#: Each patient direction letter and its opposite (PS3.3 C.7.6.1.1.1, biped).
OPPOSITE = {"A": "P", "P": "A", "R": "L", "L": "R", "H": "F", "F": "H"}
#: The body axis of each direction letter.
BODY_AXIS = {"A": "AP", "P": "AP", "R": "RL", "L": "RL", "H": "HF", "F": "HF"}
#: Patient Orientation (0020,0020) in words, for the SR.
DIRECTION_NAMES = {
    "A": "anterior",
    "P": "posterior",
    "R": "the patient's right",
    "L": "the patient's left",
    "H": "head",
    "F": "feet",
}


def parse_orientation(value: object) -> tuple[str, str] | None:
    """The principal direction letters of a Patient Orientation (0020,0020) value.

    Parameters
    ----------
    value
        The attribute's value as pydicom returns it (two strings such as ``["L", "FH"]``), or a
        string ``"L\\F"``.

    Returns
    -------
    tuple[str, str] | None
        ``(row direction, column direction)``, each one of ``A P R L H F``; None when the value
        is not two values whose first letters are such directions on two different body axes.
    """
    if value is None:
        return None
    parts = value.split("\\") if isinstance(value, str) else [str(v) for v in value]  # type: ignore[attr-defined]
    if len(parts) != 2:
        return None
    letters = tuple(p.strip().upper()[:1] for p in parts)
    if not all(letter in OPPOSITE for letter in letters):
        return None
    row, col = letters
    if BODY_AXIS[row] == BODY_AXIS[col]:
        return None
    return row, col


def format_orientation(letters: Sequence[str]) -> str:
    """``("L", "F")`` as DICOM writes it: ``L\\F``."""
    return "\\".join(letters)


@dataclass(frozen=True)
class Reorientation:
    """How one stored image maps onto the model's orientation: transpose, then flips.

    Attributes
    ----------
    target
        The model's orientation ``(row direction, column direction)``, e.g. ``("L", "F")``.
    source
        The image's Patient Orientation (0020,0020) principal letters, None when absent or
        uninterpretable (the image is then taken as stored).
    transpose
        Swap rows and columns first (a quarter turn, or a transverse image).
    flip_rows
        Then reverse the order of the rows (upside down).
    flip_columns
        Then reverse the order of the columns (left-right).
    reason
        Why the image was taken as stored, when :attr:`source` is None.
    """

    target: tuple[str, str]
    source: tuple[str, str] | None
    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False
    reason: str = ""

    @property
    def is_identity(self) -> bool:
        """True when the stored pixels are used as they are."""
        return not (self.transpose or self.flip_rows or self.flip_columns)

    @property
    def result(self) -> tuple[str, str] | None:
        """Patient Orientation of the image after :meth:`to_model`, None when unknown."""
        if self.source is None:
            return None
        row, col = (self.source[1], self.source[0]) if self.transpose else self.source
        if self.flip_columns:
            row = OPPOSITE[row]
        if self.flip_rows:
            col = OPPOSITE[col]
        return row, col

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """An array ``(rows, cols, ...)`` on the stored grid, reoriented for the model."""
        out = np.swapaxes(array, 0, 1) if self.transpose else array
        if self.flip_rows:
            out = out[::-1]
        if self.flip_columns:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """The exact inverse of :meth:`to_model`: ``(rows, cols, ...)`` back on the stored grid."""
        out = array
        if self.flip_columns:
            out = out[:, ::-1]
        if self.flip_rows:
            out = out[::-1]
        if self.transpose:
            out = np.swapaxes(out, 0, 1)
        return np.ascontiguousarray(out)

    def points_to_source(self, points: np.ndarray, source_shape: tuple[int, int]) -> np.ndarray:
        """Image coordinates ``(N, 2)`` as ``(column, row)`` with (0, 0) the top-left corner of
        the top-left pixel (SCOORD, PS3.3 C.18.6.1.1) on the image as :meth:`to_model` gave it,
        mapped onto the stored image of ``source_shape`` (rows, cols)."""
        rows, cols = (source_shape[1], source_shape[0]) if self.transpose else source_shape
        x = np.asarray(points, dtype=np.float64)[:, 0]
        y = np.asarray(points, dtype=np.float64)[:, 1]
        if self.flip_columns:
            x = cols - x
        if self.flip_rows:
            y = rows - y
        if self.transpose:
            x, y = y, x
        return np.stack([x, y], axis=1).astype(np.float32)

    def describe(self) -> str:
        """What was done, in one sentence for the SR."""
        target = format_orientation(self.target)
        if self.source is None:
            return (
                f"{self.reason}; the image was assumed to be in the model's orientation "
                f"{target} and used as stored"
            )
        source = format_orientation(self.source)
        if self.is_identity and self.result == self.target:
            return (
                f"Patient Orientation (0020,0020) {source} is the model's orientation; "
                "image used as stored"
            )
        steps = []
        if self.transpose:
            steps.append("rows and columns swapped (transposed)")
        if self.flip_rows:
            steps.append("flipped top-bottom")
        if self.flip_columns:
            steps.append("flipped left-right")
        done = ", then ".join(steps) if steps else "used as stored"
        result = self.result
        assert result is not None
        unmatched = [
            f"{DIRECTION_NAMES[got]} instead of {DIRECTION_NAMES[want]}"
            for got, want in zip(result, self.target, strict=True)
            if got != want
        ]
        partial = (
            f"; one axis has no counterpart in the model's orientation ({', '.join(unmatched)})"
            if unmatched
            else ""
        )
        return (
            f"Image {done} to the model's orientation {target} from Patient Orientation "
            f"(0020,0020) {source} before inference{partial}; results mapped back to the "
            "stored image"
        )


def plan(
    source: tuple[str, str] | None, target: tuple[str, str], reason: str = ""
) -> Reorientation:
    """The :class:`Reorientation` from Patient Orientation ``source`` to ``target``.

    Parameters
    ----------
    source
        ``(row direction, column direction)`` letters of the stored image, or None.
    target
        The model's orientation, e.g. ``("L", "F")``.
    reason
        Why ``source`` is None (recorded in the result).
    """
    if source is None:
        return Reorientation(target=target, source=None, reason=reason or "No Patient Orientation")
    row, col = source
    transpose = BODY_AXIS[row] == BODY_AXIS[target[1]] or BODY_AXIS[col] == BODY_AXIS[target[0]]
    if transpose:
        row, col = col, row
    return Reorientation(
        target=target,
        source=source,
        transpose=transpose,
        flip_columns=row == OPPOSITE[target[0]],
        flip_rows=col == OPPOSITE[target[1]],
    )


def plan_orientation(ds: pydicom.Dataset, target: tuple[str, str]) -> Reorientation:
    """The :class:`Reorientation` of projection image ``ds`` to the model's ``target``.

    Reads Patient Orientation (0020,0020). Images of quadrupeds (Anatomical Orientation Type
    (0010,2210) ``QUADRUPED``) use other direction terms, and are taken as stored.
    """
    if str(ds.get("AnatomicalOrientationType", "")).upper() == "QUADRUPED":
        return plan(
            None,
            target,
            "Anatomical Orientation Type (0010,2210) is QUADRUPED, whose Patient Orientation "
            "terms the model's orientation cannot be compared with",
        )
    value = ds.get("PatientOrientation")
    if value is None or value == "" or (not isinstance(value, str) and len(value) == 0):
        return plan(None, target, "Patient Orientation (0020,0020) is absent")
    source = parse_orientation(value)
    if source is None:
        shown = value if isinstance(value, str) else "\\".join(str(v) for v in value)
        return plan(
            None, target, f"Patient Orientation (0020,0020) {shown!r} could not be interpreted"
        )
    return plan(source, target)


def frame_datasets(series: ImageSeries) -> tuple[pydicom.Dataset, ...]:
    """The source dataset of each frame of ``series`` (a multi-frame instance: repeated)."""
    return tuple(series.datasets[index] for index, _ in series.frame_sources)


def reorientations(series: ImageSeries, package: OrientedModel) -> tuple[Reorientation, ...]:
    """How each frame of ``series`` is brought to the package's ``input.orientation``.

    Empty for 3D models, cross-sectional series and packages that declare no orientation:
    their pixels are used as stored.
    """
    if package.dims != 2 or package.orientation is None or not series.is_projection:
        return ()
    target = package.orientation
    return tuple(plan_orientation(ds, target) for ds in frame_datasets(series))
