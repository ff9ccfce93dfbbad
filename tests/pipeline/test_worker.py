"""The worker in-process: results queued for every destination, failures recorded and audited."""

from __future__ import annotations

from pathlib import Path

import torch

from dicom_node.audit import AuditLog, read_events
from dicom_node.config import parse_settings
from dicom_node.pipeline.worker import Worker
from dicom_node.store.database import Database
from tests.factories import ct_series, dx_from_array, write_files
from tests.pipeline.test_segment import chest


def setup(tmp_path: Path, model: Path) -> tuple[Worker, Database, Path]:
    settings = parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {
                "a": {"ae_title": "A", "host": "127.0.0.1", "port": 1},
                "b": {"ae_title": "B", "host": "127.0.0.1", "port": 2},
            },
            "routes": [
                {
                    "name": "r",
                    "match": {"Modality": ["CT", "DX"]},
                    "model": str(model),
                    "send_to": ["a", "b"],
                }
            ],
            "max_job_attempts": 2,
        }
    )
    db = Database(settings.database_path)
    audit = AuditLog(settings.audit_path)
    return Worker(settings, db, audit, torch.device("cpu")), db, settings.audit_path


def index(db: Database, paths: list[Path], series_uid: str) -> None:
    for i, path in enumerate(paths):
        db.record_instance(
            sop_instance_uid=f"1.2.{i}",
            sop_class_uid="1.2",
            study_uid="1.2.3",
            series_uid=series_uid,
            patient_id="P",
            attributes={"Modality": "CT"},
            path=path,
            association_id="a",
            late_policy="reprocess",
        )
    db.queue_series(series_uid, ["r"])


def test_job_outputs_go_to_every_destination(tmp_path: Path, random_package: Path) -> None:
    worker, db, audit = setup(tmp_path, random_package)
    ct = ct_series(n_slices=3)
    index(db, write_files(ct, tmp_path / "in"), ct[0].SeriesInstanceUID)
    assert worker.run_once() is True
    assert worker.run_once() is False
    assert db.status()["jobs"] == {"done": 1}
    sends = db.sends()
    assert sorted((s["destination"], Path(s["path"]).name[:3]) for s in sends) == [
        ("a", "seg"),
        ("a", "sr-"),
        ("b", "seg"),
        ("b", "sr-"),
    ]
    assert all(Path(s["path"]).is_file() for s in sends)
    made = [e for e in read_events(audit) if e["event_id"]["code"] == "110103"]
    assert made[0]["outcome"] == 0 and made[0]["patient_id"] == "P"


def test_input_errors_fail_for_good_and_are_audited(tmp_path: Path, random_package: Path) -> None:
    worker, db, audit = setup(tmp_path, random_package)
    ds = dx_from_array(chest())
    del ds.PixelData
    index(db, write_files([ds], tmp_path / "in"), ds.SeriesInstanceUID)
    assert worker.run_once() is True
    status = db.status()
    assert status["jobs"] == {"failed": 1}
    assert "InputError" in status["failed_jobs"][0]["error"]
    assert db.sends() == []
    failed = [e for e in read_events(audit) if e["event_id"]["code"] == "110103"]
    assert failed[0]["outcome"] == 8


def test_unexpected_errors_are_retried_then_fail(tmp_path: Path, random_package: Path) -> None:
    worker, db, _ = setup(tmp_path, random_package)
    ct = ct_series(n_slices=2)
    index(db, write_files(ct, tmp_path / "in"), ct[0].SeriesInstanceUID)
    (tmp_path / "var" / "outbox").write_text("a file where the outbox folder should be")
    assert worker.run_once() is True
    assert db.status()["jobs"] == {"pending": 1}  # attempt 1 of max_job_attempts 2
    assert worker.run_once() is True
    status = db.status()
    assert status["jobs"] == {"failed": 1}
    assert status["failed_jobs"][0]["attempts"] == 2


def test_each_destination_is_queued_only_the_outputs_it_asked_for(
    tmp_path: Path, random_package: Path
) -> None:
    settings = parse_settings(
        {
            "storage_dir": str(tmp_path / "var"),
            "destinations": {
                "a": {"ae_title": "A", "host": "127.0.0.1", "port": 1, "outputs": ["overlay"]},
                "b": {"ae_title": "B", "host": "127.0.0.1", "port": 2, "outputs": ["sr"]},
            },
            "routes": [
                {
                    "name": "r",
                    "match": {"Modality": ["CT"]},
                    "model": str(random_package),
                    "send_to": ["a", "b"],
                }
            ],
        }
    )
    db = Database(settings.database_path)
    worker = Worker(settings, db, AuditLog(settings.audit_path), torch.device("cpu"))
    ct = ct_series(n_slices=2)
    index(db, write_files(ct, tmp_path / "in"), ct[0].SeriesInstanceUID)
    assert worker.run_once() is True
    sends = sorted((s["destination"], Path(s["path"]).name.split("-")[0]) for s in db.sends())
    assert sends == [("a", "overlay"), ("a", "overlay"), ("b", "sr")]
    # The SEG the SR references is built, but not written: no destination asked for it.
    written = sorted(p.name.split("-")[0] for p in (settings.outbox_dir / "1").iterdir())
    assert written == ["overlay", "overlay", "sr"]
