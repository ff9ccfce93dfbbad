"""A node process with a destination that is slow (its C-STORE handler is held by the test):
series assembly, the jobs and another route's destination carry on while it is held.

Synchronised on events, not on durations: everything the fast destination receives arrives
while the slow one is provably still inside its first C-STORE.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NodeProcess, StoreSCP, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.send.test_delivery import HeldSCP
from tests.test_end_to_end import results

pytestmark = pytest.mark.peers


def test_a_held_destination_delays_neither_assembly_nor_another_route(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    random_package: Path,
) -> None:
    slow = HeldSCP().start()
    try:
        node = node_factory(
            random_package,
            storescp.port,
            destinations={
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
                "slow": {"ae_title": "SLOW", "host": "127.0.0.1", "port": slow.port},
            },
            routes=[
                {
                    "name": "to-slow",
                    "match": {"Modality": ["CT"]},
                    "model": str(random_package),
                    "send_to": ["slow"],
                },
                {
                    "name": "to-pacs",
                    "match": {"Modality": ["CT"]},
                    "model": str(random_package),
                    "send_to": ["pacs"],
                },
            ],
            send={
                "max_attempts": 5,
                "initial_backoff_s": 0.3,
                "max_backoff_s": 1,
                "timeout_s": 120,
            },
        ).start()
        first = write_files(ct_series(n_slices=3), tmp_path / "ct1")
        assert storescu(node.port, first).returncode == 0
        assert slow.entered.wait(120), "the slow destination never got a C-STORE"
        assert set(results(storescp)) == {"SEG", "SR"}
        # A second series, sent while the slow destination still holds the first result:
        second = write_files(ct_series(n_slices=3), tmp_path / "ct2")
        assert storescu(node.port, second).returncode == 0
        results(storescp, n=4)
        assert slow.stored == [] and not slow.release.is_set()  # still inside its first C-STORE
        jobs = node.status()["jobs"]
        assert jobs == {"done": 4}, jobs  # both series assembled and run for both routes
        slow.release.set()
        wait_for(lambda: len(slow.stored) == 4, 60, "the slow destination to get its 4 results")
        wait_for(lambda: node.status()["sends"] == {"done": 8}, 30, "every send marked done")
    finally:
        slow.stop()
