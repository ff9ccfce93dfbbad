"""kill -9 while four DCMTK senders send (issue 19): every instance answered Success is
indexed exactly once with its whole content after the restart, nothing half-written is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import NodeProcess, free_port
from tests.crash import crash_rounds

KILLS = 5
SEED = 19


@pytest.mark.slow
@pytest.mark.peers
def test_kill9_while_four_senders_send_loses_and_duplicates_nothing(
    tmp_path: Path, random_package: Path, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(random_package, free_port(), log_level="info")
    # Receive and index only: no route takes these CT series (no model run, no send).
    node.settings["routes"][0]["match"] = {"Modality": ["MR"]}
    node.config.write_text(yaml.safe_dump(node.settings))
    rounds, outcome = crash_rounds(
        node, tmp_path / "sent", KILLS, SEED, per_sender=60, pixel_bytes=64 * 1024
    )
    assert len(rounds) == KILLS, outcome
    assert outcome.lost == [] and outcome.duplicated == [], outcome
    assert outcome.damaged == [] and outcome.unknown == [], outcome
    # The kills hit while instances were being answered, not only before or after them.
    assert sum(1 for r in rounds if 0 < len(r.success) < len(r.sent)) >= KILLS // 2, [
        (len(r.success), len(r.sent)) for r in rounds
    ]
    log = node.log.read_text()
    assert "journal.recovered" in log
