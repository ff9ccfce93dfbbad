"""Warm-up: pay the first-call costs at start, so that the first study is as fast as the next.

The first job after start used to be about 1 s slower than the next on 2 CPU cores (torch's
first forward pass, highdicom's and pydicom's first SEG and SR: code dictionaries, templates,
the encoder). :func:`warm_up` does that work once per model package, on the worker side of
:meth:`Node.start <dicom_node.app.node.Node.start>`, before the node accepts
associations:

1. the network runs once on zeros of its input size (:meth:`Segmenter.warm_up
   <dicom_node.models.inference.Segmenter.warm_up>`), on the node's device. A network that
   cannot run its own input size, or does not give one channel per structure, fails here, at
   start, instead of at the first study;
2. a one-input package that accepts the synthetic image below (its Modality) segments it
   the way a study is (preprocessing, orientation, postprocessing);
3. the SEG and SR of one synthetic 64 x 64 image (no patient data; nothing written to disk
   but the one temporary input file) are built and encoded with the package's structures,
   by the same writers the worker uses: a DX radiograph for a 2D package of CR or DX
   images (the projection path: TID 1410, the cardiothoracic ratio), else a CT slice.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.common.errors import InputError
from dicom_node.common.output_kinds import OutputKind
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.inference import CaseSegmenter, InferenceReport
from dicom_node.outputs.measurements import measure
from dicom_node.outputs.writers import WRITERS, SegmentationContext, kinds_to_build
from dicom_node.package.manifest import ModelPackage
from dicom_node.work.segment import SegmentationResult

#: Rows and columns of the synthetic slice.
SIZE = 64


def warm_up(segmenter: CaseSegmenter) -> float:
    """Run ``segmenter``'s network once and build one SEG and SR; return the seconds.

    Raises
    ------
    ModelPackageError
        When the network's output does not fit the package (from
        :meth:`~dicom_node.models.inference.Segmenter.warm_up`); any error of the network
        itself comes through as it is.
    """
    started = time.perf_counter()
    segmenter.warm_up()
    with tempfile.TemporaryDirectory(prefix="dicom-node-warm-up-") as folder:
        path = Path(folder) / "slice.dcm"
        synthetic_image(segmenter.package).save_as(path, enforce_file_format=True)
        series = load_series([path])
        package = segmenter.package
        if len(package.inputs) == 1 and series.modality in package.modalities:
            # Outside the package's applicability, say: step 1 has run the network.
            with contextlib.suppress(InputError):
                segmenter.segment(series, None, InferenceReport())
        build_outputs(series, segmenter)
    return time.perf_counter() - started


def build_outputs(series: ImageSeries, segmenter: CaseSegmenter) -> list[pydicom.Dataset]:
    """The SEG and SR of ``series`` with a square in every structure, encoded once each."""
    package = segmenter.package
    masks = np.zeros((*series.shape, len(package.structures)), dtype=bool)
    masks[:, SIZE // 4 : SIZE // 2, SIZE // 4 : SIZE // 2, :] = True
    context = SegmentationContext(
        series=series,
        masks=masks,
        package=package,
        measurements=measure(series, masks, package),
        notes=(),
        instance_number=1,
        case_key=series.series_instance_uid,
        source_instances=series.sop_instance_uids,
    )
    built = []
    for kind in kinds_to_build([OutputKind.SEG, OutputKind.SR]):
        context.built[kind] = WRITERS[kind].write(context)
        for ds in context.built[kind]:
            SegmentationResult.encode(ds)
            built.append(ds)
    return built


def synthetic_image(package: ModelPackage) -> pydicom.Dataset:
    """A ``SIZE`` x ``SIZE`` image (a bright square), no patient data: a DX radiograph for a
    2D package of CR or DX images, else an axial CT slice."""
    ds = pydicom.Dataset()
    ds.PatientName = "WARM^UP"
    ds.PatientID = "WARM-UP"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "dicom-node warm-up"
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated = 16
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint16)
    pixels[SIZE // 4 : SIZE // 2, SIZE // 4 : SIZE // 2] = 1064
    if package.dims == 2 and {"CR", "DX"} & set(package.modalities):
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.Modality = "DX"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [1.0, 1.0]
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
    else:
        ds.SOPClassUID = CTImageStorage
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-SIZE / 2, -SIZE / 2, 0.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
