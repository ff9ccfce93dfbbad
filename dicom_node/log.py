"""Operational logging with structlog: JSON in production, readable on a console.

Operational logs carry job ids, association ids, counts and states. They never carry patient
names, patient IDs, birth dates or accession numbers: only the audit trail names patients.
Third-party loggers that dump datasets at debug level (pynetdicom, pydicom) are held at WARNING.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Route structlog and the standard library's logging to stderr in ``fmt``."""
    # JSON needs the traceback rendered into the event; the console renderer does it itself.
    renderers: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if fmt == "json"
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
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
    # pynetdicom logs whole datasets (names, IDs) at DEBUG and PDU details at INFO.
    for noisy in ("pynetdicom", "highdicom", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom's validation warnings quote the offending value, which may be a patient name.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
