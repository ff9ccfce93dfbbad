"""Raw PDUs on raw sockets, for tests that must send what a well-behaved SCU never would."""

from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

#: PDU types (PS3.8 Table 9-1).
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = (
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x07,
)


def associate_rq(
    calling: bytes = b"MODALITY",
    called: bytes = b"DICOMNODE",
    abstract_syntax: str = Verification,
    transfer_syntax: str | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU whose AE title fields hold the given raw bytes; one presentation
    context (id 1): ``abstract_syntax`` (Verification) with ``transfer_syntax`` (all default
    ones when None)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "CALLING"
    primitive.called_ae_title = "CALLED"
    context = build_context(abstract_syntax, transfer_syntax)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = bytearray(pdu.encode())
    data[10:26] = called.ljust(16, b" ")[:16]
    data[26:42] = calling.ljust(16, b" ")[:16]
    return bytes(data)


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; return the first PDU answered (b'' if closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return read_pdu(sock)


def p_data_tf(pdv: bytes, context_id: int = 1, control: int = 0x03) -> bytes:
    """A P-DATA-TF PDU of one PDV; ``control`` 0x03: a command set, last fragment."""
    item = bytes([context_id, control]) + pdv
    body = struct.pack(">L", len(item)) + item
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> bytes:
    """The next PDU from ``sock`` (b'' when closed or silent until its timeout)."""
    header = b""
    while len(header) < 6:
        try:
            chunk = sock.recv(6 - len(header))
        except TimeoutError:
            return header
        if not chunk:
            return header
        header += chunk
    (length,) = struct.unpack(">L", header[2:6])
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return header + body


def storage_association(port: int, abstract_syntax: str) -> socket.socket:
    """A raw association for ``abstract_syntax`` in Explicit VR Little Endian (context id 1)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        associate_rq(abstract_syntax=abstract_syntax, transfer_syntax=ExplicitVRLittleEndian)
    )
    answer = read_pdu(sock)
    assert answer[:1] == bytes([A_ASSOCIATE_AC]), answer[:1]
    return sock


def data_set_pdus(ds: Dataset, pdu_bytes: int, context_id: int = 1) -> list[bytes]:
    """``ds`` in Explicit VR Little Endian as P-DATA-TF PDUs of ``pdu_bytes`` of data each,
    the last one marked last fragment."""
    data = encode(ds, False, True)
    assert data is not None
    pieces = [data[i : i + pdu_bytes] for i in range(0, len(data), pdu_bytes)]
    return [
        p_data_tf(piece, context_id, 0x02 if i == len(pieces) - 1 else 0x00)
        for i, piece in enumerate(pieces)
    ]


def dimse_response(sock: socket.socket) -> Dataset:
    """The command set of the next DIMSE message (one P-DATA-TF PDU with one PDV)."""
    pdu = read_pdu(sock)
    assert pdu[:1] == bytes([P_DATA_TF]), pdu[:1]
    (length,) = struct.unpack(">L", pdu[6:10])
    command = decode(BytesIO(pdu[12 : 10 + length]), True, True)
    assert command is not None
    return command
