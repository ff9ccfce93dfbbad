"""Several receiver processes behind one port (``receivers: N``, dicom_node.app.receivers).

Real child processes, real loopback associations (DCMTK ``storescu``, pynetdicom for the
association refusals), SQLite and PostgreSQL: each instance is indexed once, both processes
serve, the node's limits hold across them, a killed child is restarted and loses nothing it
answered Success for, and the audit chain the children append to together stays valid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.app.node import Node, stage_settings
from dicom_node.app.receivers import ChildSpec, ReceiverPool
from dicom_node.audit.keys import load_key
from dicom_node.audit.log import open_audit_log
from dicom_node.audit.verify import verify, verify_database
from dicom_node.common.metrics import NodeMetrics
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.store.database import open_database
from tests.conftest import (
    PEER_ENV,
    NodeProcess,
    free_port,
    require_tool,
    storescu,
    storescu_at_once,
    wait_for,
)
from tests.factories import ct_series, write_files
from tests.receive.peers import connect, is_closed_by_peer, store_association

pytestmark = [pytest.mark.peers]


def settings_at(tmp_path: Path, database: str | None = None, **limits: Any) -> Settings:
    doc: dict[str, Any] = {
        "ae_title": "DICOMNODE",
        "port": free_port(),
        "bind_address": "127.0.0.1",
        "storage_dir": str(tmp_path / "node"),
        "limits": limits,
        "log_level": "warning",
    }
    if database is not None:
        doc["database"] = database
    return parse_settings(doc, base=tmp_path)


class Pool:
    """A :class:`ReceiverPool` of two children on ``settings``, with the node's database."""

    def __init__(self, settings: Settings, count: int = 2) -> None:
        stages = stage_settings(settings)
        self.settings = settings
        self.layout = stages.layout
        self.layout.storage_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_database(settings.database, self.layout.database_path)  # migrated
        self.audit = open_audit_log(
            self.db, audit_path=self.layout.audit_path, key_file=self.layout.audit_key_file
        )
        self.released = threading.Event()
        spec = ChildSpec(
            receiver=stages.receiver,
            database=settings.database,
            database_path=self.layout.database_path,
            database_timeout_s=settings.limits.database_timeout_s,
            audit_path=self.layout.audit_path,
            audit_key_file=self.layout.audit_key_file,
            log_format="console",
            log_level="warning",
        )
        self.metrics = NodeMetrics()
        self.pool = ReceiverPool(spec, count, on_release=self.released, metrics=self.metrics)

    @property
    def port(self) -> int:
        return self.settings.port

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> spool path of every indexed instance."""
        rows = self.db._query("SELECT sop_instance_uid, path FROM instances")
        return {str(r["sop_instance_uid"]): str(r["path"]) for r in rows}

    def audit_verifies(self) -> None:
        key = load_key(self.layout.audit_key_file, create=False)
        if self.settings.database is None:
            report = verify(self.layout.audit_path, key, self.db.audit_mark("head"))
        else:
            report = verify_database(self.db, key)
        assert report.ok, report.problems
        assert report.records > 0


@pytest.fixture
def pool(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pool]:
    database = getattr(request, "param", None)
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    made = Pool(settings_at(tmp_path, url, max_associations_per_peer=8))
    made.pool.start()
    yield made
    made.pool.stop()
    made.db.close()


def batches(tmp_path: Path, senders: int, slices: int) -> list[list[Path]]:
    return [
        write_files(ct_series(slices, 32, 32, seed=i), tmp_path / f"sender{i}")
        for i in range(senders)
    ]


@pytest.mark.parametrize("pool", ["sqlite", "postgresql"], indirect=True)
def test_two_receivers_serve_four_senders_and_index_each_instance_once(
    pool: Pool, tmp_path: Path
) -> None:
    sent = batches(tmp_path, 4, 12)
    assert storescu_at_once(pool.port, sent) == [0, 0, 0, 0]
    indexed = pool.instances()
    uids = {p.stem for b in sent for p in b}
    assert set(indexed) == uids and len(indexed) == 48
    assert all(Path(path).is_file() for path in indexed.values())
    # Both processes served (the parent hands each connection to the least busy one).
    assert all(pool.pool.served[i] > 0 for i in range(2)), pool.pool.served
    assert pool.released.is_set()  # the scheduler is woken by the children's releases
    wait_for(lambda: not pool.pool.arbiter.connections(), 5, "every connection freed")
    assert pool.pool.arbiter.admitted == 0
    pool.audit_verifies()  # two processes appended to one chain
    # The children's counters reach the node's metrics (metrics_port).
    sample = pool.metrics.registry.get_sample_value
    wait_for(lambda: sample("dicom_node_instances_received_total") == 48, 5, "counts")
    assert sample("dicom_node_associations_total", {"outcome": "accepted"}) == 4
    assert sample("dicom_node_receive_step_seconds_count", {"step": "total"}) == 48


def test_the_per_host_cap_holds_across_receiver_processes(tmp_path: Path) -> None:
    made = Pool(settings_at(tmp_path, max_associations_per_peer=2))
    made.pool.start()
    try:
        port = made.port
        held = [connect(port), connect(port)]
        by_child = wait_for(
            lambda: (c := made.pool.arbiter.connections()) and sum(map(len, c.values())) == 2 and c,
            5,
            "two connections counted",
        )
        assert len(by_child) == 2  # one on each process
        # A third from the same host: closed at once, as by one process.
        third = connect(port)
        wait_for(lambda: is_closed_by_peer(third), 5, "the third connection closed")
        assert not any(is_closed_by_peer(s) for s in held)
        for sock in (*held, third):
            sock.close()
        wait_for(lambda: not made.pool.arbiter.connections(), 5, "slots freed")
        # Associations of one calling AE title, from three hosts: the third is refused with
        # A-ASSOCIATE-RJ rejected-transient, service-provider, local-limit-exceeded.
        first = store_association(port, "127.0.0.2", "MODALITY")
        second = store_association(port, "127.0.0.3", "MODALITY")
        assert first.is_established and second.is_established
        assert len(made.pool.arbiter.connections()) == 2  # on both processes
        refused = store_association(port, "127.0.0.4", "MODALITY")
        assert refused.is_rejected
        rj = refused.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
        first.release()
        second.release()
    finally:
        made.pool.stop()
        made.db.close()


def answered_success(output: str) -> set[str]:
    """SOP Instance UIDs (the file stems) that ``storescu -v`` got Success for."""
    done: set[str] = set()
    current: str | None = None
    for line in output.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = Path(m.group(1)).stem
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(current)
            current = None
    return done


def test_a_killed_receiver_is_restarted_and_loses_nothing_answered_success(
    pool: Pool, tmp_path: Path
) -> None:
    sent = batches(tmp_path, 4, 100)
    exe = require_tool("storescu")
    procs = [
        subprocess.Popen(
            [exe, "-v", "-aet", f"MODALITY{i}", "-aec", "DICOMNODE", "127.0.0.1", str(pool.port)]
            + [str(f) for f in files],
            env=PEER_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, files in enumerate(sent)
    ]
    wait_for(lambda: len(pool.instances()) >= 12, 60, "some instances indexed")
    victim = pool.pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    successes = set().union(*(answered_success(o) for o in outputs))
    assert any(p.returncode != 0 for p in procs)  # the killed process's senders were cut
    wait_for(lambda: pool.pool.restarts == 1, 30, "the child restarted")
    wait_for(lambda: victim not in pool.pool.pids(), 5, "a new process")
    indexed = pool.instances()
    lost = successes - set(indexed)
    assert not lost, f"{len(lost)} instances answered Success are not indexed"
    assert all(Path(indexed[uid]).is_file() for uid in successes)
    # The senders resend what was cut; the restarted node takes it all, each once.
    wait_for(lambda: len(pool.pool.pids()) == 2 and pool.pool.arbiter.admitted == 0, 30, "idle")
    missing = [f for b in sent for f in b if f.stem not in indexed]
    assert missing
    assert storescu(pool.port, missing).returncode == 0
    assert set(pool.instances()) == {p.stem for b in sent for p in b}
    pool.audit_verifies()


def test_receivers_stop_after_the_associations_in_progress(pool: Pool, tmp_path: Path) -> None:
    sent = batches(tmp_path, 1, 80)[0]
    exe = require_tool("storescu")
    proc = subprocess.Popen(
        [exe, "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(pool.port)]
        + [str(f) for f in sent],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: len(pool.instances()) >= 5, 60, "the send under way")
    pool.pool.stop()  # SIGTERM: no new connection, the one in progress ends
    assert proc.wait(timeout=60) == 0
    assert len(pool.instances()) == 80
    with pytest.raises(OSError):  # nobody listens any more
        connect(pool.port)


def test_receivers_setting_chooses_processes(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    one = Node(settings_at(tmp_path / "a"))  # default: one per core
    two = Node(parse_settings({"storage_dir": str(tmp_path / "b"), "receivers": 2}))
    try:
        if cores > 1:
            assert one.receiver is None and one.receivers is not None
            assert one.receivers.count == cores
        assert two.receivers is not None and two.receivers.count == 2
    finally:
        for node in (one, two):
            node.db.close()
            node._lock_file.close()
    single = Node(parse_settings({"storage_dir": str(tmp_path / "c"), "receivers": 1}))
    assert single.receiver is not None and single.receivers is None
    single.db.close()
    single._lock_file.close()


def test_a_taken_port_is_refused_before_any_receiver_process_starts(tmp_path: Path) -> None:
    settings = settings_at(tmp_path)
    made = Pool(settings)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings.port))
        taken.listen()
        with pytest.raises(OSError):
            made.pool.start()
    assert made.pool.pids() == []
    made.db.close()


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_a_node_killed_takes_its_receiver_processes_with_it(tmp_path: Path) -> None:
    """kill -9 of the node ends its receivers at once, as it ended one process: none goes on
    beside the node started next."""
    settings = {
        "ae_title": "DICOMNODE",
        "port": free_port(),
        "storage_dir": str(tmp_path / "var"),
        "receivers": 2,
        "log_level": "info",
    }
    node = NodeProcess(tmp_path / "node", settings).start()
    try:
        found = wait_for(
            lambda: re.search(r"receivers\.started.*pids=\[(\d+), (\d+)\]", node.log.read_text()),
            30,
            "the receivers' pids in the log",
        )
        children = [int(found.group(1)), int(found.group(2))]
        assert all(alive(pid) for pid in children)
        held = store_association(node.port)  # a child would otherwise wait for it (DRAIN_S)
        assert held.is_established
        node.kill9()
        wait_for(lambda: not any(alive(pid) for pid in children), 5, "the receivers ended")
        held.abort()
    finally:
        node.stop()
