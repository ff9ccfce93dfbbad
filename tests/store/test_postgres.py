"""What only PostgreSQL has to prove: concurrent transactions from several connections.

SQLite runs one writer at a time (``BEGIN IMMEDIATE``); on PostgreSQL several receivers,
workers and senders (threads here, processes and hosts in production) run transactions at the
same moment, at READ COMMITTED. These tests make the dangerous interleavings happen on
purpose: claims racing for one queue, a claim meeting a row another transaction holds, and two
receivers merging the routing attributes of one series.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dicom_node.store.database import Database, JobState
from tests.conftest import wait_for


@pytest.fixture
def open_db(postgres_url: str) -> Iterator[Callable[[], Database]]:
    """Open one more :class:`Database` (its own pool of connections) on the test's database."""
    opened: list[Database] = []

    def make() -> Database:
        opened.append(Database(postgres_url))
        return opened[-1]

    yield make
    for db in opened:
        db.close()


def arrive(db: Database, series: str, sop: str, attributes: dict[str, str]) -> None:
    db.record_instance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2",
        series_uid=series,
        patient_id="P",
        attributes=attributes,
        path=Path(f"/spool/{sop}.dcm"),
        association_id=f"assoc-{sop}",
        late_policy="reprocess",
        now=100.0,
    )


def pending_jobs(db: Database, n: int) -> None:
    for i in range(n):
        arrive(db, f"9.{i}", f"9.{i}.1", {"Modality": "CT"})
        db.queue_series(f"9.{i}", ["chest"], now=101.0)


def waiting_on_locks(url: str, n: int) -> Callable[[], bool]:
    """True once ``n`` other sessions of the database wait for a row lock."""

    def check() -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()
        return row is not None and row[0] >= n

    return check


def test_concurrent_claims_get_every_job_exactly_once(
    open_db: Callable[[], Database],
) -> None:
    """Four workers, each on its own connection pool, two threads each, drain 80 jobs."""
    pending_jobs(open_db(), 80)
    databases = [open_db() for _ in range(4)]
    claimed: list[tuple[int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(db: Database, owner: str) -> None:
        try:
            start.wait()
            while (job := db.claim_job(owner, lease_s=600)) is not None:
                with lock:
                    claimed.append((job.id, owner))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(db, f"w{i}-{t}"))
        for i, db in enumerate(databases)
        for t in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    counts = Counter(job_id for job_id, _ in claimed)
    assert len(counts) == 80 and set(counts.values()) == {1}, counts.most_common(3)
    assert len({owner for _, owner in claimed}) > 1  # the claims really raced
    jobs = databases[0].jobs()
    assert {j["state"] for j in jobs} == {JobState.RUNNING}
    assert {j["id"]: j["owner"] for j in jobs} == {job_id: owner for job_id, owner in claimed}


def test_a_claim_passes_over_a_job_another_transaction_holds(
    postgres_url: str, open_db: Callable[[], Database]
) -> None:
    """SKIP LOCKED: the oldest job is locked by another transaction; the claim does not wait
    for it but takes the next one at once."""
    db = open_db()
    pending_jobs(db, 2)
    first, second = (j["id"] for j in db.jobs())
    with psycopg.connect(postgres_url) as holder:  # a transaction of another process
        holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first,))
        got: list[Any] = []
        claim = threading.Thread(target=lambda: got.append(db.claim_job("w", lease_s=60)))
        started = time.monotonic()
        claim.start()
        claim.join(10)
        took = time.monotonic() - started
        assert not claim.is_alive(), "the claim waited for the locked job"
        assert got[0] is not None and got[0].id == second and took < 5
        assert db.claim_job("w2", lease_s=60) is None  # the held one stays skipped
        holder.rollback()
    job = db.claim_job("w2", lease_s=60)
    assert job is not None and job.id == first


def test_two_receivers_indexing_one_series_at_once_keep_both_attributes(
    postgres_url: str, open_db: Callable[[], Database]
) -> None:
    """Two receivers index instances of one series while a third transaction holds it: both
    wait, then each merges into what the other wrote (none overwrites the other's values).
    Then the same for a series that is new: both wait for the transaction that inserts it."""
    receivers = [open_db(), open_db()]
    arrive(receivers[0], "1.1", "1.1.0", {"ImageType": "ORIGINAL", "BodyPartExamined": ""})

    def race(series: str, hold: Callable[[psycopg.Connection[Any]], None]) -> None:
        with psycopg.connect(postgres_url) as holder:
            hold(holder)
            threads = [
                threading.Thread(
                    target=arrive,
                    args=(db, series, f"{series}.{i + 1}", attrs),
                )
                for i, (db, attrs) in enumerate(
                    zip(
                        receivers,
                        (
                            {"ImageType": "AXIAL"},
                            {"ImageType": "LOCALIZER", "BodyPartExamined": "HEAD"},
                        ),
                        strict=True,
                    )
                )
            ]
            for thread in threads:
                thread.start()
            wait_for(waiting_on_locks(postgres_url, 2), 20, "both receivers to wait for the row")
            holder.commit()
            for thread in threads:
                thread.join(20)
            assert not any(t.is_alive() for t in threads)

    race("1.1", lambda h: h.execute("SELECT 1 FROM series WHERE series_uid = '1.1' FOR UPDATE"))
    info = receivers[0].series_info("1.1")
    assert info is not None
    import json

    attrs = json.loads(info["attributes"])
    assert set(attrs["ImageType"].split("\\")) == {"ORIGINAL", "AXIAL", "LOCALIZER"}
    assert attrs["BodyPartExamined"] == "HEAD"

    race(
        "1.2",
        lambda h: h.execute(
            "INSERT INTO series (series_uid, study_uid, patient_id, attributes, state, "
            "last_received_at, last_association) VALUES ('1.2', '1.2', 'P', "
            """'{"ImageType": "ORIGINAL"}', 'receiving', 99.0, 'x')"""
        ),
    )
    info = receivers[1].series_info("1.2")
    assert info is not None
    attrs = json.loads(info["attributes"])
    assert set(attrs["ImageType"].split("\\")) == {"ORIGINAL", "AXIAL", "LOCALIZER"}
    assert len(receivers[0].series_instances("1.2")) == 2


def test_the_pool_replaces_connections_the_server_closed(
    postgres_url: str, open_db: Callable[[], Database]
) -> None:
    """After the server ended every session (a restart, an administrator), the next
    transaction runs on a new connection instead of failing on a dead one."""
    db = open_db()
    pending_jobs(db, 1)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert ended is not None and ended[0] >= 1
    job = db.claim_job("w", lease_s=60)
    assert job is not None and db.job_state(job.id) is JobState.RUNNING
