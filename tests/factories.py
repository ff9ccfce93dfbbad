"""Builders of realistic DICOM test data: DX radiographs from the JSRT PNGs, synthetic CT series,
ultrasound images from the BUSI PNGs (colour JPEG baseline with a Sequence of Ultrasound
Regions, as scanners send them).

Used by the tests and benchmarks only; nothing here is imported by ``dicom_node``.
"""

from __future__ import annotations

import datetime as dt
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from dicom_node.audit.events import AuditAction, AuditEvent, AuditOutcome, Participants
from dicom_node.audit.log import AuditLog

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DICOM_NODE_SHARED_DATA", REPO.parent / "shared" / "data"))
JSRT = SHARED_DATA / "jsrt"
JSRT_SPACING_MM = 0.35  # README of shared/data/jsrt: 1024 px over the 2048 px at 0.175 mm
JSRT_STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
BUSI = SHARED_DATA / "busi"

# Patient data that must never appear in operational logs (see tests of logging).
PATIENT_NAME = "Doe^Jane^Secret"
PATIENT_ID = "PID-7731-SECRET"
PATIENT_BIRTH_DATE = "19470312"
ACCESSION_NUMBER = "ACC-99871-SECRET"


def _patient_study(ds: Dataset, study_uid: str) -> None:
    now = dt.datetime(2026, 11, 20, 9, 30, 0)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = ACCESSION_NUMBER
    ds.StudyInstanceUID = study_uid
    ds.StudyID = "1"
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "dicom-node tests"


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def jsrt_cases() -> list[str]:
    """Case ids of the JSRT images present under ``SHARED_DATA``."""
    return sorted(p.stem for p in (JSRT / "images").glob("*.png"))


def dx_from_array(
    pixels: np.ndarray,
    *,
    spacing_mm: float = JSRT_SPACING_MM,
    study_uid: str | None = None,
    series_uid: str | None = None,
    monochrome1: bool = False,
    bits_stored: int = 12,
) -> Dataset:
    """A DX For Presentation image of ``pixels`` (2D, normal polarity, any range)."""
    arr = pixels.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / max(hi - lo, 1e-9) * (2**bits_stored - 1)
    if monochrome1:
        scaled = (2**bits_stored - 1) - scaled
    data = np.round(scaled).astype(np.uint16)
    ds = Dataset()
    _patient_study(ds, study_uid or generate_uid())
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # columns toward patient left, rows toward feet (PA)
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.BurnedInAnnotation = "NO"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDeviceProcessingDescription = ""
    ds.DetectorType = "DIRECT"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if monochrome1 else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.ImageLaterality = "U"  # unpaired: the whole chest
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    region = Dataset()
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = data.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2 ** (bits_stored - 1)
    ds.WindowWidth = 2**bits_stored
    ds.LossyImageCompression = "00"
    ds.PixelData = data.tobytes()
    _file_meta(ds)
    return ds


def jsrt_dx(case: str, **kwargs: object) -> Dataset:
    """The JSRT radiograph ``case`` (e.g. ``"JPCLN001"``) as a DX image at 0.35 mm spacing."""
    png = np.asarray(Image.open(JSRT / "images" / f"{case}.png").convert("L"))
    return dx_from_array(png, **kwargs)  # type: ignore[arg-type]


def jsrt_mask(case: str, structure: str) -> np.ndarray:
    """The expert mask of ``structure`` for ``case`` as a boolean array."""
    return np.asarray(Image.open(JSRT / "masks" / structure / f"{case}.png").convert("L")) > 127


@dataclass(frozen=True)
class DxVariant:
    """How a radiograph is sent: polarity, bits, transfer syntax (with the DCMTK ``storescu``
    option that proposes it) and, for a non-square detector, the columns kept."""

    name: str
    monochrome1: bool = False
    bits_stored: int = 12
    syntax: str | None = None  # None: Explicit VR Little Endian
    storescu_flag: str | None = None
    columns: tuple[int, int] | None = None  # [first, last) columns of the 1024 kept


#: The encodings of issue 8 item 5, as radiographs arrive from CR plates and DR detectors.
DX_VARIANTS = (
    DxVariant("MONOCHROME2, 12-bit"),
    DxVariant("MONOCHROME1, 12-bit", monochrome1=True),
    DxVariant("MONOCHROME2, 16-bit", bits_stored=16),
    DxVariant("JPEG-LS lossless, MONOCHROME1, 12-bit", True, 12, JPEGLSLossless, "-xt"),
    DxVariant("JPEG 2000 lossless, 16-bit", False, 16, JPEG2000Lossless, "-xv"),
    DxVariant("non-square 1024 x 880, MONOCHROME1, 12-bit", True, 12, columns=(72, 952)),
)


def jsrt_dx_variant(case: str, variant: DxVariant) -> tuple[Dataset, np.ndarray]:
    """The JSRT radiograph ``case`` as ``variant`` sends it, and its expert masks
    ``(structures, rows, cols)`` on the same pixels (cropped alike), structures in the order
    of :data:`JSRT_STRUCTURES`."""
    png = np.asarray(Image.open(JSRT / "images" / f"{case}.png").convert("L"))
    masks = np.stack([jsrt_mask(case, s) for s in JSRT_STRUCTURES])
    if variant.columns is not None:
        first, last = variant.columns
        png, masks = png[:, first:last], masks[:, :, first:last]
    ds = dx_from_array(
        np.ascontiguousarray(png),
        monochrome1=variant.monochrome1,
        bits_stored=variant.bits_stored,
    )
    if variant.syntax is not None:
        ds.compress(variant.syntax)
    return ds, masks


def ct_series(
    n_slices: int = 8,
    rows: int = 64,
    cols: int = 64,
    *,
    spacing_mm: tuple[float, float, float] = (2.5, 0.8, 0.8),
    study_uid: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> list[Dataset]:
    """A small synthetic axial CT series: a bright ellipsoid in air, in HU via rescale.

    Instances are returned in shuffled order (unless ``shuffle`` is False) and numbered in
    reverse, so that a reader must sort them by position along the slice normal.
    """
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = generate_uid()
    dz, dy, dx = spacing_mm
    zz, yy, xx = np.mgrid[0:n_slices, 0:rows, 0:cols]
    inside = (
        ((zz - n_slices / 2) / (n_slices / 2.5)) ** 2
        + ((yy - rows / 2) / (rows / 3)) ** 2
        + ((xx - cols / 2) / (cols / 3)) ** 2
    ) <= 1.0
    hu = np.where(inside, 40.0, -1000.0) + rng.normal(0, 10, inside.shape)
    out = []
    for k in range(n_slices):
        ds = Dataset()
        _patient_study(ds, study_uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "CT"
        ds.PatientPosition = "HFS"
        ds.SeriesNumber = 2
        ds.InstanceNumber = n_slices - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-cols * dx / 2, -rows * dy / 2, -100.0 + k * dz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = np.round(hu[k] + 1024).astype(np.int16).tobytes()
        _file_meta(ds)
        out.append(ds)
    if shuffle:
        order = rng.permutation(n_slices)
        out = [out[i] for i in order]
    return out


LA_MRI = SHARED_DATA / "la-mri"


def la_mri_cases() -> list[str]:
    """Case folders of the left-atrium LGE-MRI volumes present under ``SHARED_DATA``."""
    return sorted(p.parent.name for p in LA_MRI.glob("*/image.nii.gz"))


def la_mri_volume(case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The LGE-MRI volume of ``case`` as ``(z, y, x)`` and its spacing ``(z, y, x)`` in mm."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(LA_MRI / case / "image.nii.gz"))
    sx, sy, sz = image.GetSpacing()
    return sitk.GetArrayFromImage(image).astype(np.float32), (sz, sy, sx)


def mr_series(
    volume: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float],
    study_uid: str,
    frame_of_reference_uid: str,
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    series_number: int = 1,
    description: str = "LGE 3D",
) -> list[Dataset]:
    """An MR Image Storage series of ``volume`` ``(z, y, x)``, one slice per instance.

    Slice ``k`` lies at ``origin_mm + k * spacing_z * normal`` (normal = row x column
    direction of ``orientation``); values are rounded to unsigned 16-bit.
    """
    series_uid = generate_uid()
    dz, dy, dx = spacing_mm
    row_dir = np.asarray(orientation[:3], dtype=np.float64)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    data = np.clip(np.round(volume), 0, 65535).astype(np.uint16)
    out = []
    for k in range(volume.shape[0]):
        ds = Dataset()
        _patient_study(ds, study_uid)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "MR"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.BodyPartExamined = "HEART"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 5.4
        ds.EchoTime = 2.3
        ds.EchoTrainLength = 1
        ds.SliceThickness = dz
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin_mm) + k * dz * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [dy, dx]
        ds.AcquisitionNumber = 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = data[k].tobytes()
        _file_meta(ds)
        out.append(ds)
    return out


def write_files(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Save ``datasets`` as Part 10 files named by SOP Instance UID in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def us_region(
    bounds: tuple[int, int, int, int], delta_cm: tuple[float, float], units: int = 3
) -> Dataset:
    """One Sequence of Ultrasound Regions item: a 2D tissue region with inclusive ``bounds``
    ``(min_col, min_row, max_col, max_row)`` and ``delta_cm`` ``(Physical Delta X, Y)``."""
    item = Dataset()
    item.RegionSpatialFormat = 1  # 2D
    item.RegionDataType = 1  # tissue
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = bounds[0], bounds[1]
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = bounds[2], bounds[3]
    item.PhysicalUnitsXDirection = units
    item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX, item.PhysicalDeltaY = delta_cm
    item.ReferencePixelX0 = (bounds[0] + bounds[2]) // 2
    item.ReferencePixelY0 = bounds[1]
    return item


def us_from_array(
    gray: np.ndarray,
    *,
    regions: Sequence[Dataset] | None = None,
    jpeg: bool = True,
    study_uid: str | None = None,
    series_uid: str | None = None,
    quality: int = 95,
) -> Dataset:
    """A US Image Storage image of the 8-bit ``gray`` picture as a colour scanner sends it.

    Colour (the gray value in R, G and B) as JPEG baseline YBR_FULL_422 (4:2:2 chroma, the
    way scanners compress), or native RGB with ``jpeg=False``; ``regions`` becomes the
    Sequence of Ultrasound Regions (none: an uncalibrated image).
    """
    data = np.asarray(gray, dtype=np.uint8)
    rgb = np.repeat(data[..., None], 3, axis=2)
    ds = Dataset()
    _patient_study(ds, study_uid or generate_uid())
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "BREAST", "0001"]  # 0001: 2D imaging
    ds.BodyPartExamined = "BREAST"
    ds.PatientOrientation = ""
    ds.ImageLaterality = "L"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = data.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if regions is not None:
        ds.SequenceOfUltrasoundRegions = list(regions)
    _file_meta(ds)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality, subsampling=1)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{rgb.nbytes / len(buf.getvalue()):.2f}"[:16]
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
        ds.PixelData = rgb.tobytes()
    return ds


def busi_us(case: str, delta_cm: float | None = 0.01, **kwargs: object) -> Dataset:
    """The BUSI image ``case`` (e.g. ``"benign_001"``) as a colour JPEG US image whose whole
    frame is one region calibrated at ``delta_cm`` per pixel (None: no regions)."""
    png = np.asarray(Image.open(BUSI / "images" / f"{case}.png").convert("L"))
    rows, cols = png.shape
    regions = (
        None if delta_cm is None else [us_region((0, 0, cols - 1, rows - 1), (delta_cm, delta_cm))]
    )
    return us_from_array(png, regions=regions, **kwargs)  # type: ignore[arg-type]


def busi_mask(case: str) -> np.ndarray:
    """The expert lesion mask of BUSI ``case`` as a boolean array (empty for normal images)."""
    return np.asarray(Image.open(BUSI / "masks" / f"{case}.png").convert("L")) > 127


def sr_content_items(sr: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    stack = list(reversed(sr.get("ContentSequence", [])))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(reversed(item.get("ContentSequence", [])))


def sr_numbers(sr: Dataset) -> dict[str, float]:
    """NUM content items of an SR: concept code value -> value (the last one of a code)."""
    return {
        str(item.ConceptNameCodeSequence[0].CodeValue): float(
            item.MeasuredValueSequence[0].NumericValue
        )
        for item in sr_content_items(sr)
        if item.get("ValueType") == "NUM"
    }


def sr_texts(sr: Dataset) -> list[str]:
    """TEXT content items of an SR, in document order."""
    return [str(i.TextValue) for i in sr_content_items(sr) if i.get("ValueType") == "TEXT"]


#: The peers named in the audit records of :func:`record_transfers`.
AUDIT_PEERS = Participants("MODALITY", "DICOMNODE", "127.0.0.1:5000")


def record_transfers(log: AuditLog, n: int, **details: Any) -> AuditLog:
    """Append ``n`` instances-transferred records to ``log`` (patient ``P<i>``, study
    ``1.2.3.<i>``, ``details`` such as ``instances=3``); return ``log``."""
    for i in range(n):
        log.record(
            AuditEvent.INSTANCES_TRANSFERRED,
            AuditAction.CREATE,
            AuditOutcome.SUCCESS,
            AUDIT_PEERS,
            patient_id=f"P{i}",
            study_uid=f"1.2.3.{i}",
            **details,
        )
    return log
