"""Bad input is normal input: each is refused, and the node keeps serving afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.common.status import StoreStatus
from tests.conftest import PEER_ENV, NodeProcess, StoreSCP, require_tool, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.test_end_to_end import results

pytestmark = pytest.mark.peers


def c_store(port: int, ds, calling: str = "MODALITY") -> int:  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status)
    finally:
        assoc.release()


def echo(port: int, calling: str = "MODALITY") -> int:
    exe = require_tool("echoscu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        env=PEER_ENV,
        capture_output=True,
        timeout=30,
    ).returncode


def test_bad_inputs_are_refused_and_node_keeps_serving(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    node = node_factory(random_package, storescp.port, allowed_callers=["MODALITY"]).start()

    # 1. Garbage bytes on the port, and a connection that sends half a PDU and hangs up.
    for payload in (os.urandom(4096), b"\x01\x00\x00\x00\xff\xff", b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
            s.sendall(payload)
    assert echo(node.port) == 0

    # 2. A path-like UID in the dataset never becomes a path.
    evil = ct_series(n_slices=1)[0]
    evil.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    assert c_store(node.port, evil) == StoreStatus.CANNOT_UNDERSTAND
    evil2 = ct_series(n_slices=1)[0]
    evil2.StudyInstanceUID = "../../etc"
    assert c_store(node.port, evil2) == StoreStatus.CANNOT_UNDERSTAND
    assert not list(tmp_path.rglob("evil*"))
    assert not list(node.storage.rglob("*etc*"))

    # 3. A truncated dataset (pixel data cut short) is refused, not stored.
    truncated = ct_series(n_slices=1)[0]
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    assert c_store(node.port, truncated) == StoreStatus.CANNOT_UNDERSTAND

    # 4. An unknown caller is rejected at association time, and audited.
    assert echo(node.port, calling="INTRUDER") != 0
    audit = [json.loads(x) for x in (node.storage / "audit.jsonl").read_text().splitlines()]
    alerts = [e for e in audit if e["event_id"]["meaning"] == "Security Alert"]
    assert alerts and alerts[-1]["calling_ae"] == "INTRUDER"

    # Nothing refused was indexed; C-ECHO and a valid study still work.
    assert node.status()["instances"] == 0
    assert echo(node.port) == 0
    files = write_files(ct_series(n_slices=3), tmp_path / "good")
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.status()["instances"] == 3, 10, "3 indexed instances")
    assert set(results(storescp)) == {"SEG", "SR"}
