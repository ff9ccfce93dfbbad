"""Hostile peers for the network tests: raw sockets, hand-made PDUs, a receiver with limits."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.app.node import stage_settings
from dicom_node.audit.log import AuditLog
from dicom_node.config.settings import parse_settings
from dicom_node.receive.receiver import Receiver
from dicom_node.store.database import Database
from tests.conftest import free_port

#: The first 16 bytes of an A-ASSOCIATE-RQ announcing 200 bytes: a half-open association.
HALF_OPEN_RQ = bytes.fromhex("01000000 00c80001 00004449 434f4d4e".replace(" ", ""))


@contextmanager
def running_receiver(
    tmp_path: Path, settings_doc: Mapping[str, Any] | None = None, **limits: Any
) -> Iterator[Receiver]:
    """A receiver on 127.0.0.1 with ``limits:`` overrides and other top-level settings from
    ``settings_doc`` (e.g. ``called_ae_titles``), stopped at the end."""
    settings = parse_settings(
        {
            "ae_title": "DICOMNODE",
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "node"),
            **(settings_doc or {}),
            "limits": limits,
        },
        base=tmp_path,
    )
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    stages = stage_settings(settings)
    db = Database(stages.layout.database_path)
    node = Receiver(stages.receiver, db, AuditLog(stages.layout.audit_path))
    node.start()
    try:
        yield node
    finally:
        node.stop()
        db.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the node from the loopback address ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def is_closed_by_peer(sock: socket.socket) -> bool:
    """True when the node has closed ``sock`` (EOF or reset); never blocks."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def echo(port: int, source: str = "127.0.0.1", calling: str = "ECHOSCU") -> Any:
    """Associate for Verification only from ``source``; the association (or its refusal)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(source, 0))


def store_association(port: int, source: str = "127.0.0.1", calling: str = "MODALITY") -> Any:
    """Associate for CT Image Storage from ``source``."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(source, 0))


def ct_instance(pixel_bytes: int = 128, study_uid: str | None = None) -> Dataset:
    """A small CT image; ``pixel_bytes`` of native 8-bit pixel data (rows of 64 columns)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "LIMITS-1"
    ds.PatientName = "Limits^Test"
    ds.Modality = "CT"
    rows = max(1, pixel_bytes // 64)
    ds.Rows, ds.Columns = rows, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(rows * 64)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def p_data_pdu(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV item (PS3.8 9.3.5): ``control`` is the message header."""
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0x00, len(item)) + item


def c_store_command(context_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RQ command set that announces a data set."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = encode(message.command_set, True, True)
    assert command is not None
    return p_data_pdu(context_id, 0x03, command)


def vm_rss_bytes() -> int:
    """Resident memory of this process (the in-process node), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def closed_within(sock: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the node closed ``sock``, polled; None when still open at ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if is_closed_by_peer(sock):
            return time.monotonic() - start
        time.sleep(0.02)
    return None
