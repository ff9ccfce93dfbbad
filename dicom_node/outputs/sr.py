"""TID 1500 Measurement Report (Comprehensive 3D SR) of a model's segments, with highdicom.

:func:`build_sr` writes one measurement group per non-empty segment of the SEG that
:func:`dicom_node.outputs.seg.build_seg` made:

* planar images (a radiograph or a single slice): TID 1410 Planar ROI Measurements, each
  referencing its segment's frame (Referenced Segmentation Frame, DCM 121214) and holding the
  area (SCT 42798000 "Area", UCUM ``cm2``);
* series of several slices: TID 1411 Volumetric ROI Measurements, each referencing its segment
  (Referenced Segment, DCM 121191) and holding the volume (SCT 118565006 "Volume", UCUM
  ``ml``).

Every group that has a segment to refer to is accompanied by a group of the same template
and the same Tracking Unique Identifier that holds the structure's outline as an Image Region
(DCM 111030, SCOORD POLYLINE, closed, on the source image; see
:mod:`dicom_node.outputs.contours`): on a planar image the outline (TID 1410 allows a region or
a segmentation frame per group, not both), on a series one outline per slice that shows the
structure (TID 1411). The segment groups carry the measurements. Viewers that draw SR
measurements need geometry: OHIF 3.13 merges the groups of one Tracking UID and draws their
SCOORD, and fails on a measurement it cannot draw, so a structure the model did not find (an
empty segment, nothing to outline) gets no measurement group; the SEG still lists its segment.

Each group carries the structure's Tracking Identifier and Tracking Unique Identifier (TID
4108, the same UID as the segment's Tracking UID (0062,0021) in the SEG), its type as Finding
(and, with a type modifier such as Right or Left, a Finding Site with that laterality) and its
category as Finding Category. Each value has a Comment (DCM 121106) that says how it was
derived and which pixel spacing attribute was used: Pixel Spacing (0028,0030) or Imager Pixel
Spacing (0018,1164).

The cardiothoracic ratio is a TID 1501 Measurement Group of its own: the ratio (UCUM
``{ratio}``), the transverse diameters of heart and thorax in mm when the image has a spacing,
a Comment with the image columns and rows of both extents, a reference to the heart and
lung segments it was inferred from, and each measured width as a 2-point SCOORD POLYLINE
(INFERRED FROM, under the ratio and under its diameter) a viewer draws on the image.

A structure measured by its diameters (``measurements: [diameters]``, e.g. a breast lesion on
ultrasound) has a TID 1501 group of its own (highdicom allows no coordinates under the
measurements of a TID 1410 group) with its finding type and site, the longest diameter as Long
Axis (SCT 103339001) and the longest diameter perpendicular to it as Perpendicular Axis (SCT
131189007), both in mm (CID 7470), each with a Comment saying how it was measured and on which
calibration, its 2-point line (INFERRED FROM) a viewer draws and a reference to its segment
(Source of Measurement, INFERRED FROM). A structure with an anatomic region (e.g. Breast) has
it as Finding Site. Ultrasound images are calibrated only by their Sequence of Ultrasound
Regions; a structure without a calibration (none, or it lies outside the calibrated region)
gets no area or diameters, and a note in the Qualitative Evaluations container says why.

Values are written to the precision they have: areas to 0.1 cm2, volumes to 0.1 ml, lengths to
0.1 mm, ratios to 0.01 (:data:`DECIMALS`).

No standard code for the cardiothoracic ratio of a chest radiograph could be confirmed: LOINC
59074-5 and 59076-0 (DICOM CID 12279) are fetal ultrasound ratios of circumference and area,
and no SNOMED CT concept was found. The ratio is therefore coded in the private coding scheme
:data:`PRIVATE_SCHEME` ("99" prefix, PS3.16 8.2), declared in Coding Scheme Identification
Sequence (0008,0110).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import structlog
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import dicom_node
from dicom_node.common.uids import derive_uid
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.charset import UTF8, set_output_character_set
from dicom_node.outputs.contours import horizontal_line, outline
from dicom_node.outputs.measurements import (
    HEART_LABEL,
    LEFT_LUNG_LABEL,
    RIGHT_LUNG_LABEL,
    CardiothoracicRatio,
    Extent,
    Measurements,
    StructureDiameters,
    StructureMeasurement,
)
from dicom_node.outputs.seg import (
    MANUFACTURER,
    default_series_number,
    frame_group,
    frame_segment_number,
    keeps_empty_frames,
)
from dicom_node.package.manifest import ModelPackage, Structure
from dicom_node.package.orientation import Reorientation, reorientations

log = structlog.get_logger(__name__)

#: Series Number (0020,0011) of an SR series, when not given: this plus the source's number.
SR_SERIES_NUMBER_OFFSET = 2000

#: Private coding scheme of dicom-node's own concepts (PS3.16 8.2: designators starting "99").
PRIVATE_SCHEME = "99DCMNODE"
#: No standard code confirmed for the radiographic cardiothoracic ratio; see the module text.
CARDIOTHORACIC_RATIO = Code("CTR", PRIVATE_SCHEME, "Cardiothoracic ratio")

UNIT_CM2 = codes.UCUM.SquareCentimeter  # "cm2"
UNIT_ML = Code("ml", "UCUM", "milliliter")  # as dcmqi writes it
UNIT_MM = codes.UCUM.Millimeter
UNIT_RATIO = codes.UCUM.Ratio  # "{ratio}", CID 7181

_SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement  # DCM 121112
#: TID 1500 row 12: the report's Qualitative Evaluations container (not in pydicom's dictionary).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: Decimal places of each unit's values in the SR: what the measurement can mean.
DECIMALS = {UNIT_CM2.value: 1, UNIT_ML.value: 1, UNIT_MM.value: 1, UNIT_RATIO.value: 2}


def rounded(value: float, unit: Code) -> float:
    """``value`` rounded to the :data:`DECIMALS` of ``unit`` (Numeric Value (0040,A30A))."""
    return round(float(value), DECIMALS[unit.value])


def procedure_reported(series: ImageSeries) -> Code | hd.sr.CodedConcept:
    """Procedure Reported (TID 1500 row 4) for ``series``.

    The source's Procedure Code Sequence (0008,1032) when present; SCT 413815006 "Chest
    imaging" for a chest (Body Part Examined (0018,0015) CHEST or Anatomic Region Sequence
    (0008,2218) chest); SCT 47079000 "Ultrasonography of breast" for US with Body Part
    Examined BREAST; else the modality's "unspecified body region" LOINC code of CID 100,
    or SCT 363679005 "Imaging procedure".
    """
    ds = series.datasets[0]
    procedure = ds.get("ProcedureCodeSequence")
    if procedure:
        return hd.sr.CodedConcept.from_dataset(procedure[0])
    regions = {str(item.get("CodeValue", "")) for item in ds.get("AnatomicRegionSequence", [])}
    if str(ds.get("BodyPartExamined", "")).upper() == "CHEST" or regions & {
        "51185008",  # SCT Thoracic structure
        "816094009",  # SCT Thorax / Chest
    }:
        return codes.SCT.ChestImaging
    if series.modality == "US" and str(ds.get("BodyPartExamined", "")).upper() == "BREAST":
        return codes.SCT.UltrasonographyOfBreast
    by_modality = {
        "CT": codes.LN.CTUnspecifiedBodyRegion,
        "MR": codes.LN.MRIUnspecifiedBodyRegion,
        "PT": codes.LN.PETUnspecifiedBodyRegion,
        "NM": codes.LN.NMUnspecifiedBodyRegion,
        "CR": codes.LN.XRUnspecifiedBodyRegion,
        "DX": codes.LN.XRUnspecifiedBodyRegion,
    }
    return by_modality.get(series.modality, codes.SCT.ImagingProcedure)  # type: ignore[no-any-return]


def observation_context(package: ModelPackage) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer (TID 1004): dicom-node running the model."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid("device-observer", MANUFACTURER, package.name, package.version),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=f"{package.name} {package.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


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


def _line(source: pydicom.Dataset, points: np.ndarray) -> hd.sr.ImageRegion:
    """A 2-point POLYLINE (image column, row) on ``source``, INFERRED FROM, under a length."""
    line = _image_region(source, np.asarray(points, dtype=np.float32))
    line.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    return line


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
        measurement[0].ContentSequence.append(_line(source, points))
        out.append(measurement)
    return out


def _frames_of_segment(seg: pydicom.Dataset, segment_number: int) -> list[int]:
    return [
        n
        for n in range(1, len(seg.PerFrameFunctionalGroupsSequence) + 1)
        if frame_segment_number(seg, n) == segment_number
    ]


def segmentation_frame_reference(
    seg: pydicom.Dataset, frame_number: int
) -> hd.sr.ReferencedSegmentationFrame:
    """Referenced Segmentation Frame (DCM 121214) and its Source Image For Segmentation.

    Built here rather than with ``ReferencedSegmentationFrame.from_segmentation``, which in
    highdicom 0.28 writes both Referenced Frame Number (0008,1160) and Referenced Segment
    Number (0062,000B) in the SEG reference, and the SEG's frame number in the reference to a
    single-frame source image; dciodvfy reports both as errors (Image SOP Instance Reference
    Macro, PS3.3 Table 10-3). Here the SEG is referenced by frame only (the frame implies its
    segment) and the source by its own frame number, only when it is multi-frame.
    """
    segment = frame_segment_number(seg, frame_number)
    derivation = frame_group(seg, frame_number, "DerivationImageSequence")
    src = derivation[0].SourceImageSequence[0]
    source_frame = src.get("ReferencedFrameNumber")
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        frame_number=frame_number,
        segment_number=segment,
        source_image=hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=src.ReferencedSOPClassUID,
            referenced_sop_instance_uid=src.ReferencedSOPInstanceUID,
            referenced_frame_numbers=None if source_frame is None else [int(source_frame)],
        ),
    )
    del reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return reference


def _segment_reference(
    series: ImageSeries, seg: pydicom.Dataset, number: int
) -> hd.sr.ReferencedSegment:
    """Referenced Segment (DCM 121191) with the source images of the segment's frames, or
    with the source series for an empty segment (whose frames were omitted).

    Built here rather than with ``ReferencedSegment.from_segmentation``, which in highdicom
    0.28 reads the Segment Identification Sequence (0062,000A) from each Per-Frame
    Functional Groups item only, and fails on a SEG of one segment, where highdicom puts it
    in the Shared Functional Groups (a volume of one structure). A multi-frame source is
    referenced once with all the frames of the segment."""
    frames = _frames_of_segment(seg, number)
    if frames:
        found: dict[tuple[str, str], list[int]] = {}
        for n in frames:
            for src in frame_group(seg, n, "DerivationImageSequence")[0].SourceImageSequence:
                key = (str(src.ReferencedSOPClassUID), str(src.ReferencedSOPInstanceUID))
                numbers = found.setdefault(key, [])
                if "ReferencedFrameNumber" in src:
                    value = src.ReferencedFrameNumber
                    numbers.extend(
                        int(v) for v in ([value] if isinstance(value, int | str) else value)
                    )
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_images=[
                hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=cls,
                    referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=sorted(set(numbers)) or None,
                )
                for (cls, uid), numbers in found.items()
            ],
        )
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(series.series_instance_uid),
    )


def _image_region(
    source: pydicom.Dataset, points: np.ndarray, frame_number: int = 1
) -> hd.sr.ImageRegion:
    """Image Region (DCM 111030): SCOORD POLYLINE ``points`` SELECTED FROM ``source`` (and its
    frame ``frame_number`` when it is a multi-frame image: Referenced Frame Number (0008,1160))."""
    multi_frame = int(source.get("NumberOfFrames", 1) or 1) > 1
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            referenced_frame_numbers=[frame_number] if multi_frame else None,
        ),
    )


def structure_outlines(series: ImageSeries, mask: np.ndarray) -> list[hd.sr.ImageRegion]:
    """Closed outlines of one structure, one per image where its ``(frames, rows, cols)``
    ``mask`` is not empty, largest first (the one a viewer shows first)."""
    areas = mask.reshape(len(mask), -1).sum(axis=1)
    regions = []
    for frame in np.argsort(-areas, kind="stable"):
        points = outline(mask[frame]) if areas[frame] else None
        if points is not None:
            index, frame_number = series.frame_sources[frame]
            regions.append(_image_region(series.datasets[index], points, frame_number))
    return regions


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
    UID; none when ``mask`` (``(frames, rows, cols)``) is empty (see the module text).
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
        (frame,) = _frames_of_segment(seg, number)
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
            referenced_segment=_segment_reference(series, seg, number),
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
                name=_SOURCE_OF_MEASUREMENT,
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
    line = _image_region(series.datasets[0], points)
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
            name=_SOURCE_OF_MEASUREMENT,
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
        referenced_region=_image_region(series.datasets[index], border, frame_number),
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


def build_sr(
    series: ImageSeries,
    seg: pydicom.Dataset,
    masks: np.ndarray,
    package: ModelPackage,
    measurements: Measurements,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int | None = None,
    instance_number: int = 1,
    series_description: str | None = None,
    notes: Sequence[str] = (),
    secondary: Sequence[ImageSeries] = (),
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report on ``seg`` and its source ``series``.

    Parameters
    ----------
    series
        The source series (evidence and Procedure Reported).
    seg
        The SEG made by :func:`dicom_node.outputs.seg.build_seg` from ``masks`` and
        ``package``: its segments are referenced and its Tracking UIDs reused.
    masks
        Boolean ``(frames, rows, cols, S)`` masks the SEG was made from.
    package
        The model: structures (finding type, category, laterality), name and version
        (Algorithm Identification, TID 4019; device observer, TID 1004).
    measurements
        From :func:`dicom_node.outputs.measurements.measure`.
    series_uid, sop_uid
        Series Instance UID (0020,000E) and SOP Instance UID (0008,0018), from
        :func:`dicom_node.common.uids.output_uids`.
    series_number
        Series Number (0020,0011); default :data:`SR_SERIES_NUMBER_OFFSET` + the source's.
    instance_number
        Instance Number (0020,0013).
    series_description
        Series Description (0008,103E); default ``"<model name> measurements"``.
    notes
        Sentences for the reader (orientation, assumptions, measurements not reported and
        why): Comments in the report's Qualitative Evaluations container
        (:func:`notes_container`). A structure the model did not find gets no measurement
        group (there is nothing to draw, and a group without geometry breaks OHIF 3); a
        note after these says it was not found.
    secondary
        The other inputs of a multi-input model (resampled onto ``series`` for the model):
        their images join the evidence (Current Requested Procedure Evidence Sequence
        (0040,A375)), and with them every input image is listed in the report's Image Library
        (TID 1600), so the report names every series the result was inferred from. The SEG,
        and so the measurement groups' segment references, are on ``series`` only.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Complete, unverified, preliminary (Completion Flag COMPLETE, Verification Flag
        UNVERIFIED, Preliminary Flag PRELIMINARY): no person has reviewed it.

    Raises
    ------
    ValueError
        When ``masks`` or ``seg`` do not match ``package``.
    """
    n = len(package.structures)
    if masks.shape != (*series.shape, n) or len(seg.SegmentSequence) != n:
        raise ValueError(
            f"series {series.shape}, package {n} structures, masks {masks.shape} and SEG "
            f"{len(seg.SegmentSequence)} segments: they must agree"
        )
    algorithm = hd.sr.AlgorithmIdentification(name=package.name, version=package.version)
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        group
        for i, structure in enumerate(package.structures)
        for group in structure_groups(
            series,
            seg,
            structure,
            i + 1,
            masks[..., i],
            measurements.for_segment(i + 1),
            algorithm,
        )
    ]
    for value in measurements.diameters:
        groups.append(
            diameters_group(
                series, seg, package.structures[value.segment_number - 1], value, algorithm
            )
        )
    if measurements.cardiothoracic_ratio is not None:
        groups.append(
            ratio_group(series, seg, package, measurements.cardiothoracic_ratio, algorithm)
        )
    if not groups:
        groups.append(nothing_found_group(series, package, algorithm))
    others = [ds for other in secondary for ds in other.datasets]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(package),
        procedure_reported=procedure_reported(series),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=[*series.datasets, *others] if others else None,
    )
    not_found = [
        f"{structure.name}: not found by the model (segment {i + 1} of the SEG is empty)"
        for i, structure in enumerate(package.structures)
        if not masks[..., i].any()
    ]
    if notes or not_found:
        report[0].ContentSequence.append(notes_container([*notes, *not_found]))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*series.datasets, *others, seg],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=(
            default_series_number(series, SR_SERIES_NUMBER_OFFSET)
            if series_number is None
            else series_number
        ),
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=(series_description or f"{package.name} measurements")[:64],
        manufacturer_model_name=package.name[:64],
        software_versions=dicom_node.__version__,
        coding_schemes=(
            None
            if measurements.cardiothoracic_ratio is None
            else [
                CodingSchemeIdentificationItem(
                    designator=PRIVATE_SCHEME,
                    name="dicom-node private concepts",
                    responsible_organization=MANUFACTURER,
                )
            ]
        ),
        specific_character_set=UTF8,  # never the source's: highdicom refuses some (e.g. "")
    )
    set_output_character_set(sr)
    log.debug("measurement report built", groups=len(groups))
    return sr
