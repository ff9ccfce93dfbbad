"""Held-out LGE-MRI cases of ``../shared/data/la-mri`` as a scanner sends them.

:func:`mr_slices` builds a single-frame MR series (MR Image Storage) from a NIfTI volume with
an oblique geometry: the volume's x and y axes become the row and column directions of a
rotated Image Orientation (Patient), slice k sits at origin + k * spacing * normal. Its
instances are numbered and returned in reverse slice order. :func:`enhanced_mr` wraps the same
slices into one Legacy Converted Enhanced MR Image (highdicom), per-frame geometry included.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from tests.factories import SHARED_DATA, _file_meta, _patient_study

LA_MRI = SHARED_DATA / "la-mri"
REPO = Path(__file__).resolve().parents[1]
LA_PACKAGE = REPO / "config" / "models" / "la-lge"


def held_out_cases() -> list[str]:
    """The test cases of the shipped package's split (never used in training or choices)."""
    return list(json.loads((LA_PACKAGE / "split.json").read_text())["test"])


def read_case(case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(image uint8 (z, y, x), expert mask bool (z, y, x), spacing (z, y, x) mm)``."""
    image = sitk.ReadImage(str(LA_MRI / case / "image.nii.gz"))
    label = sitk.ReadImage(str(LA_MRI / case / "label.nii.gz"))
    x, y, z = image.GetSpacing()
    return (
        sitk.GetArrayFromImage(image),
        sitk.GetArrayFromImage(label) > 0,
        (float(z), float(y), float(x)),
    )


def oblique_axes(degrees: float = 25.0) -> np.ndarray:
    """A rotation (columns: row direction, column direction, normal) about (1, 1, 1)."""
    axis = np.ones(3) / math.sqrt(3)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def mr_slices(
    image: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    axes: np.ndarray | None = None,
    series_description: str = "LGE 3D LA",
) -> list[Dataset]:
    """Single-frame MR instances of ``image`` (z, y, x), in reverse slice order."""
    axes = oblique_axes() if axes is None else axes
    row_dir, col_dir, normal = axes[:, 0], axes[:, 1], axes[:, 2]
    dz, dy, dx = spacing
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    origin = np.array([-60.0, -80.0, 40.0])
    n = image.shape[0]
    out = []
    for k in range(n):
        ds = Dataset()
        _patient_study(ds, study_uid)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "MR"
        ds.BodyPartExamined = "HEART"
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        ds.SeriesNumber = 9
        ds.InstanceNumber = n - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 5.4
        ds.EchoTime = 2.3
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.FlipAngle = 20
        position = origin + k * dz * normal
        ds.ImagePositionPatient = [round(float(v), 5) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.SpacingBetweenSlices = dz
        ds.AcquisitionNumber = 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape[1], image.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 128
        ds.WindowWidth = 256
        ds.PixelData = np.ascontiguousarray(image[k], dtype=np.uint16).tobytes()
        _file_meta(ds)
        out.append(ds)
    return out[::-1]


def enhanced_mr(slices: list[Dataset]) -> Dataset:
    """One Legacy Converted Enhanced MR Image of ``slices`` (frames in the given order)."""
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=copy.deepcopy(slices),
        series_instance_uid=generate_uid(),
        series_number=10,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf.SeriesDescription = "LGE 3D LA enhanced"
    mf.BodyPartExamined = "HEART"
    return mf


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
