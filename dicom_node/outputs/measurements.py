"""Measurements on the masks of one series: area, volume and the cardiothoracic ratio.

What is measured follows the model package's ``measurements`` list
(:class:`~dicom_node.package.manifest.Measurement`):

* ``area``: per structure on a single image (a projection radiograph or a single slice), the
  pixel count times the row and column spacing, in cm2. The spacing is the one
  :class:`~dicom_node.imaging.series.ImageSeries` chose, and the result names its attribute:
  Pixel Spacing (0028,0030), i.e. in the patient (or calibrated), or Imager Pixel Spacing
  (0018,1164), i.e. at the detector, magnified by the source-to-detector geometry.
* ``volume``: per structure on a cross-sectional series of two or more slices, the voxel count
  times row spacing x column spacing x slice spacing, in ml.
* ``diameters``: per structure on a single image, the longest diameter and the longest
  diameter perpendicular to it, in mm (:mod:`dicom_node.outputs.diameters`).
* Ultrasound images (Modality US) have no Pixel Spacing: area and diameters use the
  calibration of the Sequence of Ultrasound Regions (0018,6011), only when the whole structure
  lies inside one region calibrated in cm (:func:`~dicom_node.imaging.ultrasound.calibration_for`);
  otherwise nothing physical is reported and :attr:`Measurements.omitted` says why.
* ``cardiothoracic_ratio``: on a single projection image (a PA chest radiograph), the widest
  transverse extent of the heart over the widest inner extent of the thorax, both along the
  image columns, from the masks labelled ``heart``, ``right_lung`` and ``left_lung``.

Nothing here reads patient data; the results carry counts, spacings and image indices only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pydicom
import structlog

from dicom_node.imaging.series import ImageSeries
from dicom_node.imaging.ultrasound import calibration_for
from dicom_node.outputs.diameters import Diameters, measure_diameters
from dicom_node.package.applicability import non_human_reason, view_position
from dicom_node.package.manifest import Measurement, ModelPackage
from dicom_node.package.orientation import format_orientation, reorientations

log = structlog.get_logger(__name__)

#: Labels of the structures the cardiothoracic ratio is taken from.
HEART_LABEL = "heart"
RIGHT_LUNG_LABEL = "right_lung"
LEFT_LUNG_LABEL = "left_lung"

#: DICOM attribute tags of the spacing keywords ImageSeries reports, for human-readable text.
SPACING_TAGS = {
    "PixelSpacing": "(0028,0030)",
    "ImagerPixelSpacing": "(0018,1164)",
    "NominalScannedPixelSpacing": "(0018,2010)",
    "SequenceOfUltrasoundRegions": "(0018,6011)",
}

#: ``spacing_source`` of measurements calibrated by an ultrasound region.
ULTRASOUND_SOURCE = "SequenceOfUltrasoundRegions"

_MM2_PER_CM2 = 100.0
_MM3_PER_ML = 1000.0


@dataclass(frozen=True)
class StructureMeasurement:
    """The area or volume of one structure (one segment of the SEG).

    Attributes
    ----------
    label
        The structure's label in the model package, e.g. ``"right_lung"``.
    segment_number
        Segment Number (0062,0004) of the structure in the SEG: its 1-based position in
        ``ModelPackage.structures``.
    kind
        :attr:`Measurement.AREA` (value in cm2) or :attr:`Measurement.VOLUME` (value in ml).
    value
        The area in cm2 or the volume in ml.
    pixel_count
        Number of mask pixels (area) or voxels (volume).
    spacing_mm
        Area: ``(row, column)`` spacing; volume: ``(slice, row, column)`` spacing, in mm.
    spacing_source
        Keyword of the attribute the in-plane spacing came from, e.g. ``"PixelSpacing"`` or
        ``"ImagerPixelSpacing"``.
    """

    label: str
    segment_number: int
    kind: Measurement
    value: float
    pixel_count: int
    spacing_mm: tuple[float, ...]
    spacing_source: str

    @property
    def unit(self) -> str:
        """UCUM code of :attr:`value`: ``"cm2"`` or ``"ml"``."""
        return "cm2" if self.kind is Measurement.AREA else "ml"

    def describe(self) -> str:
        """One sentence saying how the value was derived (for the SR)."""
        tag = SPACING_TAGS.get(self.spacing_source, "")
        attribute = f"{self.spacing_source} {tag}".strip()
        if self.kind is Measurement.AREA and self.spacing_source == ULTRASOUND_SOURCE:
            row, col = self.spacing_mm
            return (
                f"{self.pixel_count} pixels x {row:g} mm (rows, Physical Delta Y) x {col:g} mm "
                f"(columns, Physical Delta X) of the region of the {attribute} that holds it"
            )
        if self.kind is Measurement.AREA:
            row, col = self.spacing_mm
            plane = (
                " at the detector, not corrected for magnification"
                if self.spacing_source == "ImagerPixelSpacing"
                else ""
            )
            return (
                f"{self.pixel_count} pixels x {attribute} {row:g} mm (rows) x {col:g} mm "
                f"(columns){plane}"
            )
        dz, row, col = self.spacing_mm
        return (
            f"{self.pixel_count} voxels x {attribute} {row:g} mm (rows) x {col:g} mm "
            f"(columns) x {dz:g} mm slice spacing from ImagePositionPatient (0020,0032)"
        )


@dataclass(frozen=True)
class StructureDiameters:
    """The longest and perpendicular diameters of one structure (one segment of the SEG).

    ``calibration`` says where the spacing came from, in words (for the SR).
    """

    label: str
    segment_number: int
    diameters: Diameters
    calibration: str


@dataclass(frozen=True)
class Extent:
    """The widest extent of a mask along the image columns (the transverse direction).

    Columns and rows are 0-based image indices. The leftmost and rightmost columns need not
    lie on the same row: as in the radiological definition of the cardiothoracic ratio, the
    widths are taken between the outermost points on each side.
    """

    first_column: int
    first_row: int  # a row on which first_column is reached
    last_column: int
    last_row: int  # a row on which last_column is reached

    @property
    def width_px(self) -> int:
        """Number of columns from the first to the last, both included."""
        return self.last_column - self.first_column + 1

    def describe(self) -> str:
        """The extent in words, with 0-based image indices."""
        return (
            f"columns {self.first_column} (row {self.first_row}) to {self.last_column} "
            f"(row {self.last_row}), {self.width_px} px"
        )


@dataclass(frozen=True)
class CardiothoracicRatio:
    """Cardiothoracic ratio of one projection image and how it was derived.

    Attributes
    ----------
    value
        ``heart.width_px / thorax.width_px`` (both along the columns, so the spacing cancels).
    heart
        Widest transverse extent of the ``heart`` mask.
    thorax
        Inner extent of the thorax: from the leftmost column of either lung mask to the
        rightmost one.
    column_spacing_mm
        Column spacing of the image, or None when the image has no spacing.
    spacing_source
        Keyword of the attribute :attr:`column_spacing_mm` came from, or None.
    view_position
        View Position (0018,5101) of the image (``"PA"``, ``"AP"``, ...), empty when absent;
        an AP view magnifies the heart, so its ratio is higher than on a PA view.
    oriented_to
        When the image was reoriented for the model, the Patient Orientation (0020,0020) it
        was brought to (e.g. ``L\\F``): the extents' rows and columns are of that image.
    """

    value: float
    heart: Extent
    thorax: Extent
    column_spacing_mm: float | None
    spacing_source: str | None
    view_position: str
    oriented_to: str | None = None

    @property
    def heart_width_mm(self) -> float | None:
        """Transverse cardiac diameter in mm, None without spacing."""
        if self.column_spacing_mm is None:
            return None
        return self.heart.width_px * self.column_spacing_mm

    @property
    def thorax_width_mm(self) -> float | None:
        """Inner transverse thoracic diameter in mm, None without spacing."""
        if self.column_spacing_mm is None:
            return None
        return self.thorax.width_px * self.column_spacing_mm

    def describe(self) -> str:
        """How the ratio was derived, in words (for the SR)."""
        view = f" on a {self.view_position} view" if self.view_position else ""
        grid = (
            f" of the image as oriented to {self.oriented_to} for the model"
            if self.oriented_to
            else ""
        )
        return (
            f"Heart width {self.heart.width_px} px ({self.heart.describe()}) over inner "
            f"thorax width {self.thorax.width_px} px ({self.thorax.describe()}) from the "
            f"outermost columns of the right and left lung masks{view}; 0-based image "
            f"rows and columns{grid}"
        )


@dataclass(frozen=True)
class Measurements:
    """All measurements of one series: per-structure values and the optional ratio.

    ``omitted`` says, in words for the SR, why a measurement the package asks for was not
    reported (e.g. the cardiothoracic ratio of a lateral view).
    """

    structures: tuple[StructureMeasurement, ...]
    cardiothoracic_ratio: CardiothoracicRatio | None
    omitted: tuple[str, ...] = ()
    diameters: tuple[StructureDiameters, ...] = ()

    def for_segment(self, segment_number: int) -> StructureMeasurement | None:
        """The measurement of segment ``segment_number``, or None when it was not measured."""
        for m in self.structures:
            if m.segment_number == segment_number:
                return m
        return None

    def diameters_of(self, segment_number: int) -> StructureDiameters | None:
        """The diameters of segment ``segment_number``, or None when they were not measured."""
        for d in self.diameters:
            if d.segment_number == segment_number:
                return d
        return None


def column_extent(mask: np.ndarray) -> Extent | None:
    """Leftmost and rightmost column of a 2D ``mask`` and rows where they are reached.

    Returns None for an empty mask. Ties go to the topmost row.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (rows, cols), got shape {mask.shape}")
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size == 0:
        return None
    first, last = int(columns[0]), int(columns[-1])
    return Extent(
        first_column=first,
        first_row=int(np.argmax(mask[:, first])),
        last_column=last,
        last_row=int(np.argmax(mask[:, last])),
    )


def cardiothoracic_ratio(
    heart: np.ndarray,
    right_lung: np.ndarray,
    left_lung: np.ndarray,
    *,
    column_spacing_mm: float | None = None,
    spacing_source: str | None = None,
    view_position: str = "",
) -> CardiothoracicRatio | None:
    """Cardiothoracic ratio from 2D masks of the heart and both lungs.

    Parameters
    ----------
    heart, right_lung, left_lung
        Boolean masks of shape ``(rows, cols)`` on one projection image.
    column_spacing_mm, spacing_source, view_position
        Recorded in the result (the ratio itself needs no spacing).

    Returns
    -------
    CardiothoracicRatio | None
        None when the heart or both lungs are empty.
    """
    heart_extent = column_extent(heart)
    thorax_extent = column_extent(np.logical_or(right_lung, left_lung))
    if heart_extent is None or thorax_extent is None:
        return None
    return CardiothoracicRatio(
        value=heart_extent.width_px / thorax_extent.width_px,
        heart=heart_extent,
        thorax=thorax_extent,
        column_spacing_mm=column_spacing_mm,
        spacing_source=spacing_source,
        view_position=view_position,
    )


def is_planar(series: ImageSeries) -> bool:
    """True when ``series`` is one image (a radiograph or a single slice): measured by area."""
    return series.shape[0] == 1


def check_masks(series: ImageSeries, masks: np.ndarray, package: ModelPackage) -> None:
    """Raise ValueError unless ``masks`` is boolean ``(frames, rows, cols, structures)``."""
    expected = (*series.shape, len(package.structures))
    if masks.shape != expected:
        raise ValueError(
            f"masks must have shape (frames, rows, cols, structures) = {expected}, "
            f"got {masks.shape}"
        )
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be a boolean array, got dtype {masks.dtype}")


def _structure_measurements(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage
) -> tuple[StructureMeasurement, ...]:
    planar = is_planar(series)
    kind = Measurement.AREA if planar else Measurement.VOLUME
    if kind not in package.measurements:
        return ()
    if series.is_projection and not planar:
        log.warning("several projection images in one series; structures not measured")
        return ()
    if series.pixel_spacing_mm is None or series.spacing_source is None:
        log.warning("no pixel spacing; structures not measured", measurement=kind.value)
        return ()
    row, col = series.pixel_spacing_mm
    spacing: tuple[float, ...]
    if planar:
        spacing = (row, col)
        factor = row * col / _MM2_PER_CM2
    else:
        if series.slice_spacing_mm is None:
            log.warning("no uniform slice spacing; volumes not measured")
            return ()
        spacing = (series.slice_spacing_mm, row, col)
        factor = series.slice_spacing_mm * row * col / _MM3_PER_ML
    counts = masks.reshape(-1, masks.shape[-1]).sum(axis=0)
    return tuple(
        StructureMeasurement(
            label=structure.label,
            segment_number=index + 1,
            kind=kind,
            value=float(counts[index]) * factor,
            pixel_count=int(counts[index]),
            spacing_mm=spacing,
            spacing_source=series.spacing_source,
        )
        for index, structure in enumerate(package.structures)
    )


#: View Position (0018,5101) values of lateral views (PS3.3 C.8.11.5 defined terms and the
#: spelled-out term some modalities write).
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT"})

_NO_RATIO = "Cardiothoracic ratio not reported"


def ratio_not_applicable(ds: pydicom.Dataset) -> str | None:
    """Why the cardiothoracic ratio is not reported for image ``ds``, None when it is.

    The ratio is defined on a PA chest radiograph of a human (its reference value, 0.5, is for
    that view): a lateral view has no transverse diameters, and an AP view magnifies the
    heart (it lies further from the detector), so its ratio overstates the PA one; neither is
    reported. Nor is the ratio of an image without View Position (0018,5101), or of an
    animal (:func:`~dicom_node.package.applicability.non_human_reason`).
    """
    animal = non_human_reason(ds)
    if animal is not None:
        return f"{_NO_RATIO}: {animal}; the ratio and its reference values are for humans"
    view = view_position(ds)
    if view == "PA":
        return None
    if view == "AP":
        return (
            f"{_NO_RATIO}: View Position (0018,5101) is AP; the ratio is defined on a PA view, "
            "and an AP view magnifies the heart, so its ratio would overstate the PA one"
        )
    if view in LATERAL_VIEWS:
        return (
            f"{_NO_RATIO}: View Position (0018,5101) is {view}, a lateral view, which shows "
            "no transverse diameters of heart and thorax; the ratio is defined on a PA view"
        )
    if not view:
        return (
            f"{_NO_RATIO}: View Position (0018,5101) is absent; the ratio is defined on a PA "
            "view and reported only when the image says it is one"
        )
    return f"{_NO_RATIO}: View Position (0018,5101) is {view}; the ratio is defined on a PA view"


def _ratio(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage
) -> tuple[CardiothoracicRatio | None, str | None]:
    """The ratio, or None and why not (None: not asked for)."""
    if Measurement.CARDIOTHORACIC_RATIO not in package.measurements:
        return None, None
    index = {s.label: i for i, s in enumerate(package.structures)}
    needed = (HEART_LABEL, RIGHT_LUNG_LABEL, LEFT_LUNG_LABEL)
    if not all(label in index for label in needed):
        log.warning("cardiothoracic ratio needs structures heart, right_lung and left_lung")
        return None, f"{_NO_RATIO}: the model has no heart, right_lung and left_lung"
    if not (series.is_projection and series.shape[0] == 1):
        log.warning("cardiothoracic ratio is taken on a single projection image only")
        return None, f"{_NO_RATIO}: it is taken on a single projection image only"
    reason = ratio_not_applicable(series.datasets[0])
    if reason is not None:
        log.info("cardiothoracic ratio not applicable to this image")
        return None, reason
    frame = masks[0]
    spacing = series.pixel_spacing_mm
    oriented_to = None
    plans = reorientations(series, package)
    if plans and not plans[0].is_identity:
        # the transverse direction is along the columns of the image in the model's orientation
        frame = plans[0].to_model(frame)
        result = plans[0].result
        oriented_to = None if result is None else format_orientation(result)
        if spacing is not None and plans[0].transpose:
            spacing = (spacing[1], spacing[0])
    heart, right, left = (frame[..., index[label]] for label in needed)
    if not (heart.any() and right.any() and left.any()):
        log.info("cardiothoracic ratio not measured: heart or a lung mask is empty")
        return None, f"{_NO_RATIO}: the heart or a lung mask is empty"
    column_spacing = None if spacing is None else spacing[1]
    ratio = cardiothoracic_ratio(
        heart,
        right,
        left,
        column_spacing_mm=column_spacing,
        spacing_source=series.spacing_source if column_spacing is not None else None,
        view_position=view_position(series.datasets[0]),
    )
    if ratio is not None and oriented_to is not None:
        ratio = replace(ratio, oriented_to=oriented_to)
    return ratio, None


def is_ultrasound(series: ImageSeries) -> bool:
    """True for ultrasound images (Modality US): calibrated by their regions only."""
    return series.modality == "US"


def _ultrasound_measurements(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage
) -> Measurements:
    """Area and diameters of each found structure of a single ultrasound image, calibrated by
    the region of the Sequence of Ultrasound Regions that holds it (module docstring)."""
    wanted = [m for m in (Measurement.AREA, Measurement.DIAMETERS) if m in package.measurements]
    if not wanted:
        return Measurements((), None)
    names = " and ".join("area" if m is Measurement.AREA else "diameters" for m in wanted)
    if series.shape[0] != 1:
        log.warning("ultrasound with several frames; structures not measured")
        return Measurements(
            (), None, (f"No {names} reported: they are measured on single ultrasound images",)
        )
    ds = series.datasets[0]
    areas: list[StructureMeasurement] = []
    diameters: list[StructureDiameters] = []
    omitted: list[str] = []
    for index, structure in enumerate(package.structures):
        mask = masks[0, ..., index]
        if not mask.any():
            continue  # the SR says it was not found
        calibration, reason = calibration_for(ds, mask)
        if calibration is None:
            log.info("ultrasound structure not measured: no calibration for it")
            omitted.append(f"{structure.name}: {names} not reported: {reason}")
            continue
        row, col = calibration.spacing_mm
        if Measurement.AREA in wanted:
            count = int(mask.sum())
            areas.append(
                StructureMeasurement(
                    label=structure.label,
                    segment_number=index + 1,
                    kind=Measurement.AREA,
                    value=count * row * col / _MM2_PER_CM2,
                    pixel_count=count,
                    spacing_mm=(row, col),
                    spacing_source=ULTRASOUND_SOURCE,
                )
            )
        found = measure_diameters(mask, calibration.spacing_mm)
        if Measurement.DIAMETERS in wanted and found is not None:
            diameters.append(
                StructureDiameters(structure.label, index + 1, found, calibration.describe())
            )
    return Measurements(tuple(areas), None, tuple(omitted), tuple(diameters))


def _planar_diameters(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage
) -> tuple[StructureDiameters, ...]:
    """Diameters of the found structures of a single non-ultrasound image with a spacing."""
    if Measurement.DIAMETERS not in package.measurements or not is_planar(series):
        return ()
    if series.pixel_spacing_mm is None or series.spacing_source is None:
        return ()
    tag = SPACING_TAGS.get(series.spacing_source, "")
    out = []
    for index, structure in enumerate(package.structures):
        found = measure_diameters(masks[0, ..., index], series.pixel_spacing_mm)
        if found is not None:
            row, col = series.pixel_spacing_mm
            text = f"{series.spacing_source} {tag} {row:g} mm (rows) x {col:g} mm (columns)"
            out.append(StructureDiameters(structure.label, index + 1, found, text))
    return tuple(out)


def measure(series: ImageSeries, masks: np.ndarray, package: ModelPackage) -> Measurements:
    """Measure the structures of ``package`` in ``masks`` as the package asks.

    Parameters
    ----------
    series
        The source series; its spacing (and the attribute it came from) scales the counts.
    masks
        Boolean array ``(frames, rows, cols, S)`` on the source grid, ``S`` =
        ``len(package.structures)``, overlaps allowed.
    package
        Its ``measurements`` select area (planar images), volume (cross-sectional series of
        two or more slices), diameters (planar images) and the cardiothoracic ratio.
        Ultrasound images are measured by their regions' calibration only.

    Returns
    -------
    Measurements
        Per-structure areas or volumes (empty when not asked for or without spacing) and the
        cardiothoracic ratio (None when not asked for, not applicable or not measurable,
        and then :attr:`Measurements.omitted` says why). The ratio is taken along the columns
        of the image in the package's ``input.orientation`` (see :func:`ratio_not_applicable`
        for the views it is reported on).

    Raises
    ------
    ValueError
        When ``masks`` is not boolean or its shape does not match the series and package.
    """
    check_masks(series, masks, package)
    if is_ultrasound(series):
        return _ultrasound_measurements(series, masks, package)
    ratio, why_not = _ratio(series, masks, package)
    return Measurements(
        structures=_structure_measurements(series, masks, package),
        cardiothoracic_ratio=ratio,
        omitted=() if why_not is None else (why_not,),
        diameters=_planar_diameters(series, masks, package),
    )
