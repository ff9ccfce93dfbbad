"""Operational logging: JSON lines with tracebacks, third-party dataset dumps held back."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from dicom_node.log import configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_json_logs_carry_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("t").exception("worker.error", job_id=7)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert event["event"] == "worker.error" and event["job_id"] == 7
    assert "RuntimeError: boom" in event["exception"]


def test_pydicom_and_pynetdicom_detail_is_held_back(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "debug")
    logging.getLogger("pynetdicom").debug("(0010,0010) Patient's Name PN: Doe^Jane")
    logging.getLogger("pydicom").warning("Invalid value for VR PN: 'Doe^Jane'")
    assert "Doe" not in capsys.readouterr().err
