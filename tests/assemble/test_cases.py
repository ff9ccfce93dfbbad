"""Study-level cases: named inputs chosen from a study's series, timeouts, late series."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.app.cli import main
from dicom_node.app.node import Node, stage_settings
from dicom_node.assemble.assembler import Assembler
from dicom_node.assemble.routing import assign_roles, matches
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import ConfigError
from dicom_node.config.destinations import DimseDestination
from dicom_node.config.sections import InputRole, Route, Trigger
from dicom_node.config.settings import Settings, parse_settings
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database, JobState
from dicom_node.store.series import SeriesState, SeriesSummary
from tests.conftest import StoreSCP, free_port, storescu, wait_for
from tests.factories import ct_series, write_files

T1 = InputRole("t1", {"Modality": ("MR",), "SeriesDescription": ("*T1*",)})
T1C = InputRole("t1c", {"SeriesDescription": ("*T1*C*", "*T1*POST*", "*T1*GD*")})
FLAIR = InputRole("flair", {"SeriesDescription": ("*FLAIR*",)}, required=False)
BRAIN = Route(
    "brain", {}, Path("m"), ("pacs",), Trigger.STUDY, (T1, T1C, FLAIR), study_timeout_s=100.0
)


def summary(uid: str, description: str, n: int = 10, at: float = 0.0) -> SeriesSummary:
    attrs = {"Modality": "MR", "SeriesDescription": description}
    return SeriesSummary(uid, SeriesState.QUEUED, attrs, n, at)


# -- selectors -----------------------------------------------------------------------------


def test_selectors_are_case_insensitive_shell_patterns() -> None:
    assert matches({"SeriesDescription": ["*t1*"]}, {"SeriesDescription": "Ax T1 MPRAGE"})
    assert matches({"SeriesDescription": ["ax t1 ?prage"]}, {"SeriesDescription": "AX T1 MPRAGE"})
    assert not matches({"SeriesDescription": ["T1"]}, {"SeriesDescription": "AX T1"})  # exact
    assert matches({"SeriesDescription": ["T1 [GD]"]}, {"SeriesDescription": "t1 [gd]"})
    assert matches({"ImageType": ["*LOCAL*"]}, {"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    assert not matches({"ImageType": ["AX*"]}, {"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    assert matches({"BodyPartExamined": ["", "HEAD"]}, {})


def test_each_series_fills_one_role_the_most_specific_first() -> None:
    series = [summary("1.1", "AX T1 MPRAGE"), summary("1.2", "AX T1 POST GD", n=50)]
    # *T1* matches both; t1c has one candidate, so it is served first.
    assert assign_roles(BRAIN, series) == {"t1": "1.1", "t1c": "1.2"}


def test_among_several_candidates_the_most_instances_then_the_latest_wins() -> None:
    series = [
        summary("1.1", "T1 POST", n=20, at=5.0),
        summary("1.2", "T1 POST", n=30, at=1.0),
        summary("1.3", "T1 POST", n=30, at=2.0),
        summary("1.4", "FLAIR", n=5),
    ]
    # Equal candidates: roles in route order, t1 takes the best (30, latest), t1c the next.
    assert assign_roles(BRAIN, series) == {"t1": "1.3", "t1c": "1.2", "flair": "1.4"}
    assert assign_roles(BRAIN, list(reversed(series))) == assign_roles(BRAIN, series)


# -- config --------------------------------------------------------------------------------


def route_doc(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 1}},
        "routes": [{"name": "brain", "model": str(model), "send_to": ["pacs"], **extra}],
    }


def test_config_reads_trigger_inputs_and_timeouts(random_package: Path) -> None:
    doc = route_doc(
        random_package,
        trigger="study",
        study_timeout_s=900,
        inputs=[
            {"role": "t1", "select": {"Modality": ["MR"], "SeriesDescription": ["*T1*"]}},
            {"role": "flair", "select": {"SeriesDescription": "*FLAIR*"}, "required": False},
        ],
    )
    settings = parse_settings({**doc, "study_timeout_s": 60})
    (route,) = settings.routes
    assert settings.study_timeout_s == 60.0
    assert route.trigger is Trigger.STUDY and route.study_timeout_s == 900.0
    assert route.inputs == (
        InputRole("t1", {"Modality": ("MR",), "SeriesDescription": ("*T1*",)}, True),
        InputRole("flair", {"SeriesDescription": ("*FLAIR*",)}, False),
    )
    (plain,) = parse_settings(route_doc(random_package)).routes
    assert plain.trigger is Trigger.SERIES and [r.role for r in plain.input_roles] == ["image"]


S = {"Modality": ["MR"]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"trigger": "patient"}, "trigger: must be one of series, study, got 'patient'"),
        ({"inputs": [{"role": "t1"}]}, "named inputs need trigger: study"),
        (
            {
                "trigger": "study",
                "inputs": [{"role": "t1", "select": S}, {"role": "t1", "select": S}],
            },
            "inputs[1].role: 't1' is already the role of inputs[0]",
        ),
        (
            {"trigger": "study", "inputs": [{"role": "t1", "required": "false"}]},
            "required: must be true or false, written without quotes, got 'false'",
        ),
        (
            {"trigger": "study", "inputs": [{"role": "t1", "select": {"Colour": "x"}}]},
            "select.Colour: not a DICOM keyword",
        ),
        (
            {"trigger": "study", "inputs": [{"role": "t1", "required": False}]},
            "needs at least one role with required: true",
        ),
    ],
)
def test_config_errors_name_the_key(
    random_package: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_settings(route_doc(random_package, **extra))


# -- assembly in the database --------------------------------------------------------------


def brain_settings(tmp_path: Path, **changes: Any) -> Settings:
    settings = dataclasses.replace(
        Settings(),
        storage_dir=tmp_path,
        stable_after_s=10.0,
        release_grace_s=1.0,
        destinations={"pacs": DimseDestination(name="pacs", ae_title="PACS", host="h", port=104)},
        routes=(BRAIN,),
    )
    return dataclasses.replace(settings, **changes)


def arrive(
    db: Database,
    series: str,
    description: str,
    now: float,
    *,
    n: int = 2,
    policy: str = "reprocess",
    study: str = "9.9",
) -> None:
    for i in range(n):
        db.record_instance(
            sop_instance_uid=f"{series}.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_uid=study,
            series_uid=series,
            patient_id="P",
            attributes={"Modality": "MR", "SeriesDescription": description},
            path=Path(f"/spool/{series}.{i}.dcm"),
            association_id=f"a-{series}",
            late_policy=policy,
            now=now,
        )


@pytest.fixture
def db(tmp_path: Path, database_url: str | None) -> Iterator[Database]:
    """The store on both backends: SQLite in ``tmp_path``, then a fresh PostgreSQL database."""
    database = Database(database_url or tmp_path / "node.sqlite3")
    yield database
    database.close()


def test_a_case_is_ready_when_every_required_role_arrived_and_the_study_is_quiet(
    tmp_path: Path, db: Database
) -> None:
    assembler = Assembler(stage_settings(brain_settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "AX T1", now=100.0)
    arrive(db, "1.2", "AX T1 POST GD", now=105.0)
    arrive(db, "1.3", "AX FLAIR", now=106.0)
    assert assembler.tick(now=111.0) == 0  # T1 complete, the others still receiving
    assert [c["state"] for c in db.cases()] == ["waiting"]
    assert assembler.tick(now=116.5) == 1
    job = db.claim_job("w", 60, now=117.0)
    assert job is not None
    assert job.inputs == {"t1": "1.1", "t1c": "1.2", "flair": "1.3"}
    assert job.series_uid == "1.1" and job.route == "brain" and job.case_id is not None
    assert [c["state"] for c in db.cases()] == ["queued"]
    assert assembler.tick(now=200.0) == 0  # one case, one job


def test_a_missing_required_role_fails_visibly_at_the_study_timeout(
    tmp_path: Path,
    db: Database,
    database_url: str | None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DICOM_NODE_STORAGE_DIR", raising=False)
    monkeypatch.delenv("DICOM_NODE_DATABASE", raising=False)
    assembler = Assembler(stage_settings(brain_settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "AX T1", now=100.0)
    arrive(db, "1.3", "AX FLAIR", now=100.0)
    assembler.tick(now=111.0)  # the case opens at 111: times out at 211
    assert assembler.tick(now=210.0) == 0
    assert db.status()["failed_cases"] == []
    assert assembler.tick(now=211.0) == 0
    status = db.status()
    assert status["cases"] == {"failed": 1}
    (failed,) = status["failed_cases"]
    assert failed["route"] == "brain"
    assert (
        "required input(s) t1c" in failed["error"] and "study_timeout_s (100 s)" in failed["error"]
    )
    assert db.jobs() == []
    # ... and `dicom-node status` prints it.
    config = tmp_path / "node.yaml"
    config.write_text(
        f"storage_dir: {tmp_path}\n" + (f"database: {database_url}\n" if database_url else "")
    )
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "cases: failed 1" in out
    assert f"failed case {failed['id']} (route brain): no series for required input(s) t1c" in out


def test_an_optional_missing_role_still_runs(tmp_path: Path, db: Database) -> None:
    assembler = Assembler(stage_settings(brain_settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "AX T1", now=100.0)
    arrive(db, "1.2", "T1 POST", now=100.0)
    assert assembler.tick(now=111.0) == 1
    job = db.claim_job("w", 60, now=112.0)
    assert job is not None and job.inputs == {"t1": "1.1", "t1c": "1.2"}


def test_a_late_series_reprocesses_the_case_with_it(tmp_path: Path, db: Database) -> None:
    assembler = Assembler(stage_settings(brain_settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "AX T1", now=100.0)
    arrive(db, "1.2", "T1 POST", now=100.0)
    assembler.tick(now=111.0)
    job = db.claim_job("w", 60, now=112.0)
    assert job is not None and db.finish_job(job.id, "w", [], {}, now=113.0)
    arrive(db, "1.3", "FLAIR", now=120.0)  # after the case ran
    assert [c["state"] for c in db.cases()] == ["waiting"]
    assert assembler.tick(now=131.0) == 1
    again = db.claim_job("w", 60, now=132.0)
    assert again is not None and again.inputs == {"t1": "1.1", "t1c": "1.2", "flair": "1.3"}


def test_a_late_series_that_fills_no_role_does_not_rerun_the_case(
    tmp_path: Path, db: Database
) -> None:
    assembler = Assembler(stage_settings(brain_settings(tmp_path)).assembly, db)
    arrive(db, "1.1", "AX T1", now=100.0)
    arrive(db, "1.2", "T1 POST", now=100.0)
    assembler.tick(now=111.0)
    job = db.claim_job("w", 60, now=112.0)
    assert job is not None and db.finish_job(job.id, "w", [], {}, now=113.0)
    arrive(db, "1.9", "LOCALIZER", now=120.0)
    assert [c["state"] for c in db.cases()] == ["waiting"]
    assert assembler.tick(now=131.0) == 0
    assert [c["state"] for c in db.cases()] == ["queued"]
    assert [j["state"] for j in db.jobs()] == [JobState.DONE]
    arrive(db, "1.2", "T1 POST", now=140.0, n=3)  # one more instance of an input: runs
    assert assembler.tick(now=151.0) == 1
    assert db.job_inputs(db.jobs()[-1]["id"]) == {"t1": "1.1", "t1c": "1.2"}


def test_a_late_series_before_the_case_ran_supersedes_its_job(tmp_path: Path, db: Database) -> None:
    assembler = Assembler(
        stage_settings(brain_settings(tmp_path, late_instances="ignore")).assembly, db
    )
    arrive(db, "1.1", "AX T1", now=100.0, policy="ignore")
    arrive(db, "1.2", "T1 POST", now=100.0, policy="ignore")
    assembler.tick(now=111.0)
    arrive(db, "1.3", "FLAIR", now=112.0, policy="ignore")  # job still pending
    assert [j["state"] for j in db.jobs()] == [JobState.SUPERSEDED]
    assembler.tick(now=123.0)
    job = db.claim_job("w", 60, now=124.0)
    assert job is not None and job.inputs == {"t1": "1.1", "t1c": "1.2", "flair": "1.3"}


def test_with_ignore_a_late_series_after_the_case_ran_is_only_stored(
    tmp_path: Path, db: Database
) -> None:
    assembler = Assembler(
        stage_settings(brain_settings(tmp_path, late_instances="ignore")).assembly, db
    )
    arrive(db, "1.1", "AX T1", now=100.0, policy="ignore")
    arrive(db, "1.2", "T1 POST", now=100.0, policy="ignore")
    assembler.tick(now=111.0)
    job = db.claim_job("w", 60, now=112.0)
    assert job is not None and db.finish_job(job.id, "w", [], {}, now=113.0)
    arrive(db, "1.3", "FLAIR", now=120.0, policy="ignore")
    arrive(db, "1.1", "AX T1", now=120.0, policy="ignore")  # a resent input series, too
    assert assembler.tick(now=300.0) == 0
    assert [c["state"] for c in db.cases()] == ["queued"]
    assert [j["state"] for j in db.jobs()] == [JobState.DONE]
    assert db.series_info("1.1")["state"] == SeriesState.IGNORED
    assert len(db.series_instances("1.3")) == 2  # stored


def test_routing_attributes_come_from_every_instance_of_the_series(db: Database) -> None:
    for i, image_type in enumerate(["ORIGINAL\\PRIMARY\\LOCALIZER", "ORIGINAL\\PRIMARY\\AXIAL"]):
        db.record_instance(
            sop_instance_uid=f"1.{i}",
            sop_class_uid="1.2",
            study_uid="9",
            series_uid="1",
            patient_id="P",
            attributes={"Modality": "CT", "ImageType": image_type, "BodyPartExamined": ""}
            | ({"BodyPartExamined": "HEAD"} if i else {}),
            path=Path(f"/s/{i}.dcm"),
            association_id="a",
            late_policy="reprocess",
            now=100.0,
        )
    ((_, attrs),) = db.complete_series(10, 1, now=200.0)
    assert attrs["ImageType"] == "ORIGINAL\\PRIMARY\\LOCALIZER\\AXIAL"
    assert attrs["BodyPartExamined"] == "HEAD"
    assert matches({"ImageType": ["AXIAL"]}, attrs)


# -- real associations ---------------------------------------------------------------------


def mr_series(study_uid: str, description: str, n: int = 3, seed: int = 0) -> list[Dataset]:
    """A small synthetic MR series of ``study_uid`` (the CT factory, relabelled)."""
    out = ct_series(n_slices=n, study_uid=study_uid, seed=seed)
    for ds in out:
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.SeriesDescription = description
        for keyword in ("KVP", "RescaleType"):
            delattr(ds, keyword)
    return out


def send_study(port: int, folder: Path, *series: list[Dataset]) -> None:
    for i, datasets in enumerate(series):
        result = storescu(port, write_files(datasets, folder / str(i)))
        assert result.returncode == 0, result.stderr


def network_settings(
    tmp_path: Path, model: Path, pacs_port: int, route: dict[str, Any]
) -> Settings:
    return parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "stable_after_s": 30,
            "release_grace_s": 0.5,
            "device": "cpu",
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
            "routes": [{"model": str(model), "send_to": ["pacs"], **route}],
            "send": {"initial_backoff_s": 0.2, "timeout_s": 10},
        }
    )


@pytest.mark.peers
def test_a_study_level_case_runs_from_real_c_stores(
    tmp_path: Path, random_package: Path, storescp: StoreSCP
) -> None:
    """Two MR series of one study by C-STORE; the study route's one role takes the T1."""
    settings = network_settings(
        tmp_path,
        random_package,
        storescp.port,
        {
            "name": "brain-t1",
            "trigger": "study",
            "inputs": [{"role": "image", "select": {"SeriesDescription": ["*T1*"]}}],
        },
    )
    study = generate_uid()
    t1, flair = mr_series(study, "AX T1 MPRAGE"), mr_series(study, "AX FLAIR", seed=1)
    node = Node(settings)
    node.start()
    try:
        send_study(settings.port, tmp_path / "send", t1, flair)
        wait_for(lambda: len(storescp.files()) >= 2, 120, "SEG and SR at the PACS")
        (job,) = node.db.jobs()
        assert job["state"] == JobState.DONE and job["series_uid"] == t1[0].SeriesInstanceUID
        assert node.db.job_inputs(job["id"]) == {"image": t1[0].SeriesInstanceUID}
        assert [c["state"] for c in node.db.cases()] == ["queued"]
    finally:
        node.stop()
    seg = next(dcmread(p) for p in storescp.files() if dcmread(p).Modality == "SEG")
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == t1[0].SeriesInstanceUID


@pytest.mark.peers
def test_two_roles_from_real_c_stores_fill_the_case_inputs(
    tmp_path: Path, random_package: Path
) -> None:
    """Receiver and assembler only: the job's role -> series mapping, without running it."""
    settings = network_settings(
        tmp_path,
        random_package,
        1,
        {
            "name": "brain",
            "trigger": "study",
            "inputs": [
                {"role": "t1", "select": {"Modality": ["MR"], "SeriesDescription": ["*T1*"]}},
                {"role": "flair", "select": {"SeriesDescription": ["*FLAIR*"]}},
                {"role": "t2", "select": {"SeriesDescription": ["*T2*"]}, "required": False},
            ],
        },
    )
    settings.storage_dir.mkdir(parents=True)
    stages = stage_settings(settings)
    db = Database(stages.layout.database_path)
    released = threading.Event()
    receiver = Receiver(
        stages.receiver, db, AuditLog(stages.layout.audit_path), on_release=released
    )
    receiver.start()
    assembler = Assembler(stage_settings(settings).assembly, db)
    study = generate_uid()
    t1, flair = mr_series(study, "Sag T1"), mr_series(study, "Ax Flair", seed=1)
    try:
        send_study(settings.port, tmp_path / "send", flair, t1)
        wait_for(lambda: assembler.tick() or db.jobs(), 30, "the case's job")
    finally:
        receiver.stop()
    (job,) = db.jobs()
    assert job["state"] == JobState.PENDING and job["case_id"] is not None
    assert db.job_inputs(job["id"]) == {
        "t1": t1[0].SeriesInstanceUID,
        "flair": flair[0].SeriesInstanceUID,
    }
    db.close()
