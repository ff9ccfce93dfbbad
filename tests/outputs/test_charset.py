"""Specific Character Set: sources in any character set pydicom decodes give SEG + SR whose
text (the patient's name above all) reads back as it was sent, with a valid character set."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files

from dicom_node.models.inference import Segmenter
from dicom_node.outputs.charset import UTF8, has_non_ascii_text, set_output_character_set
from dicom_node.testing.dciodvfy import dciodvfy_errors
from dicom_node.testing.random_package import make_random_package
from dicom_node.work.segment import SegmentationResult, segment_series
from tests.conftest import require_shared_data, require_tool
from tests.factories import SHARED_DATA

GE_CT = SHARED_DATA / "reference" / "dcmqi" / "segmentations" / "ct-3slice"

#: Skipped with the reason without dciodvfy; failed under DICOM_NODE_REQUIRE_PEERS=1.
needs_dciodvfy = pytest.mark.needs_tool("dciodvfy")

#: pydicom's character set test images (Secondary Capture, 32 x 32) and their charset.
CHARSET_IMAGES = {
    "chrArab.dcm": "ISO_IR 127",
    "chrFren.dcm": "ISO_IR 100",
    "chrGreek.dcm": "ISO_IR 126",
    "chrH31.dcm": ["", "ISO 2022 IR 87"],  # empty first value: ISO 2022 with extensions
    "chrH32.dcm": ["ISO 2022 IR 13", "ISO 2022 IR 87"],
    "chrHbrw.dcm": "ISO_IR 138",
    "chrI2.dcm": ["", "ISO 2022 IR 149"],
    "chrRuss.dcm": "ISO_IR 144",
    "chrX1.dcm": "ISO_IR 192",
    "chrX2.dcm": "GB18030",
}


def charset_file(name: str) -> Path:
    (path,) = get_charset_files(name)
    return Path(path)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    folder = tmp_path_factory.mktemp("model") / "any-modality"
    return Segmenter(make_random_package(folder, modalities=(), structures=("heart", "left_lung")))


def written(ds: pydicom.Dataset, path: Path) -> Path:
    path.write_bytes(SegmentationResult.encode(ds))
    return path


@pytest.mark.parametrize("name", sorted(CHARSET_IMAGES))
def test_patient_name_survives_into_seg_and_sr(
    name: str, segmenter: Segmenter, tmp_path: Path
) -> None:
    source = pydicom.dcmread(charset_file(name))
    assert source.SpecificCharacterSet == CHARSET_IMAGES[name]  # the case under test
    (result,) = segment_series([charset_file(name)], segmenter)
    for kind, out in (("seg", result.seg), ("sr", result.sr)):
        back = pydicom.dcmread(written(out, tmp_path / f"{kind}.dcm"))
        assert back.SpecificCharacterSet == UTF8, kind
        assert str(back.PatientName) == str(source.PatientName), kind
        assert back.PatientName.ideographic == source.PatientName.ideographic, kind
        # UTF-8 on disk, as the character set says.
        raw = pydicom.dcmread(tmp_path / f"{kind}.dcm").get_item("PatientName").value
        assert raw.rstrip(b" ") == str(source.PatientName).encode("utf-8"), kind


@needs_dciodvfy
@pytest.mark.parametrize("name", ["chrH31.dcm", "chrX2.dcm", "chrFren.dcm"])
def test_non_ascii_outputs_validate(name: str, segmenter: Segmenter, tmp_path: Path) -> None:
    (result,) = segment_series([charset_file(name)], segmenter)
    for kind, out in (("seg", result.seg), ("sr", result.sr)):
        assert dciodvfy_errors(written(out, tmp_path / f"{kind}.dcm")) == [], kind


def test_empty_character_set_of_a_ge_ct_gives_plain_outputs(
    segmenter: Segmenter, tmp_path: Path
) -> None:
    """The GE CT says Specific Character Set is empty, which highdicom refuses to copy."""
    require_shared_data("reference", "dcmqi", "segmentations", "ct-3slice")
    paths = sorted(GE_CT.glob("*.dcm"))
    source = pydicom.dcmread(paths[0])
    assert source.SpecificCharacterSet == ""
    (result,) = segment_series(paths, segmenter)
    for kind, out in (("seg", result.seg), ("sr", result.sr)):
        path = written(out, tmp_path / f"{kind}.dcm")
        back = pydicom.dcmread(path)
        assert "SpecificCharacterSet" not in back, kind  # ASCII text: the default repertoire
        assert back.PatientName == source.PatientName
        require_tool("dciodvfy")
        assert dciodvfy_errors(path) == [], kind


def test_set_output_character_set_follows_the_text() -> None:
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Doe^John"
    set_output_character_set(ds)
    assert "SpecificCharacterSet" not in ds
    item = pydicom.Dataset()
    item.CodeMeaning = "Cœur"  # non-ASCII text deep in a sequence counts too
    ds.ConceptNameCodeSequence = [item]
    assert has_non_ascii_text(ds)
    set_output_character_set(ds)
    assert ds.SpecificCharacterSet == UTF8
