"""The whole node on PostgreSQL: DCMTK storescu -> ``dicom-node serve`` (``database:`` a
PostgreSQL URL) -> SEG + SR at DCMTK storescp, with three modalities sending at once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread

from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.conftest import REPO, NodeProcess, StoreSCP, storescu_at_once, wait_for
from tests.factories import ct_series, write_files

pytestmark = pytest.mark.peers

#: The trust authentication of the test cluster ignores it; it must show nowhere.
PASSWORD = "not-to-be-printed"


def test_a_node_on_postgresql_segments_three_concurrent_studies(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
    postgres_url: str,
) -> None:
    url = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    node = node_factory(random_package, storescp.port, database=url, release_grace_s=0.3).start()
    series = [ct_series(n_slices=6, seed=i) for i in range(3)]
    batches = [write_files(s, tmp_path / f"ct{i}") for i, s in enumerate(series)]
    assert storescu_at_once(node.port, batches) == [0, 0, 0]
    wait_for(lambda: len(storescp.files()) >= 6, 120, "three SEGs and three SRs at the PACS")

    by_modality: dict[str, list[Path]] = {}
    referenced = set()
    for path in storescp.files():
        ds = dcmread(path)
        by_modality.setdefault(str(ds.Modality), []).append(path)
        if ds.Modality == "SEG":
            referenced.add(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    assert {k: len(v) for k, v in by_modality.items()} == {"SEG": 3, "SR": 3}
    assert referenced == {s[0].SeriesInstanceUID for s in series}
    for path in (by_modality["SEG"][0], by_modality["SR"][0]):
        assert dciodvfy_errors(path) == [], path

    # The state is in PostgreSQL, not in a SQLite file, and status reads it from there.
    status = node.status()
    assert status["instances"] == 18 and status["jobs"] == {"done": 3}
    wait_for(lambda: node.status()["sends"] == {"done": 6}, 30, "sends marked done")
    assert status["database"]["backend"] == "postgresql"
    assert not (node.storage / "node.sqlite3").exists()
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT count(*) FROM instances").fetchone()
    assert row == (18,)
    text = subprocess.run(
        [sys.executable, "-m", "dicom_node", "status", "--config", str(node.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "database: postgresql postgresql://postgres:***@127.0.0.1:" in text
    node.stop()
    log = node.log.read_text()
    assert "node.started" in log and "job.done" in log
    for shown in (text, log, str(status)):
        assert PASSWORD not in shown
