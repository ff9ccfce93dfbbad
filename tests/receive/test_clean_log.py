"""A node under malformed PDUs keeps a clean JSON log: one object per line, no patient data."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.audit.file_chain import read_events
from tests.conftest import NodeProcess, free_port
from tests.factories import PATIENT_ID, PATIENT_NAME
from tests.receive.raw import A_ASSOCIATE_AC, associate_rq, p_data_tf, read_pdu


def element(group: int, elem: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element (the encoding of every command set)."""
    if len(value) % 2:
        value += b" "
    return struct.pack("<HHL", group, elem, len(value)) + value


#: Command sets a broken or hostile peer might send: no Command Field (0000,0100), one with
#: patient data where a command belongs, a truncated element, bytes that are no dataset.
GARBAGE_COMMANDS = [
    element(0x0010, 0x0010, PATIENT_NAME.encode()) + element(0x0010, 0x0020, PATIENT_ID.encode()),
    element(0x0000, 0x0002, b"1.2.840.10008.1.1\x00")
    + element(0x0010, 0x0010, PATIENT_NAME.encode()),
    element(0x0000, 0x0100, struct.pack("<H", 0x0030))[:-1] + PATIENT_NAME.encode(),
    b"\xff" * 7 + PATIENT_NAME.encode(),
]


def send_garbage(port: int, command: bytes) -> None:
    """Associate (Verification), then send ``command`` as a P-DATA-TF command PDV."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(associate_rq(calling=b"MODALITY", called=b"DICOMNODE"))
        assert read_pdu(sock)[:1] == bytes([A_ASSOCIATE_AC])
        sock.sendall(p_data_tf(command))
        read_pdu(sock)  # an A-ABORT, or nothing until the timeout


def test_malformed_p_data_leaves_a_clean_json_log(
    node_factory: Callable[..., NodeProcess], random_package: Path
) -> None:
    node = node_factory(random_package, free_port(), log_format="json", log_level="info")
    node.start()
    for command in GARBAGE_COMMANDS:
        send_garbage(node.port, command)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established, "the node still answers after the garbage"
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    node.stop()

    lines = node.log.read_text().splitlines()
    assert lines, "the node logged nothing"
    events = []
    for number, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {number} of the log is not JSON: {line[:200]!r}") from None
    text = "\n".join(lines)
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe^Jane"):
        assert secret not in text
    # The node saw the garbage (and said so in a structured way) and audited each one.
    assert any(e.get("level") in ("error", "warning") for e in events)
    alerts = [
        e
        for e in read_events(node.storage / "audit.jsonl")
        if e["event_id"]["meaning"] == "Security Alert"
    ]
    assert len(alerts) == len(GARBAGE_COMMANDS)
    assert all(a["peer_address"].startswith("127.0.0.1:") for a in alerts)
    assert all("malformed PDU" in a["details"]["reason"] for a in alerts), alerts
