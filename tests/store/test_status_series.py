"""``status`` shows a series by what its jobs did: queued, processing, failed, processed; not
"queued" for ever once it completed (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydicom.dataset import Dataset

from dicom_node.app.cli import main
from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import parse_settings
from dicom_node.store.database import Database
from dicom_node.work.worker import Worker
from tests.factories import ct_series, dx_from_array, write_files
from tests.work.test_segment import chest


def index(db: Database, datasets: list[Dataset], folder: Path, routes: list[str]) -> None:
    """Index the series of ``datasets`` as the receiver would, and queue it as assembly does."""
    for ds, path in zip(datasets, write_files(datasets, folder), strict=True):
        db.record_instance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            patient_id="P",
            attributes={"Modality": str(ds.Modality)},
            path=path,
            association_id="a",
            late_policy="reprocess",
        )
    db.queue_series(str(datasets[0].SeriesInstanceUID), routes)


def test_status_counts_series_by_their_jobs(
    tmp_path: Path,
    random_package: Path,
    database_url: str | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw: dict[str, Any] = {
        "storage_dir": str(tmp_path / "var"),
        "routes": [
            {"name": "r", "match": {"Modality": ["CT", "DX"]}, "model": str(random_package)}
        ],
    }
    if database_url is not None:
        raw["database"] = database_url
    settings = parse_settings(raw)
    stages = stage_settings(settings)
    settings.storage_dir.mkdir(parents=True)
    db = Database(database_url or stages.layout.database_path)
    worker = Worker(stages.worker, db, AuditLog(stages.layout.audit_path), torch.device("cpu"))
    try:
        index(db, ct_series(n_slices=2), tmp_path / "done", ["r"])
        broken = dx_from_array(chest())
        del broken.PixelData
        index(db, [broken], tmp_path / "failed", ["r"])
        assert worker.run_once() and worker.run_once()  # one done, one failed for good
        assert db.status()["series"] == {"processed": 1, "failed": 1}

        index(db, ct_series(n_slices=2), tmp_path / "running", ["r"])
        index(db, ct_series(n_slices=2), tmp_path / "pending", ["r"])
        index(db, ct_series(n_slices=2), tmp_path / "unrouted", [])
        assert db.claim_job("another-worker", 60) is not None  # the older one runs
    finally:
        db.close()
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()  # the worker's log lines
    assert main(["status", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["series"]
    assert shown == {"processed": 1, "failed": 1, "processing": 1, "queued": 1, "unrouted": 1}
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "series: failed 1, processed 1, processing 1, queued 1, unrouted 1\n" in out
    assert "jobs: done 1, failed 1, pending 1, running 1\n" in out
