"""A scaled-out node: receiver, worker and sender processes on one PostgreSQL and one folder.

Real processes (``dicom-node serve --role ...``), a real PostgreSQL (``tests/postgres.py``),
DCMTK ``storescu`` as the modality and ``storescp`` as the PACS. ``storescp -uf`` gives every
instance it receives a file of its own, so a result delivered twice is two files.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.store.database import Database, JobState, open_database
from dicom_node.store.files import StorageLayout
from tests.conftest import NodeProcess, StoreSCP, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.slow_node import SLEEP_ENV

pytestmark = [pytest.mark.peers, pytest.mark.slow]

#: Short leases, so a killed worker's job returns within seconds (renewed every lease / 3).
#: Not shorter: a fresh worker's first inference initialises torch's kernels holding the GIL,
#: which stalled its renewals for over 3 s on 2 loaded cores (the lease then went to the other
#: worker, correctly, but the job ran twice).
LEASE_S = 10.0


@pytest.fixture
def cluster(
    tmp_path: Path,
    postgres_url: str,
    random_package: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
) -> Callable[..., NodeProcess]:
    """Make a role process of one node: shared storage folder and database."""
    shared = {
        "storage_dir": str(tmp_path / "shared"),
        "database": postgres_url,
        "job_lease_s": LEASE_S,
        "release_grace_s": 0.2,
    }

    def make(role: str, *, sleep_s: float | None = None) -> NodeProcess:
        node = node_factory(random_package, storescp.port, role, **shared)
        if sleep_s is not None:
            node.module = "tests.slow_node"
            node.env[SLEEP_ENV] = str(sleep_s)
        return node

    return make


def started(*nodes: NodeProcess) -> list[NodeProcess]:
    """Start ``nodes`` at once (their start-up is mostly imports); return them when all run."""
    for node in nodes:
        node.spawn()
    return [node.ready(timeout_s=120) for node in nodes]


@contextmanager
def database(url: str, tmp_path: Path) -> Iterator[Database]:
    db = open_database(url, StorageLayout.at(tmp_path / "shared").database_path)
    try:
        yield db
    finally:
        db.close()


def pacs_uids(scp: StoreSCP) -> list[str]:
    """SOP Instance UIDs of every file the PACS received (one per reception)."""
    uids = []
    for path in scp.files():
        with contextlib.suppress(Exception):  # storescp may still be writing it
            uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return uids


def settled(scp: StoreSCP, n: int, timeout_s: float) -> list[str]:
    """Wait for ``n`` files at the PACS, then a little longer: a duplicate would show."""
    wait_for(lambda: len(pacs_uids(scp)) >= n, timeout_s, f"{n} results at the PACS")
    time.sleep(2 * LEASE_S)
    return pacs_uids(scp)


def jobs(url: str, tmp_path: Path) -> list[dict[str, Any]]:
    with database(url, tmp_path) as db:
        return db.jobs()


def test_receiver_worker_and_sender_processes_deliver_a_study(
    tmp_path: Path, postgres_url: str, storescp: StoreSCP, cluster: Callable[..., NodeProcess]
) -> None:
    receiver, worker, sender = started(cluster("receiver"), cluster("worker"), cluster("sender"))
    files = write_files(ct_series(n_slices=3, rows=64, cols=64), tmp_path / "ct")
    assert storescu(receiver.port, files).returncode == 0
    uids = settled(storescp, 2, timeout_s=120)
    modalities = sorted(str(dcmread(p, stop_before_pixels=True).Modality) for p in storescp.files())
    assert modalities == ["SEG", "SR"] and len(set(uids)) == 2
    (job,) = jobs(postgres_url, tmp_path)
    assert (job["state"], job["attempts"]) == (JobState.DONE, 1)
    assert job["owner"].split(":")[1] == str(worker.pid)  # the worker process ran it
    assert not (tmp_path / "shared" / "node.sqlite3").exists()  # the state is in PostgreSQL


def test_a_worker_killed_mid_job_loses_nothing_and_delivers_once(
    tmp_path: Path, postgres_url: str, storescp: StoreSCP, cluster: Callable[..., NodeProcess]
) -> None:
    # the doomed worker's job runs until it is killed
    receiver, doomed, sender = started(
        cluster("receiver"), cluster("worker", sleep_s=600), cluster("sender")
    )
    files = write_files(ct_series(n_slices=3, rows=64, cols=64), tmp_path / "ct")
    assert storescu(receiver.port, files).returncode == 0

    def running() -> dict[str, Any] | None:
        found = [j for j in jobs(postgres_url, tmp_path) if j["state"] == JobState.RUNNING]
        return found[0] if found else None

    job = wait_for(running, 60, "the doomed worker to claim the job")
    assert job["owner"].split(":")[1] == str(doomed.pid)
    rescuer = cluster("worker").start()  # the job is leased: it waits for the lease
    time.sleep(LEASE_S)
    assert jobs(postgres_url, tmp_path)[0]["owner"] == job["owner"]  # renewed, not taken
    doomed.kill9()
    uids = settled(storescp, 2, timeout_s=120)
    assert len(uids) == 2 and len(set(uids)) == 2, "one SEG and one SR, each once"
    (done,) = jobs(postgres_url, tmp_path)
    assert done["state"] == JobState.DONE and done["attempts"] == 2
    assert done["owner"].split(":")[1] == str(rescuer.pid)


def test_two_workers_never_run_one_job_twice(
    tmp_path: Path, postgres_url: str, storescp: StoreSCP, cluster: Callable[..., NodeProcess]
) -> None:
    receiver, *workers, sender = started(
        cluster("receiver"),
        cluster("worker", sleep_s=0.5),
        cluster("worker", sleep_s=0.5),
        cluster("sender"),
    )
    n_series = 8
    files = []
    for i in range(n_series):
        series = ct_series(n_slices=2, rows=64, cols=64)
        files += write_files(series, tmp_path / f"ct{i}")
    assert storescu(receiver.port, files).returncode == 0
    uids = settled(storescp, 2 * n_series, timeout_s=180)
    assert len(uids) == 2 * n_series and len(set(uids)) == 2 * n_series, "each result once"
    done = jobs(postgres_url, tmp_path)
    assert len(done) == n_series
    assert {(j["state"], j["attempts"]) for j in done} == {(JobState.DONE, 1)}, done
    pids = {j["owner"].split(":")[1] for j in done}
    assert pids == {str(w.pid) for w in workers}, "both worker processes ran jobs"
