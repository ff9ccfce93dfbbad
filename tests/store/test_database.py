"""The index and queues: assembly, supersession, leases, sends and their retries.

Every test runs on both backends (``database_url``: SQLite, then a fresh PostgreSQL database).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.store.database import Database, JobState, SendState, SeriesState


@pytest.fixture
def db(tmp_path: Path, database_url: str | None) -> Iterator[Database]:
    database = Database(database_url or tmp_path / "node.sqlite3")
    yield database
    database.close()


def add(
    db: Database,
    sop: str,
    series: str = "1.2.3",
    assoc: str = "a1",
    now: float = 100.0,
    policy: str = "reprocess",
) -> bool:
    return db.record_instance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2",
        series_uid=series,
        patient_id="P",
        attributes={"Modality": "CT"},
        path=Path(f"/spool/{sop}.dcm"),
        association_id=assoc,
        late_policy=policy,
        now=now,
    )


def test_resend_replaces_never_duplicates(db: Database) -> None:
    assert add(db, "1.1") is True
    assert add(db, "1.1") is False
    assert len(db.series_instances("1.2.3")) == 1


def test_series_complete_after_quiet_period_or_release(db: Database) -> None:
    add(db, "1.1", now=100.0)
    assert db.complete_series(10, 1, now=105.0) == []
    assert [s for s, _ in db.complete_series(10, 1, now=110.0)] == ["1.2.3"]
    db.association_released("a1", now=101.0)
    assert db.complete_series(10, 1, now=101.5) == []
    assert [s for s, _ in db.complete_series(10, 1, now=102.0)] == ["1.2.3"]
    # A new instance on another association clears the release: wait again.
    add(db, "1.2", assoc="a2", now=102.0)
    assert db.complete_series(10, 1, now=103.5) == []


def test_release_only_touches_series_of_that_association(db: Database) -> None:
    add(db, "1.1", series="9.1", assoc="a1")
    add(db, "2.1", series="9.2", assoc="a2")
    assert db.association_released("a1", now=100.0) == 1
    assert [s for s, _ in db.complete_series(60, 0.5, now=101.0)] == ["9.1"]


def test_jobs_lease_and_recover(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    assert db.series_info("1.2.3")["state"] == SeriesState.QUEUED
    job = db.claim_job("w", lease_s=60, now=102.0)
    assert job is not None and job.attempts == 1
    assert db.claim_job("w", lease_s=60, now=103.0) is None  # leased
    # Lease expired: runs again, here as this process (a node that restarts recovers it).
    again = db.claim_job(f"{socket.gethostname()}:{os.getpid()}:w", lease_s=60, now=200.0)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert db.recover_after_restart() == 1
    assert db.jobs()[0]["state"] == JobState.PENDING


def test_recovery_at_start_leaves_the_jobs_of_live_processes_alone(db: Database) -> None:
    """On a shared PostgreSQL other processes run jobs: a restarting node takes back only the
    jobs of this host's processes that are gone (SQLite: every job, the node is alone)."""
    import subprocess

    dead = subprocess.Popen(["true"])  # its process id no longer runs once it is waited for
    dead.wait()
    host = socket.gethostname()
    owners = {
        f"{host}:{dead.pid}:worker-0": "dead process of this host",
        f"{host}:{os.getpid()}:worker-0": "this process, before it claims",
        f"{host}:1:worker-0": "a live process of this host",
        "other-host:123:worker-0": "a process of another host",
    }
    for i, owner in enumerate(owners):
        add(db, f"1.{i}", series=f"9.{i}")
        db.queue_series(f"9.{i}", ["chest"], now=101.0)
        assert db.claim_job(owner, lease_s=600, now=102.0) is not None
    recovered = db.recover_after_restart()
    states = {j["owner"] or j["series_uid"]: j["state"] for j in db.jobs()}
    if db.backend == "sqlite":
        assert recovered == 4 and set(states.values()) == {JobState.PENDING}
    else:
        assert recovered == 2
        assert states == {
            "9.0": JobState.PENDING,
            "9.1": JobState.PENDING,
            f"{host}:1:worker-0": JobState.RUNNING,
            "other-host:123:worker-0": JobState.RUNNING,
        }


def test_late_instance_supersedes_pending_job_and_reprocesses_done_one(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    add(db, "1.2", now=102.0)
    assert [j["state"] for j in db.jobs()] == [JobState.SUPERSEDED]
    db.queue_series("1.2.3", ["chest"], now=120.0)
    job = db.claim_job("w", 60, now=121.0)
    assert job is not None
    assert db.finish_job(
        job.id, "w", [("seg", Path("/o/seg.dcm"), "2.25.1")], {"pacs": ("seg",)}, now=122.0
    )
    add(db, "1.3", now=130.0)  # after the job ran: policy reprocess
    assert db.series_info("1.2.3")["state"] == SeriesState.RECEIVING


def test_late_instance_with_ignore_policy(db: Database) -> None:
    add(db, "1.1", policy="ignore")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    job = db.claim_job("w", 60, now=102.0)
    assert job is not None
    db.finish_job(job.id, "w", [], {}, now=103.0)
    add(db, "1.2", now=104.0, policy="ignore")
    assert db.series_info("1.2.3")["state"] == SeriesState.IGNORED
    assert len(db.series_instances("1.2.3")) == 2  # kept, not processed


def test_sends_retry_and_dead_letter(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    job = db.claim_job("w", 60, now=102.0)
    assert job is not None
    db.finish_job(
        job.id,
        "w",
        [("seg", Path("/o/seg.dcm"), "2.25.1"), ("sr", Path("/o/sr.dcm"), "2.25.2")],
        {"pacs": ("seg", "sr")},
        now=103.0,
    )
    due = db.due_sends(now=104.0)
    assert [s.sop_instance_uid for s in due] == ["2.25.1", "2.25.2"]
    assert db.send_failed(due[0].id, "down", next_attempt_at=200.0, now=104.0) == SendState.PENDING
    assert [s.sop_instance_uid for s in db.due_sends(now=150.0)] == ["2.25.2"]
    assert db.send_failed(due[0].id, "down", next_attempt_at=None) == SendState.FAILED
    db.send_done(due[1].id)
    status = db.status()
    assert status["sends"] == {"failed": 1, "done": 1}
    assert status["destinations"]["pacs"]["last_error"] == "down"
    assert db.retry_failed_sends() == 1
    assert [s.sop_instance_uid for s in db.due_sends(now=150.0)] == ["2.25.1"]


def test_finish_of_a_superseded_job_sends_nothing(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    job = db.claim_job("w", 60, now=102.0)
    assert job is not None
    db.fail_job(job.id, "w", "boom", retry=True)
    assert (
        db.finish_job(job.id, "w", [("seg", Path("/o/x.dcm"), "2.25.9")], {"pacs": ("seg",)})
        is False
    )
    assert db.sends() == []


def test_unrouted_series(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", [], now=101.0)
    assert db.series_info("1.2.3")["state"] == SeriesState.UNROUTED
    assert db.jobs() == []


def test_waiting_sends_become_due_when_the_destination_answers(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    job = db.claim_job("w", 60, now=102.0)
    assert job is not None
    db.finish_job(
        job.id,
        "w",
        [("seg", Path("/o/seg.dcm"), "2.25.1"), ("sr", Path("/o/sr.dcm"), "2.25.2")],
        {"pacs": ("seg", "sr"), "other": ("sr",)},
        now=103.0,
    )
    sends = {(s.destination, s.sop_instance_uid): s for s in db.due_sends(now=104.0)}
    assert set(sends) == {("pacs", "2.25.1"), ("pacs", "2.25.2"), ("other", "2.25.2")}
    db.send_failed(sends["pacs", "2.25.1"].id, "early", next_attempt_at=400.0, now=104.0)
    db.send_failed(sends["pacs", "2.25.2"].id, "down", next_attempt_at=500.0, now=105.0)
    db.send_failed(sends["other", "2.25.2"].id, "refused", next_attempt_at=None, now=105.0)
    assert db.waiting_destinations(now=106.0) == {"pacs": 400.0}
    status = db.status(now=106.0)["destinations"]
    assert status["pacs"]["next_attempt_at"] == 400.0
    assert status["pacs"]["next_attempt_in_s"] == 294.0
    assert status["pacs"]["last_error"] == "down"  # the latest, not the greatest string
    assert status["other"]["last_error"] == "refused" and "next_attempt_at" not in status["other"]
    # Only pending sends to the destination that answered; dead letters stay dead.
    assert db.sends_due_now("nowhere", now=107.0) == 0
    assert db.sends_due_now("pacs", now=107.0) == 2
    assert {s.sop_instance_uid for s in db.due_sends(now=107.0)} == {"2.25.1", "2.25.2"}
    assert db.waiting_destinations(now=107.0) == {}
    assert db.status()["sends"] == {"pending": 2, "failed": 1}


def test_send_claims_are_leased_and_only_their_owner_records_the_outcome(db: Database) -> None:
    add(db, "1.1")
    db.queue_series("1.2.3", ["chest"], now=101.0)
    job = db.claim_job("w", 60, now=102.0)
    assert job is not None
    outputs = [("seg", Path(f"/o/{i}.dcm"), f"2.25.{i}") for i in range(3)]
    db.finish_job(job.id, "w", outputs, {"pacs": ("seg",), "other": ("seg",)}, now=103.0)
    first = db.claim_sends("pacs", "a", lease_s=30, limit=2, now=104.0)
    assert [s.sop_instance_uid for s in first] == ["2.25.0", "2.25.1"]  # oldest first
    assert {s.destination for s in first} == {"pacs"}
    rest = db.claim_sends("pacs", "b", lease_s=100, limit=10, now=105.0)
    assert [s.sop_instance_uid for s in rest] == ["2.25.2"]  # a's two stay a's
    assert db.claim_sends("pacs", "b", lease_s=30, limit=10, now=110.0) == []
    # a stalled past its lease: b takes its sends over, and a's late outcomes change nothing.
    taken = db.claim_sends("pacs", "b", lease_s=30, limit=10, now=140.0)
    assert [s.id for s in taken] == [s.id for s in first]
    assert db.send_done(first[0].id, owner="a", now=141.0) is False
    assert db.send_failed(first[1].id, "late", next_attempt_at=None, owner="a") is None
    assert db.send_done(first[0].id, owner="b", now=142.0) is True
    assert db.send_failed(first[1].id, "down", next_attempt_at=500.0, owner="b", now=142.0) == (
        SendState.PENDING
    )
    by_id = {s["id"]: s for s in db.sends()}
    assert (by_id[first[0].id]["state"], by_id[first[0].id]["owner"]) == (SendState.DONE, None)
    assert by_id[first[1].id]["lease_until"] is None and by_id[first[1].id]["attempts"] == 1
    # A failed send waits for its next attempt; then any sender may claim it again.
    assert [s.id for s in db.claim_sends("pacs", "c", 30, 10, now=499.0)] == [rest[0].id]
    assert [s.id for s in db.claim_sends("pacs", "c", 30, 10, now=500.0)] == [first[1].id]
