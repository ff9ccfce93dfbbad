"""Check written DICOM objects with an independent validator: dicom3tools' ``dciodvfy``.

``dciodvfy`` (David Clunie's dicom3tools, Debian package ``dicom3tools``) checks an object
against the IOD of its SOP Class: modules, attribute types and conditions, value
representations, defined terms, SR relationship constraints. Its lines that start with
``Error`` are what the tests of :mod:`dicom_node.outputs` require to be absent.

The 2022 release predates the Label Map Segmentation IOD (SOP Class
1.2.840.10008.5.1.4.1.1.66.7, Segmentation Type LABELMAP): for such a file it reports
"Information Object Not found" and, for the background segment 0 that IOD allows, a Segment
Number (0062,0004) not increasing from one. Those lines are dropped for files of that SOP
Class, as they say nothing about the object. dicom-node writes BINARY segmentations.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.common.errors import DicomNodeError

DCIODVFY = "dciodvfy"
#: Seconds a single run may take; a large multi-frame SEG takes a few seconds.
DCIODVFY_TIMEOUT_S = 300.0

LABELMAP_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"
#: What dciodvfy 2022 says about the (to it unknown) Label Map Segmentation IOD.
_LABELMAP_UNKNOWN = (
    "Information Object Not found",
    "SegmentNumber not monotonically increasing",
    "LABELMAP",
)


class ValidatorNotFoundError(DicomNodeError):
    """The external validator is not installed."""


def dciodvfy_path() -> Path | None:
    """Path of ``dciodvfy`` on ``PATH``, or None when dicom3tools is not installed."""
    found = shutil.which(DCIODVFY)
    return None if found is None else Path(found)


def dciodvfy_errors(path: Path) -> list[str]:
    """Run ``dciodvfy`` on the DICOM file ``path`` and return its ``Error`` lines.

    Parameters
    ----------
    path
        A DICOM file with File Meta Information (as written by
        ``Dataset.save_as(..., enforce_file_format=True)``).

    Returns
    -------
    list[str]
        Every output line that starts with ``Error``, in order; for a Label Map
        Segmentation, less those about its IOD that this release of dciodvfy does not know.
        Empty when valid.

    Raises
    ------
    ValidatorNotFoundError
        When ``dciodvfy`` is not on ``PATH``; the message says how to install it.
    FileNotFoundError
        When ``path`` is not a file.
    """
    executable = dciodvfy_path()
    if executable is None:
        raise ValidatorNotFoundError(
            "dciodvfy not found on PATH; install dicom3tools (Debian/Ubuntu: "
            "apt-get install dicom3tools) to validate DICOM objects"
        )
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file to validate")
    completed = subprocess.run(
        [str(executable), str(file)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=DCIODVFY_TIMEOUT_S,
        check=False,
    )
    errors = [
        line.strip()
        for line in (completed.stdout + completed.stderr).splitlines()
        if line.lstrip().startswith("Error")
    ]
    if errors and _is_labelmap(file):
        errors = [e for e in errors if not any(text in e for text in _LABELMAP_UNKNOWN)]
    return errors


def _is_labelmap(file: Path) -> bool:
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return str(ds.get("SOPClassUID", "")) == LABELMAP_SOP_CLASS_UID
