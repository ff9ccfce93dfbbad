"""The container image, run: DCMTK on the host talks to the node inside it (``make
test-container``).

The image (``make container``) is named by ``DICOM_NODE_CONTAINER_IMAGE`` and run with
``DICOM_NODE_PODMAN`` (default ``podman``; ``DICOM_NODE_PODMAN_RUN``: flags for ``run``). The
node runs with a changed AE title, its storage on a named volume and a route to a DCMTK
storescp on the host (``host.containers.internal``): a C-ECHO and a C-STORE of a real
radiograph from the host, the SEG + SR back at the host, the image's own health check
passing, then a stop and a start that keep what was on the volume.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from tests.conftest import (
    PEER_ENV,
    REPO,
    StoreSCP,
    free_port,
    require_shared_data,
    require_tool,
    storescu,
    wait_for,
)
from tests.factories import jsrt_dx, write_files
from tests.test_end_to_end import results

pytestmark = [pytest.mark.container, pytest.mark.peers]

IMAGE = os.environ.get("DICOM_NODE_CONTAINER_IMAGE", "")
PODMAN = shlex.split(os.environ.get("DICOM_NODE_PODMAN", "podman"))
#: Flags for ``podman run`` only (the Makefile's ulimits).
RUN_FLAGS = shlex.split(os.environ.get("DICOM_NODE_PODMAN_RUN", ""))
AE_TITLE = "CONTAINERNODE"  # not the image's default: the health check must read the config
CONFIG = "/etc/dicom-node/node.yaml"


def podman(
    *args: str, check: bool = True, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [*PODMAN, *args[:1], *(RUN_FLAGS if args[0] == "run" else []), *args[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return proc


@pytest.fixture
def node_config(tmp_path: Path, storescp: StoreSCP) -> Path:
    """The repository's config, with another AE title and the host's storescp as the PACS."""
    doc = yaml.safe_load((REPO / "config" / "node.yaml").read_text())
    doc["ae_title"] = AE_TITLE
    doc["destinations"] = {
        "pacs": {"ae_title": "PACS", "host": "host.containers.internal", "port": storescp.port}
    }
    doc["log_format"] = "json"
    path = tmp_path / "config" / "node.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.parent.chmod(0o755)
    path.chmod(0o644)
    return path


@pytest.fixture
def container(node_config: Path) -> Iterator[tuple[str, int]]:
    """The node's container (name, host port of its DICOM port); removed with its volume."""
    if not IMAGE:
        pytest.skip("DICOM_NODE_CONTAINER_IMAGE is not set: `make test-container` builds it")
    require_tool(PODMAN[0])
    name = f"dicom-node-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    podman(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:11112",
        "-v", f"{name}:/var/lib/dicom-node",
        "-v", f"{node_config}:{CONFIG}:ro",
        IMAGE,
    )  # fmt: skip
    try:
        yield name, port
    finally:
        logs = podman("logs", "--tail", "40", name, check=False)
        print(logs.stdout[-4000:], logs.stderr[-4000:])
        podman("rm", "-f", "-v", "-t", "5", name, check=False)  # -v: its anonymous volumes
        podman("volume", "rm", "-f", name, check=False)


def healthy(name: str, timeout_s: float = 180) -> str:
    """Wait until the image's HEALTHCHECK passes; return what it said."""

    def check() -> str | None:
        state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
        assert state == "running", f"{name} is {state}"
        proc = podman("healthcheck", "run", name, check=False)
        if proc.returncode != 0:
            return None
        said = podman("exec", name, "dicom-node", "health", "--config", CONFIG, check=False)
        return said.stdout.strip() if said.returncode == 0 else None

    return str(wait_for(check, timeout_s, f"{name} healthy"))


def node_status(name: str) -> dict[str, object]:
    proc = podman("exec", name, "dicom-node", "status", "--config", CONFIG, "--json")
    status = json.loads(proc.stdout)
    assert isinstance(status, dict)
    return status


def test_container_round_trip_and_restart(
    tmp_path: Path, storescp: StoreSCP, container: tuple[str, int]
) -> None:
    require_shared_data()
    name, port = container
    started = time.monotonic()
    said = healthy(name)
    assert said.startswith(f"healthy: C-ECHO {AE_TITLE}@127.0.0.1:11112"), said
    ready_s = time.monotonic() - started

    # not root, and the CPU build of torch
    assert podman("exec", name, "id", "-u").stdout.strip() != "0"
    cuda = podman("exec", name, "python", "-c", "import torch; print(torch.version.cuda)")
    assert cuda.stdout.strip() == "None", cuda.stdout

    echoscu = require_tool("echoscu")
    echo = subprocess.run(
        [echoscu, "-aet", "MODALITY", "-aec", AE_TITLE, "127.0.0.1", str(port)],
        env=PEER_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr

    source = jsrt_dx("JPCLN001")
    sent = time.monotonic()
    files = write_files([source], tmp_path / "in")
    stored = storescu(port, files, ae_title=AE_TITLE)
    assert stored.returncode == 0, stored.stderr
    out = results(storescp, n=2, timeout_s=180)
    round_trip_s = time.monotonic() - sent
    assert set(out) == {"SEG", "SR"}, out
    seg = dcmread(out["SEG"])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID

    before = node_status(name)
    assert before["instances"] == 1, before
    podman("stop", "-t", "30", name)
    podman("start", name)
    healthy(name)
    after = node_status(name)
    assert after["instances"] == 1, "the volume kept the index across the restart"
    assert after["cases"] == before["cases"] and after["sends"] == before["sends"], (before, after)
    assert len(storescp.files()) == 2, "nothing was sent twice after the restart"
    print(f"healthy after {ready_s:.1f} s; C-STORE to SEG+SR at the host in {round_trip_s:.1f} s")
