"""Operational logging with structlog: JSON in production, readable on a console.

Operational logs carry job ids, association ids, counts and states. They never carry patient
names, patient IDs, birth dates or accession numbers: only the audit trail names patients.
Third-party loggers that dump datasets at debug level (pynetdicom, pydicom) are held at WARNING.

Every exception goes through the same handler, one JSON object per line in production:
uncaught ones in any thread (:data:`threading.excepthook`, :data:`sys.excepthook`, pynetdicom's
reactor threads included) and the ones pynetdicom logs with ``LOGGER.exception``. A traceback
keeps the exception's type and the frames (file, line, function, source line) but not its
message, which may quote a dataset value (a patient name in a pydicom ``ValueError``); only
the messages of dicom-node's own errors (:class:`~dicom_node.common.errors.DicomNodeError`), written
to carry no patient data, are kept.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from types import TracebackType
from typing import Any

import structlog
from structlog.typing import EventDict

from dicom_node.common.errors import DicomNodeError

_uncaught = structlog.get_logger("dicom_node.uncaught")


def safe_exception(exc: BaseException) -> str:
    """A traceback of ``exc`` (and its causes) with types and frames, messages left out.

    Parameters
    ----------
    exc : BaseException
        The exception to describe.

    Returns
    -------
    str
        ``Traceback`` lines as :mod:`traceback` writes them, each exception's last line
        being its qualified type name only, unless it is a :class:`DicomNodeError`.
    """
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = "".join(traceback.format_tb(current.__traceback__))
        kind = f"{type(current).__module__}.{type(current).__qualname__}"
        last = f"{kind}: {current}" if isinstance(current, DicomNodeError) else kind
        parts.append(f"Traceback (most recent call last):\n{frames}{last}")
        current = current.__cause__ or current.__context__
    return "\n\nwhich happened while handling:\n".join(parts)


def _safe_exc_info(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: ``exc_info`` becomes ``exception``, a traceback without messages."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        event_dict["exception"] = safe_exception(exc_info)
    elif isinstance(exc_info, tuple) and exc_info[1] is not None:
        event_dict["exception"] = safe_exception(exc_info[1])
    return event_dict


def _no_exception_message(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """A standard-library record whose message is an exception (``LOGGER.exception(exc)``,
    as pynetdicom writes) logs the exception's type, not its text."""
    record = event_dict.get("_record")
    message = getattr(record, "msg", None)
    if isinstance(message, BaseException) and not isinstance(message, DicomNodeError):
        event_dict["event"] = f"exception {type(message).__name__}"
    return event_dict


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """An exception no thread caught: one structured line, the thread's name, no message."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    _uncaught.error("thread.uncaught_exception", thread=name, exc_info=exc)


def _sys_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """An exception the main thread did not catch: logged like any other, then exit."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    _uncaught.critical("uncaught_exception", thread="MainThread", exc_info=exc)


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Route structlog and the standard library's logging to stderr in ``fmt``."""
    # JSON needs the traceback rendered into the event; the console renderer does it itself.
    renderers: list[structlog.types.Processor] = (
        [structlog.processors.JSONRenderer()]
        if fmt == "json"
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _no_exception_message,
        _safe_exc_info,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # No caching: a module's logger keeps following the configuration (a cached one
        # would ignore a later configure, e.g. structlog.testing.capture_logs in tests).
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs whole datasets (names, IDs) at DEBUG and PDU details at INFO;
    # dicomweb-client and urllib3 log request URLs and headers at DEBUG and INFO.
    for noisy in ("pynetdicom", "highdicom", "PIL", "matplotlib", "dicomweb_client", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom's validation warnings quote the offending value, which may be a patient name.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    threading.excepthook = _thread_excepthook
    sys.excepthook = _sys_excepthook
