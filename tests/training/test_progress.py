"""Progress lines: first item, every n-th, at least every every_s seconds, last; or nothing."""

from __future__ import annotations

import io

from dicom_node.training.progress import ProgressLines, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_by_count_and_by_time() -> None:
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines("evaluate", 100, "cases", every_n=25, stream=out, clock=clock)
    for i in range(1, 101):
        clock.now += 62.0 if i == 60 else 2.0  # 2 s per case, case 60 takes a minute
        lines.update(detail="x" if i == 100 else "")
    printed = out.getvalue().splitlines()
    assert printed[0] == "evaluate: 1/100 cases, 2 s elapsed, about 3 min 18 s left"
    counts = [int(line.split()[1].split("/")[0]) for line in printed]
    assert counts == [1, 16, 25, 40, 50, 60, 75, 90, 100]  # 16, 40, 60, 90: by time
    assert printed[-1] == "evaluate: 100/100 cases, 4 min 20 s elapsed; x"


def test_time_only_and_disabled() -> None:
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(
        "epoch", 10, "batches", by_count=False, every_s=30, stream=out, clock=clock
    )
    for i in range(1, 11):
        clock.now = i * 10.0
        lines.update()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["3/10", "6/10", "9/10"]
    silent = io.StringIO()
    off = ProgressLines("x", 3, "cases", enabled=False, stream=silent, clock=clock)
    for _ in range(3):
        off.update()
    off.print("anything")
    assert silent.getvalue() == ""


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (5, 65, 3725)] == ["5 s", "1 min 5 s", "1 h 02 min"]


def test_time_left_of_a_resumed_count_uses_this_run_pace_only() -> None:
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines("train", 10, "epochs", every_n=1, already_done=6, stream=out, clock=clock)
    clock.now = 60.0
    lines.update(7)  # one epoch in this run: 60 s each, three left
    clock.now = 120.0
    lines.update(8)
    printed = out.getvalue().splitlines()
    assert printed[0] == "train: 7/10 epochs, 1 min 0 s elapsed, about 3 min 0 s left"
    assert printed[1] == "train: 8/10 epochs, 2 min 0 s elapsed, about 2 min 0 s left"
