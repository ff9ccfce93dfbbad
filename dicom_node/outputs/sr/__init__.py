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

The package: :mod:`~dicom_node.outputs.sr.concepts` (codes, units and precision),
:mod:`~dicom_node.outputs.sr.references` (segment, segmentation frame and image region
references), :mod:`~dicom_node.outputs.sr.groups` (the measurement groups and the notes
container) and :mod:`~dicom_node.outputs.sr.document` (:func:`build_sr`).
"""

from dicom_node.outputs.sr.concepts import (
    CARDIOTHORACIC_RATIO,
    DECIMALS,
    PRIVATE_SCHEME,
    QUALITATIVE_EVALUATIONS,
    rounded,
)
from dicom_node.outputs.sr.document import SR_SERIES_NUMBER_OFFSET, build_sr

__all__ = [
    "CARDIOTHORACIC_RATIO",
    "DECIMALS",
    "PRIVATE_SCHEME",
    "QUALITATIVE_EVALUATIONS",
    "SR_SERIES_NUMBER_OFFSET",
    "build_sr",
    "rounded",
]
