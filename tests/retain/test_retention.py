"""Retention: received instances are purged only once their results are delivered, audited."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.app.cli import main
from dicom_node.app.node import stage_settings
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import parse_settings
from dicom_node.retain.retention import Retention
from dicom_node.store.database import Database


def setup(tmp_path: Path, **overrides: object) -> tuple[Retention, Database, Path]:
    settings = parse_settings({"storage_dir": str(tmp_path / "var"), **overrides})
    db = Database(stage_settings(settings).layout.database_path)
    return (
        Retention(
            stage_settings(settings).retention,
            db,
            AuditLog(stage_settings(settings).layout.audit_path),
        ),
        db,
        stage_settings(settings).layout.spool_dir,
    )


def received(db: Database, spool: Path, n: int, now: float = 100.0) -> list[Path]:
    paths = []
    for i in range(n):
        path = spool / "1.2" / "1.2.3" / f"1.2.3.{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"instance")
        db.record_instance(
            sop_instance_uid=f"1.2.3.{i}",
            sop_class_uid="1.2",
            study_uid="1.2",
            series_uid="1.2.3",
            patient_id="P7",
            attributes={},
            path=path,
            association_id="a",
            late_policy="reprocess",
            now=now,
        )
        paths.append(path)
    db.queue_series("1.2.3", ["r"], now=now)
    return paths


def test_purge_after_delivery_only(tmp_path: Path) -> None:
    retention, db, spool = setup(tmp_path, delete_after_success=True)
    paths = received(db, spool, 2)
    assert retention.tick() == 0  # job not run yet
    job = db.claim_job("w", 60)
    assert job is not None
    db.finish_job(job.id, "w", [("seg", tmp_path / "seg.dcm", "2.25.1")], {"pacs": ("seg",)})
    assert retention.tick() == 0  # result not delivered yet
    (send,) = db.due_sends()
    outbox = tmp_path / "var" / "outbox" / str(job.id)
    outbox.mkdir(parents=True)
    (outbox / "seg.dcm").write_bytes(b"delivered result")
    db.send_done(send.id)
    assert retention.tick() == 1
    assert not any(p.exists() for p in paths)
    assert not outbox.exists()
    assert not (spool / "1.2").exists()
    assert db.series_instances("1.2.3") == []
    deleted = [e for e in read_events(tmp_path / "var" / "audit.jsonl")]
    assert deleted[-1]["event_id"]["meaning"] == "DICOM Study Deleted"
    assert deleted[-1]["patient_id"] == "P7" and deleted[-1]["details"]["instances"] == 2
    assert retention.tick() == 0  # nothing left to purge


def test_purge_after_retention_period(tmp_path: Path) -> None:
    retention, db, spool = setup(tmp_path, retention_days=1)
    paths = received(db, spool, 1, now=1000.0)
    assert retention.tick(now=1000.0 + 3600) == 0
    assert retention.tick(now=1000.0 + 2 * 86400) == 0  # its job has not run yet
    job = db.claim_job("w", 60)
    assert job is not None
    db.finish_job(job.id, "w", [], {})
    assert retention.tick(now=1000.0 + 2 * 86400) == 1
    assert not paths[0].exists()


def test_nothing_is_purged_by_default(tmp_path: Path) -> None:
    retention, db, spool = setup(tmp_path)
    paths = received(db, spool, 1, now=0.0)
    assert retention.tick(now=10 * 365 * 86400) == 0
    assert paths[0].exists()


def test_retry_command_requeues_dead_letters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, db, spool = setup(tmp_path)
    received(db, spool, 1)
    job = db.claim_job("w", 60)
    assert job is not None
    db.finish_job(job.id, "w", [("seg", tmp_path / "seg.dcm", "2.25.1")], {"pacs": ("seg",)})
    (send,) = db.due_sends()
    db.send_failed(send.id, "refused", next_attempt_at=None)
    config = tmp_path / "node.yaml"
    config.write_text(f"storage_dir: {tmp_path / 'var'}\n")
    assert main(["retry", "--config", str(config)]) == 0
    assert "1 failed send(s) queued again" in capsys.readouterr().out
    assert db.status()["sends"] == {"pending": 1}
