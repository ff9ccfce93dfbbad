"""Delivery in-process against DCMTK storescp: backoff, catching up when a peer answers, and
one thread per destination (a silent or slow destination holds only its own)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.audit import AuditLog
from dicom_node.config import Settings, parse_settings
from dicom_node.pipeline.delivery import Delivery
from dicom_node.store.database import Database
from tests.conftest import StoreSCP, free_port, wait_for
from tests.factories import ct_series, write_files

pytestmark = pytest.mark.peers

#: A backoff no test waits out: delivery within seconds proves the catch-up.
LONG_BACKOFF_S = 600.0


def make(tmp_path: Path, port: int, **send: Any) -> tuple[Settings, Database, Delivery]:
    settings = parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}},
            "send": {
                "initial_backoff_s": LONG_BACKOFF_S,
                "max_backoff_s": LONG_BACKOFF_S,
                "timeout_s": 5,
                **send,
            },
        }
    )
    db = Database(settings.database_path)
    return settings, db, Delivery(settings, db, AuditLog(settings.audit_path))


def queue(db: Database, paths: list[Path], series_uid: str = "1.2.3") -> None:
    """A finished job whose outputs are ``paths`` (any DICOM files), for destination pacs."""
    db.record_instance(
        sop_instance_uid=f"{series_uid}.1",
        sop_class_uid="1.2",
        study_uid="1.2",
        series_uid=series_uid,
        patient_id="P",
        attributes={"Modality": "CT"},
        path=paths[0],
        association_id="a",
        late_policy="reprocess",
    )
    db.queue_series(series_uid, ["r"])
    job = db.claim_job(60)
    assert job is not None
    outputs = [("seg", p, f"{series_uid}.9.{i}") for i, p in enumerate(paths)]
    db.finish_job(job.id, outputs, {"pacs": ("seg",)})


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return write_files(ct_series(n_slices=3), tmp_path / "out")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", free_port())
    yield scp
    scp.stop()


def run_until_delivered(delivery: Delivery, scp: StoreSCP, n: int, timeout_s: float) -> float:
    """Tick as the scheduler does until ``n`` files reached ``scp``; return the seconds."""
    start = time.monotonic()

    def delivered() -> bool:
        delivery.tick()
        return len(scp.files()) >= n

    wait_for(delivered, timeout_s, f"{n} files at the destination")
    return time.monotonic() - start


def test_echo_makes_waiting_sends_due_when_the_peer_is_back(
    tmp_path: Path, files: list[Path], pacs: StoreSCP
) -> None:
    _, db, delivery = make(tmp_path, pacs.port, echo_interval_s=0.5)
    queue(db, files)
    assert delivery.tick() == 0  # peer down: every send waits LONG_BACKOFF_S
    assert db.status()["sends"] == {"pending": 3}
    assert db.due_sends() == []
    pacs.start()
    took = run_until_delivered(delivery, pacs, 3, timeout_s=10)
    assert took < 5, f"catching up took {took:.1f} s"
    wait_for(lambda: db.status()["sends"] == {"done": 3}, 5, "sends marked done")


def test_a_successful_send_makes_the_others_due(
    tmp_path: Path, files: list[Path], pacs: StoreSCP
) -> None:
    _, db, delivery = make(tmp_path, pacs.port, echo_interval_s=0)  # no echo: only sends
    queue(db, files[:2], "1.2.3")
    delivery.tick()
    assert db.waiting_destinations()  # the first two wait
    pacs.start()
    queue(db, files[2:], "1.2.4")  # a new result, due at once: its success says "back"
    took = run_until_delivered(delivery, pacs, 3, timeout_s=10)
    assert took < 3
    assert db.status()["sends"] == {"done": 3}
