"""An Orthanc process (Debian ``orthanc``) for the tests: a config of its own, REST on loopback.

:class:`OrthancProcess` writes ``orthanc.json`` from the settings a test gives (HTTP and DICOM
ports on loopback are filled in), starts Orthanc, waits until :meth:`OrthancProcess.ready`
says so, and stops it. The Debian package's ``/etc/orthanc/orthanc.json`` loads every plugin in
``/usr/share/orthanc/plugins``; a config of our own loads only those its ``Plugins`` names.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, require_tool, wait_for, wait_port


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
