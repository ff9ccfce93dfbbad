"""The worker in-process: results queued for every destination, failures recorded and audited."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from pydicom.dataset import Dataset
from pydicom.uid import RTImageStorage

from dicom_node.app.node import stage_settings
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import parse_settings
from dicom_node.store.database import Database
from dicom_node.work import worker as worker_module
from dicom_node.work.worker import Worker
from tests.factories import (
    ACCESSION_NUMBER,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    ct_series,
    dx_from_array,
    write_files,
)
from tests.work.test_segment import chest


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
    db = Database(stage_settings(settings).layout.database_path)
    audit = AuditLog(stage_settings(settings).layout.audit_path)
    return (
        Worker(stage_settings(settings).worker, db, audit, torch.device("cpu")),
        db,
        stage_settings(settings).layout.audit_path,
    )


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
    db = Database(stage_settings(settings).layout.database_path)
    worker = Worker(
        stage_settings(settings).worker,
        db,
        AuditLog(stage_settings(settings).layout.audit_path),
        torch.device("cpu"),
    )
    ct = ct_series(n_slices=2)
    index(db, write_files(ct, tmp_path / "in"), ct[0].SeriesInstanceUID)
    assert worker.run_once() is True
    sends = sorted((s["destination"], Path(s["path"]).name.split("-")[0]) for s in db.sends())
    assert sends == [("a", "overlay"), ("a", "overlay"), ("b", "sr")]
    # The SEG the SR references is built, but not written: no destination asked for it.
    written = sorted(
        p.name.split("-")[0] for p in (stage_settings(settings).layout.outbox_dir / "1").iterdir()
    )
    assert written == ["overlay", "overlay", "sr"]


def captured_log(monkeypatch: pytest.MonkeyPatch) -> structlog.testing.CapturingLogger:
    """The worker's log lines, captured whatever structlog's global configuration is."""
    capture = structlog.testing.CapturingLogger()
    logger = structlog.wrap_logger(
        capture, processors=[], wrapper_class=structlog.stdlib.BoundLogger
    )
    monkeypatch.setattr(worker_module, "log", logger)
    return capture


def rt_image() -> list[Dataset]:
    ds = dx_from_array(chest())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RTImageStorage
    return [ds]


def ct_without_frame_of_reference() -> list[Dataset]:
    series = ct_series(n_slices=3)
    for ds in series:
        del ds.FrameOfReferenceUID
    return series


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (rt_image, "SEG cannot be written on this RT Image Storage source"),
        (ct_without_frame_of_reference, "have no FrameOfReferenceUID (0020,0052)"),
    ],
)
def test_bad_datasets_fail_at_once_with_a_readable_reason(
    tmp_path: Path,
    random_package: Path,
    monkeypatch: pytest.MonkeyPatch,
    make: Any,
    expected: str,
) -> None:
    capture = captured_log(monkeypatch)
    worker, db, _ = setup(tmp_path, random_package)
    datasets = make()
    index(db, write_files(datasets, tmp_path / "in"), datasets[0].SeriesInstanceUID)
    assert worker.run_once() is True
    status = db.status()
    assert status["jobs"] == {"failed": 1}  # no retry, although max_job_attempts is 2
    job = status["failed_jobs"][0]
    assert job["attempts"] == 1
    assert job["error"].startswith("InputError: ") and expected in job["error"]
    [line] = [c.kwargs for c in capture.calls if c.kwargs.get("event") == "job.failed"]
    assert line["job_id"] == job["id"] and line["route"] == "r"
    assert line["error"] == "InputError" and line["reason"] == job["error"]
    assert line["kind"] == "input" and line["retry"] is False
    assert line["cause"] in ("AttributeError", "ValueError", None) and line["raised_at"]
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION_NUMBER):
        assert secret not in repr(capture.calls) and secret not in job["error"]


def test_unexpected_failures_show_a_readable_reason_at_the_end(
    tmp_path: Path, random_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = captured_log(monkeypatch)
    worker, db, _ = setup(tmp_path, random_package)
    ct = ct_series(n_slices=2)
    index(db, write_files(ct, tmp_path / "in"), ct[0].SeriesInstanceUID)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("model server went away; try again")

    monkeypatch.setattr(worker_module, "segment_series", broken)
    assert worker.run_once() is True and worker.run_once() is True
    job = db.status()["failed_jobs"][0]
    assert job["attempts"] == 2
    assert job["error"] == "RuntimeError: model server went away; try again"
    lines = [c.kwargs for c in capture.calls if c.kwargs.get("event") == "job.failed"]
    assert [(x["kind"], x["retry"]) for x in lines] == [("unexpected", True), ("unexpected", False)]
    assert lines[-1]["reason"] == job["error"]


def test_a_run_that_ran_out_of_gpu_memory_is_logged_with_the_job(
    tmp_path: Path, random_package: Path
) -> None:
    from tests.models.test_gpu_slots import RunsOutOfMemory

    worker, db, _ = setup(tmp_path, random_package)
    assert worker.slots.gpu_slots == 1
    segmenter = worker.segmenter(random_package)
    assert segmenter.slots is worker.slots  # one limit for every model and thread
    segmenter.network = RunsOutOfMemory(segmenter.network, fits=2)
    ct = ct_series(n_slices=3)
    index(db, write_files(ct, tmp_path / "in"), ct[0].SeriesInstanceUID)
    with structlog.testing.capture_logs() as logs:
        assert worker.run_once() is True
    assert db.status()["jobs"] == {"done": 1}
    (degraded,) = [e for e in logs if e["event"] == "job.inference_degraded"]
    assert degraded["job_id"] == 1 and degraded["batch_size"] == 2
    assert degraded["oom"] == [
        "CUDA out of memory at batch 8; retried with batch 4",
        "CUDA out of memory at batch 4; retried with batch 2",
    ]
