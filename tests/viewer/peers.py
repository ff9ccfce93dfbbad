"""The peers of the viewer tests: Orthanc with its DICOMweb plugin, OHIF's build, Chromium.

* Orthanc (Debian ``orthanc``) loads only the DICOMweb plugin (Debian ``orthanc-dicomweb``)
  from a config of our own, HTTP on loopback.
* OHIF: the ``dist/`` folder of the npm package ``@ohif/app`` (:data:`OHIF_VERSION`), which
  ``make ohif`` unpacks into ``.cache/ohif/<version>/dist`` (ignored by git);
  ``DICOM_NODE_OHIF_DIST`` points elsewhere.
* Chromium (Debian ``chromium``), driven by Playwright for Python with the system browser:
  Playwright's own browser download is never used.

Each ``require_*`` skips the test when its peer is missing, or fails it under ``make test``
(``DICOM_NODE_REQUIRE_PEERS=1``), which installs them all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, REQUIRE_PEERS, require_tool
from tests.orthanc import OrthancProcess

#: The OHIF release the tests run (``npm pack @ohif/app@OHIF_VERSION``); the Makefile agrees.
OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(
    os.environ.get("DICOM_NODE_OHIF_DIST", REPO / ".cache" / "ohif" / OHIF_VERSION / "dist")
)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHROMIUM = "chromium"

#: Chromium flags for this sandbox: headless, no GPU, no network beyond loopback.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _missing(message: str) -> None:
    if REQUIRE_PEERS:
        pytest.fail(message + "; `make test-viewer` installs it")
    pytest.skip(message)


def require_ohif() -> Path:
    """OHIF's ``dist/`` folder (with ``index.html``)."""
    if not (OHIF_DIST / "index.html").is_file():
        _missing(f"OHIF {OHIF_VERSION} not found at {OHIF_DIST} (run `make ohif`)")
    return OHIF_DIST


def require_dicomweb_plugin() -> Path:
    """Orthanc's DICOMweb plugin library."""
    if not DICOMWEB_PLUGIN.is_file():
        _missing(f"{DICOMWEB_PLUGIN} not found (Debian package orthanc-dicomweb)")
    return DICOMWEB_PLUGIN


def require_chromium() -> str:
    """Path of Debian's Chromium, after checking Playwright for Python is importable."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright (Python) is not installed: pip install -e '.[dev]'")
    return require_tool(CHROMIUM)


class DicomWebOrthanc(OrthancProcess):
    """Orthanc with only the DICOMweb plugin, on loopback; instances are uploaded over REST."""

    WHAT = "Orthanc with its DICOMweb plugin"

    def __init__(self, folder: Path) -> None:
        super().__init__(
            folder,
            {
                "Name": "dicom-node-viewer-tests",
                "Plugins": [str(require_dicomweb_plugin())],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            },
        )

    def ready(self) -> bool:
        return "dicom-web" in self.get("/plugins")

    def upload(self, file: Path) -> str:
        """POST a Part 10 file to ``/instances``; returns Orthanc's instance id."""
        return str(self.post("/instances", file.read_bytes())["ID"])


def new_user_data_dir() -> str:
    """A fresh, empty Chromium profile folder (removed with the system's temp files)."""
    return tempfile.mkdtemp(prefix="dicom-node-chromium-")
