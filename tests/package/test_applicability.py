"""A package's ``applicability`` against image headers: refuse what is known to be outside."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node.common.errors import InputError, NotApplicableError
from dicom_node.package.applicability import check_image, non_human_reason
from dicom_node.package.manifest import Applicability, ModelPackage, load_package

CXR = Path(__file__).resolve().parents[2] / "config" / "models" / "cxr-anatomy"


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(CXR)


def chest(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_cxr_anatomy_declares_what_it_is_valid_for(package: ModelPackage) -> None:
    assert package.orientation == ("L", "F")
    assert package.applicability.views == ("PA", "AP")
    assert "CHEST" in package.applicability.body_parts
    assert package.applicability.species == ("human",)


def test_pa_chest_of_a_human_is_accepted_without_notes(package: ModelPackage) -> None:
    assert check_image(chest(), package) == ()
    assert (
        check_image(chest(ViewPosition="AP", PatientSpeciesDescription="Homo sapiens"), package)
        == ()
    )


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"ViewPosition": "LL"}, "ViewPosition (0018,5101)"),
        ({"BodyPartExamined": "HAND"}, "BodyPartExamined (0018,0015)"),
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, "(0010,2201)"),
        ({"PatientBreedDescription": "Beagle"}, "Patient Breed"),
        ({"AnatomicalOrientationType": "QUADRUPED"}, "QUADRUPED"),
    ],
)
def test_known_outside_is_refused_with_a_reason(
    package: ModelPackage, attributes: dict[str, object], named: str
) -> None:
    with pytest.raises(NotApplicableError, match="cxr-anatomy") as raised:
        check_image(chest(**attributes), package)
    assert named in str(raised.value) and "route" in str(raised.value)
    assert isinstance(raised.value, InputError)  # the job fails once, readable


def test_species_code_other_than_homo_sapiens_is_an_animal() -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "448771007", "SCT", "Dog"
    assert "Dog" in (non_human_reason(chest(PatientSpeciesCodeSequence=[code])) or "")
    code.CodeValue, code.CodeMeaning = "337915000", "Homo sapiens"
    assert non_human_reason(chest(PatientSpeciesCodeSequence=[code])) is None


def test_missing_attributes_are_assumed_and_noted(package: ModelPackage) -> None:
    notes = check_image(Dataset(), package)
    assert len(notes) == 2
    assert "ViewPosition (0018,5101) is absent" in notes[0] and "PA, AP" in notes[0]
    assert "BodyPartExamined (0018,0015) is absent" in notes[1]


def test_a_package_without_applicability_accepts_anything(package: ModelPackage) -> None:
    anything = dataclasses.replace(package, applicability=Applicability())
    ds = chest(ViewPosition="LL", BodyPartExamined="KNEE", PatientSpeciesDescription="Feline")
    assert check_image(ds, anything) == ()
