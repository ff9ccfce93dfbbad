"""``storage_dir`` on a volume with less free space than ``limits.min_free_disk_bytes``: the
node says so at start and in ``status``, and refuses every C-STORE with 0xA700 (never an
abort, never a traceback), whatever the size of the data set (issue 18)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, NodeProcess, StoreSCP, storescu
from tests.factories import ct_series, write_files

pytestmark = pytest.mark.peers


def test_a_node_below_its_free_space_mark_warns_refuses_and_reports(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    # More than the volume has free: the real free space is below the mark and its floor.
    mark = 2 * shutil.disk_usage(tmp_path).free + 1024**3
    node = node_factory(random_package, storescp.port, limits={"min_free_disk_bytes": mark}).start()
    small = write_files(ct_series(n_slices=1, rows=16, cols=16), tmp_path / "small")
    # 1024 x 1024 x 2 bytes: many PDUs of storescu's 16 KiB, dropped as they arrive.
    large = write_files(ct_series(n_slices=1, rows=1024, cols=1024), tmp_path / "large")
    for files in (small, large):
        done = storescu(node.port, files, "-d")
        out = done.stdout + done.stderr
        assert "DIMSE Status                  : 0xa700: Refused: Out of resources" in out, out
        assert "node storage below its free-space mark" in out, out  # the Error Comment
        assert "Abort" not in out and "Releasing Association" in out, out
    log = node.log.read_text()
    start = log.split("node.started")[0]
    assert "storage.below_free_space_mark" in start
    assert str(node.storage) in start and f"min_free_disk_bytes={mark}" in start
    assert "Traceback" not in log and "PeerLimitExceeded" not in log
    assert "limit_exceeded" not in log
    assert not list((node.storage / "spool").rglob("*.dcm"))

    status = node.status()["disk"]
    assert status["storage_dir"] == str(node.storage)
    assert status["min_free_disk_bytes"] == mark and status["below_mark"] is True
    assert 0 < status["free_bytes"] < mark
    text = subprocess.run(
        [sys.executable, "-m", "dicom_node", "status", "--config", str(node.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    disk_line = next(line for line in text.splitlines() if line.startswith("disk: "))
    assert f"free on {node.storage}" in disk_line and "limits.min_free_disk_bytes" in disk_line
    assert "BELOW THE MARK" in disk_line
    node.stop()
