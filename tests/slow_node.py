"""``python -m tests.slow_node serve ...``: the real ``dicom-node`` with slow model runs.

For the multi-process tests only: every job sleeps ``DICOM_NODE_TEST_JOB_SLEEP_S`` seconds
before its real inference, so a test can kill a worker process while it runs a job, or see two
workers run jobs at the same time. Everything else (the CLI, leases, the database, the
outputs) is the node's own code.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from dicom_node.app.cli import main
from dicom_node.work import worker

SLEEP_ENV = "DICOM_NODE_TEST_JOB_SLEEP_S"


def _slow(real: Any, sleep_s: float) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        time.sleep(sleep_s)
        return real(*args, **kwargs)

    return run


if __name__ == "__main__":
    worker.segment_series = _slow(worker.segment_series, float(os.environ[SLEEP_ENV]))  # type: ignore[assignment]
    sys.exit(main())
