"""Connections and memory are bounded: no peer holds a slot, memory or disk beyond the limits.

Real loopback sockets; a second "host" is another loopback address (127.0.0.2, ...).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, generate_uid

from dicom_node.common.status import StoreStatus
from dicom_node.receive import limits as net_limits
from tests.conftest import wait_for
from tests.receive.peers import (
    HALF_OPEN_RQ,
    c_store_command,
    closed_within,
    connect,
    ct_instance,
    echo,
    is_closed_by_peer,
    p_data_pdu,
    running_receiver,
    store_association,
    vm_rss_bytes,
)
from tests.receive.raw import (
    A_RELEASE_RP,
    data_set_pdus,
    dimse_response,
    read_pdu,
    storage_association,
)


def indexed(node: object) -> set[str]:
    rows = node.db._query("SELECT sop_instance_uid FROM instances")  # type: ignore[attr-defined]
    return {r[0] for r in rows}


def test_40_half_open_connections_do_not_lock_out_a_c_echo(tmp_path: Path) -> None:
    with running_receiver(tmp_path, idle_timeout_s=3) as node:
        port = node.settings.port
        # 40 hosts, each one half-open A-ASSOCIATE-RQ: more than max_associations (32).
        socks = [connect(port, f"127.0.0.{10 + i}") for i in range(40)]
        for sock in socks:
            sock.sendall(HALF_OPEN_RQ)
        wait_for(lambda: node.server.open_connections >= 40, 5, "40 connections accepted")
        start = time.monotonic()
        assoc = echo(port, "127.0.0.2")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - start < 2.0
        # Each half-open connection is closed after idle_timeout_s and its slot freed.
        wait_for(lambda: all(is_closed_by_peer(s) for s in socks), 5, "half-open closed")
        wait_for(lambda: node.server.open_connections == 0, 5, "slots freed")
        for sock in socks:
            sock.close()


def test_connections_from_one_host_are_capped_and_others_still_served(tmp_path: Path) -> None:
    with running_receiver(tmp_path, idle_timeout_s=30, max_associations_per_peer=4) as node:
        port = node.settings.port
        socks = [connect(port) for _ in range(40)]
        for sock in socks:
            sock.sendall(HALF_OPEN_RQ)
        # Beyond 4 from this host, closed at once (no A-ASSOCIATE-RQ to answer yet).
        wait_for(lambda: sum(is_closed_by_peer(s) for s in socks) >= 36, 5, "36 refused")
        start = time.monotonic()
        assoc = echo(port, "127.0.0.2")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - start < 2.0
        for sock in socks:
            sock.close()
        wait_for(lambda: node.server.open_connections == 0, 5, "slots freed when peers go")


@pytest.mark.parametrize("gap_s", [0.4, 3.0], ids=["slow-drip", "long-gap"])
def test_a_dripping_connection_is_closed_within_the_limits(tmp_path: Path, gap_s: float) -> None:
    # A 1-byte drip: a short gap is cut by min_bytes_per_s, a long one by idle_timeout_s.
    with running_receiver(tmp_path, idle_timeout_s=1.0, min_bytes_per_s=100) as node:
        sock = connect(node.settings.port)
        sock.sendall(HALF_OPEN_RQ[:6])
        start = time.monotonic()
        closed = None
        for byte in HALF_OPEN_RQ[6:] + bytes(200):
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - start
                break
            closed_after = closed_within(sock, gap_s)
            if closed_after is not None:
                closed = time.monotonic() - start
                break
        assert closed is not None and closed < 1.0 + 1.0 + 0.5, closed
        wait_for(lambda: node.server.open_connections == 0, 5, "slot freed")
        sock.close()


def test_per_peer_cap_with_a_reserve_for_c_echo(tmp_path: Path) -> None:
    limits = {"max_associations": 3, "reserved_associations": 1, "max_associations_per_peer": 2}
    with running_receiver(tmp_path, **limits) as node:
        port = node.settings.port
        a = [store_association(port, "127.0.0.1", "SLOW1") for _ in range(2)]
        assert all(x.is_established for x in a)
        # A third from the same host: no slot for it (closed before any association).
        assert not store_association(port, "127.0.0.1", "SLOW1").is_established
        # Another host fills the unreserved share: refused, transient, local limit exceeded.
        b = store_association(port, "127.0.0.2", "OTHER")
        assert b.is_rejected
        rj = b.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
        # A C-ECHO uses the reserve.
        e = echo(port, "127.0.0.3")
        assert e.is_established and e.send_c_echo().Status == 0
        e.release()
        # The slot is free as soon as a peer goes away.
        a[0].release()
        c = wait_for(
            lambda: (x := store_association(port, "127.0.0.2", "OTHER")).is_established and x,
            5,
            "a freed slot",
        )
        c.release()
        a[1].release()


def test_a_never_completed_data_set_does_not_grow_memory(tmp_path: Path) -> None:
    announced = 50 * 1024 * 1024
    with running_receiver(tmp_path, max_instance_bytes=200 * 1024 * 1024) as node:
        incoming = node.settings.storage_dir / "incoming"
        assoc = store_association(node.settings.port)
        assert assoc.is_established
        cx = assoc.accepted_contexts[0].context_id
        sock = assoc.dul.socket.socket
        sock.sendall(c_store_command(cx, CTImageStorage, generate_uid()))
        chunk = p_data_pdu(cx, 0x00, bytes(1024 * 1024 - 64))
        rss_before = vm_rss_bytes()
        peak = rss_before
        sent = 0
        while sent < announced:
            sock.sendall(chunk)
            sent += len(chunk)
            peak = max(peak, vm_rss_bytes())
        time.sleep(0.5)  # let the node catch up; then sample while the data set stays open
        for _ in range(10):
            peak = max(peak, vm_rss_bytes())
            time.sleep(0.05)
        growth = peak - rss_before
        # On disk, in the node's storage (under its watermark), not in memory or /tmp.
        (partial,) = list(incoming.iterdir())
        assert partial.stat().st_size >= announced
        print(f"RSS growth while {sent >> 20} MiB of a data set stayed open: {growth >> 20} MiB")
        assert growth < 20 * 1024 * 1024
        assoc.abort()
        wait_for(lambda: node.server.open_connections == 0, 10, "slot freed")
        # The partial data set written by pynetdicom is removed when the connection ends.
        assert list(incoming.iterdir()) == []


def test_an_instance_over_max_instance_bytes_is_refused(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_instance_bytes=64 * 1024) as node:
        assoc = store_association(node.settings.port)
        small_over = ct_instance(pixel_bytes=200 * 1024)  # one PDU: answered 0xA700
        rsp = assoc.send_c_store(small_over)
        assert rsp.Status == StoreStatus.OUT_OF_RESOURCES
        assert "max_instance_bytes" in rsp.ErrorComment
        fits = ct_instance(pixel_bytes=1024)
        assert assoc.send_c_store(fits).Status == StoreStatus.SUCCESS
        big = ct_instance(pixel_bytes=3 * 1024 * 1024)  # several PDUs: cut while it arrives
        rsp = assoc.send_c_store(big)
        assert "Status" not in rsp
        wait_for(lambda: not assoc.is_established, 5, "the association cut")
        assert indexed(node) == {fits.SOPInstanceUID}


def test_below_the_disk_watermark_stores_are_refused_echo_served_and_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = {"bytes": 600 * 1024}  # below the 1 MiB mark, above the 512 KiB floor
    monkeypatch.setattr(net_limits, "free_disk_bytes", lambda path: free["bytes"])
    with running_receiver(tmp_path, min_free_disk_bytes=1024 * 1024) as node:
        assoc = store_association(node.settings.port)
        first = ct_instance()
        rsp = assoc.send_c_store(first)
        assert rsp.Status == StoreStatus.OUT_OF_RESOURCES
        assert "free-space" in rsp.ErrorComment
        e = echo(node.settings.port, "127.0.0.2")
        assert e.send_c_echo().Status == 0
        e.release()
        free["bytes"] = 10 * 1024 * 1024  # space returns: stores resume by themselves
        assert assoc.send_c_store(first).Status == StoreStatus.SUCCESS
        # Below the floor, a data set of several PDUs is read, dropped and refused: 0xA700,
        # never an abort; the association goes on.
        free["bytes"] = 10
        rsp = assoc.send_c_store(ct_instance(pixel_bytes=3 * 1024 * 1024))
        assert rsp.Status == StoreStatus.OUT_OF_RESOURCES
        assert rsp.ErrorComment == "node storage below its free-space mark"
        assert assoc.is_established
        free["bytes"] = 10 * 1024 * 1024
        second = ct_instance(pixel_bytes=3 * 1024 * 1024)
        assert assoc.send_c_store(second).Status == StoreStatus.SUCCESS
        assoc.release()
        assert indexed(node) == {first.SOPInstanceUID, second.SOPInstanceUID}


@pytest.mark.parametrize("when", ["at-start", "while-it-arrives"])
def test_a_data_set_below_the_disk_floor_is_read_dropped_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # Free space below half the mark as the data set starts, or falling there while it
    # arrives: the rest is read and dropped (the file never holds more than about one PDU),
    # and the C-STORE answered 0xA700 with an Error Comment.
    free = {"bytes": 10 if when == "at-start" else 10 * 1024 * 1024}
    monkeypatch.setattr(net_limits, "free_disk_bytes", lambda path: free["bytes"])
    pdu_bytes = 128 * 1024
    with running_receiver(tmp_path, min_free_disk_bytes=1024 * 1024) as node:
        incoming = node.settings.storage_dir / "incoming"
        sock = storage_association(node.settings.port, CTImageStorage)
        ds = ct_instance(pixel_bytes=3 * 1024 * 1024)
        sock.sendall(c_store_command(1, CTImageStorage, ds.SOPInstanceUID))
        largest = 0
        for i, pdu in enumerate(data_set_pdus(ds, pdu_bytes)):
            if i == 8 and when == "while-it-arrives":
                # 1 MiB written: checked again within the next MiB, then dropped.
                free["bytes"] = 10
            sock.sendall(pdu)
            time.sleep(0.01)
            if i > 18:  # past the first checks: what remains on disk is one fragment
                sizes = [p.stat().st_size for p in incoming.iterdir() if p.exists()]
                largest = max([largest, *sizes])
        rsp = dimse_response(sock)
        assert rsp.Status == StoreStatus.OUT_OF_RESOURCES
        assert rsp.ErrorComment == "node storage below its free-space mark"
        assert largest <= 2 * pdu_bytes + 4096, largest
        # The association goes on: space is back, the next instance is stored.
        free["bytes"] = 10 * 1024 * 1024
        ok = ct_instance()
        sock.sendall(c_store_command(1, CTImageStorage, ok.SOPInstanceUID))
        for pdu in data_set_pdus(ok, pdu_bytes):
            sock.sendall(pdu)
        assert dimse_response(sock).Status == StoreStatus.SUCCESS
        sock.sendall(bytes.fromhex("0500000000040000 0000".replace(" ", "")))  # A-RELEASE-RQ
        assert read_pdu(sock)[:1] == bytes([A_RELEASE_RP])
        sock.close()
        assert indexed(node) == {ok.SOPInstanceUID}
        wait_for(lambda: list(incoming.iterdir()) == [], 5, "the dropped data set's file gone")


def test_a_data_set_of_small_complete_pdus_sent_slowly_is_cut(tmp_path: Path) -> None:
    # Each PDU arrives whole and well within idle_timeout_s, so neither the idle limit nor
    # the rate inside a PDU ends it; 112 bytes every 0.3 s is below min_bytes_per_s over the
    # data set's whole transfer, which is cut after idle_timeout_s plus what was sent.
    with running_receiver(tmp_path, idle_timeout_s=1.0, min_bytes_per_s=2000) as node:
        incoming = node.settings.storage_dir / "incoming"
        sock = storage_association(node.settings.port, CTImageStorage)
        sock.sendall(c_store_command(1, CTImageStorage, generate_uid()))
        start = time.monotonic()
        sent = 0
        closed = None
        while time.monotonic() - start < 10:
            try:
                sock.sendall(p_data_pdu(1, 0x00, bytes(100)))
            except OSError:
                closed = time.monotonic() - start
                break
            sent += 1
            if closed_within(sock, 0.3) is not None:
                closed = time.monotonic() - start
                break
        assert closed is not None, "the slow data set was never cut"
        assert sent >= 3 and closed < 1.0 + 2.0, (sent, closed)
        sock.close()
        wait_for(lambda: node.server.open_connections == 0, 5, "slot freed")
        wait_for(lambda: list(incoming.iterdir()) == [], 5, "the partial data set removed")
        # The node keeps serving another sender.
        assoc = store_association(node.settings.port, "127.0.0.2")
        fits = ct_instance()
        assert assoc.send_c_store(fits).Status == StoreStatus.SUCCESS
        assoc.release()
        assert indexed(node) == {fits.SOPInstanceUID}
