"""A node process and DCMTK storescp destinations that go away and come back; per-destination
outputs (SEG + SR to one, the overlay fallback to another).

Each test sets a retry backoff no test waits out: results that arrive within seconds of the
destination's return prove that delivery caught up instead of sitting out the backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.app.cli import main
from tests.conftest import NodeProcess, StoreSCP, free_port, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.test_end_to_end import results

pytestmark = pytest.mark.peers

LONG_BACKOFF = {"max_attempts": 50, "initial_backoff_s": 600, "max_backoff_s": 600, "timeout_s": 5}


def failed_once(node: NodeProcess) -> dict[str, Any]:
    """Wait until the node has tried the (down) destination and recorded why it failed."""

    def tried() -> dict[str, Any] | None:
        dest = node.status()["destinations"].get("pacs", {})
        return dest if "last_error" in dest else None

    return dict(wait_for(tried, 60, "a failed send attempt"))


def test_results_flow_within_seconds_when_the_destination_comes_back(
    tmp_path: Path, node_factory: Callable[..., NodeProcess], random_package: Path
) -> None:
    port = free_port()
    send = {**LONG_BACKOFF, "echo_interval_s": 1}
    node = node_factory(random_package, port, send=send).start()
    assert storescu(node.port, write_files(ct_series(n_slices=4), tmp_path / "ct")).returncode == 0
    dest = failed_once(node)
    assert dest["next_attempt_in_s"] > 500  # the backoff it would otherwise wait out
    scp = StoreSCP(tmp_path / "late-pacs", port).start()
    back_at = time.monotonic()
    try:
        out = results(scp, timeout_s=30)
        took = time.monotonic() - back_at
        assert set(out) == {"SEG", "SR"}
        assert took < 8, f"results arrived {took:.1f} s after the destination came back"
        wait_for(lambda: node.status()["sends"] == {"done": 2}, 10, "sends marked done")
    finally:
        scp.stop()
    node.stop()
    assert "destination.answering" in node.log.read_text()
    print(f"destination back -> results delivered: {took:.2f} s")


def test_retry_now_pushes_waiting_sends_and_status_says_when_next(
    tmp_path: Path,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    send = {**LONG_BACKOFF, "echo_interval_s": 0}  # no probing: only the operator helps
    node = node_factory(random_package, port, send=send).start()
    assert storescu(node.port, write_files(ct_series(n_slices=3), tmp_path / "ct")).returncode == 0
    failed_once(node)
    config = str(node.config)
    capsys.readouterr()
    assert main(["status", "--config", config]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("destination"))
    assert line.startswith(f"destination pacs (PACS@127.0.0.1:{port}): pending 2; next try ")
    assert "(in 5" in line or "(in 6" in line  # seconds from now, ~600
    assert "last error: no association (peer down?)" in line

    scp = StoreSCP(tmp_path / "late-pacs", port).start()
    try:
        assert main(["retry", "--now", "--config", config]) == 0
        assert "0 failed send(s) queued again, 2 waiting send(s) made due now" in (
            capsys.readouterr().out
        )
        pushed_at = time.monotonic()
        assert set(results(scp, timeout_s=30)) == {"SEG", "SR"}
        assert time.monotonic() - pushed_at < 8
        wait_for(lambda: node.status()["sends"] == {"done": 2}, 10, "sends marked done")
    finally:
        scp.stop()
    assert main(["status", "--config", config]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("destination"))
    assert line == f"destination pacs (PACS@127.0.0.1:{port}): done 2"
    assert main(["retry", "--destination", "nowhere", "--config", config]) == 2


def test_each_destination_gets_only_the_outputs_it_asked_for(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    old_pacs = StoreSCP(tmp_path / "old-pacs", free_port(), ae_title="OLDPACS").start()
    try:
        node = node_factory(
            random_package,
            storescp.port,
            destinations={
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
                "old": {
                    "ae_title": "OLDPACS",
                    "host": "127.0.0.1",
                    "port": old_pacs.port,
                    "outputs": ["overlay"],
                },
            },
            routes=[
                {
                    "name": "chest",
                    "match": {"Modality": ["CT"]},
                    "model": str(random_package),
                    "send_to": ["pacs", "old"],
                }
            ],
        ).start()
        ct = ct_series(n_slices=3)
        assert storescu(node.port, write_files(ct, tmp_path / "ct")).returncode == 0
        assert set(results(storescp)) == {"SEG", "SR"}
        wait_for(lambda: len(old_pacs.files()) >= 3, 60, "three overlays at the old PACS")
        wait_for(lambda: node.status()["sends"] == {"done": 5}, 10, "sends marked done")
        overlays = [dcmread(p) for p in old_pacs.files()]
        assert {ds.SOPClassUID for ds in overlays} == {"1.2.840.10008.5.1.4.1.1.7"}
        assert {ds.BurnedInAnnotation for ds in overlays} == {"YES"}
        assert {ds.StudyInstanceUID for ds in overlays} == {ct[0].StudyInstanceUID}
        sources = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in overlays}
        assert sources == {ds.SOPInstanceUID for ds in ct}
        assert len(storescp.files()) == 2  # no overlay for the PACS that reads SEG
    finally:
        old_pacs.stop()
