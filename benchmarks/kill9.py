"""kill -9 goal of issue 19: 20 random kills of a receiving node while four DCMTK storescu
send, each followed by a restart and the check of ``tests/crash.py`` (every instance answered
Success indexed once with its whole content; nothing half-written or unsent indexed).

Usage: ``PYTHONPATH=. python -m benchmarks.kill9 [--kills 20] [--seed 19]``; prints one JSON
line (rounds, instances answered Success, indexed, lost, duplicated, damaged).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from dicom_node.testing.random_package import make_random_package
from tests.conftest import NodeProcess, free_port, node_settings
from tests.crash import crash_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--per-sender", type=int, default=30)
    parser.add_argument("--pixel-bytes", type=int, default=64 * 1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill9-") as tmp:
        root = Path(tmp)
        model = root / "model"
        make_random_package(model)
        settings = node_settings(root / "node", model, free_port(), log_level="info")
        settings["routes"][0]["match"] = {"Modality": ["MR"]}  # receive and index only
        node = NodeProcess(root / "node", settings)
        node.config.write_text(yaml.safe_dump(settings))
        try:
            rounds, outcome = crash_rounds(
                node, root / "sent", args.kills, args.seed, args.per_sender, args.pixel_bytes
            )
        finally:
            node.stop()
        mid_transfer = sum(1 for r in rounds if 0 < len(r.success) < len(r.sent))
        print(
            json.dumps(
                {
                    "kills": len(rounds),
                    "kills_mid_transfer": mid_transfer,
                    "success": outcome.success,
                    "indexed": outcome.indexed,
                    "lost": len(outcome.lost),
                    "duplicated": len(outcome.duplicated),
                    "damaged": len(outcome.damaged),
                    "unknown": len(outcome.unknown),
                    "seed": args.seed,
                }
            )
        )


if __name__ == "__main__":
    main()
