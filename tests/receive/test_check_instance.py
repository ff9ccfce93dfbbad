"""The receiver's validation of one dataset against its C-STORE request."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.common.status import StoreStatus
from dicom_node.receive.receiver import RejectedInstance, check_instance, routing_attributes
from tests.factories import ct_series


def request_for(ds: Dataset) -> Dataset:
    req = Dataset()
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.AffectedSOPClassUID = ds.SOPClassUID
    return req


def test_valid_instance_passes() -> None:
    ds = ct_series(n_slices=1)[0]
    check_instance(ds, request_for(ds))


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("SOPInstanceUID", "1.2.3/../../etc"),
        ("SeriesInstanceUID", "1.2.3/.."),
        ("StudyInstanceUID", "..\\..\\x"),
        ("StudyInstanceUID", "1." + "1" * 70),
        ("SeriesInstanceUID", ""),
    ],
)
def test_invalid_uids_are_refused(keyword: str, value: str) -> None:
    ds = ct_series(n_slices=1)[0]
    req = request_for(ds)
    setattr(ds, keyword, value)
    with pytest.raises(RejectedInstance) as exc:
        check_instance(ds, req)
    assert exc.value.status == StoreStatus.CANNOT_UNDERSTAND


def test_uid_mismatch_with_request_is_refused() -> None:
    ds = ct_series(n_slices=1)[0]
    req = request_for(ds)
    req.AffectedSOPInstanceUID = generate_uid()
    with pytest.raises(RejectedInstance) as exc:
        check_instance(ds, req)
    assert exc.value.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_truncated_pixel_data_is_refused() -> None:
    ds = ct_series(n_slices=1)[0]
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(RejectedInstance, match="truncated"):
        check_instance(ds, request_for(ds))


def test_routing_attributes_join_multi_values() -> None:
    ds = ct_series(n_slices=1)[0]
    attrs = routing_attributes(ds)
    assert attrs["Modality"] == "CT"
    assert attrs["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert "PatientID" not in attrs
