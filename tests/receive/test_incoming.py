"""Incoming data sets are written under ``<storage_dir>/incoming`` and renamed into the spool.

Real loopback associations; a data set sent in several PDUs from a raw socket is looked at
while it arrives, as in test_limits.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import dimse_messages
from pynetdicom.dsutils import encode

from dicom_node.common.status import StoreStatus
from dicom_node.receive import incoming
from dicom_node.store.files import instance_path
from dicom_node.store.journal import Journal
from tests.conftest import wait_for
from tests.receive.peers import (
    c_store_command,
    ct_instance,
    p_data_pdu,
    running_receiver,
    store_association,
)

FRAGMENT = 256 * 1024


def encoded(ds: Dataset) -> bytes:
    """``ds`` as the sender puts it on the wire (Explicit VR Little Endian, no file meta)."""
    data = encode(ds, False, True)
    assert data is not None
    return data


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def start_data_set(assoc: Any, ds: Dataset, data: bytes) -> tuple[Any, int]:
    """Send the C-STORE-RQ of ``ds`` and all but the last fragment of ``data``, raw."""
    cx = assoc.accepted_contexts[0].context_id
    sock = assoc.dul.socket.socket
    sock.sendall(c_store_command(cx, CTImageStorage, ds.SOPInstanceUID))
    for start in range(0, len(data) - FRAGMENT, FRAGMENT):
        sock.sendall(p_data_pdu(cx, 0x00, data[start : start + FRAGMENT]))
    return sock, cx


def finish_data_set(sock: Any, cx: int, data: bytes) -> None:
    last = (len(data) - 1) // FRAGMENT * FRAGMENT
    sock.sendall(p_data_pdu(cx, 0x02, data[last:]))


def indexed(node: Any) -> set[str]:
    return {r[0] for r in node.db._query("SELECT sop_instance_uid FROM instances")}


def test_a_data_set_arrives_in_storage_incoming_and_is_renamed_into_the_spool(
    tmp_path: Path,
) -> None:
    ds = ct_instance(pixel_bytes=1024 * 1024)  # four fragments
    data = encoded(ds)
    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    with running_receiver(tmp_path) as node:
        incoming = node.settings.storage_dir / "incoming"
        assoc = store_association(node.settings.port)
        sock, cx = start_data_set(assoc, ds, data)
        # Mid-transfer: the data set is a file under storage_dir/incoming, not in /tmp.
        (arriving,) = wait_for(
            lambda: [p for p in files_in(incoming) if p.stat().st_size > 3 * FRAGMENT],
            10,
            "the data set written in storage_dir/incoming",
        )
        assert not {
            p
            for p in set(Path(tempfile.gettempdir()).iterdir()) - temp_before
            if p.suffix == ".dcm"
        }
        inode = arriving.stat().st_ino
        finish_data_set(sock, cx, data)
        wait_for(lambda: indexed(node) == {ds.SOPInstanceUID}, 10, "the instance indexed")
        stored = instance_path(
            node.settings.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        # The very file that arrived (renamed, not copied), holding the bytes as sent.
        assert stored.stat().st_ino == inode
        content = stored.read_bytes()
        assert content[128:132] == b"DICM" and content.endswith(data)
        assert files_in(incoming) == []
        assoc.release()


def test_each_receiver_in_a_process_has_its_own_incoming_folder(tmp_path: Path) -> None:
    with (
        running_receiver(tmp_path / "a") as first,
        running_receiver(tmp_path / "b") as second,
    ):
        open_ = []
        for node in (first, second):
            ds = ct_instance(pixel_bytes=1024 * 1024)
            assoc = store_association(node.settings.port)
            start_data_set(assoc, ds, encoded(ds))
            open_.append(assoc)
        for node in (first, second):
            incoming = node.settings.storage_dir / "incoming"
            wait_for(lambda f=incoming: len(files_in(f)) == 1, 10, "one file in each folder")
        for assoc in open_:
            assoc.abort()


def test_an_aborted_transfer_leaves_nothing_in_incoming(tmp_path: Path) -> None:
    ds = ct_instance(pixel_bytes=1024 * 1024)
    with running_receiver(tmp_path) as node:
        incoming = node.settings.storage_dir / "incoming"
        assoc = store_association(node.settings.port)
        start_data_set(assoc, ds, encoded(ds))
        wait_for(lambda: files_in(incoming), 10, "the partial data set in incoming")
        assoc.abort()
        wait_for(lambda: node.server.open_connections == 0, 10, "the connection closed")
        wait_for(lambda: files_in(incoming) == [], 5, "the partial data set removed")
        assert list(node.settings.spool_dir.rglob("*.dcm")) == []
        assert indexed(node) == set()


def test_a_refused_instance_leaves_nothing_in_incoming(tmp_path: Path) -> None:
    with running_receiver(tmp_path) as node:
        assoc = store_association(node.settings.port)
        bad = ct_instance(pixel_bytes=4096)
        bad.SeriesInstanceUID = "1.2.3/../../etc"
        rsp = assoc.send_c_store(bad)
        assert rsp.Status == StoreStatus.CANNOT_UNDERSTAND
        assoc.release()
        assert files_in(node.settings.storage_dir / "incoming") == []


def test_stale_incoming_files_are_removed_at_start(tmp_path: Path) -> None:
    storage = tmp_path / "node"
    (storage / "incoming").mkdir(parents=True)
    (storage / "incoming" / "rx-killed.dcm").write_bytes(b"half a data set")
    (storage / "keep.txt").write_bytes(b"not ours to remove")
    with running_receiver(tmp_path) as node:
        assert node.settings.storage_dir == storage
        assert files_in(storage / "incoming") == []
        assert (storage / "keep.txt").read_bytes() == b"not ours to remove"


def test_a_node_whose_temp_folder_is_unusable_still_receives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any file in the system temp folder would now fail (it is a regular file, not a folder).
    not_a_folder = tmp_path / "tmp-is-a-file"
    not_a_folder.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    with pytest.raises(OSError), tempfile.NamedTemporaryFile():
        pass
    with running_receiver(tmp_path) as node:
        assoc = store_association(node.settings.port)
        sent = [ct_instance(pixel_bytes=p) for p in (1024, 3 * 1024 * 1024)]
        for ds in sent:
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        assoc.release()
        assert indexed(node) == {ds.SOPInstanceUID for ds in sent}
    assert os.path.isfile(not_a_folder)


def test_elsewhere_pynetdicom_keeps_the_system_temp_folder(tmp_path: Path) -> None:
    # Outside a registered receiver's DUL threads (here: the test's own thread, e.g. an SCU
    # receiving a C-STORE), the replacement leaves NamedTemporaryFile as it was.
    incoming.install()
    assert dimse_messages.NamedTemporaryFile is not tempfile.NamedTemporaryFile
    with dimse_messages.NamedTemporaryFile(suffix=".dcm") as fh:
        assert Path(fh.name).parent == Path(tempfile.gettempdir())


def test_no_success_when_the_received_file_cannot_be_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The journal's fdatasync is the one flush per instance; its failure decides the answer.
    def failing_sync(self: Journal, segment: Any, end: int) -> None:
        time.sleep(0.2)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Journal, "_sync", failing_sync)
    with running_receiver(tmp_path) as node:
        assoc = store_association(node.settings.port)
        rsp = assoc.send_c_store(ct_instance(pixel_bytes=4096))
        assert rsp.Status == StoreStatus.OUT_OF_RESOURCES
        assert rsp.ErrorComment == "cannot write the instance to disk"
        assoc.release()
        assert indexed(node) == set()
        assert list(node.settings.spool_dir.rglob("*.dcm")) == []
        assert files_in(node.settings.storage_dir / "incoming") == []
