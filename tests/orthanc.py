"""An Orthanc process (Debian ``orthanc``) for the tests: a config of its own, REST on loopback.

:class:`OrthancProcess` writes ``orthanc.json`` from the settings a test gives (HTTP and DICOM
ports on loopback are filled in), starts Orthanc, waits until :meth:`OrthancProcess.ready`
says so, and stops it. :class:`DicomwebOrthanc` adds the DICOMweb plugin (STOW-RS, QIDO-RS),
with optional basic auth. The Debian package's ``/etc/orthanc/orthanc.json`` loads every plugin in
``/usr/share/orthanc/plugins``; a config of our own loads only those its ``Plugins`` names.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_PEERS, free_port, require_tool, wait_for, wait_port


class OrthancProcess:
    """An Orthanc process with the config ``settings`` (plus its ports and folders)."""

    #: What :meth:`start` waits for, in its error message.
    WHAT = "Orthanc's REST API"

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_file = folder / "orthanc.log"
        self.config = folder / "orthanc.json"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomPort": self.dicom_port,
            **settings,
        }
        self.config.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def ready(self) -> bool:
        """True once the REST API answers (subclasses ask for more)."""
        self.get("/system")
        return True

    def start(self) -> OrthancProcess:
        exe = require_tool("Orthanc")
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, str(self.config)], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.ready()
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(up, 30, self.WHAT)
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

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: bytes) -> Any:
        return json.loads(self.request("POST", path, body))


#: Where Debian's ``orthanc-dicomweb`` puts the plugin (the first that exists is used).
DICOMWEB_PLUGIN_PLACES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


def dicomweb_plugin() -> Path:
    """Orthanc's DICOMweb plugin library (Debian ``orthanc-dicomweb``); skip or fail without."""
    for place in DICOMWEB_PLUGIN_PLACES:
        if place.is_file():
            return place
    message = "Orthanc's DICOMweb plugin not found (Debian package orthanc-dicomweb)"
    if REQUIRE_PEERS:
        pytest.fail(message + "; `make peers` installs it")
    pytest.skip(message)


class DicomwebOrthanc(OrthancProcess):
    """Orthanc with its DICOMweb plugin as a STOW-RS server at :attr:`dicomweb_url`.

    ``users`` (name -> password) turns on HTTP basic authentication (``RegisteredUsers``);
    ``lua`` is a Lua script Orthanc runs (e.g. a ``ReceivedInstanceFilter`` that refuses some
    instances, which STOW-RS then reports in its ``FailedSOPSequence``). The tests' own REST
    calls authenticate as the first user.
    """

    WHAT = "Orthanc with its DICOMweb plugin"

    def __init__(
        self, folder: Path, users: dict[str, str] | None = None, lua: str | None = None
    ) -> None:
        settings: dict[str, Any] = {
            "Name": "dicom-node-dicomweb-tests",
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if users:
            settings["AuthenticationEnabled"] = True
            settings["RegisteredUsers"] = users
        if lua is not None:
            script = folder / "filter.lua"
            folder.mkdir(parents=True, exist_ok=True)
            script.write_text(lua)
            settings["LuaScripts"] = [str(script)]
        super().__init__(folder, settings)
        self.users = dict(users or {})

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def ready(self) -> bool:
        return "dicom-web" in self.get("/plugins")

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())

    def sop_instance_uids(self) -> dict[str, str]:
        """SOP Instance UID -> Modality of every instance Orthanc holds."""
        out = {}
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            out[str(tags["SOPInstanceUID"])] = str(tags.get("Modality", ""))
        return out
