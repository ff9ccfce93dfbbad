"""Operational logging: JSON lines with tracebacks, third-party dataset dumps held back."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from dicom_node.common.errors import InputError
from dicom_node.common.log import configure_logging
from tests.factories import PATIENT_NAME


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = threading.excepthook, sys.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    threading.excepthook, sys.excepthook = hooks
    structlog.reset_defaults()


def test_json_logs_carry_tracebacks_without_messages(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    try:
        raise RuntimeError(PATIENT_NAME)
    except RuntimeError:
        structlog.get_logger("t").exception("worker.error", job_id=7)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    event = json.loads(line)
    assert event["event"] == "worker.error" and event["job_id"] == 7
    assert event["exception"].endswith("builtins.RuntimeError")
    assert "test_json_logs_carry_tracebacks_without_messages" in event["exception"]
    assert PATIENT_NAME not in line


def test_our_own_error_messages_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    try:
        raise InputError("Rows (0028,0010) is missing")
    except InputError:
        structlog.get_logger("t").exception("job.failed")
    event = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert event["exception"].endswith("InputError: Rows (0028,0010) is missing")


def test_an_exception_in_any_thread_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")

    def crash() -> None:
        raise AttributeError(PATIENT_NAME)

    thread = threading.Thread(target=crash, name="AcceptorThread@test")
    thread.start()
    thread.join()
    [line] = capsys.readouterr().err.strip().splitlines()
    event = json.loads(line)
    assert event["event"] == "thread.uncaught_exception"
    assert event["thread"] == "AcceptorThread@test" and event["level"] == "error"
    assert event["exception"].endswith("builtins.AttributeError")
    assert PATIENT_NAME not in line


def test_pynetdicom_exceptions_are_logged_without_their_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    try:
        raise ValueError(PATIENT_NAME)
    except ValueError as exc:
        logging.getLogger("pynetdicom.dul").exception(exc)  # as pynetdicom does
    [line] = capsys.readouterr().err.strip().splitlines()
    event = json.loads(line)
    assert event["event"] == "exception ValueError" and event["logger"] == "pynetdicom.dul"
    assert PATIENT_NAME not in line


def test_pydicom_and_pynetdicom_detail_is_held_back(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "debug")
    logging.getLogger("pynetdicom").debug("(0010,0010) Patient's Name PN: Doe^Jane")
    logging.getLogger("pydicom").warning("Invalid value for VR PN: 'Doe^Jane'")
    assert "Doe" not in capsys.readouterr().err
