"""kill -9 of a receiving node: four DCMTK ``storescu`` senders, SIGKILL at a random instant
(seeded), restart, and a check that every instance answered Success is indexed exactly once
with its whole content, and that nothing else (half-written) is indexed.

Used by ``tests/receive/test_kill9.py`` (a few kills) and ``benchmarks/kill9.py`` (20).
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import PEER_ENV, NodeProcess, require_tool
from tests.receive.peers import ct_instance

SENDERS = 4
#: storescu -v: the file it sends, then the answer to it.
SENDING = re.compile(r"^I: Sending file: (.+)$")
ANSWERED = re.compile(r"^I: Received Store Response \((.+)\)")


@dataclass
class Round:
    """One send-and-kill round."""

    sent: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> pixel data
    success: set[str] = field(default_factory=set)
    #: Seconds from the first answer to the kill.
    kill_after_s: float = 0.0


@dataclass
class Outcome:
    """What the checks found over all rounds."""

    rounds: int = 0
    success: int = 0
    indexed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def write_batches(
    folder: Path, senders: int, per_sender: int, pixel_bytes: int
) -> list[list[tuple[Path, str, bytes]]]:
    """Files for each sender: (path, SOP Instance UID, pixel data); one study per sender."""
    batches = []
    for s in range(senders):
        study = generate_uid()
        series = generate_uid()
        batch = []
        for i in range(per_sender):
            ds = ct_instance(pixel_bytes=pixel_bytes, study_uid=study)
            ds.SeriesInstanceUID = series
            ds.InstanceNumber = i + 1
            ds.PixelData = random.randbytes(len(ds.PixelData))
            path = folder / f"s{s}-{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            batch.append((path, str(ds.SOPInstanceUID), bytes(ds.PixelData)))
        batches.append(batch)
    return batches


def send_and_kill(
    node: NodeProcess, folder: Path, rng: random.Random, per_sender: int, pixel_bytes: int
) -> Round:
    """Four storescu at once; SIGKILL the node after a random delay; what was answered."""
    exe = require_tool("storescu")
    folder.mkdir(parents=True, exist_ok=True)
    batches = write_batches(folder, SENDERS, per_sender, pixel_bytes)
    result = Round(kill_after_s=rng.uniform(0.0, 0.6))
    by_path: dict[str, str] = {}
    for batch in batches:
        for path, sop, pixels in batch:
            result.sent[sop] = pixels
            by_path[str(path)] = sop
    procs = []
    outputs = []
    for i, batch in enumerate(batches):
        log = (folder / f"storescu{i}.log").open("w")
        outputs.append(log)
        procs.append(
            subprocess.Popen(
                [exe, "-v", "-aet", f"MODALITY{i}", "-aec", "DICOMNODE", "127.0.0.1"]
                + [str(node.port)]
                + [str(p) for p, _, _ in batch],
                env=PEER_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    # The random instant is counted from the first answer, so that kills land mid-transfer
    # whatever the machine's load (at most 60 s of waiting for it).
    logs = [folder / f"storescu{i}.log" for i in range(len(batches))]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        "Received Store Response" in log.read_text(errors="replace") for log in logs
    ):
        time.sleep(0.01)
    time.sleep(result.kill_after_s)
    node.kill9()
    for proc in procs:
        proc.wait(timeout=60)
    for log in outputs:
        log.close()
    for i in range(len(batches)):
        current = None
        for line in (folder / f"storescu{i}.log").read_text(errors="replace").splitlines():
            if m := SENDING.match(line):
                current = by_path.get(m.group(1).strip())
            elif (m := ANSWERED.match(line)) and current is not None:
                if m.group(1) == "Success":
                    result.success.add(current)
                current = None
    return result


def check(node: NodeProcess, rounds: list[Round], outcome: Outcome) -> Outcome:
    """After a restart: every Success indexed once, whole; nothing indexed that was not sent."""
    sent = {sop: pixels for r in rounds for sop, pixels in r.sent.items()}
    success = set().union(*(r.success for r in rounds))
    with sqlite3.connect(node.storage / "node.sqlite3") as db:
        rows = db.execute("SELECT sop_instance_uid, path FROM instances").fetchall()
    counts: dict[str, int] = {}
    for sop, _ in rows:
        counts[sop] = counts.get(sop, 0) + 1
    outcome.rounds = len(rounds)
    outcome.success = len(success)
    outcome.indexed = len(counts)
    outcome.lost = sorted(success - set(counts))
    outcome.duplicated = sorted(sop for sop, n in counts.items() if n > 1)
    outcome.unknown = sorted(set(counts) - set(sent))
    outcome.damaged = []
    for sop, path in rows:
        if sop not in sent:
            continue
        try:
            ds = dcmread(path)
            whole = str(ds.SOPInstanceUID) == sop and bytes(ds.PixelData) == sent[sop]
        except Exception:  # noqa: BLE001 - any unreadable file is damaged
            whole = False
        if not whole:
            outcome.damaged.append(sop)
    return outcome


def crash_rounds(
    node: NodeProcess, folder: Path, kills: int, seed: int, per_sender: int, pixel_bytes: int
) -> tuple[list[Round], Outcome]:
    """``kills`` rounds of send, kill -9, restart, check; the outcome after the last."""
    rng = random.Random(seed)
    random.seed(seed)
    rounds: list[Round] = []
    outcome = Outcome()
    node.start()
    for k in range(kills):
        rounds.append(send_and_kill(node, folder / f"round{k}", rng, per_sender, pixel_bytes))
        node.start()  # recovery runs before it listens
        check(node, rounds, outcome)
        if outcome.lost or outcome.duplicated or outcome.damaged or outcome.unknown:
            break
    return rounds, outcome
