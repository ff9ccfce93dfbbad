"""DICOM Segmentation (SEG) of a model's masks, written with highdicom, and a reader for it.

:func:`build_seg` writes a BINARY Segmentation Storage instance with one segment per structure
of the model package (overlaps allowed), on the exact grid of the source images, referencing
every source instance. What highdicom 0.28 does not do is added here:

* Segmented Property Type Modifier Code Sequence (0062,0011), e.g. Right or Left, inside the
  item of Segmented Property Type Code Sequence (0062,000F) (Segment Description Macro,
  PS3.3 C.8.20.2);
* Patient Orientation (0020,0020) for sources without a Frame of Reference (projection
  radiographs): Type 2C in the General Image Module when there is no Image Orientation
  (Patient); copied from the source, as dciodvfy reports its absence as an error;
* Plane Orientation Sequence (0020,9116) in the Shared Functional Groups for sources without
  a Frame of Reference: highdicom leaves it out there, and the SEG loader of OHIF 3
  (cornerstone's adapters, ``checkOrientation``) reads Image Orientation (Patient)
  (0020,0037) from it unconditionally and never shows the SEG without it. The value is the
  image plane itself, rows along x and columns along y (``[1, 0, 0, 0, 1, 0]``), which is how
  those viewers place a radiograph; the Multi-frame Functional Groups Module allows the macro
  and dciodvfy accepts it;
* Slice Thickness (0018,0050) in the Pixel Measures Sequence (0028,9110) of a source that
  has none (a projection radiograph): highdicom writes Pixel Spacing alone there, which its
  own reader (``highdicom.seg.segread``) refuses ("Sequence does not have the required
  attributes for a Pixel Measures Sequence"); an empty value is an error to dciodvfy (Type
  1C), and leaving the whole sequence out breaks OHIF 3, whose SEG viewport reads it
  unconditionally. A projection has no physical slice thickness, so the SEG says a nominal
  :data:`NOMINAL_SLICE_THICKNESS_MM` (the unit depth ITK and cornerstone give a single 2D
  image); no measurement of dicom-node uses it. A source with a Slice Thickness keeps its own.
* deterministic Dimension Organization UIDs (0020,9164), so the same input gives the same
  object (highdicom draws random ones).

:func:`read_seg_masks` decodes a BINARY SEG back onto its source grid with pydicom alone,
following each frame's Derivation Image Sequence (0008,9124), for SEGs of other writers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import structlog
from pydicom.sr.codedict import codes
from pydicom.uid import UID

import dicom_node
from dicom_node.common.errors import InputError
from dicom_node.common.uids import derive_uid
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.charset import UTF8, set_output_character_set
from dicom_node.outputs.measurements import check_masks
from dicom_node.package.manifest import ModelPackage, Structure

log = structlog.get_logger(__name__)

MANUFACTURER = "dicom-node"
#: Series Number (0020,0011) of a SEG series, when not given: this plus the source's number.
SEG_SERIES_NUMBER_OFFSET = 1000
#: Slice Thickness (0018,0050) of the Pixel Measures of a SEG on a source that has none (a
#: projection): nominal, so that highdicom reads the SEG back (see the module text).
NOMINAL_SLICE_THICKNESS_MM = 1.0
#: Image Orientation (Patient) (0020,0037) written for a source without a Frame of Reference:
#: the image plane, as viewers place a radiograph (see the module text).
IMAGE_PLANE_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

_CS_INVALID = re.compile(r"[^A-Z0-9_ ]")
_CS_MAX_CHARS = 16


def code_string(text: str) -> str:
    """``text`` as a valid Code String (CS): upper case, ``A-Z 0-9 _ space``, <= 16 chars.

    Used for Content Label (0070,0080). Returns ``"SEGMENTATION"`` when nothing is left.
    """
    value = _CS_INVALID.sub("_", text.upper())[:_CS_MAX_CHARS].strip()
    return value or "SEGMENTATION"


def segment_tracking_uid(source_series_uid: str, package: ModelPackage, label: str) -> UID:
    """Tracking UID (0062,0021) of structure ``label``: the same for the same series and model.

    The SR's Tracking Unique Identifier (TID 4108) of the structure's measurement group takes
    this UID from the SEG, so both documents identify the finding alike.
    """
    return derive_uid(source_series_uid, f"{package.name}@{package.version}", "segment", label)


def default_series_number(series: ImageSeries, offset: int) -> int:
    """``offset`` + the source's Series Number (0020,0011) (0 when it has none), kept within
    the range of an Integer String (IS)."""
    value = series.datasets[0].get("SeriesNumber")
    number = 0 if value in (None, "") else int(value)
    return min(offset + max(number, 0), 2**31 - 1)


def algorithm_identification(package: ModelPackage) -> hd.AlgorithmIdentificationSequence:
    """Segment Algorithm Identification: family DCM 123110 "Artificial Intelligence" (CID
    7162), name and version of the model, its output activation and threshold."""
    return hd.AlgorithmIdentificationSequence(
        name=package.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=package.version,
        parameters={
            "activation": package.activation.value,
            "threshold": f"{package.threshold:g}",
        },
    )


def segment_description(
    number: int,
    structure: Structure,
    algorithm: hd.AlgorithmIdentificationSequence,
    tracking_uid: str,
) -> hd.seg.SegmentDescription:
    """Segment Sequence (0062,0002) item of one structure (Segment Description Macro).

    Segment Label, Segmented Property Category and Type (with Type Modifier when the
    structure has one), Anatomic Region Sequence when it has one, Segment Algorithm Type
    AUTOMATIC, Tracking ID/UID and Recommended
    Display CIELab Value (0062,000D) from the structure's RGB colour.
    """
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.name,
        segmented_property_category=structure.category,
        segmented_property_type=structure.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid,
        tracking_id=structure.label,
        display_color=hd.color.CIELabColor.from_rgb(*structure.color_rgb),
        anatomic_regions=(
            None if structure.anatomic_region is None else [structure.anatomic_region]
        ),
    )
    if structure.type_modifier is not None:
        # highdicom 0.28 has no parameter for it; PS3.3 C.8.20.2 nests it in the type's item.
        type_item = description.SegmentedPropertyTypeCodeSequence[0]
        type_item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(structure.type_modifier)
        ]
    return description


def keeps_empty_frames(series: ImageSeries) -> bool:
    """True when the SEG of ``series`` keeps empty frames: a single image (a radiograph or
    one slice), whose segments are measured and referenced by frame (TID 1410)."""
    return series.shape[0] == 1


def _add_plane_orientation(seg: hd.seg.Segmentation) -> None:
    """Plane Orientation Sequence (0020,9116) in the Shared Functional Groups Sequence
    (5200,9229) of a SEG whose source has no Frame of Reference (see the module text)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" in shared:
        return
    item = pydicom.Dataset()
    item.ImageOrientationPatient = list(IMAGE_PLANE_ORIENTATION)
    shared.PlaneOrientationSequence = [item]


def _fill_slice_thickness(seg: hd.seg.Segmentation) -> None:
    """Give every Pixel Measures Sequence (0028,9110) item of a SEG without Frame of Reference
    that lacks Slice Thickness (0018,0050) the nominal :data:`NOMINAL_SLICE_THICKNESS_MM`,
    so that ``highdicom.seg.segread`` reads it (see the module text)."""
    groups = [*seg.get("SharedFunctionalGroupsSequence", [])]
    groups += [*seg.get("PerFrameFunctionalGroupsSequence", [])]
    for group in groups:
        for item in group.get("PixelMeasuresSequence", []):
            if item.get("SliceThickness") in (None, ""):
                item.SliceThickness = pydicom.valuerep.DSfloat(
                    NOMINAL_SLICE_THICKNESS_MM, auto_format=True
                )


def _fix_dimension_organization(seg: hd.seg.Segmentation, sop_uid: str) -> None:
    uid = derive_uid(sop_uid, "dimension-organization")
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid


def check_seg_sources(series: ImageSeries) -> None:
    """Refuse, before any inference, a series no SEG can be written on.

    A multi-frame instance without Frame of Reference UID (0020,0052), e.g. an ultrasound
    cine: highdicom 0.28 writes a SEG on one frame only when the source has no Frame of
    Reference. (With a Frame of Reference one SEG covers all its frames.)

    Raises
    ------
    InputError
        Saying what was received and what is supported.
    """
    if series.shape[0] > 1 and series.frame_of_reference_uid is None and len(series.datasets) == 1:
        raise InputError(
            f"a multi-frame {series.modality or 'image'} instance of {series.shape[0]} "
            "frames without FrameOfReferenceUID (0020,0052) (e.g. an ultrasound cine) "
            "cannot get a SEG (highdicom 0.28 covers one frame without a Frame of "
            "Reference); send single-frame images or add a Frame of Reference"
        )


def masks_in_source_order(
    series: ImageSeries, masks: np.ndarray
) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """The source images and ``masks`` reordered as highdicom expects them.

    highdicom maps ``pixel_array`` frames to source frames in the sources' own order: each
    single-frame source image in turn, or the frames of one multi-frame source in frame
    number order. The series' frames may be in another order (a multi-frame object sorted
    along the slice normal); :attr:`ImageSeries.frame_sources` says where each came from.

    Raises
    ------
    InputError
        When the series holds several instances of which one is multi-frame: highdicom 0.28
        writes a SEG on one multi-frame source image, or on single-frame images only.
    """
    sources = list(series.datasets)
    keys = source_frame_keys(sources)
    if len(sources) > 1 and len(keys) != len(sources):
        raise InputError(
            f"the series holds {len(sources)} instances, some multi-frame; a SEG is written "
            "on one multi-frame instance or on single-frame instances, so send each "
            "multi-frame instance as its own series"
        )
    position = {key: i for i, key in enumerate(series.frame_keys)}
    order = [position[key] for key in keys]
    if order == list(range(len(order))):
        return sources, masks
    return sources, masks[order]


def build_seg(
    series: ImageSeries,
    masks: np.ndarray,
    package: ModelPackage,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int | None = None,
    instance_number: int = 1,
    content_label: str | None = None,
    series_description: str | None = None,
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of ``masks`` on the source series, one segment per structure.

    Parameters
    ----------
    series
        The source series; every instance is referenced (Referenced Series Sequence
        (0008,1115) and each frame's Derivation Image Sequence (0008,9124)).
    masks
        Boolean array ``(frames, rows, cols, S)`` on the source grid in the series' frame
        order (reordered into the sources' own frame order here), ``S`` =
        ``len(package.structures)``; segment ``i + 1`` is ``masks[..., i]``. Overlaps are
        allowed (BINARY, not LABELMAP).
    package
        Its structures describe the segments; name and version identify the algorithm.
    series_uid, sop_uid
        Series Instance UID (0020,000E) and SOP Instance UID (0008,0018), from
        :func:`dicom_node.common.uids.output_uids`.
    series_number
        Series Number (0020,0011); default :data:`SEG_SERIES_NUMBER_OFFSET` + the source's.
    instance_number
        Instance Number (0020,0013).
    content_label
        Content Label (0070,0080); default the model name as a Code String.
    series_description
        Series Description (0008,103E); default ``"<model name> segmentation"``.

    Returns
    -------
    highdicom.seg.Segmentation
        A projection image or a single slice keeps a frame per segment even when it is
        empty, so that every segment has a frame an SR can reference (TID 1410); series of
        several slices omit empty frames.

    Raises
    ------
    InputError
        When ``series`` holds several projection images: highdicom 0.28 writes a SEG on a
        single image (or one multi-frame instance) without Frame of Reference only; each
        image must be processed alone. Likewise for several instances of which one is
        multi-frame (see :func:`masks_in_source_order`).
    ValueError
        When ``masks`` is not boolean or does not match the series and package.
    """
    if series.is_projection and len(series.datasets) > 1:
        raise InputError(
            f"the series holds {len(series.datasets)} projection images; a SEG is written for "
            "one projection image at a time (or one multi-frame instance), so process each "
            "image of the series on its own"
        )
    check_seg_sources(series)
    check_masks(series, masks, package)
    sources, source_masks = masks_in_source_order(series, masks)
    algorithm = algorithm_identification(package)
    descriptions = [
        segment_description(
            i + 1,
            structure,
            algorithm,
            segment_tracking_uid(series.series_instance_uid, package, structure.label),
        )
        for i, structure in enumerate(package.structures)
    ]
    omit_empty = not keeps_empty_frames(series) and bool(masks.any())
    try:
        seg = _segmentation(
            sources,
            source_masks,
            descriptions,
            series,
            package,
            omit_empty,
            series_uid=series_uid,
            sop_uid=sop_uid,
            series_number=series_number,
            instance_number=instance_number,
            content_label=content_label,
            series_description=series_description,
        )
    except (AttributeError, KeyError) as exc:
        # highdicom reads source attributes without checking (e.g. Patient ID (0010,0020),
        # Shared Functional Groups of an RT Dose): say which one, and that it is final.
        sop_class = getattr(sources[0].get("SOPClassUID"), "name", "unknown SOP class")
        raise InputError(
            f"a SEG cannot be written on this {sop_class} source: it lacks an attribute the "
            f"SEG copies or needs ({exc}); send images with a complete Patient, Study and "
            "Image module"
        ) from exc
    set_output_character_set(seg)
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        # General Image Module, Type 2C without Image Orientation (Patient).
        seg.PatientOrientation = series.datasets[0].get("PatientOrientation", "")
    if "FrameOfReferenceUID" not in seg:
        _add_plane_orientation(seg)
        _fill_slice_thickness(seg)
    _fix_dimension_organization(seg, sop_uid)
    log.debug(
        "segmentation built",
        segments=len(descriptions),
        frames=int(seg.NumberOfFrames),
        omit_empty_frames=omit_empty,
    )
    return seg


def _segmentation(  # noqa: PLR0913 - the arguments of build_seg, passed on
    sources: list[pydicom.Dataset],
    masks: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    series: ImageSeries,
    package: ModelPackage,
    omit_empty: bool,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int | None,
    instance_number: int,
    content_label: str | None,
    series_description: str | None,
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=(
            default_series_number(series, SEG_SERIES_NUMBER_OFFSET)
            if series_number is None
            else series_number
        ),
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=package.name[:64],
        software_versions=dicom_node.__version__,
        device_serial_number="0",
        content_description=f"{package.name} {package.version}"[:64],
        content_label=code_string(content_label or package.name),
        series_description=(series_description or f"{package.name} segmentation")[:64],
        omit_empty_frames=omit_empty,
        specific_character_set=UTF8,  # never the source's: highdicom refuses some (e.g. "")
    )


def source_frame_keys(datasets: Sequence[pydicom.Dataset]) -> list[tuple[str, int]]:
    """``(SOP Instance UID, frame number)`` of every source frame, in frame order.

    Single-frame instances have frame number 1; a multi-frame instance contributes its
    Number of Frames (0028,0008) frames.
    """
    keys: list[tuple[str, int]] = []
    for ds in datasets:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        keys.extend((str(ds.SOPInstanceUID), f) for f in range(1, frames + 1))
    return keys


def frame_group(seg: pydicom.Dataset, frame_number: int, keyword: str) -> Any:
    """The functional group ``keyword`` of SEG frame ``frame_number`` (1-based): from the
    frame's Per-Frame Functional Groups item, else from the Shared Functional Groups, where
    highdicom puts a group every frame has alike (e.g. the Segment Identification Sequence
    (0062,000A) of a SEG with one frame)."""
    value = seg.PerFrameFunctionalGroupsSequence[frame_number - 1].get(keyword)
    if value:
        return value
    shared = seg.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()]
    value = shared[0].get(keyword)
    if not value:
        raise ValueError(f"SEG frame {frame_number} has no {keyword}")
    return value


def frame_segment_number(seg: pydicom.Dataset, frame_number: int) -> int:
    """Referenced Segment Number (0062,000B) of SEG frame ``frame_number`` (1-based)."""
    group = frame_group(seg, frame_number, "SegmentIdentificationSequence")
    return int(group[0].ReferencedSegmentNumber)


def read_seg_masks(seg: pydicom.Dataset, source_frames: Sequence[tuple[str, int]]) -> np.ndarray:
    """Decode a BINARY SEG onto its source grid, using pydicom only.

    Parameters
    ----------
    seg
        A Segmentation Storage dataset with Segmentation Type (0062,0001) BINARY whose frames
        each name one source frame in Derivation Image Sequence (0008,9124) > Source Image
        Sequence (0008,2112) (highdicom, dcmqi and this module write them).
    source_frames
        ``(SOP Instance UID, frame number)`` of each frame of the source grid, e.g. from
        :func:`source_frame_keys`; frame numbers are 1 for single-frame instances.

    Returns
    -------
    numpy.ndarray
        Boolean ``(len(source_frames), rows, cols, number of segments)``; segment ``n`` is
        ``[..., n - 1]``. Source frames without a SEG frame are empty.

    Raises
    ------
    ValueError
        When the SEG is not BINARY, or a frame names no source frame or one not in
        ``source_frames``.
    """
    if seg.get("SegmentationType") != "BINARY":
        raise ValueError(f"only BINARY segmentations are read, got {seg.get('SegmentationType')!r}")
    index = {key: i for i, key in enumerate(source_frames)}
    n_segments = len(seg.SegmentSequence)
    rows, cols = int(seg.Rows), int(seg.Columns)
    out = np.zeros((len(source_frames), rows, cols, n_segments), dtype=bool)
    n_frames = int(seg.get("NumberOfFrames", 1))
    pixels = np.asarray(seg.pixel_array).reshape(n_frames, rows, cols)
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = frame_segment_number(seg, f + 1)
        sources = [
            src
            for drv in item.get("DerivationImageSequence", [])
            for src in drv.SourceImageSequence
        ]
        if not sources:
            raise ValueError(f"frame {f + 1} names no source image (DerivationImageSequence)")
        for src in sources:
            ref_frames = src.get("ReferencedFrameNumber", 1)
            numbers = ref_frames if isinstance(ref_frames, Sequence) else [ref_frames]
            for number in numbers:
                key = (str(src.ReferencedSOPInstanceUID), int(number))
                if key not in index:
                    raise ValueError(
                        f"frame {f + 1} refers to a source frame that is not in source_frames"
                    )
                out[index[key], :, :, segment - 1] |= pixels[f] != 0
    return out
