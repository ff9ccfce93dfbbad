"""Error messages without patient data, for operational logs and ``dicom-node status``.

Messages of exceptions raised by pydicom and highdicom on a bad dataset may quote the values
they choke on (``Invalid value for VR DA: '19620914'``), and such a value can be a birth date,
a patient name or an ID. :func:`safe_message` keeps what helps to fix the problem (DICOM
keywords, tags, UIDs, Code String values such as ``'RGB'``, Python type names, small numbers)
and replaces everything else that is quoted, every long run of digits and every given patient
value with ``<value>``. Code String look-alikes (an upper-case name) are caught by the patient
values of the series, which the pipeline always passes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset

#: Header attributes whose values never appear in an operational message.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "InstitutionName",
    "StudyID",
)

REDACTED = "<value>"
_QUOTED = re.compile(r"'([^'\n]*)'|\"([^\"\n]*)\"")
_DIGITS = re.compile(r"(?<![\d.])\d{6,}(?![\d.])")
_TAG = re.compile(r"^\(?[0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+){2,}$")
# Code String (CS) values such as 'MONOCHROME1' or 'YBR_FULL_422': upper case, at least one letter
_CODE_STRING = re.compile(r"^(?=.*[A-Z])[A-Z0-9_ ]{1,16}$")
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]*(Dataset|Sequence|Element|Value|Type|Error|UID)$")
_SAFE_WORDS = frozenset(
    {"NoneType", "int", "float", "str", "bytes", "list", "tuple", "dict", "PersonName", "DSfloat"}
)


def _keep(token: str) -> bool:
    return bool(
        token in keyword_dict
        or token in _SAFE_WORDS
        or _TAG.match(token)
        or _UID.match(token)
        or _CODE_STRING.match(token)
        or _TYPE_NAME.match(token)
    )


def phi_values(datasets: Iterable[Dataset]) -> set[str]:
    """The non-empty values of :data:`PHI_KEYWORDS` in ``datasets`` (and their name parts)."""
    values: set[str] = set()
    for ds in datasets:
        for keyword in PHI_KEYWORDS:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            items = value if isinstance(value, list | tuple) else [value]
            for item in items:
                text = str(item).strip()
                if text:
                    values.add(text)
                    values.update(p for p in re.split(r"[\^= ]+", text) if len(p) > 2)
    return values


def safe_message(message: str, phi: Iterable[str] = ()) -> str:
    """``message`` with quoted values, long digit runs and the ``phi`` values replaced.

    Parameters
    ----------
    message
        An exception's message.
    phi
        Values known to be patient data (e.g. from :func:`phi_values`); removed wherever they
        occur, longest first.
    """
    for value in sorted({v for v in phi if v}, key=len, reverse=True):
        message = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", REDACTED, message)

    def quoted(match: re.Match[str]) -> str:
        token = match.group(1) if match.group(1) is not None else match.group(2)
        return match.group(0) if _keep(token) else f"'{REDACTED}'"

    message = _QUOTED.sub(quoted, message)
    return _DIGITS.sub(REDACTED, message)


def describe(exc: BaseException, phi: Iterable[str] = ()) -> str:
    """``"ExceptionType: message"`` made safe with :func:`safe_message`."""
    return f"{type(exc).__name__}: {safe_message(str(exc), phi)}"
