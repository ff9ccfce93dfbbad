"""The measurement groups of the SR: one structure's outline and measurement, its diameters,
the cardiothoracic ratio, the group of a result with nothing found, and the notes container.

Each group carries the structure's Tracking Identifier and Tracking Unique Identifier (TID
4108), its finding type, category and site, and its values with a Comment (DCM 121106) on how
they were derived; see :mod:`dicom_node.outputs.sr` for the templates and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import structlog
from pydicom.sr.codedict import codes

from dicom_node.common.uids import derive_uid
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.contours import horizontal_line
from dicom_node.outputs.measurements import (
    HEART_LABEL,
    LEFT_LUNG_LABEL,
    RIGHT_LUNG_LABEL,
    CardiothoracicRatio,
    Extent,
    StructureDiameters,
    StructureMeasurement,
)
from dicom_node.outputs.seg import keeps_empty_frames
from dicom_node.outputs.sr.concepts import (
    CARDIOTHORACIC_RATIO,
    QUALITATIVE_EVALUATIONS,
    SOURCE_OF_MEASUREMENT,
    UNIT_CM2,
    UNIT_ML,
    UNIT_MM,
    UNIT_RATIO,
    rounded,
)
from dicom_node.outputs.sr.references import (
    frames_of_segment,
    image_region,
    inferred_line,
    segment_reference,
    segmentation_frame_reference,
    structure_outlines,
)
from dicom_node.package.manifest import ModelPackage, Structure
from dicom_node.package.orientation import Reorientation, reorientations

log = structlog.get_logger(__name__)


def _comment(measurement: hd.sr.Measurement, text: str) -> None:
    """Add a Comment (DCM 121106) TEXT item under the measurement's NUM item."""
    item = hd.sr.TextContentItem(
        name=codes.DCM.Comment,
        value=text[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    num = measurement[0]
    if "ContentSequence" not in num:
        num.ContentSequence = hd.sr.ContentSequence()
    num.ContentSequence.append(item)


def structure_measurement(value: StructureMeasurement) -> hd.sr.Measurement:
    """TID 300 Measurement of an area (cm2) or volume (ml), with how it was derived."""
    area = value.unit == "cm2"
    unit = UNIT_CM2 if area else UNIT_ML
    measurement = hd.sr.Measurement(
        name=codes.SCT.Area if area else codes.SCT.Volume,
        value=rounded(value.value, unit),
        unit=unit,
    )
    _comment(measurement, value.describe())
    return measurement


def _finding_sites(structure: Structure) -> list[hd.sr.FindingSite] | None:
    if structure.anatomic_region is not None:  # a finding in a region, e.g. a breast lesion
        return [hd.sr.FindingSite(structure.anatomic_region)]
    if structure.type_modifier is None:
        return None
    return [hd.sr.FindingSite(structure.type, laterality=structure.type_modifier)]


def diameter_measurements(
    source: pydicom.Dataset, value: StructureDiameters
) -> list[hd.sr.Measurement]:
    """TID 300 Long Axis (SCT 103339001) and Perpendicular Axis (SCT 131189007) in mm (CID
    7470), each with how it was derived and its line, drawn on ``source``."""
    d = value.diameters
    out = []
    for name, length, points, what in (
        (codes.SCT.LongAxis, d.longest_mm, d.longest_points, "Longest diameter"),
        (
            codes.SCT.PerpendicularAxis,
            d.perpendicular_mm,
            d.perpendicular_points,
            "Longest diameter perpendicular to the longest diameter",
        ),
    ):
        measurement = hd.sr.Measurement(name=name, value=rounded(length, UNIT_MM), unit=UNIT_MM)
        (c0, r0), (c1, r1) = points
        _comment(
            measurement,
            f"{what} of the mask, from ({c0:.1f}, {r0:.1f}) to ({c1:.1f}, {r1:.1f}) (image "
            f"column, row; pixel corners), with {value.calibration}",
        )
        measurement[0].ContentSequence.append(inferred_line(source, points))
        out.append(measurement)
    return out


def structure_groups(
    series: ImageSeries,
    seg: pydicom.Dataset,
    structure: Structure,
    number: int,
    mask: np.ndarray,
    value: StructureMeasurement | None,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
]:
    """The groups of segment ``number``: its outline and its segment with the measurement.

    TID 1410 (single image) or TID 1411 (several slices), both with the segment's Tracking
    UID; none when ``mask`` (``(frames, rows, cols)``) is empty (see
    :mod:`dicom_node.outputs.sr`).
    """
    regions = structure_outlines(series, mask)
    if not regions:
        log.info("structure not found; no measurement group", segment=number)
        return []
    tracking = hd.sr.TrackingIdentifier(
        uid=seg.SegmentSequence[number - 1].TrackingUID, identifier=structure.name
    )
    values = None if value is None else [structure_measurement(value)]
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": structure.type,
        "finding_category": structure.category,
        "finding_sites": _finding_sites(structure),
        "algorithm_id": algorithm,
    }
    if keeps_empty_frames(series):  # one image: the SEG has exactly one frame per segment
        (frame,) = frames_of_segment(seg, number)
        return [
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=regions[0], **common
            ),
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=segmentation_frame_reference(seg, frame),
                measurements=values,
                **common,
            ),
        ]
    return [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_regions=regions, **common
        ),
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=segment_reference(series, seg, number),
            measurements=values,
            **common,
        ),
    ]


def diameters_group(
    series: ImageSeries,
    seg: pydicom.Dataset,
    structure: Structure,
    value: StructureDiameters,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of a structure's two diameters, each with its line (highdicom allows
    no coordinates under the measurements of a TID 1410 group), inferred from its segment."""
    index, _ = series.frame_sources[0]
    source = series.datasets[index]
    values = diameter_measurements(source, value)
    for measurement in values:
        measurement[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=SOURCE_OF_MEASUREMENT,
                referenced_sop_class_uid=seg.SOPClassUID,
                referenced_sop_instance_uid=seg.SOPInstanceUID,
                referenced_segment_numbers=[value.segment_number],
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
        )
    tracking_uid = seg.SegmentSequence[value.segment_number - 1].TrackingUID
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(tracking_uid, "diameters"),
            identifier=f"{structure.name} diameters"[:64],
        ),
        finding_type=structure.type,
        finding_sites=_finding_sites(structure),
        algorithm_id=algorithm,
        measurements=values,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
        ],
    )


def _width_line(
    series: ImageSeries, extent: Extent, plan: Reorientation | None
) -> hd.sr.ImageRegion:
    """The measured width of ``extent`` as a 2-point POLYLINE, INFERRED FROM, on the stored
    image: horizontal on the image as the model saw it, mapped back through ``plan`` when
    the image was reoriented (a mirrored film's line is mirrored with it)."""
    row = (extent.first_row + extent.last_row) / 2
    points = horizontal_line(extent.first_column, extent.last_column, row)
    if plan is not None:
        points = plan.points_to_source(points, series.shape[1:])
    line = image_region(series.datasets[0], points)
    line.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    return line


def ratio_group(
    series: ImageSeries,
    seg: pydicom.Dataset,
    package: ModelPackage,
    ratio: CardiothoracicRatio,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the cardiothoracic ratio, the two diameters and their derivation."""
    source = series.datasets[0]
    plans = reorientations(series, package)
    plan = plans[0] if plans and not plans[0].is_identity else None
    numbers = {s.label: i + 1 for i, s in enumerate(package.structures)}
    ratio_value = hd.sr.Measurement(
        name=CARDIOTHORACIC_RATIO,
        value=rounded(ratio.value, UNIT_RATIO),
        unit=UNIT_RATIO,
    )
    _comment(ratio_value, ratio.describe())
    ratio_value[0].ContentSequence.append(
        hd.sr.ImageContentItem(
            name=SOURCE_OF_MEASUREMENT,
            referenced_sop_class_uid=seg.SOPClassUID,
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            referenced_segment_numbers=[
                numbers[HEART_LABEL],
                numbers[RIGHT_LUNG_LABEL],
                numbers[LEFT_LUNG_LABEL],
            ],
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
        )
    )
    ratio_value[0].ContentSequence.extend(
        [_width_line(series, ratio.heart, plan), _width_line(series, ratio.thorax, plan)]
    )
    values = [ratio_value]
    if ratio.heart_width_mm is not None and ratio.thorax_width_mm is not None:
        for width, site, extent, what in (
            (ratio.heart_width_mm, codes.SCT.Heart, ratio.heart, "heart mask"),
            (ratio.thorax_width_mm, codes.SCT.Thorax, ratio.thorax, "right and left lung masks"),
        ):
            diameter = hd.sr.Measurement(
                name=codes.SCT.Diameter,
                value=rounded(width, UNIT_MM),
                unit=UNIT_MM,
                finding_sites=[hd.sr.FindingSite(site)],
            )
            _comment(
                diameter,
                f"Transverse extent of the {what}: {extent.describe()} x "
                f"{ratio.spacing_source} column spacing {ratio.column_spacing_mm:g} mm",
            )
            diameter[0].ContentSequence.append(_width_line(series, extent, plan))
            values.append(diameter)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(
                series.series_instance_uid,
                f"{package.name}@{package.version}",
                "cardiothoracic-ratio",
            ),
            identifier="Cardiothoracic ratio",
        ),
        algorithm_id=algorithm,
        measurements=values,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
        ],
    )


def nothing_found_group(
    series: ImageSeries, package: ModelPackage, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group for a result with no structure found: the region analysed (the border
    of the middle image, a closed SCOORD POLYLINE) with each structure's type evaluated as
    Absent (SCT 272519000).

    A viewer then has something to show, and OHIF 3 needs it: its SR viewport breaks on a
    report whose Imaging Measurements hold no group with geometry.
    """
    frame = series.shape[0] // 2
    index, frame_number = series.frame_sources[frame]
    rows, cols = series.shape[1:]
    border = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]], dtype=np.float32)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(
                series.series_instance_uid, f"{package.name}@{package.version}", "nothing-found"
            ),
            identifier=f"Nothing found by {package.name}"[:64],
        ),
        referenced_region=image_region(series.datasets[index], border, frame_number),
        finding_type=codes.DCM.ImageRegion,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(kind, codes.SCT.Absent)
            for kind in {
                (s.type.value, s.type.scheme_designator): s.type for s in package.structures
            }.values()
        ],
    )


def notes_container(notes: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 Qualitative Evaluations (UMLS C0034375) with one Comment (DCM 121106) TEXT
    item per note: what was assumed about the input, done to it, or not reported, and why."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=note[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for note in notes
        ]
    )
    return container
