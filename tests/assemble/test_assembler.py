"""When a series is complete: quiet, released + grace, or at release for projection modalities."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.app.node import stage_settings
from dicom_node.assemble.assembler import Assembler
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import ConfigError
from dicom_node.config.destinations import DimseDestination
from dicom_node.config.sections import Route
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database, JobState
from dicom_node.store.series import SeriesState
from tests.conftest import free_port, storescu, wait_for
from tests.factories import ct_series, dx_from_array, write_files

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def settings(tmp_path: Path, **changes: Any) -> Settings:
    base = dataclasses.replace(
        Settings(),
        storage_dir=tmp_path,
        stable_after_s=10.0,
        release_grace_s=1.0,
        destinations={"pacs": DimseDestination(name="pacs", ae_title="PACS", host="h", port=104)},
        routes=(Route("any", {}, Path("m"), ("pacs",)),),
    )
    return dataclasses.replace(base, **changes)


def arrive(
    db: Database, series: str, modality: str, now: float, *, association: str, n: int = 1
) -> None:
    for i in range(n):
        db.record_instance(
            sop_instance_uid=f"{series}.{association}.{i}",
            sop_class_uid=DX_CLASS if modality in ("DX", "CR") else CT_CLASS,
            study_uid="9.9",
            series_uid=series,
            patient_id="P",
            attributes={"Modality": modality},
            path=Path(f"/spool/{series}.{association}.{i}.dcm"),
            association_id=association,
            late_policy="reprocess",
            now=now,
        )


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "node.sqlite3")


def state(db: Database, series_uid: str) -> str:
    info = db.series_info(series_uid)
    assert info is not None
    return str(info["state"])


def test_the_default_completes_radiographs_at_release() -> None:
    assert Settings().complete_at_release == ("CR", "DX", "MG", "IO", "PX")
    assert Settings().release_grace_s == 1.0


def test_a_radiograph_is_complete_at_release_a_ct_after_the_grace(
    tmp_path: Path, db: Database
) -> None:
    assembler = Assembler(stage_settings(settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    arrive(db, "1.2", "CT", 100.0, association="a2", n=3)
    db.association_released("a1", now=100.5)
    db.association_released("a2", now=100.5)
    assert assembler.tick(now=100.5) == 1  # the DX, at the instant of its release
    assert (state(db, "1.1"), state(db, "1.2")) == (SeriesState.QUEUED, SeriesState.RECEIVING)
    assert assembler.tick(now=101.4) == 0  # the CT waits release_grace_s
    assert assembler.tick(now=101.5) == 1
    assert state(db, "1.2") == SeriesState.QUEUED


def test_a_radiograph_still_receiving_is_not_complete(tmp_path: Path, db: Database) -> None:
    assembler = Assembler(stage_settings(settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    assert assembler.tick(now=105.0) == 0  # its association is open, not yet quiet
    assert assembler.tick(now=110.0) == 1  # quiet for stable_after_s


def test_without_complete_at_release_a_radiograph_waits_the_grace(
    tmp_path: Path, db: Database
) -> None:
    assembler = Assembler(stage_settings(settings(tmp_path, complete_at_release=())).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    db.association_released("a1", now=100.5)
    assert assembler.tick(now=100.5) == 0
    assert assembler.tick(now=101.5) == 1


def test_a_series_of_mixed_modalities_waits_the_grace(tmp_path: Path, db: Database) -> None:
    """Only a series all of whose instances are of complete_at_release modalities."""
    assembler = Assembler(stage_settings(settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    arrive(db, "1.1", "OT", 100.1, association="a1")
    db.association_released("a1", now=100.5)
    assert assembler.tick(now=100.5) == 0
    assert assembler.tick(now=101.5) == 1


def test_an_image_after_a_radiograph_ran_makes_it_run_again(tmp_path: Path, db: Database) -> None:
    """late_instances: reprocess still holds for a series completed at release."""
    assembler = Assembler(stage_settings(settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    db.association_released("a1", now=100.2)
    assert assembler.tick(now=100.2) == 1
    first = db.claim_job("w", 60, now=100.3)
    assert first is not None
    assert db.finish_job(first.id, "w", [], {}, now=100.8)
    arrive(db, "1.1", "DX", 101.0, association="a2")  # a lateral, on a second association
    assert state(db, "1.1") == SeriesState.RECEIVING
    db.association_released("a2", now=101.2)
    assert assembler.tick(now=101.2) == 1
    again = db.claim_job("w", 60, now=101.3)
    assert again is not None and again.series_uid == "1.1" and again.id != first.id
    assert len(db.series_instances("1.1")) == 2


def test_ignore_keeps_a_late_image_of_a_radiograph_unprocessed(
    tmp_path: Path, db: Database
) -> None:
    assembler = Assembler(stage_settings(settings(tmp_path, late_instances="ignore")).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    db.association_released("a1", now=100.2)
    assert assembler.tick(now=100.2) == 1
    job = db.claim_job("w", 60, now=100.3)
    assert job is not None and db.finish_job(job.id, "w", [], {}, now=100.8)
    db.record_instance(
        sop_instance_uid="1.1.late",
        sop_class_uid=DX_CLASS,
        study_uid="9.9",
        series_uid="1.1",
        patient_id="P",
        attributes={"Modality": "DX"},
        path=Path("/spool/late.dcm"),
        association_id="a2",
        late_policy="ignore",
        now=101.0,
    )
    db.association_released("a2", now=101.2)
    assert assembler.tick(now=101.2) == 0
    assert assembler.tick(now=200.0) == 0
    assert len(db.jobs()) == 1
    assert state(db, "1.1") == SeriesState.IGNORED


def test_an_image_before_the_radiograph_job_started_replaces_that_job(
    tmp_path: Path, db: Database
) -> None:
    """Completed at release, then a second image on another association before a worker took
    the job: the pending job is superseded, one job runs on both images."""
    assembler = Assembler(stage_settings(settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "DX", 100.0, association="a1")
    db.association_released("a1", now=100.1)
    assert assembler.tick(now=100.1) == 1
    arrive(db, "1.1", "DX", 100.2, association="a2")
    db.association_released("a2", now=100.3)
    assert assembler.tick(now=100.3) == 1
    job = db.claim_job("w", 60, now=100.4)
    assert job is not None and len(db.series_instances(job.series_uid)) == 2
    assert db.claim_job("w", 60, now=100.5) is None
    assert sorted(j["state"] for j in db.jobs()) == [JobState.RUNNING, JobState.SUPERSEDED]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["dx"], "complete_at_release[0]: must be a Modality (0008,0060) code such as DX or CR"),
        ("DX", "complete_at_release: "),
        ([""], "complete_at_release[0]: must be a Modality"),
    ],
)
def test_complete_at_release_must_be_modality_codes(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_settings({"complete_at_release": value})


def test_complete_at_release_may_be_emptied() -> None:
    assert parse_settings({"complete_at_release": []}).complete_at_release == ()
    assert parse_settings({"complete_at_release": ["CR"]}).complete_at_release == ("CR",)


@pytest.mark.peers
def test_a_radiograph_by_c_store_is_queued_at_release_not_after_the_grace(
    tmp_path: Path, random_package: Path
) -> None:
    """A real association: with a 30 s grace, only the at-release rule can queue it now."""
    config = parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "stable_after_s": 60,
            "release_grace_s": 30,
            "device": "cpu",
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
            "routes": [
                {
                    "name": "chest",
                    "match": {"Modality": ["DX", "CT"]},
                    "model": str(random_package),
                    "send_to": ["pacs"],
                }
            ],
        }
    )
    config.storage_dir.mkdir(parents=True)
    stages = stage_settings(config)
    db = Database(stages.layout.database_path)
    released = threading.Event()
    receiver = Receiver(
        stages.receiver, db, AuditLog(stages.layout.audit_path), on_release=released
    )
    receiver.start()
    assembler = Assembler(stage_settings(config).assembly, db)
    try:
        dx = dx_from_array(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
        ct = ct_series(n_slices=3)
        for name, datasets in (("dx", [dx]), ("ct", ct)):
            result = storescu(config.port, write_files(datasets, tmp_path / name))
            assert result.returncode == 0, result.stderr
        wait_for(released.is_set, 10, "the association's release")
        started = time.monotonic()
        wait_for(lambda: assembler.tick() or db.jobs(), 10, "the radiograph's job")
        assert time.monotonic() - started < 5  # far below release_grace_s (30 s)
        (job,) = db.jobs()
        assert job["series_uid"] == dx.SeriesInstanceUID and job["state"] == JobState.PENDING
        assert state(db, ct[0].SeriesInstanceUID) == SeriesState.RECEIVING
    finally:
        receiver.stop()
        db.close()


def test_the_scheduler_wakes_when_a_release_grace_ends_not_at_the_next_tick() -> None:
    from dicom_node.app.node import TICK_S, next_wait

    ends = [10.05, 10.5, 9.0]
    assert next_wait(ends, 10.0) == pytest.approx(0.05)  # the nearest grace end
    assert ends == [10.05, 10.5], "a grace end already past is dropped"
    assert next_wait(ends, 10.06) == pytest.approx(TICK_S)  # the next one is a tick away
    assert next_wait(ends, 10.45) == pytest.approx(0.05)
    assert next_wait(ends, 10.5) == pytest.approx(TICK_S) and ends == []
