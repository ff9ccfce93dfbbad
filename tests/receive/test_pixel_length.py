"""Native pixel data length: subsampled colour, 1- and 32-bit, odd lengths; refusals say why.

The files are pydicom's test images, written by other producers; they travel over a real
association on loopback to an in-process :class:`Receiver`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pynetdicom import AE, StoragePresentationContexts

from dicom_node.common.status import StoreStatus
from dicom_node.receive.receiver import (
    ERROR_COMMENT_MAX_CHARS,
    Receiver,
    RejectedInstance,
    check_instance,
    expected_pixel_bytes,
)
from tests.receive.peers import running_receiver


def pydicom_file(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def request_for(ds: Dataset) -> Dataset:
    req = Dataset()
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.AffectedSOPClassUID = ds.SOPClassUID
    return req


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SC_ybr_full_422_uncompressed.dcm", 100 * 100 * 2),  # 4:2:2: 2/3 of RGB
        ("SC_rgb_small_odd.dcm", 3 * 3 * 3),  # 27 bytes, padded to 28
        ("liver_1frame.dcm", 512 * 512 // 8),  # BitsAllocated 1, packed
        ("rtdose.dcm", 10 * 10 * 15 * 4),  # BitsAllocated 32, 15 frames
        ("MR_small_padded.dcm", 64 * 64 * 2),  # trailing padding beyond the frame
        ("examples_palette.dcm", 350 * 800),  # PALETTE COLOR, 8 bit
    ],
)
def test_real_files_pass_with_their_native_length(name: str, expected: int) -> None:
    ds = pydicom_file(name)
    assert expected_pixel_bytes(ds) == expected
    assert len(ds.PixelData) >= expected
    check_instance(ds, request_for(ds))


@pytest.mark.parametrize(
    "name", ["SC_ybr_full_422_uncompressed.dcm", "liver_1frame.dcm", "rtdose.dcm"]
)
def test_one_byte_short_is_refused(name: str) -> None:
    ds = pydicom_file(name)
    ds.PixelData = ds.PixelData[: expected_pixel_bytes(ds) - 1]  # type: ignore[operator]
    with pytest.raises(RejectedInstance, match="truncated") as exc:
        check_instance(ds, request_for(ds))
    assert exc.value.status == StoreStatus.CANNOT_UNDERSTAND


def test_ybr_partial_422_and_odd_one_bit_frames() -> None:
    ds = pydicom_file("SC_ybr_full_422_uncompressed.dcm")
    ds.PhotometricInterpretation = "YBR_PARTIAL_422"
    assert expected_pixel_bytes(ds) == 100 * 100 * 2
    one_bit = Dataset()
    one_bit.Rows, one_bit.Columns, one_bit.NumberOfFrames = 3, 3, 3  # 27 bits over 3 frames
    one_bit.SamplesPerPixel, one_bit.BitsAllocated = 1, 1
    one_bit.PhotometricInterpretation = "MONOCHROME2"
    assert expected_pixel_bytes(one_bit) == 4
    one_bit.BitsAllocated = 12  # not a multiple of 8: not checked here
    assert expected_pixel_bytes(one_bit) is None
    del one_bit.Rows
    assert expected_pixel_bytes(one_bit) is None


@pytest.mark.parametrize("bits", [1, 8, 16, 32, 64])
@pytest.mark.parametrize(
    ("samples", "photometric"),
    [(1, "MONOCHROME2"), (1, "PALETTE COLOR"), (3, "RGB"), (3, "YBR_FULL"), (3, "YBR_FULL_422")],
)
@pytest.mark.parametrize("frames", [1, 7])
def test_expected_length_is_pydicoms(
    bits: int, samples: int, photometric: str, frames: int
) -> None:
    # The receiver computes the common cases itself; it must agree with pydicom everywhere.
    ds = Dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 5, 13, frames
    ds.SamplesPerPixel, ds.BitsAllocated = samples, bits
    ds.PhotometricInterpretation = photometric
    assert expected_pixel_bytes(ds) == get_expected_length(ds, unit="bytes")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(tmp_path) as node:
        yield node


def send(port: int, datasets: list[Dataset]) -> list[Dataset]:
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def test_subsampled_colour_is_stored_and_truncation_is_refused_with_a_comment(
    receiver: Receiver,
) -> None:
    ybr = pydicom_file("SC_ybr_full_422_uncompressed.dcm")
    short = copy.deepcopy(ybr)
    short.SOPInstanceUID = ybr.SOPInstanceUID + ".1"
    short.PixelData = ybr.PixelData[:15000]
    one_bit = pydicom_file("liver_1frame.dcm")
    ok, refused, seg = send(receiver.settings.port, [ybr, short, one_bit])
    assert ok.Status == StoreStatus.SUCCESS
    assert seg.Status == StoreStatus.SUCCESS
    assert refused.Status == StoreStatus.CANNOT_UNDERSTAND
    assert refused.ErrorComment == "pixel data truncated (15000 of 20000 bytes)"
    assert len(refused.ErrorComment) <= ERROR_COMMENT_MAX_CHARS
    stored = list(receiver.settings.spool_dir.rglob("*.dcm"))
    assert sorted(p.stem for p in stored) == sorted([ybr.SOPInstanceUID, one_bit.SOPInstanceUID])


def test_refusal_of_a_path_like_uid_names_the_attribute(receiver: Receiver) -> None:
    ds = pydicom_file("SC_rgb_small_odd.dcm")
    ds.SeriesInstanceUID = "1.2.3/../x"
    (rsp,) = send(receiver.settings.port, [ds])
    assert rsp.Status == StoreStatus.CANNOT_UNDERSTAND
    assert rsp.ErrorComment == "missing or invalid SeriesInstanceUID"
