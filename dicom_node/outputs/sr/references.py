"""What a measurement group of the SR points at: the SEG's segments and frames, and regions
(outlines, lines) drawn on the source images.

The SEG references are built here rather than with highdicom's ``from_segmentation``
constructors, whose output dciodvfy rejects or which fail on some SEGs (see each function).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom

from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.contours import outline
from dicom_node.outputs.seg import frame_group, frame_segment_number


def frames_of_segment(seg: pydicom.Dataset, segment_number: int) -> list[int]:
    """The frame numbers of ``seg`` (from 1) that belong to segment ``segment_number``."""
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


def segment_reference(
    series: ImageSeries, seg: pydicom.Dataset, number: int
) -> hd.sr.ReferencedSegment:
    """Referenced Segment (DCM 121191) with the source images of the segment's frames, or
    with the source series for an empty segment (whose frames were omitted).

    Built here rather than with ``ReferencedSegment.from_segmentation``, which in highdicom
    0.28 reads the Segment Identification Sequence (0062,000A) from each Per-Frame
    Functional Groups item only, and fails on a SEG of one segment, where highdicom puts it
    in the Shared Functional Groups (a volume of one structure). A multi-frame source is
    referenced once with all the frames of the segment."""
    frames = frames_of_segment(seg, number)
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


def image_region(
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
            regions.append(image_region(series.datasets[index], points, frame_number))
    return regions


def inferred_line(source: pydicom.Dataset, points: np.ndarray) -> hd.sr.ImageRegion:
    """A 2-point POLYLINE (image column, row) on ``source``, INFERRED FROM, under a length."""
    line = image_region(source, np.asarray(points, dtype=np.float32))
    line.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    return line
