"""Error messages made safe for logs and status: what helps stays, patient data goes."""

from __future__ import annotations

from dicom_node.common.redact import REDACTED, describe, phi_values, safe_message
from tests.factories import ct_series


def test_keywords_tags_uids_and_type_names_stay() -> None:
    message = (
        "'FileDataset' object has no attribute 'NumberOfFrames' (0028,0008) in "
        "'1.2.840.10008.5.1.4.1.1.481.1'"
    )
    assert safe_message(message) == message
    code_string = "PhotometricInterpretation (0028,0004) 'YBR_FULL_422' is not supported"
    assert safe_message(code_string) == code_string


def test_quoted_values_and_long_digit_runs_go() -> None:
    assert safe_message("Invalid value for VR DA: '19470312'") == (
        f"Invalid value for VR DA: '{REDACTED}'"
    )
    assert safe_message('bad name "Doe^Jane"') == f"bad name '{REDACTED}'"
    assert safe_message("birth 19470312 in slice 3") == f"birth {REDACTED} in slice 3"


def test_patient_values_of_the_series_go_wherever_they_are() -> None:
    ds = ct_series(n_slices=1)[0]
    phi = phi_values([ds])
    message = f"cannot use {ds.PatientID} for {ds.PatientName} ({ds.AccessionNumber})"
    safe = safe_message(message, phi)
    for value in (ds.PatientID, str(ds.PatientName), ds.AccessionNumber):
        assert value not in safe
    assert describe(KeyError(ds.PatientID), phi) == f"KeyError: '{REDACTED}'"
