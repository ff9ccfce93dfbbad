"""The audit trail: PS3.15 vocabulary, hash chain, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.audit import (
    AuditAction,
    AuditEvent,
    AuditLog,
    AuditOutcome,
    Participants,
    read_events,
    verify,
)


def fill(path: Path) -> AuditLog:
    log = AuditLog(path)
    who = Participants("MODALITY", "DICOMNODE", "127.0.0.1:5000")
    log.record(
        AuditEvent.INSTANCES_TRANSFERRED,
        AuditAction.CREATE,
        AuditOutcome.SUCCESS,
        who,
        patient_id="P1",
        study_uid="1.2.3",
        instances=3,
    )
    log.record(
        AuditEvent.STUDY_DELETED,
        AuditAction.DELETE,
        AuditOutcome.SUCCESS,
        who,
        patient_id="P1",
        study_uid="1.2.3",
    )
    return log


def test_events_carry_dicom_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    events = read_events(path)
    assert events[0]["event_id"] == {
        "code": "110104",
        "scheme": "DCM",
        "meaning": "DICOM Instances Transferred",
    }
    assert events[0]["action"] == "C" and events[0]["outcome"] == 0
    assert events[0]["patient_id"] == "P1" and events[0]["calling_ae"] == "MODALITY"
    assert events[0]["details"] == {"instances": 3}
    assert events[1]["event_id"]["code"] == "110105"
    assert verify(path) == (2, [])


def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    fill(path)  # a new AuditLog object, as after a restart
    assert verify(path) == (4, [])


def test_edit_removal_and_torn_line_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path)
    fill(path)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["patient_id"] = "P2"
    path.write_text("\n".join([lines[0], json.dumps(edited), *lines[2:]]) + "\n")
    n, problems = verify(path)
    assert n == 4 and any("line 2" in p and "edited" in p for p in problems)

    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    assert any("removed or reordered" in p for p in verify(path)[1])

    path.write_text("\n".join(lines) + "\n" + lines[-1][:20])
    assert any("not a complete audit record" in p for p in verify(path)[1])
