"""Delivery in-process against DCMTK storescp: backoff, catching up when a peer answers, and
one thread per destination (a silent or slow destination holds only its own); on both
backends (``database_url``), and two deliveries on one PostgreSQL database send each result
once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.send.delivery import Delivery
from dicom_node.store.database import Database
from tests.conftest import StoreSCP, free_port, wait_for
from tests.factories import ct_series, write_files

pytestmark = pytest.mark.peers

#: A backoff no test waits out: delivery within seconds proves the catch-up.
LONG_BACKOFF_S = 600.0


def make(
    tmp_path: Path, port: int, database: str | None, **send: Any
) -> tuple[Settings, Database, Delivery]:
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
    db = Database(database or stage_settings(settings).layout.database_path)
    return (
        settings,
        db,
        Delivery(
            stage_settings(settings).delivery,
            db,
            AuditLog(stage_settings(settings).layout.audit_path),
        ),
    )


def queue(
    db: Database,
    paths: list[Path],
    series_uid: str = "1.2.3",
    destinations: tuple[str, ...] = ("pacs",),
) -> None:
    """A finished job whose outputs are ``paths`` (any DICOM files), for ``destinations``."""
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
    job = db.claim_job("w", 60)
    assert job is not None
    outputs = [("seg", p, f"{series_uid}.9.{i}") for i, p in enumerate(paths)]
    db.finish_job(job.id, "w", outputs, {d: ("seg",) for d in destinations})


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
    tmp_path: Path, files: list[Path], pacs: StoreSCP, database_url: str | None
) -> None:
    _, db, delivery = make(tmp_path, pacs.port, database_url, echo_interval_s=0.5)
    queue(db, files)
    assert delivery.tick() == 0  # peer down: every send waits LONG_BACKOFF_S
    assert db.status()["sends"] == {"pending": 3}
    assert db.due_sends() == []
    pacs.start()
    took = run_until_delivered(delivery, pacs, 3, timeout_s=10)
    assert took < 5, f"catching up took {took:.1f} s"
    wait_for(lambda: db.status()["sends"] == {"done": 3}, 5, "sends marked done")


def test_a_successful_send_makes_the_others_due(
    tmp_path: Path, files: list[Path], pacs: StoreSCP, database_url: str | None
) -> None:
    _, db, delivery = make(
        tmp_path, pacs.port, database_url, echo_interval_s=0
    )  # no echo: only sends
    queue(db, files[:2], "1.2.3")
    delivery.tick()
    assert db.waiting_destinations()  # the first two wait
    pacs.start()
    queue(db, files[2:], "1.2.4")  # a new result, due at once: its success says "back"
    took = run_until_delivered(delivery, pacs, 3, timeout_s=10)
    assert took < 3
    assert db.status()["sends"] == {"done": 3}


class HeldSCP:
    """A pynetdicom Storage SCP whose C-STORE handler holds each request until released.

    ``entered`` is set when the first C-STORE arrives: from then on this destination is
    "slow", for as long as the test keeps ``release`` unset.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stored: list[str] = []
        self.ae = AE(ae_title="SLOW")
        self.ae.supported_contexts = StoragePresentationContexts
        self.port = free_port()

    def _on_store(self, event: Any) -> int:
        self.entered.set()
        self.release.wait(60)
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def start(self) -> HeldSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


def two_destinations(tmp_path: Path, slow_port: int, fast_port: int, **slow: Any) -> Settings:
    return parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {
                "slow": {"ae_title": "SLOW", "host": "127.0.0.1", "port": slow_port, **slow},
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": fast_port},
            },
            "send": {"initial_backoff_s": LONG_BACKOFF_S, "max_backoff_s": LONG_BACKOFF_S},
        }
    )


def test_a_slow_destination_holds_only_its_own_thread(
    tmp_path: Path, files: list[Path], pacs: StoreSCP, database_url: str | None
) -> None:
    """The slow destination's C-STORE is held the whole time the other one gets its results."""
    slow = HeldSCP().start()
    pacs.start()
    settings = two_destinations(tmp_path, slow.port, pacs.port, timeout_s=60)
    db = Database(database_url or stage_settings(settings).layout.database_path)
    delivery = Delivery(
        stage_settings(settings).delivery, db, AuditLog(stage_settings(settings).layout.audit_path)
    )
    try:
        queue(db, files, destinations=("slow", "pacs"))
        delivery.start()
        assert slow.entered.wait(30), "the slow destination never got a C-STORE"

        def fast_done() -> bool:
            return {(s["destination"], s["state"]) for s in db.sends()} == {
                ("pacs", "done"),
                ("slow", "pending"),
            }

        wait_for(fast_done, 30, "the fast destination's sends done, the slow one's pending")
        assert len(pacs.files()) == 3
        assert not slow.release.is_set() and slow.stored == []  # still held, mid-send
        assert delivery._threads["slow"].is_alive()
        slow.release.set()
        wait_for(lambda: len(slow.stored) == 3, 30, "the slow destination to finish")
        wait_for(lambda: db.status()["sends"] == {"done": 6}, 10, "every send marked done")
    finally:
        slow.stop()
        delivery.stop()


def test_a_silent_destination_fails_after_its_connect_timeout_and_waits_its_backoff(
    tmp_path: Path, files: list[Path], pacs: StoreSCP, database_url: str | None
) -> None:
    """TCP accepted, no A-ASSOCIATE-AC ever: the attempt ends at connect_timeout_s, is retried
    later, and the other destination is served meanwhile."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        pacs.start()
        settings = two_destinations(
            tmp_path, silent.getsockname()[1], pacs.port, connect_timeout_s=1
        )
        db = Database(database_url or stage_settings(settings).layout.database_path)
        delivery = Delivery(
            stage_settings(settings).delivery,
            db,
            AuditLog(stage_settings(settings).layout.audit_path),
        )
        try:
            queue(db, files, destinations=("slow", "pacs"))
            delivery.start()
            wait_for(lambda: len(pacs.files()) == 3, 30, "three files at the fast destination")

            def slow_failed() -> dict[str, Any] | None:
                # The batch's failures are recorded one send at a time: wait for all three.
                dest = db.status()["destinations"].get("slow", {})
                waiting = dest.get("next_attempt_in_s", 0.0) > LONG_BACKOFF_S / 2
                return dest if "last_error" in dest and waiting else None

            dest = wait_for(slow_failed, 30, "the silent destination's sends to wait a backoff")
            assert dest["last_error"] == (
                "no association: no answer to the association request within 1 s"
            )
            assert dest["pending"] == 3 and "done" not in dest
        finally:
            delivery.stop()


def test_sends_to_a_destination_removed_from_the_config_are_dead_lettered_at_start(
    tmp_path: Path, files: list[Path], pacs: StoreSCP, database_url: str | None
) -> None:
    """Even those still waiting for their backoff: no thread would ever serve them. But not
    one another sender process holds a live lease on (its config may still have it)."""
    settings, db, delivery = make(tmp_path, pacs.port, database_url)
    queue(db, files[2:], "1.2.6", destinations=("gone",))
    (leased,) = db.claim_sends("gone", "otherhost:7:deliver-gone", 600, 10)
    queue(db, files[:1], "1.2.3", destinations=("gone",))
    queue(db, files[1:2], "1.2.4", destinations=("gone",))
    db.send_failed(db.sends()[-1]["id"], "down", next_attempt_at=time.time() + LONG_BACKOFF_S)
    pacs.start()
    queue(db, files[2:], "1.2.5")
    delivery.start()
    try:
        wait_for(
            lambda: db.status()["sends"] == {"failed": 2, "done": 1, "pending": 1},
            30,
            "sends settled",
        )
        gone = {s["id"]: s for s in db.sends() if s["destination"] == "gone"}
        assert gone.pop(leased.id)["state"] == "pending"
        assert {s["last_error"] for s in gone.values()} == {"destination 'gone' is not configured"}
        assert db.send_done(leased.id, owner="otherhost:7:deliver-gone")
    finally:
        delivery.stop()


def test_two_deliveries_on_one_postgresql_database_send_each_result_once(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sender processes' deliveries (distinct owners) drain one queue in small batches at
    the same time: every result reaches the destination exactly once."""
    from dicom_node.send import delivery as delivery_module

    monkeypatch.setattr(delivery_module, "BATCH", 2)

    class SteadySCP(HeldSCP):
        """Records every C-STORE; each takes 50 ms, so both deliveries get batches."""

        def _on_store(self, event: Any) -> int:
            time.sleep(0.05)
            return super()._on_store(event)

    peer = SteadySCP().start()
    peer.release.set()
    settings = parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {"pacs": {"ae_title": "SLOW", "host": "127.0.0.1", "port": peer.port}},
        }
    )
    ct = ct_series(n_slices=16)
    files = write_files(ct, tmp_path / "out")
    first, second = Database(postgres_url), Database(postgres_url)
    for i in range(0, len(files), 2):
        queue(first, files[i : i + 2], series_uid=f"1.2.3.{i}")
    deliveries = [
        Delivery(
            stage_settings(settings).delivery,
            db,
            AuditLog(tmp_path / f"audit-{name}.jsonl"),
            owner=name,
        )
        for name, db in (("a", first), ("b", second))
    ]
    try:
        for delivery in deliveries:
            delivery.start()
        wait_for(lambda: first.status()["sends"] == {"done": 16}, 60, "every send done")
        owners = {s["owner"] for s in first.sends()}
    finally:
        for delivery in deliveries:
            delivery.stop()
        peer.stop()
        first.close()
        second.close()
    assert sorted(peer.stored) == sorted(str(ds.SOPInstanceUID) for ds in ct)  # once each
    assert owners == {None}  # every lease ended with its outcome
    audited = [len((tmp_path / f"audit-{n}.jsonl").read_text().splitlines()) for n in "ab"]
    assert sum(audited) == 16 and min(audited) > 0, audited  # both sent, none twice
