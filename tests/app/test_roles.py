"""Roles: which stages a ``serve`` process runs, what each needs, the storage lock, recovery.

The processes of several roles against one PostgreSQL are in ``tests/app/test_scale_out.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.app.cli import main
from dicom_node.app.node import Node
from dicom_node.app.roles import ROLE_ENV, Role, check_role, default_role, parse_role
from dicom_node.common.errors import StartupError
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.store.database import JobState, open_database
from dicom_node.store.files import StorageLayout
from dicom_node.store.jobs import owner_is_gone
from tests.app.test_startup import assert_one_line, write_config
from tests.conftest import free_port, node_settings


def settings_for(tmp_path: Path, model: Path, **overrides: object) -> Settings:
    raw = node_settings(tmp_path, model, free_port(), **overrides)
    return parse_settings(raw)


def test_role_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROLE_ENV, raising=False)
    assert default_role() is Role.ALL
    monkeypatch.setenv(ROLE_ENV, "Worker")
    assert default_role() is Role.WORKER
    monkeypatch.setenv(ROLE_ENV, "gpu")
    with pytest.raises(StartupError, match=f"{ROLE_ENV}: 'gpu' is not a role; choose one of all"):
        default_role()
    assert parse_role("sender") is Role.SENDER
    assert [r for r in Role if r.receives] == [Role.ALL, Role.RECEIVER]
    assert [r for r in Role if r.works] == [Role.ALL, Role.WORKER]
    assert [r for r in Role if r.sends] == [Role.ALL, Role.SENDER]


@pytest.mark.parametrize("role", ["receiver", "worker", "sender"])
def test_a_role_on_sqlite_is_refused_in_one_line(
    tmp_path: Path, random_package: Path, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, random_package)
    assert main(["serve", "--config", str(config), "--role", role]) == 2
    assert_one_line(
        capsys.readouterr().err,
        f"--role {role}: roles in separate processes need a shared PostgreSQL database",
        "run --role all",
    )
    assert not (tmp_path / "var" / "node.sqlite3").exists()  # refused before anything ran


def test_an_unknown_role_is_refused_in_one_line(
    tmp_path: Path, random_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, random_package)
    assert main(["serve", "--config", str(config), "--role", "gpu"]) == 2
    assert_one_line(capsys.readouterr().err, "--role: 'gpu' is not a role")


def test_what_each_role_needs_from_the_config(tmp_path: Path, random_package: Path) -> None:
    bare = parse_settings({"storage_dir": str(tmp_path)})
    full = settings_for(tmp_path, random_package)

    def needs(settings: Settings) -> dict[str, bool]:
        return {
            "has_routes": bool(settings.routes),
            "has_destinations": bool(settings.destinations),
        }

    for role in Role:
        check_role(role, "postgresql", **needs(full))
    check_role(Role.ALL, "sqlite", **needs(bare))  # today's node: receives even with no routes
    check_role(Role.RECEIVER, "postgresql", **needs(bare))
    with pytest.raises(StartupError, match="--role worker: the config has no routes"):
        check_role(Role.WORKER, "postgresql", **needs(bare))
    with pytest.raises(StartupError, match="--role sender: the config has no destinations"):
        check_role(Role.SENDER, "postgresql", **needs(bare))


def test_two_nodes_on_one_sqlite_storage_folder_are_refused(
    tmp_path: Path, random_package: Path
) -> None:
    settings = settings_for(tmp_path, random_package)
    first = Node(settings)
    try:
        with pytest.raises(StartupError, match="in use by another dicom-node process"):
            Node(settings)
    finally:
        first.db.close()
        first._lock_file.close()
    Node(settings).db.close()  # free again once the first is gone


def test_role_processes_share_a_storage_folder_on_postgresql(
    tmp_path: Path, random_package: Path, postgres_url: str
) -> None:
    """Several role processes (and several of one role) start on one folder; no SQLite there."""
    shared = settings_for(tmp_path, random_package, database=postgres_url)
    nodes = [Node(shared, role) for role in (Role.RECEIVER, Role.WORKER, Role.WORKER, Role.SENDER)]
    try:
        assert (nodes[0].receiver or nodes[0].receivers) is not None and nodes[0].worker is None
        assert nodes[1].worker is not None and nodes[1].receiver is None
        assert nodes[1].delivery is None and nodes[3].delivery is not None
        assert nodes[3].worker is None and nodes[3].device is None  # no model, no device
        sqlite = settings_for(tmp_path, random_package)  # same storage_dir, no database
        with pytest.raises(StartupError, match="in use by another dicom-node process"):
            Node(sqlite)
    finally:
        for node in nodes:
            node.db.close()
            node._lock_file.close()
    sqlite_node = Node(sqlite)
    try:
        with pytest.raises(StartupError, match="in use by a dicom-node on SQLite"):
            Node(shared, Role.WORKER)
    finally:
        sqlite_node.db.close()
        sqlite_node._lock_file.close()


def _queue_running_jobs(db: object, owners: list[str]) -> list[int]:
    """One running job per owner (claimed by that owner); their ids."""
    ids = []
    for i, owner in enumerate(owners):
        db.record_instance(  # type: ignore[attr-defined]
            sop_instance_uid=f"1.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_uid="1.2",
            series_uid=f"1.2.{i}",
            patient_id="P",
            attributes={"Modality": "CT"},
            path=Path(f"/spool/{i}.dcm"),
            association_id="a",
            late_policy="reprocess",
            now=100.0,
        )
        db.queue_series(f"1.2.{i}", ["r"], now=101.0)  # type: ignore[attr-defined]
        job = db.claim_job(owner, 600, now=102.0)  # type: ignore[attr-defined]
        assert job is not None
        ids.append(job.id)
    return ids


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it)


def test_a_gone_owner_is_a_dead_process_of_this_host() -> None:
    host = socket.gethostname()
    assert owner_is_gone(f"{host}:{_dead_pid()}:worker-0")
    assert owner_is_gone(f"{host}:{os.getpid()}:worker-0")  # a restarted container: same pid
    assert not owner_is_gone(f"{host}:{os.getppid()}:worker-0")  # alive
    assert not owner_is_gone(f"{host}-other:{_dead_pid()}:worker-0")  # another host: lease
    assert not owner_is_gone("w")  # not ours to judge


def test_recovery_on_postgresql_leaves_live_and_remote_workers_jobs_alone(
    tmp_path: Path, postgres_url: str
) -> None:
    """A restarted worker returns only its host's dead processes' jobs; SQLite returns all."""
    host = socket.gethostname()
    dead = f"{host}:{_dead_pid()}:worker-0"
    live = f"{host}:{os.getppid()}:worker-0"
    remote = f"{host}-b:{_dead_pid()}:worker-0"
    db = open_database(postgres_url, StorageLayout.at(tmp_path).database_path)
    try:
        ids = _queue_running_jobs(db, [dead, live, remote])
        assert db.recover_after_restart() == 1
        states = {j["id"]: (j["state"], j["owner"]) for j in db.jobs()}
        assert states[ids[0]] == (JobState.PENDING, None)
        assert states[ids[1]] == (JobState.RUNNING, live)
        assert states[ids[2]] == (JobState.RUNNING, remote)  # returns when its lease expires
        first = db.claim_job("w", 600, now=103.0)
        assert first is not None and first.id == ids[0]
        assert db.claim_job("w", 600, now=104.0) is None  # the others are still leased
    finally:
        db.close()

    sqlite = open_database(None, StorageLayout.at(tmp_path / "sqlite").database_path)
    try:
        _queue_running_jobs(sqlite, [live, remote])
        assert sqlite.recover_after_restart() == 2  # the lock proves every owner is dead
        assert {j["state"] for j in sqlite.jobs()} == {JobState.PENDING}
    finally:
        sqlite.close()


def test_the_role_comes_from_the_environment_when_no_flag_is_given(
    tmp_path: Path,
    random_package: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """systemd's ``Environment=DICOM_NODE_ROLE=%i``: the flag's default."""
    config = write_config(tmp_path, random_package)
    monkeypatch.setenv(ROLE_ENV, "sender")
    assert main(["serve", "--config", str(config)]) == 2
    assert_one_line(capsys.readouterr().err, "--role sender: roles in separate processes")
