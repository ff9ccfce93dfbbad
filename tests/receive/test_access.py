"""Access control over real loopback sockets: raw A-ASSOCIATE-RQ PDUs, networks, alerts."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.app.node import stage_settings
from dicom_node.audit.file_chain import read_events
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import ConfigError
from dicom_node.config.settings import parse_settings
from dicom_node.receive.access import ae_title_problem
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database
from tests.conftest import free_port, wait_for
from tests.receive.raw import A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, associate_rq, exchange


@pytest.fixture
def make_receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    started: list[tuple[Receiver, Database]] = []

    def make(**overrides: Any) -> Receiver:
        doc = {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / f"var{len(started)}"),
            "allowed_callers": ["MODALITY"],
            **overrides,
        }
        settings = parse_settings(doc)
        settings.storage_dir.mkdir(parents=True)
        stages = stage_settings(settings)
        db = Database(stages.layout.database_path)
        receiver = Receiver(stages.receiver, db, AuditLog(stages.layout.audit_path))
        receiver.start()
        started.append((receiver, db))
        return receiver

    yield make
    for receiver, db in started:
        receiver.stop()
        db.close()


@pytest.fixture
def receiver(make_receiver: Callable[..., Receiver]) -> Receiver:
    return make_receiver()


def alerts(receiver: Receiver, count: int = 1) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        events = [
            e
            for e in read_events(receiver.audit.path)
            if e["event_id"]["meaning"] == "Security Alert"
        ]
        return events if len(events) >= count else None

    return list(wait_for(found, 10, f"{count} Security Alert(s) in the audit trail"))


@pytest.mark.parametrize(
    "field",
    [b"", b"        ", b"MODALITY", b"  MODALITY  ", b"MODALITY\t", b"MODALITY\n", b"\x00MODALITY"],
)
def test_ae_title_rules(field: bytes) -> None:
    valid = field.strip(b" ") == b"MODALITY"
    assert (ae_title_problem(field.ljust(16, b" ")) is None) is valid


@pytest.mark.parametrize(
    "calling",
    [
        b"MODALITY\t",
        b"MODALITY\n",
        b"MODALITY\r\n",
        b"MODALITY\x00",
        b"\tMODALITY",
        b"MODAL\x1bITY",
        b"MODALIT\xc9",
        b"MODALITY\\X",
    ],
    ids=["tab", "newline", "crlf", "nul", "leading-tab", "esc", "non-ascii", "backslash"],
)
def test_a_calling_title_with_a_control_character_is_refused_and_audited(
    receiver: Receiver, calling: bytes
) -> None:
    answer = exchange(receiver.settings.port, associate_rq(calling=calling))
    # Titles that pynetdicom decodes (it strips TAB, LF, CR) are rejected here: rejected-
    # permanent (1), service-user (1), calling-AE-title-not-recognized (3). Titles it cannot
    # decode at all make it abort the request (A-ABORT): refused either way, and audited.
    assert answer[0] in (A_ASSOCIATE_RJ, A_ABORT), answer[:1]
    if answer[0] == A_ASSOCIATE_RJ:
        assert tuple(answer[7:10]) == (1, 1, 3)
    [alert] = alerts(receiver)
    assert alert["peer_address"].startswith("127.0.0.1:")
    assert alert["details"]["reason"].startswith("invalid calling AE title")
    server = receiver.server
    assert server is not None
    wait_for(lambda: not server.active_associations, 10, "the refused association's slot")


def test_a_called_title_with_a_newline_is_refused(receiver: Receiver) -> None:
    answer = exchange(receiver.settings.port, associate_rq(called=b"DICOMNODE\r\n"))
    assert answer[0] == A_ASSOCIATE_RJ and tuple(answer[7:10]) == (1, 1, 7)
    [alert] = alerts(receiver)
    assert alert["details"]["reason"].startswith("invalid called AE title")


def test_spaces_around_a_title_are_not_significant(receiver: Receiver) -> None:
    answer = exchange(receiver.settings.port, associate_rq(calling=b"  MODALITY"))
    assert answer[0] == A_ASSOCIATE_AC


def test_an_all_space_calling_title_that_pynetdicom_aborts_is_audited(receiver: Receiver) -> None:
    answer = exchange(receiver.settings.port, associate_rq(calling=b" " * 16))
    assert answer[:1] in (b"", bytes([A_ABORT]), bytes([A_ASSOCIATE_RJ]))
    [alert] = alerts(receiver)
    assert "empty" in alert["details"]["reason"]
    assert alert["peer_address"].startswith("127.0.0.1:")


def test_an_unknown_pdu_type_is_audited(receiver: Receiver) -> None:
    with socket.create_connection(("127.0.0.1", receiver.settings.port), timeout=5) as sock:
        sock.sendall(b"\x09\x00\x00\x00\x00\x02ab")
    [alert] = alerts(receiver)
    assert "invalid or unrecognised PDU" in alert["details"]["reason"]
    server = receiver.server
    assert server is not None
    wait_for(lambda: not server.active_associations, 5, "the slot of the junk connection")


def test_a_peer_abort_is_audited_and_a_release_is_not(receiver: Receiver) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.settings.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assoc.release()
    assoc = ae.associate("127.0.0.1", receiver.settings.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assoc.abort()
    [alert] = alerts(receiver)
    assert alert["details"]["reason"] == "aborted by the peer (A-ABORT)"
    assert alert["calling_ae"] == "MODALITY"


def test_a_peer_outside_allowed_networks_is_refused_and_audited(
    make_receiver: Callable[..., Receiver],
) -> None:
    receiver = make_receiver(allowed_networks=["10.0.0.0/8", "192.168.1.7"])
    answer = exchange(receiver.settings.port, associate_rq())
    assert answer[0] == A_ASSOCIATE_RJ
    [alert] = alerts(receiver)
    assert alert["details"]["reason"] == "peer address not in allowed_networks"
    assert alert["peer_address"].startswith("127.0.0.1:")


def test_a_peer_inside_allowed_networks_is_served(make_receiver: Callable[..., Receiver]) -> None:
    receiver = make_receiver(allowed_networks=["127.0.0.0/8"])
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.settings.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_allowed_networks_must_be_networks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"allowed_networks\[0\]"):
        parse_settings({"storage_dir": str(tmp_path), "allowed_networks": ["10.0.0.0/33"]})
