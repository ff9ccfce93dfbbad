"""Overlay fallback: the segmentation burned into Secondary Capture images, for PACS and viewers
that cannot show DICOM SEG.

One Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7) instance, RGB, per source
frame: single-frame SC is what every PACS and viewer displays, and each image references
exactly the source image it shows (Source Image Sequence (0008,2112)). A series of N slices
gives N images in one overlay series, instance numbers in the source's frame order.

Each image is the source frame windowed to 8 bits (Window Center/Width (0028,1050/1051) or the
VOI LUT Sequence (0028,3010) when present, else the 0.5 to 99.5 percentile of the frame), each
structure's outline in its display colour (the inner boundary of its mask, ``mask &
~binary_erosion(mask)``), and below the image a black band with the burned-in label
:data:`LABEL`, the model's name and version, and a legend (colour swatch + structure name).
Images narrower than :data:`MIN_WIDTH_PX` are enlarged by an integer factor (nearest
neighbour) so that the text stays legible. Nothing of the patient but the image is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_voi
from scipy.ndimage import binary_erosion

import dicom_node
from dicom_node.common.errors import InputError
from dicom_node.common.uids import derive_uid
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.seg import default_series_number
from dicom_node.package.manifest import ModelPackage

#: The burned-in warning on every overlay image.
LABEL = "AI RESULT - NOT FOR DIAGNOSIS"
#: Series Number (0020,0011) of the overlay series: this + the source's Series Number.
OVERLAY_SERIES_NUMBER_OFFSET = 3000
#: Narrower images are enlarged by an integer factor to at least this width.
MIN_WIDTH_PX = 512
#: Percentiles of the frame's values that span the 8-bit range without a VOI in the header.
PERCENTILE_WINDOW = (0.5, 99.5)

_LABEL_COLOUR = (255, 255, 0)
_TEXT_COLOUR = (255, 255, 255)


def scale_factor(cols: int) -> int:
    """The integer enlargement of an image ``cols`` wide (1 when it is wide enough)."""
    return max(1, math.ceil(MIN_WIDTH_PX / max(cols, 1)))


def outline(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a 2D boolean ``mask``: its pixels with a neighbour outside it.

    Pixels on the image border count as boundary (the outside of the image is outside).
    """
    mask = np.asarray(mask, dtype=bool)
    eroded: np.ndarray = binary_erosion(mask, border_value=0)
    boundary: np.ndarray = mask & ~eroded
    return boundary


def window_to_8bit(pixels: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """One frame of modality values (MONOCHROME2 polarity) to ``uint8`` for display.

    Uses the first Window Center (0028,1050) / Window Width (0028,1051) pair, or else the
    VOI LUT Sequence (0028,3010), when the source has one and is MONOCHROME2 (the loader
    inverts MONOCHROME1 frames, so the header's window no longer applies); otherwise the
    :data:`PERCENTILE_WINDOW` of the frame.
    """
    values = np.asarray(pixels, dtype=np.float64)
    mono2 = source.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME2"
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if mono2 and center not in (None, "") and width not in (None, ""):
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w >= 1:
            # PS3.3 C.11.2.1.2.1, the linear VOI function, onto 0..255.
            scaled = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
            return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if mono2 and "VOILUTSequence" in source:
        values = np.asarray(apply_voi(values, source), dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = (float(v) for v in np.percentile(values, PERCENTILE_WINDOW))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_band(width: int, package: ModelPackage) -> np.ndarray:
    """The black band under the image: label, model, legend; ``uint8 (rows, width, 3)``."""
    size = max(12, width // 40)
    font = _font(size)
    line_h = int(size * 1.5)
    pad = size // 2
    # Lay the legend out first (entries flow left to right, wrapping), to know the height.
    entries: list[tuple[int, int, tuple[int, int, int], str]] = []
    x, y = pad, pad + 2 * line_h
    for structure in package.structures:
        entry_w = line_h + int(font.getlength(structure.name)) + size
        if x > pad and x + entry_w > width - pad:
            x, y = pad, y + line_h
        entries.append((x, y, structure.color_rgb, structure.name))
        x += entry_w
    band = Image.new("RGB", (width, y + line_h + pad), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    draw.text((pad, pad), LABEL, fill=_LABEL_COLOUR, font=font)
    draw.text(
        (pad, pad + line_h), f"{package.name} {package.version}", fill=_TEXT_COLOUR, font=font
    )
    swatch = size
    for ex, ey, colour, name in entries:
        draw.rectangle((ex, ey + 2, ex + swatch, ey + 2 + swatch), fill=colour)
        draw.text((ex + line_h, ey), name, fill=_TEXT_COLOUR, font=font)
    return np.asarray(band, dtype=np.uint8)


def render(
    gray: np.ndarray, masks: np.ndarray, package: ModelPackage
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame: ``gray`` ``uint8 (rows, cols)``, ``masks`` boolean ``(rows, cols, S)``.

    Returns the RGB image ``uint8 (rows * k + band, cols * k, 3)`` (``k`` from
    :func:`scale_factor`) and the outline map ``int (rows, cols)`` on the source grid: the
    1-based index of the structure whose outline each pixel shows (0: none). Later structures
    are drawn over earlier ones where outlines cross.
    """
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    drawn = np.zeros(gray.shape, dtype=np.int32)
    for i, structure in enumerate(package.structures):
        edge = outline(masks[..., i])
        rgb[edge] = structure.color_rgb
        drawn[edge] = i + 1
    k = scale_factor(gray.shape[1])
    if k > 1:
        rgb = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
    return np.concatenate([rgb, _text_band(rgb.shape[1], package)], axis=0), drawn


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """Patient Orientation (0020,0020) of the source, or the main axes of its Image
    Orientation (Patient) (0020,0037); None when neither says."""
    given = source.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    iop = source.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # towards -x/+x, -y/+y, -z/+z (LPS)

    def axis(v: Sequence[float]) -> str:
        j = int(np.argmax(np.abs(v)))
        return letters[j][1 if v[j] > 0 else 0]

    return axis([float(v) for v in iop[:3]]), axis([float(v) for v in iop[3:]])


def frame_sop_uid(sop_uid: str, frame: int, frames: int) -> str:
    """SOP Instance UID of the overlay of ``frame``: ``sop_uid`` itself for a single frame,
    else derived from it and the frame index (deterministic)."""
    return sop_uid if frames == 1 else str(derive_uid(sop_uid, "frame", str(frame)))


def build_overlay(
    series: ImageSeries,
    masks: np.ndarray,
    package: ModelPackage,
    *,
    series_uid: str,
    sop_uid: str,
    instance_number: int = 1,
    frame: int = 0,
) -> pydicom.Dataset:
    """The Secondary Capture image of one source ``frame`` with the outlines burned in.

    Parameters
    ----------
    series
        The source; ``series.pixels`` (modality values) and ``series.datasets`` are used.
    masks
        Boolean ``(frames, rows, cols, S)`` on the source grid, one channel per structure of
        ``package`` in its order (as :func:`~dicom_node.outputs.seg.build_seg` takes).
    package
        Names, display colours (``color_rgb``), name and version of the model.
    series_uid, sop_uid
        Series Instance UID (0020,000E) and SOP Instance UID (0008,0018) of this image.
    instance_number
        Instance Number (0020,0013).
    frame
        Index of the source frame shown.

    Returns
    -------
    pydicom.Dataset
        Secondary Capture Image Storage, Photometric Interpretation RGB, Burned In
        Annotation (0028,0301) YES, Image Type (0008,0008) DERIVED\\SECONDARY, the source's
        patient and study, Source Image Sequence (0008,2112) naming the source image (and
        Referenced Frame Number (0008,1160) for a multi-frame source).
    """
    frames, rows, cols = series.pixels.shape
    if masks.shape != (frames, rows, cols, len(package.structures)):
        raise InputError(
            f"masks of shape {masks.shape} do not fit {frames} frame(s) of {rows} x {cols} "
            f"and {len(package.structures)} structure(s)"
        )
    if not 0 <= frame < frames:
        raise InputError(f"frame must be in 0..{frames - 1}, got {frame}")
    index, frame_number = series.frame_sources[frame]
    source = series.datasets[index]
    multi_frame = int(source.get("NumberOfFrames", 1) or 1) > 1
    gray = window_to_8bit(series.pixels[frame], source)
    rgb, _ = render(gray, masks[frame].astype(bool), package)
    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=default_series_number(series, OVERLAY_SERIES_NUMBER_OFFSET),
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer="dicom-node",
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if orientation is None:
        sc.add_new(0x00200020, "CS", None)  # Patient Orientation, Type 2: empty when unknown
    sc.Laterality = source.get("Laterality")  # Type 2C (paired body parts): may be empty
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = source.get("RecognizableVisualFeatures", "NO") or "NO"
    sc.SeriesDescription = f"AI overlay {package.name} {package.version}"[:64]
    sc.SoftwareVersions = dicom_node.__version__
    sc.ManufacturerModelName = package.name[:64]
    sc.DerivationDescription = (
        f"Outlines of {len(package.structures)} structure(s) segmented by {package.name} "
        f"{package.version}; not for diagnosis"
    )[:1024]
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if multi_frame:
        ref.ReferencedFrameNumber = frame_number
    sc.SourceImageSequence = [ref]
    return sc


def build_overlays(
    series: ImageSeries,
    masks: np.ndarray,
    package: ModelPackage,
    *,
    series_uid: str,
    sop_uid: str,
    instance_number: int = 1,
) -> list[pydicom.Dataset]:
    """One overlay per source frame (see :func:`build_overlay`), in frame order.

    ``sop_uid`` is the UID of the first image's family (:func:`frame_sop_uid`); instance
    numbers run from ``instance_number`` on.
    """
    frames = series.pixels.shape[0]
    return [
        build_overlay(
            series,
            masks,
            package,
            series_uid=series_uid,
            sop_uid=frame_sop_uid(sop_uid, f, frames),
            instance_number=instance_number + f,
            frame=f,
        )
        for f in range(frames)
    ]
