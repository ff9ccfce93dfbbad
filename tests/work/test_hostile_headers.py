"""Every stored instance is processed or fails once with a reason: hostile header values.

The header mutations that made the worker raise unexpected exceptions (retried 3 times) under
the fuzzing of issue 9, applied to a small DX: each must either give outputs that dciodvfy
accepts, or raise :class:`InputError` (failed once, not retried) with a readable reason that
carries no patient data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicom_node.common.errors import InputError
from dicom_node.models.inference import Segmenter
from dicom_node.package.manifest import load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors, dciodvfy_path
from dicom_node.work.segment import segment_series, write_outputs
from tests.factories import PATIENT_ID, PATIENT_NAME, dx_from_array, write_files
from tests.work.test_segment import chest


def raw(keyword_tag: int, vr: str, value: bytes) -> Callable[[Dataset], None]:
    """Set an element to exactly ``value`` (bytes as a peer would send them)."""

    def mutate(ds: Dataset) -> None:
        ds[keyword_tag] = DataElement(keyword_tag, vr, value)

    return mutate


def setattr_(keyword: str, value: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        with pydicom_config.disable_value_validation():
            setattr(ds, keyword, value)

    return mutate


def delete(keyword: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        delattr(ds, keyword)

    return mutate


MUTATIONS: dict[str, Callable[[Dataset], None]] = {
    "two-valued Patient Name": setattr_("PatientName", [PATIENT_NAME, "Other^Name"]),
    "1 MB Patient Name": raw(0x00100010, "PN", PATIENT_NAME.encode() + b"A" * 1_000_000),
    "unknown character set": setattr_("SpecificCharacterSet", "ISO_IR 999"),
    "ISO 2022 IR 87": lambda ds: (
        setattr(ds, "SpecificCharacterSet", ["", "ISO 2022 IR 87"]),
        raw(0x00100010, "PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B")(ds),
    ),
    "ISO 2022 broken escape": lambda ds: (
        setattr(ds, "SpecificCharacterSet", ["", "ISO 2022 IR 87"]),
        raw(0x00100010, "PN", b"Doe^\x1b$B\xff\xfe\x1b")(ds),
    ),
    "malformed Study Date": raw(0x00080020, "DA", b"2023-13-45"),
    "malformed Study Time": raw(0x00080030, "TM", b"25:61:99"),
    "malformed Content Date": raw(0x00080023, "DA", b"notadate"),
    "malformed Content Time": raw(0x00080033, "TM", b"xx"),
    "malformed Birth Date": raw(0x00100030, "DA", b"19991399"),
    "malformed Acquisition DateTime": raw(0x0008002A, "DT", b"20231345xx"),
    "missing Patient ID": delete("PatientID"),
    "missing Patient Name": delete("PatientName"),
    "missing Patient Sex": delete("PatientSex"),
    "missing Rows": delete("Rows"),
    "missing Columns": delete("Columns"),
    "Imager Pixel Spacing 1e300": lambda ds: (
        setattr(ds, "ImagerPixelSpacing", [1e300, 1e300]),
        setattr(ds, "PixelSpacing", [1e300, 1e300]),
    ),
    "Imager Pixel Spacing 1e300 alone": lambda ds: (
        setattr(ds, "ImagerPixelSpacing", [1e300, 1e300]),
        delattr(ds, "PixelSpacing"),
    ),
    "calibrated Pixel Spacing 1e300": lambda ds: (
        setattr(ds, "PixelSpacing", [1e300, 1e300]),
        setattr(ds, "PixelSpacingCalibrationType", "GEOMETRY"),
    ),
    "Pixel Spacing zero": setattr_("PixelSpacing", [0, 0]),
    "Pixel Spacing negative": setattr_("ImagerPixelSpacing", [-0.2, 0.2]),
    "Pixel Spacing NaN": raw(0x00181164, "DS", b"nan\\nan"),
}


def absurd_numbers(ds: Dataset) -> list[str]:
    """Decimal and floating-point values that are not finite or beyond 1e30 (e.g. mm, mm2)."""
    found = []
    for element in ds.iterall():
        if element.VR not in ("DS", "FD", "FL") or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            if value is not None and value != "" and not abs(float(value)) < 1e30:
                found.append(f"{element.keyword or element.tag}={value}")
    return found


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_hostile_header_is_processed_or_fails_once_with_a_reason(
    tmp_path: Path, random_package: Path, name: str
) -> None:
    ds = dx_from_array(chest(64, 56))
    MUTATIONS[name](ds)
    with pydicom_config.disable_value_validation():
        paths = write_files([ds], tmp_path / "in")
    try:
        results = segment_series(paths, Segmenter(load_package(random_package)))
    except InputError as exc:
        message = str(exc)
        assert message and len(message) < 400, message
        assert PATIENT_NAME not in message and PATIENT_ID not in message
        assert "Yamada" not in message and "Doe" not in message
        return
    written = write_outputs(results, tmp_path / "out")
    assert written
    for output in written:
        assert not absurd_numbers(dcmread(output.path)), (name, output.path.name)
    if dciodvfy_path() is not None:
        for output in written:
            assert dciodvfy_errors(output.path) == [], (name, output.path.name)
