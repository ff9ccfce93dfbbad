"""Shared fixtures: free ports, real DICOM peers (DCMTK, dicom3tools, Orthanc), a node process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.factories import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
REQUIRE_PEERS = os.environ.get("DICOM_NODE_REQUIRE_PEERS") == "1"
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def require_tool(name: str) -> str:
    """Path of a peer program; skip (or fail under ``make test``) when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        message = f"{name} is not installed (Debian packages dcmtk, dicom3tools, orthanc)"
        if REQUIRE_PEERS:
            pytest.fail(message + "; `make test` installs them")
        pytest.skip(message)
    return path


#: How to point the tests at the shared data, said by every skip for its absence.
SHARED_DATA_HINT = (
    "set DICOM_NODE_SHARED_DATA to the folder that holds jsrt/, busi/, la-mri/ and reference/ "
    "(default: ../shared/data beside the clone)"
)


def require_shared_data(*parts: str) -> Path:
    """``SHARED_DATA / parts`` (default ``jsrt/images``): the public data sets some tests use.

    When it is missing the test is skipped with the path and :data:`SHARED_DATA_HINT` as the
    reason; with ``DICOM_NODE_REQUIRE_PEERS=1`` (``make test``, CI) it fails instead, so that
    a run without the data cannot pass as complete.
    """
    path = SHARED_DATA.joinpath(*(parts or ("jsrt", "images")))
    if not path.exists():
        message = f"shared data not found: {path}; {SHARED_DATA_HINT}"
        if REQUIRE_PEERS:
            pytest.fail(f"{message} (DICOM_NODE_REQUIRE_PEERS=1 requires it)")
        pytest.skip(message)
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.shared_data("jsrt", "images")``: :func:`require_shared_data` first;
    ``@pytest.mark.needs_tool("dciodvfy")``: :func:`require_tool` first."""
    for mark in item.iter_markers("shared_data"):
        require_shared_data(*mark.args)
    for mark in item.iter_markers("needs_tool"):
        require_tool(*mark.args)


def pytest_report_header(config: pytest.Config) -> str:
    """Say at the start of every run where the shared data is, or that it is missing."""
    if (SHARED_DATA / "jsrt" / "images").is_dir():
        return f"shared data: {SHARED_DATA}"
    then = "fail" if REQUIRE_PEERS else "skip"
    return f"shared data: NOT FOUND at {SHARED_DATA}; tests that need it {then}; {SHARED_DATA_HINT}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def wait_port(port: int, timeout_s: float = 20) -> None:
    def is_open() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(is_open, timeout_s, f"port {port} to listen")


@pytest.fixture(scope="session")
def random_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised chest model package (routing never depends on weights)."""
    from dicom_node.testing.random_package import make_random_package

    folder = tmp_path_factory.mktemp("model") / "random-cxr"
    make_random_package(folder)
    return folder


class StoreSCP:
    """DCMTK storescp receiving into a folder: the PACS of the tests."""

    def __init__(self, folder: Path, port: int, ae_title: str = "PACS") -> None:
        self.folder = folder
        self.port = port
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        exe = require_tool("storescp")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "-aet", self.ae_title, "-od", str(self.folder), "-uf", str(self.port)],
            env=PEER_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def files(self) -> list[Path]:
        return sorted(
            p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", free_port()).start()
    yield scp
    scp.stop()


def storescu(
    port: int,
    files: list[Path],
    *extra: str,
    ae_title: str = "DICOMNODE",
    calling: str = "MODALITY",
) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", ae_title, *extra, "127.0.0.1", str(port), *map(str, files)],
        env=PEER_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def storescu_at_once(port: int, batches: list[list[Path]]) -> list[int]:
    """Send each batch by its own ``storescu`` process (calling AE ``MODALITY<i>``), all at
    once, so the node serves several associations together; their exit codes."""
    exe = require_tool("storescu")
    procs = [
        subprocess.Popen(
            [exe, "-aet", f"MODALITY{i}", "-aec", "DICOMNODE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env=PEER_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, files in enumerate(batches)
    ]
    return [p.wait(timeout=120) for p in procs]


class NodeProcess:
    """``dicom-node serve`` as a real process (so tests can kill -9 it and read its logs).

    ``role`` is its ``--role``; the processes of a scaled-out node share ``storage_dir`` and
    ``database`` (a PostgreSQL URL) in their settings, each with its own config and log here.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], role: str = "all") -> None:
        self.folder = folder
        self.settings = settings
        self.role = role
        self.module = "dicom_node"  # tests.slow_node: the same node, with slow model runs
        self.env: dict[str, str] = {}  # added to this process's environment
        self._offset = 0  # where this run's lines start in the log
        self.config = folder / "node.yaml"
        self.log = folder / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(settings))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    @property
    def port(self) -> int:
        return int(self.settings["port"])

    @property
    def storage(self) -> Path:
        return Path(self.settings["storage_dir"])

    def start(self) -> NodeProcess:
        """Start it; return once it listens (a role without a DICOM port: once it started)."""
        return self.spawn().ready()

    def spawn(self) -> NodeProcess:
        """Start the process and return at once; :meth:`ready` waits for it (start several
        processes at once: spawn each, then wait for each)."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        command = [sys.executable, "-m", self.module, "serve", "--config", str(self.config)]
        if self.role != "all":
            command += ["--role", self.role]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        return self

    def ready(self, timeout_s: float = 60) -> NodeProcess:
        """Wait until the spawned process listens (or, without a DICOM port, has started)."""
        assert self.proc is not None
        listens = self.role in ("all", "receiver")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"node exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if listens:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return self
            elif f"({self.role}) running as" in self.log.read_bytes()[self._offset :].decode(
                errors="replace"
            ):
                return self
            time.sleep(0.1)
        pytest.fail(
            f"node ({self.role}) did not start within {timeout_s} s:\n{self.log.read_text()}"
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def status(self) -> dict[str, Any]:
        import json

        out = subprocess.run(
            [sys.executable, "-m", "dicom_node", "status", "--json", "--config", str(self.config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return dict(json.loads(out.stdout))


def node_settings(tmp_path: Path, model: Path, pacs_port: int, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "ae_title": "DICOMNODE",
        "port": free_port(),
        "storage_dir": str(tmp_path / "var"),
        "allowed_callers": [],
        "stable_after_s": 30,
        "release_grace_s": 0.5,
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        "routes": [
            {
                "name": "chest",
                "match": {"Modality": ["CR", "DX", "CT"]},
                "model": str(model),
                "send_to": ["pacs"],
            }
        ],
        "send": {
            "max_attempts": 50,
            "initial_backoff_s": 0.3,
            "max_backoff_s": 1.0,
            "timeout_s": 10,
        },
        "device": "cpu",
        "log_level": "debug",
    }
    settings.update(overrides)
    return settings


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    nodes: list[NodeProcess] = []

    def make(model: Path, pacs_port: int, role: str = "all", **overrides: Any) -> NodeProcess:
        """A node process; pass ``storage_dir`` and ``database`` to share them between roles."""
        node = NodeProcess(
            tmp_path / f"node{len(nodes)}",
            node_settings(tmp_path / f"node{len(nodes)}", model, pacs_port, **overrides),
            role,
        )
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


# PostgreSQL fixtures (postgres_server, postgres_url, database_url) for every test file; imported
# last because tests.postgres uses the helpers above.
from tests.postgres import database_url, postgres_server, postgres_url  # noqa: E402, F401


@pytest.fixture(scope="session")
def playwright_session() -> Iterator[Any]:
    """One Playwright (sync API) for the whole session: the viewer's and the console's browser
    tests each start their Chromium from it (a second ``sync_playwright()`` while one runs
    fails: "using Playwright Sync API inside the asyncio loop")."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright
