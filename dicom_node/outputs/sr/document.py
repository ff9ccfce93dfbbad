"""The TID 1500 Measurement Report as a whole: :func:`build_sr`, with its Procedure Reported
and observation context; see :mod:`dicom_node.outputs.sr` for what it holds and why."""

from __future__ import annotations

from collections.abc import Sequence

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
from dicom_node.outputs.measurements import Measurements
from dicom_node.outputs.seg import MANUFACTURER, default_series_number
from dicom_node.outputs.sr.concepts import (
    BREAST_ULTRASOUND,
    CHEST_IMAGING,
    IMAGING_PROCEDURE,
    PRIVATE_SCHEME,
    PROCEDURE_OF_MODALITY,
)
from dicom_node.outputs.sr.groups import (
    diameters_group,
    notes_container,
    nothing_found_group,
    ratio_group,
    structure_groups,
)
from dicom_node.package.manifest import ModelPackage

log = structlog.get_logger(__name__)

#: Series Number (0020,0011) of an SR series, when not given: this plus the source's number.
SR_SERIES_NUMBER_OFFSET = 2000


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
        concept: hd.sr.CodedConcept = hd.sr.CodedConcept.from_dataset(procedure[0])
        return concept
    regions = {str(item.get("CodeValue", "")) for item in ds.get("AnatomicRegionSequence", [])}
    if str(ds.get("BodyPartExamined", "")).upper() == "CHEST" or regions & {
        "51185008",  # SCT Thoracic structure
        "816094009",  # SCT Thorax / Chest
    }:
        return CHEST_IMAGING
    if series.modality == "US" and str(ds.get("BodyPartExamined", "")).upper() == "BREAST":
        return BREAST_ULTRASOUND
    return PROCEDURE_OF_MODALITY.get(series.modality, IMAGING_PROCEDURE)


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
