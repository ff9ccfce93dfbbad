"""A lean C-STORE SCP on raw sockets: a ceiling measurement, NOT the node's receive path.

What a Python receive path outside pynetdicom could reach at best (issue 19): the DICOM upper
layer (PS3.8 section 9.3) is hand-encoded here on plain sockets; pydicom only decodes and
encodes the DIMSE command sets (Implicit VR Little Endian) and writes the File Meta
Information. Happy path only, as DCMTK ``storescu`` needs it:

- A-ASSOCIATE-RQ -> A-ASSOCIATE-AC: every presentation context whose abstract syntax is a
  storage SOP class or Verification is accepted with the first offered transfer syntax among
  Implicit / Explicit VR Little Endian; other abstract syntaxes are rejected (result 3),
  other transfer syntaxes too (result 4). Maximum PDU 1 MiB, as the node's.
- P-DATA-TF: command and data fragments reassembled by their Message Control Header; C-ECHO-RQ
  -> RSP; C-STORE-RQ: the data set fragments are written as they arrive to
  ``FOLDER/<SOP Instance UID>.dcm`` (preamble, File Meta Information, data set), one
  ``os.fdatasync`` per instance (none with ``--no-sync``), then C-STORE-RSP Success.
- A-RELEASE-RQ -> A-RELEASE-RP; A-ABORT and EOF close the association; anything else aborts.

Left out, compared with the node: access checks (calling/called AE titles, peers), limits
(sizes, associations, time), validation of the data set, the audit journal, the index, the
rename into the spool and the folder fsync, metrics, logging, the routing that follows.

Design, as the node's receivers (dicom_node.app.receivers): the parent accepts on the port
and hands each connection (SCM_RIGHTS over a socket pair) to the one of ``--processes N``
forked workers with the fewest open connections; a worker serves each association in a
thread of its own (blocking sockets; the GIL is released in recv, write, fdatasync).
``--reuseport`` instead gives each worker its own ``SO_REUSEPORT`` socket on the port (the
kernel hashes each connection to one of them: 4 senders on 2 workers split 2+2 only 3 times
in 8). On SIGTERM each worker prints one line of counts to stderr (no patient data). Runs
until SIGTERM or SIGINT.

    python -m benchmarks.lean_scp --port PORT --folder FOLDER [--processes N] [--no-sync]
        [--reuseport] [--ae-title LEANSCP]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from types import FrameType

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import AllStoragePresentationContexts

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
#: Storage SOP classes (pynetdicom's list, the node's: only the UIDs, no networking) + echo.
ACCEPTED_CLASSES = frozenset(
    [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax]
    + [VERIFICATION]
)
ACCEPTED_SYNTAXES = (str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian))
MAX_PDU = 1024 * 1024  # what we announce (A-ASSOCIATE-AC maximum length)
MAX_ACCEPTED_PDU = 64 * 1024 * 1024  # a peer that ignores it is aborted beyond this
IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.9.7433.1.19"
IMPLEMENTATION_VERSION = b"LEAN_SCP_0"
SOCKET_TIMEOUT_S = 60.0
UID_RE = re.compile(r"[0-9.]{1,64}")

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
RELEASE_RP = b"\x06\x00" + struct.pack(">I", 4) + b"\x00" * 4
ABORT = b"\x07\x00" + struct.pack(">I", 4) + b"\x00" * 4


class Abort(Exception):
    """The peer did what this happy-path SCP does not handle: abort the association."""


def uid_text(raw: bytes | memoryview) -> str:
    """A UID from an association item (some senders pad it with NUL or space)."""
    return bytes(raw).rstrip(b"\x00 ").decode("ascii")


def item(kind: int, value: bytes) -> bytes:
    """One association item or sub-item: type, reserved byte, 2-byte length, value."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_ac(rq: memoryview) -> tuple[bytes, dict[int, str]]:
    """The A-ASSOCIATE-AC for the A-ASSOCIATE-RQ body ``rq`` (PS3.8 9.3.2, 9.3.3), and the
    accepted presentation contexts: {context ID: transfer syntax UID}."""
    accepted: dict[int, str] = {}
    answers = []
    offset = 68  # protocol version, reserved, called AE, calling AE, 32 reserved bytes
    while offset + 4 <= len(rq):
        kind, length = rq[offset], struct.unpack_from(">H", rq, offset + 2)[0]
        value = rq[offset + 4 : offset + 4 + length]
        offset += 4 + length
        if kind != 0x20:  # application context and user information: ours are fixed
            continue
        context_id, abstract, syntaxes = value[0], "", []
        sub = 4
        while sub + 4 <= len(value):
            sub_kind, sub_len = value[sub], struct.unpack_from(">H", value, sub + 2)[0]
            text = uid_text(value[sub + 4 : sub + 4 + sub_len])
            if sub_kind == 0x30:
                abstract = text
            elif sub_kind == 0x40:
                syntaxes.append(text)
            sub += 4 + sub_len
        chosen = next((ts for ts in syntaxes if ts in ACCEPTED_SYNTAXES), None)
        if abstract not in ACCEPTED_CLASSES:
            result, chosen = 3, None  # abstract syntax not supported
        elif chosen is None:
            result = 4  # transfer syntaxes not supported
        else:
            result = 0
            accepted[context_id] = chosen
        ts_item = item(0x40, (chosen or (syntaxes[0] if syntaxes else "")).encode())
        answers.append(item(0x21, bytes([context_id, 0, result, 0]) + ts_item))
    user = item(
        0x50,
        item(0x51, struct.pack(">I", MAX_PDU))
        + item(0x52, IMPLEMENTATION_CLASS_UID)
        + item(0x55, IMPLEMENTATION_VERSION),
    )
    # Called and calling AE titles and the reserved bytes are sent back as received.
    body = b"\x00\x01\x00\x00" + bytes(rq[4:68]) + item(0x10, APPLICATION_CONTEXT)
    body += b"".join(answers) + user
    return b"\x02\x00" + struct.pack(">I", len(body)) + body, accepted


def encode_command(command: Dataset) -> bytes:
    """A command set in Implicit VR Little Endian, with its Command Group Length first."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, command)
    body = fp.getvalue()
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def p_data(context_id: int, command: Dataset) -> bytes:
    """A P-DATA-TF with the whole command set in one PDV (command, last fragment)."""
    data = encode_command(command)
    pdv = struct.pack(">IBB", len(data) + 2, context_id, 0x03) + data
    return b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv


def response(request: Dataset, field: int, status: int) -> Dataset:
    """The C-ECHO-RSP or C-STORE-RSP to ``request``."""
    rsp = Dataset()
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    rsp.CommandField = field
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.CommandDataSetType = NO_DATA_SET
    rsp.Status = status
    if "AffectedSOPInstanceUID" in request:
        rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    return rsp


def file_header(request: Dataset, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of the instance ``request`` stores."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = request.AffectedSOPClassUID
    meta.MediaStorageSOPInstanceUID = request.AffectedSOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID.decode())
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION.decode()
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class Association:
    """One association on an accepted socket, served to its end by :meth:`run`."""

    def __init__(self, sock: socket.socket, folder: Path, sync: bool) -> None:
        self.sock = sock
        self.folder = folder
        self.sync = sync
        self.buffer = bytearray(MAX_PDU + 64)
        self.contexts: dict[int, str] = {}
        self.command = bytearray()  # command fragments so far
        self.request: Dataset | None = None  # the C-STORE-RQ whose data set is arriving
        self.fd = -1
        self.stored = 0
        self.associated = False  # an A-ASSOCIATE-RQ came (a port probe sends none)

    def recv_exact(self, n: int) -> memoryview:
        """The next ``n`` bytes, in :attr:`buffer` (valid until the next call)."""
        if n > len(self.buffer):
            if n > MAX_ACCEPTED_PDU:
                raise Abort(f"PDU of {n} bytes")
            self.buffer = bytearray(n)
        view = memoryview(self.buffer)[:n]
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if k == 0:
                raise EOFError
            got += k
        return view

    def run(self) -> int:
        """Serve the association; the number of instances stored."""
        try:
            while True:
                kind, length = struct.unpack(">BxI", self.recv_exact(6))
                body = self.recv_exact(length)
                if kind == 0x01:
                    self.associated = True
                    ac, self.contexts = associate_ac(body)
                    self.sock.sendall(ac)
                elif kind == 0x04:
                    self.p_data(body)
                elif kind == 0x05:
                    self.sock.sendall(RELEASE_RP)
                    return self.stored
                elif kind == 0x07:
                    return self.stored
                else:
                    raise Abort(f"PDU type {kind:#04x}")
        except EOFError:
            return self.stored
        except (Abort, ValueError, KeyError, AttributeError, struct.error):
            with contextlib.suppress(OSError):
                self.sock.sendall(ABORT)
            return self.stored
        finally:
            if self.fd >= 0:
                os.close(self.fd)  # an instance cut short: its partial file stays
            self.sock.close()

    def p_data(self, body: memoryview) -> None:
        offset = 0
        while offset < len(body):
            length, context_id, control = struct.unpack_from(">IBB", body, offset)
            fragment = body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if control & 0x01:  # command
                self.command += fragment
                if control & 0x02:
                    self.on_command(context_id)
            else:
                if self.fd < 0:
                    raise Abort("data set fragment without a C-STORE-RQ")
                write_all(self.fd, fragment)
                if control & 0x02:
                    self.on_data_set_end(context_id)

    def on_command(self, context_id: int) -> None:
        request = read_dataset(BytesIO(self.command), True, True)
        self.command.clear()
        field = request.CommandField
        if field == C_ECHO_RQ:
            self.sock.sendall(p_data(context_id, response(request, C_ECHO_RSP, 0)))
        elif field == C_STORE_RQ and request.CommandDataSetType != NO_DATA_SET:
            uid = str(request.AffectedSOPInstanceUID)
            if not UID_RE.fullmatch(uid):
                raise Abort("SOP Instance UID that is no UID")
            path = self.folder / f"{uid}.dcm"
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            write_all(self.fd, memoryview(file_header(request, self.contexts[context_id])))
            self.request = request
        else:
            raise Abort(f"command {field:#06x}")

    def on_data_set_end(self, context_id: int) -> None:
        if self.sync:
            os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = -1
        assert self.request is not None
        self.sock.sendall(p_data(context_id, response(self.request, C_STORE_RSP, 0)))
        self.request = None
        self.stored += 1


def worker(
    next_connection: Callable[[], socket.socket | None],
    folder: Path,
    sync: bool,
    done: Callable[[], None],
) -> None:
    """Serve the connections ``next_connection`` gives (None: the end), a thread each;
    ``done`` after each; one line of counts on stderr at the end (or SIGTERM)."""
    counts = {"associations": 0, "instances": 0}
    lock = threading.Lock()

    def serve(conn: socket.socket) -> None:
        association = Association(conn, folder, sync)
        stored = association.run()
        with lock:
            counts["associations"] += association.associated
            counts["instances"] += stored
        done()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while (conn := next_connection()) is not None:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(SOCKET_TIMEOUT_S)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    except SystemExit:
        pass
    with lock:
        print(
            f"lean_scp worker {os.getpid()}: {counts['associations']} associations, "
            f"{counts['instances']} instances",
            file=sys.stderr,
            flush=True,
        )


def listen(port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def handed_worker(handoff: socket.socket, folder: Path, sync: bool) -> None:
    """A worker fed by the parent: each connection comes over ``handoff`` (SCM_RIGHTS), and
    one byte goes back when it is closed."""

    def next_connection() -> socket.socket | None:
        _, fds, _, _ = socket.recv_fds(handoff, 16, 1)
        return socket.socket(fileno=fds[0]) if fds else None

    worker(next_connection, folder, sync, lambda: handoff.sendall(b"x"))


def reuseport_worker(port: int, folder: Path, sync: bool) -> None:
    """A worker that accepts on its own ``SO_REUSEPORT`` socket on ``port``."""
    own = listen(port, True)
    worker(lambda: own.accept()[0], folder, sync, lambda: None)


def dispatch(listener: socket.socket, handoffs: list[socket.socket], stop: threading.Event) -> None:
    """Accept on ``listener`` and hand each connection to the worker with the fewest open
    connections, until ``stop`` is set or a worker is gone."""
    open_count = [0] * len(handoffs)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, -1)
    for k, handoff in enumerate(handoffs):
        selector.register(handoff, selectors.EVENT_READ, k)
    while not stop.is_set():
        for key, _ in selector.select(0.2):
            if key.data == -1:
                conn, _ = listener.accept()
                k = open_count.index(min(open_count))
                socket.send_fds(handoffs[k], [b"c"], [conn.fileno()])
                conn.close()
                open_count[k] += 1
            else:
                closed = handoffs[key.data].recv(64)
                if not closed:
                    print("lean_scp: a worker died", file=sys.stderr, flush=True)
                    return
                open_count[key.data] -= len(closed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lean_scp", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True, help="where instances are written")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-sync", action="store_true", help="no fdatasync per instance")
    parser.add_argument(
        "--reuseport", action="store_true", help="a SO_REUSEPORT socket per worker, no hand-off"
    )
    parser.add_argument("--ae-title", default="LEANSCP", help="accepted as any other (unchecked)")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    sync = not args.no_sync
    listener = None if args.reuseport else listen(args.port, False)
    children: list[int] = []
    handoffs: list[socket.socket] = []
    for _ in range(args.processes):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                for other in handoffs:
                    other.close()
                if listener is None:
                    reuseport_worker(args.port, args.folder, sync)
                else:
                    listener.close()
                    handed_worker(theirs, args.folder, sync)
            except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
                code = 1
            os._exit(code)
        theirs.close()
        children.append(pid)
        handoffs.append(ours)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if listener is not None:
        dispatch(listener, handoffs, stop)
    else:
        while not stop.wait(0.2):
            if any(os.waitpid(pid, os.WNOHANG)[0] for pid in children):
                print("lean_scp: a worker died", file=sys.stderr, flush=True)
                break
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in children:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.02)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
