"""The receiver's associations wait for work instead of polling every 1 ms
(:mod:`dicom_node.receive.reactor`); these tests fail when the hook stops applying, e.g. after
a pynetdicom upgrade that changes the loops it relies on."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import association as pynetdicom_association
from pynetdicom import dul as pynetdicom_dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from dicom_node.common.status import StoreStatus
from dicom_node.receive import reactor
from dicom_node.receive.receiver import Receiver
from tests.conftest import wait_for
from tests.receive.peers import ct_instance, running_receiver, store_association


def test_pynetdicom_loops_still_sleep_where_the_hook_waits() -> None:
    # The hook replaces these very calls; if pynetdicom changes them, re-check reactor.py
    # (and the upstream proposal in docs/pynetdicom-event-driven.md).
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(DULServiceProvider.run_reactor)
    assert "time.sleep(0.001)" in inspect.getsource(Association._run_reactor)
    assert "dimse.get_msg(block=False)" in inspect.getsource(Association._run_reactor)
    reactor.install()
    assert isinstance(pynetdicom_dul.time, reactor._ReactorTime)
    assert isinstance(pynetdicom_association.time, reactor._ReactorTime)


def test_other_threads_sleep_as_before() -> None:
    reactor.install()
    started = time.perf_counter()
    pynetdicom_association.time.sleep(0.02)
    assert time.perf_counter() - started >= 0.02


def test_an_idle_association_waits_instead_of_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    original = Receiver._on_store

    def spy(self: Receiver, event: Any) -> Any:
        seen.append(event.assoc)
        return original(self, event)

    monkeypatch.setattr(Receiver, "_on_store", spy)
    with running_receiver(tmp_path) as node:
        assoc = store_association(node.settings.port)
        assert assoc.send_c_store(ct_instance(pixel_bytes=4096)).Status == StoreStatus.SUCCESS
        time.sleep(1.0)  # idle: 1000 passes of each loop when polling every 1 ms
        assert assoc.send_c_store(ct_instance(pixel_bytes=4096)).Status == StoreStatus.SUCCESS
        served = seen[0]
        assert isinstance(served, reactor.EventAssociation)
        assert isinstance(served.dul, reactor.EventDUL)
        # Both loops went through the hook, about once per POLL_S while idle.
        assert 0 < served.event_waits < 200, served.event_waits
        assert 0 < served.dul.event_waits < 200, served.dul.event_waits
        started = time.perf_counter()
        assoc.release()
        wait_for(lambda: not served.is_alive(), 5, "the association thread to end")
        assert time.perf_counter() - started < 1.0
