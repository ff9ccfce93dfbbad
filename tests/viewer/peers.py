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

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, REQUIRE_PEERS, free_port, require_tool, wait_for, wait_port

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


class DicomWebOrthanc:
    """Orthanc with only the DICOMweb plugin, on loopback; instances are uploaded over REST."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_file = folder / "orthanc.log"
        self.config = folder / "orthanc.json"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            json.dumps(
                {
                    "Name": "dicom-node-viewer-tests",
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "index"),
                    "Plugins": [str(require_dicomweb_plugin())],
                    "HttpPort": self.http_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomPort": self.dicom_port,
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                },
                indent=2,
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> DicomWebOrthanc:
        exe = require_tool("Orthanc")
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, str(self.config)], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return "dicom-web" in self.get("/plugins")
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(up, 30, "Orthanc with its DICOMweb plugin")
        wait_port(self.dicom_port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def upload(self, file: Path) -> str:
        """POST a Part 10 file to ``/instances``; returns Orthanc's instance id."""
        answer = json.loads(self._request("POST", "/instances", file.read_bytes()))
        return str(answer["ID"])


def new_user_data_dir() -> str:
    """A fresh, empty Chromium profile folder (removed with the system's temp files)."""
    return tempfile.mkdtemp(prefix="dicom-node-chromium-")
