"""A bare pynetdicom Storage SCP: the floor of the node's receive stack (benchmarks.receive).

The node's pynetdicom settings (``Receiver._ae``: maximum PDU 1 MiB, the same storage contexts
and transfer syntaxes, the same timeouts, ``STORE_RECV_CHUNKED_DATASET``, so each data set is
written to a file as it arrives, in ``FOLDER``), and a C-STORE handler that only answers
Success: nothing checked, kept or indexed (pynetdicom removes the file after the handler).

With ``--durable`` the handler also does what the node's durability contract costs, and
nothing else: fsync the received file, rename it into ``FOLDER/kept`` and fsync that folder,
and commit one row per instance to a SQLite database (WAL, ``synchronous=FULL``, as the node's).
No header is read and nothing is checked: the floor of a pynetdicom SCP that answers Success
only once an instance is durable. With ``--event-driven`` its associations wait for work
instead of polling (:mod:`dicom_node.receive.reactor`, as the node's). Runs until SIGTERM or
SIGINT.

    python -m benchmarks.bare_scp PORT FOLDER [--ae-title DICOMNODE] [--durable]
        [--event-driven]
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler

from dicom_node.common.syntaxes import ACCEPTED
from dicom_node.receive.reactor import make_event_driven
from dicom_node.store.files import fsync_file, rename_durably


class EventDrivenHandler(RequestHandler):
    """pynetdicom's request handler with :func:`dicom_node.receive.reactor.make_event_driven`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc


def bare_ae(ae_title: str) -> AE:
    """An AE with the settings of :meth:`dicom_node.receive.receiver.Receiver._ae` (defaults)."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 1024 * 1024
    ae.network_timeout = ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, list(ACCEPTED))
    return ae


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_scp", description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("folder", type=Path, help="where data sets are written while they arrive")
    parser.add_argument("--ae-title", default="DICOMNODE")
    parser.add_argument(
        "--durable", action="store_true", help="fsync, rename, fsync the folder, commit a row"
    )
    parser.add_argument(
        "--event-driven",
        action="store_true",
        help="the node's reactor hook: wait for work instead of polling every 1 ms",
    )
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(args.folder)  # one SCP per process: the process-wide temp folder
    _config.STORE_RECV_CHUNKED_DATASET = True
    kept = args.folder / "kept"
    kept.mkdir(exist_ok=True)
    db = sqlite3.connect(args.folder / "index.sqlite3", check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS instances (uid TEXT PRIMARY KEY, path TEXT)")
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        if args.durable:
            uid = str(event.request.AffectedSOPInstanceUID)
            path = kept / f"{uid}.dcm"
            fsync_file(Path(event.dataset_path))
            rename_durably(Path(event.dataset_path), path)
            with lock, db:
                db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?)", (uid, str(path)))
        return 0x0000

    ae = bare_ae(args.ae_title)
    server = ae.make_server(
        ("127.0.0.1", args.port),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        request_handler=EventDrivenHandler if args.event_driven else RequestHandler,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ae._servers.append(server)  # as start_server does: shutdown() removes it
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
