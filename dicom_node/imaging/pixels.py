"""Pixel data to numbers: the one place where Pixel Data (7FE0,0010) is decoded.

:func:`decode_instance` decodes every frame of one instance with pydicom's pixel data handlers
(the plugin is chosen by Transfer Syntax UID (0002,0010); pylibjpeg, openjpeg, libjpeg and
pyjpegls decode JPEG, JPEG-LS, JPEG 2000 and RLE) and returns

* grayscale images (MONOCHROME1, MONOCHROME2) as modality values: Rescale Slope (0028,1053)
  and Rescale Intercept (0028,1052), or the Modality LUT Sequence (0028,3000), applied (per
  frame, from the Pixel Value Transformation Sequence (0028,9145) of enhanced objects), in
  MONOCHROME2 polarity;
* colour images (RGB, YBR_FULL, YBR_FULL_422, YBR_PARTIAL_422, YBR_RCT, YBR_ICT and PALETTE
  COLOR) as RGB in 0..255 (pydicom converts YBR to RGB; JPEG 2000 decoders undo the RCT/ICT;
  :func:`pydicom.pixels.apply_color_lut` maps PALETTE COLOR) together with their luminance
  (ITU-R BT.601: ``0.299 R + 0.587 G + 0.114 B``), which stands for the image where one
  grayscale value per pixel is needed.

What cannot be decoded faithfully is refused with :class:`~dicom_node.common.errors.InputError`:
float pixel data, 1-bit images, Bits Allocated other than 8, 16 or 32, other photometric
interpretations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixel_array

from dicom_node.common.errors import InputError

#: Photometric Interpretation (0028,0004) values of grayscale images.
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
#: Photometric Interpretation values of colour images with three samples per pixel.
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_RCT", "YBR_ICT")
#: Photometric Interpretation of one sample per pixel mapped through a colour palette.
PALETTE = "PALETTE COLOR"
#: Bits Allocated (0028,0100) values decoded.
BITS_ALLOCATED = (8, 16, 32)
#: ITU-R BT.601 luma weights of R, G and B.
BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class DecodedFrames:
    """The frames of one instance, in its own frame order.

    Attributes
    ----------
    gray
        ``float32 (frames, rows, cols)``: modality values in MONOCHROME2 polarity, or the
        BT.601 luminance of ``rgb`` for colour images.
    rgb
        ``float32 (frames, rows, cols, 3)`` in 0..255 for colour images, None for grayscale.
    """

    gray: np.ndarray
    rgb: np.ndarray | None


def number_of_frames(ds: pydicom.Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent or empty.

    Raises
    ------
    InputError
        When the value is not a positive integer.
    """
    try:
        value = ds.get("NumberOfFrames")
        if value is None or value == "":
            return 1
        frames = int(value)
    except (TypeError, ValueError):
        raise InputError(
            "NumberOfFrames (0028,0008) is not a valid Integer String; send a whole number"
        ) from None
    if frames < 1:
        raise InputError(f"NumberOfFrames (0028,0008) is {frames}; it must be at least 1")
    return frames


def image_size(ds: pydicom.Dataset) -> tuple[int, int]:
    """``(Rows (0028,0010), Columns (0028,0011))``; InputError when missing or not positive."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise InputError(
            "an image without valid Rows (0028,0010) and Columns (0028,0011) was received; "
            "send complete image instances"
        ) from None
    if rows < 1 or cols < 1:
        raise InputError(f"the image has {rows} Rows and {cols} Columns; both must be positive")
    return rows, cols


def check_pixel_module(ds: pydicom.Dataset) -> None:
    """Refuse, with a message saying what is supported, pixel data this module cannot decode.

    Raises
    ------
    InputError
        No integer Pixel Data, Bits Allocated (0028,0100) not 8, 16 or 32, Samples per Pixel
        (0028,0002) not matching the Photometric Interpretation (0028,0004), or an unsupported
        Photometric Interpretation.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InputError(
                "float pixel data (FloatPixelData/DoubleFloatPixelData) is not supported; "
                "send integer Pixel Data (7FE0,0010)"
            )
        raise InputError("an instance has no Pixel Data (7FE0,0010); send image instances only")
    image_size(ds)
    number_of_frames(ds)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in BITS_ALLOCATED:
        raise InputError(
            f"BitsAllocated (0028,0100) is {bits}; images of 8, 16 or 32 bits are supported "
            "(1-bit data such as masks and overlays is not an image to segment)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected_samples = 3 if photometric in COLOR else 1
    if photometric not in (*GRAYSCALE, *COLOR, PALETTE):
        raise InputError(
            f"PhotometricInterpretation (0028,0004) {photometric!r} is not supported; "
            f"supported: {', '.join((*GRAYSCALE, *COLOR, PALETTE))}"
        )
    if samples != expected_samples:
        raise InputError(
            f"SamplesPerPixel (0028,0002) is {samples} but PhotometricInterpretation "
            f"{photometric} needs {expected_samples}"
        )
    if photometric == PALETTE and bits == 32:
        raise InputError("PALETTE COLOR images of 32 bits are not supported; send 8 or 16 bits")


def _stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        # YBR_FULL and YBR_FULL_422 are converted to RGB (as_rgb, pydicom's default).
        return np.asarray(decode_pixel_array(ds))
    except Exception as exc:  # every decoder plugin raises its own exception types
        name = getattr(syntax, "name", syntax)
        raise InputError(
            f"pixel data with transfer syntax {name!r} could not be decoded ({exc}); "
            "send it uncompressed or in a supported compression"
        ) from exc


def _to_255(rgb: np.ndarray, max_value: float) -> np.ndarray:
    out = rgb.astype(np.float32)
    if max_value != 255:
        out *= np.float32(255.0 / max_value)
    return out


def decode_instance(ds: pydicom.Dataset, modality_luts: Sequence[pydicom.Dataset]) -> DecodedFrames:
    """Decode every frame of ``ds``.

    Parameters
    ----------
    ds
        An image instance (single- or multi-frame).
    modality_luts
        One dataset per frame holding that frame's Modality LUT Module attributes (Rescale
        Slope/Intercept or Modality LUT Sequence), for grayscale images; see
        :func:`dicom_node.imaging.frames.frame_modality_luts`.

    Raises
    ------
    InputError
        When :func:`check_pixel_module` refuses the instance, or the pixel data cannot be
        decoded into Number of Frames x Rows x Columns.
    """
    check_pixel_module(ds)
    rows, cols = image_size(ds)
    frames = number_of_frames(ds)
    photometric = str(ds.PhotometricInterpretation).strip()
    stored = _decode(ds)
    samples = 3 if photometric in COLOR else 1
    shape = (frames, rows, cols, samples) if samples == 3 else (frames, rows, cols)
    if stored.size != int(np.prod(shape)):
        raise InputError(
            f"decoded pixel data has shape {stored.shape}, expected {frames} frame(s) of "
            f"{rows} x {cols} x {samples} (NumberOfFrames, Rows, Columns, SamplesPerPixel)"
        )
    stored = stored.reshape(shape)
    if photometric in COLOR:
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        rgb = _to_255(stored, float(2**bits - 1))
        return DecodedFrames(gray=rgb @ BT601, rgb=rgb)
    if photometric == PALETTE:
        mapped = np.asarray(apply_color_lut(stored, ds))
        rgb = _to_255(mapped, float(np.iinfo(mapped.dtype).max))
        return DecodedFrames(gray=rgb @ BT601, rgb=rgb)
    if len(modality_luts) != frames:
        raise ValueError(f"{len(modality_luts)} modality LUTs for {frames} frames")
    gray = np.empty(shape, dtype=np.float32)
    lo_hi = np.array(_stored_range(ds))
    for f in range(frames):
        values = np.asarray(apply_modality_lut(stored[f], modality_luts[f]), dtype=np.float64)
        if photometric == "MONOCHROME1":
            ends = np.asarray(apply_modality_lut(lo_hi, modality_luts[f]), dtype=np.float64)
            values = float(ends.min()) + float(ends.max()) - values
        gray[f] = values
    return DecodedFrames(gray=gray, rgb=None)
