"""Without the shared data a test says why it skips, and under ``DICOM_NODE_REQUIRE_PEERS=1``
(``make test``, CI) it fails instead (issue 18: 67 tests skipped silently).

Two tests that need ``DICOM_NODE_SHARED_DATA`` (one through the ``shared_data`` marker, one
through :func:`tests.conftest.require_shared_data`) run in a child pytest with the variable
pointed at an empty folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

NEEDS_SHARED_DATA = [
    "tests/imaging/test_series.py::test_jsrt_radiograph_loads_in_normal_polarity",  # marker
    "tests/outputs/test_seg.py::test_reader_rejects_fractional",  # require_shared_data(...)
]


def child_pytest(shared: Path, *, require_peers: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOM_NODE_SHARED_DATA": str(shared), "PYTHONPATH": str(REPO)}
    env.pop("DICOM_NODE_REQUIRE_PEERS", None)
    if require_peers:
        env["DICOM_NODE_REQUIRE_PEERS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rsf", "-p", "no:cacheprovider", *NEEDS_SHARED_DATA],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )


def test_missing_shared_data_skips_with_the_path_and_the_variable(tmp_path: Path) -> None:
    run = child_pytest(tmp_path, require_peers=False)
    assert run.returncode == 0, run.stdout
    assert "2 skipped" in run.stdout
    assert f"shared data: NOT FOUND at {tmp_path}; tests that need it skip" in run.stdout
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 2, run.stdout
    assert f"shared data not found: {tmp_path / 'jsrt' / 'images'}" in skips[0] + skips[1]
    assert f"{tmp_path / 'reference' / 'highdicom'}" in skips[0] + skips[1]
    assert all("set DICOM_NODE_SHARED_DATA" in line for line in skips)


def test_missing_shared_data_fails_under_require_peers(tmp_path: Path) -> None:
    run = child_pytest(tmp_path, require_peers=True)
    assert run.returncode != 0
    assert "skipped" not in run.stdout.splitlines()[-1]
    assert "tests that need it fail" in run.stdout
    assert run.stdout.count("DICOM_NODE_REQUIRE_PEERS=1 requires it") >= 2
