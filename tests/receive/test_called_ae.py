"""The Called AE Title is checked: other titles are refused at association time and audited."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.audit.file_chain import read_events
from dicom_node.receive.receiver import Receiver
from tests.conftest import PEER_ENV, require_tool, wait_for
from tests.receive.peers import running_receiver


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(
        tmp_path, {"called_ae_titles": ["AI-CHEST"], "allowed_callers": ["MODALITY"]}
    ) as receiver:
        yield receiver


def associate(port: int, called: str, calling: str = "MODALITY") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def alerts(receiver: Receiver) -> list[dict[str, Any]]:
    return [
        e for e in read_events(receiver.audit.path) if e["event_id"]["meaning"] == "Security Alert"
    ]


def test_a_wrong_called_ae_title_is_rejected_and_audited(receiver: Receiver) -> None:
    assoc = associate(receiver.settings.port, "ANY-SCP")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # rejected-permanent (1), service-user (1), called-AE-title-not-recognized (7): PS3.8 9.3.4
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)
    [alert] = wait_for(lambda: alerts(receiver), 5, "the Security Alert")
    assert alert["called_ae"] == "ANY-SCP" and alert["calling_ae"] == "MODALITY"
    assert alert["details"]["reason"].startswith("called AE title not recognized: 'ANY-SCP'")


def test_the_wrong_caller_is_audited_as_such(receiver: Receiver) -> None:
    assert associate(receiver.settings.port, "DICOMNODE", calling="INTRUDER").is_rejected
    # pynetdicom sends the A-ASSOCIATE-RJ before EVT_REJECTED, whose handler audits it.
    [alert] = wait_for(lambda: alerts(receiver), 5, "the Security Alert")
    assert alert["details"]["reason"] == "calling AE title not in allowed_callers"


@pytest.mark.parametrize("called", ["DICOMNODE", "AI-CHEST"])
def test_the_node_title_and_the_extra_titles_are_accepted(receiver: Receiver, called: str) -> None:
    assoc = associate(receiver.settings.port, called)
    assert assoc.is_established
    assert str(assoc.acceptor.primitive.called_ae_title).strip() == called
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert alerts(receiver) == []


@pytest.mark.peers
def test_dcmtk_echoscu_with_a_wrong_called_title(receiver: Receiver) -> None:
    def echoscu(called: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [require_tool("echoscu"), "-aet", "MODALITY", "-aec", called, "127.0.0.1"]
            + [str(receiver.settings.port)],
            env=PEER_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )

    refused = echoscu("WRONG")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu("DICOMNODE").returncode == 0 and echoscu("AI-CHEST").returncode == 0
    assert [a["called_ae"] for a in alerts(receiver)] == ["WRONG"]
