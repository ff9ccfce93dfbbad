"""Is a model valid for this image? The package's ``applicability`` against the image header.

A model package declares the views, body parts and species it is valid for
(:class:`~dicom_node.package.manifest.Applicability`). :func:`check_image` compares them with
View Position (0018,5101), Body Part Examined (0018,0015) and the species attributes of the
Patient Module (Patient Species Description (0010,2201), Patient Species Code Sequence
(0010,2202), Patient Breed Description (0010,2292), Patient Breed Code Sequence (0010,2293),
and Anatomical Orientation Type (0010,2210)):

* a value known to be outside the package's list refuses the image with
  :class:`~dicom_node.common.errors.NotApplicableError` (the job fails once, with that reason);
* a missing value is assumed to fit, and a note says so (it goes into the SR): many
  radiographs carry no View Position or Body Part Examined.
"""

from __future__ import annotations

import pydicom

from dicom_node.common.errors import NotApplicableError
from dicom_node.package.manifest import ModelPackage

#: Applicability value that stands for human patients.
HUMAN = "human"
#: SCT 337915000 "Homo sapiens", the species code of a human patient.
HOMO_SAPIENS_CODE = "337915000"
_HUMAN_DESCRIPTIONS = {"human", "homo sapiens", "homo sapiens sapiens"}


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def non_human_reason(ds: pydicom.Dataset) -> str | None:
    """Why ``ds`` shows a non-human patient, or None when nothing says so.

    Human images normally carry none of the veterinary attributes; any of Anatomical
    Orientation Type (0010,2210) ``QUADRUPED``, a Patient Species Description (0010,2201) or
    Patient Species Code Sequence (0010,2202) other than Homo sapiens, or a Patient Breed
    Description (0010,2292) or Patient Breed Code Sequence (0010,2293) marks an animal.
    """
    description = _text(ds, "PatientSpeciesDescription")
    if description and description.lower() not in _HUMAN_DESCRIPTIONS:
        return f"Patient Species Description (0010,2201) is {description!r}"
    for item in ds.get("PatientSpeciesCodeSequence") or []:
        code = str(item.get("CodeValue", ""))
        if code and code != HOMO_SAPIENS_CODE:
            meaning = str(item.get("CodeMeaning", code))
            return f"Patient Species Code Sequence (0010,2202) is {meaning!r}"
    if _text(ds, "PatientBreedDescription") or ds.get("PatientBreedCodeSequence"):
        return "the image has a Patient Breed (0010,2292/0010,2293), which only animals have"
    if _text(ds, "AnatomicalOrientationType").upper() == "QUADRUPED":
        return "Anatomical Orientation Type (0010,2210) is QUADRUPED"
    return None


def view_position(ds: pydicom.Dataset) -> str:
    """View Position (0018,5101) in upper case, empty when absent."""
    return _text(ds, "ViewPosition").upper()


def _check_species(ds: pydicom.Dataset, package: ModelPackage) -> str | None:
    species = package.applicability.species
    if not species:
        return None
    reason = non_human_reason(ds)
    description = _text(ds, "PatientSpeciesDescription")
    if HUMAN in species and reason is None:
        return None
    if description.lower() in species:
        return None
    if reason is None:  # a veterinary package and an image that names no species
        return (
            f"Patient Species Description (0010,2201) is absent; the model is valid for "
            f"{', '.join(species)}, assumed"
        )
    raise NotApplicableError(
        f"model {package.name} is valid for {', '.join(species)} patients only and {reason}; "
        "route images of other species to a model made for them"
    )


def check_image(ds: pydicom.Dataset, package: ModelPackage) -> tuple[str, ...]:
    """Refuse ``ds`` when it is known to be outside the package's ``applicability``.

    Parameters
    ----------
    ds
        One source image (its header is enough).
    package
        The model package and its :class:`~dicom_node.package.manifest.Applicability`.

    Returns
    -------
    tuple[str, ...]
        Notes for the SR: each attribute that was missing and assumed to fit.

    Raises
    ------
    NotApplicableError
        When View Position (0018,5101), Body Part Examined (0018,0015) or the species
        attributes hold a value outside the package's lists; the message names the attribute,
        the value and what the model accepts.
    """
    notes = []
    app = package.applicability
    species_note = _check_species(ds, package)
    if species_note:
        notes.append(species_note)
    for keyword, tag, accepted, what in (
        ("ViewPosition", "(0018,5101)", app.views, "views"),
        ("BodyPartExamined", "(0018,0015)", app.body_parts, "body parts"),
    ):
        if not accepted:
            continue
        value = _text(ds, keyword).upper()
        if not value:
            notes.append(
                f"{keyword} {tag} is absent; the model is valid for {what} "
                f"{', '.join(accepted)}, assumed"
            )
        elif value not in accepted:
            raise NotApplicableError(
                f"model {package.name} is valid for {what} {', '.join(accepted)} "
                f"({keyword} {tag}), not {value}; route other {what} elsewhere (a route can "
                f"match {keyword})"
            )
    return tuple(notes)
