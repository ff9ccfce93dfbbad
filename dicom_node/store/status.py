"""``dicom-node status`` and the metrics' queue depths: counts per state, failures, sends.

Read at the moment they are asked for, so they are right after a restart too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dicom_node.store.connection import Store
from dicom_node.store.files import free_disk_bytes
from dicom_node.store.sends import SendState
from dicom_node.store.states import CaseState, JobState, SeriesState

__all__ = ["SERIES_SHOWN", "SqlStatus", "disk_space", "format_bytes"]

#: How ``status`` shows a queued series (stored state ``queued`` from its completion on),
#: by the latest job of each route it is an input of: any running -> ``processing``; any
#: pending, or no job yet (an input of a study case still waiting) -> ``queued``; any failed
#: -> ``failed``; all done -> ``processed``. Other states (receiving, unrouted, ignored) show
#: as stored.
SERIES_SHOWN = ("processing", "queued", "failed", "processed")

_SERIES_COUNTS = """
WITH latest AS (
    SELECT ci.series_uid, j.state, ROW_NUMBER() OVER (
        PARTITION BY ci.series_uid, j.route ORDER BY j.id DESC) AS n
    FROM case_inputs ci JOIN jobs j ON j.id = ci.job_id WHERE j.state != ?
), ranked AS (
    SELECT series_uid,
        MAX(CASE state WHEN ? THEN 4 WHEN ? THEN 3 WHEN ? THEN 2 ELSE 1 END) AS r
    FROM latest WHERE n = 1 GROUP BY series_uid
)
SELECT CASE WHEN s.state != ? THEN s.state
    WHEN k.r = 4 THEN 'processing' WHEN k.r = 3 OR k.r IS NULL THEN 'queued'
    WHEN k.r = 2 THEN 'failed' ELSE 'processed' END AS shown, COUNT(*) AS n
FROM series s LEFT JOIN ranked k ON k.series_uid = s.series_uid
GROUP BY shown
"""


def disk_space(storage_dir: Path, min_free_disk_bytes: int) -> dict[str, Any]:
    """Free space on ``storage_dir`` against ``limits.min_free_disk_bytes``, for ``status``.

    Returns ``storage_dir``, ``free_bytes`` (for this process, on the file system that holds
    the folder, or its nearest existing parent), ``min_free_disk_bytes`` and ``below_mark``
    (True: every C-STORE is refused with 0xA700 until space returns).
    """
    folder = storage_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = free_disk_bytes(folder)
    return {
        "storage_dir": str(storage_dir),
        "free_bytes": free,
        "min_free_disk_bytes": min_free_disk_bytes,
        "below_mark": free < min_free_disk_bytes,
    }


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB`` ... ``2.0 TiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class SqlStatus(Store):
    """Counts of the node's database for ``status``."""

    def status(self, now: float | None = None) -> dict[str, Any]:
        """Counts per state, failed jobs and cases, sends per destination: ``status``.

        Per destination: counts of its sends by state, ``next_attempt_at`` (epoch seconds)
        and ``next_attempt_in_s`` of its earliest pending send, and ``last_error`` (with
        ``last_error_at``) of the most recently failed send not yet delivered.
        """
        now = time.time() if now is None else now
        return {
            "instances": self.instance_count(),
            **self.case_status(),
            **self.send_status(now),
        }

    def instance_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM instances")[0]["n"])

    def case_status(self) -> dict[str, Any]:
        """Series (shown as :data:`SERIES_SHOWN` says), cases and jobs by state; failures."""

        def counts(table: str) -> dict[str, int]:
            rows = self._query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            return {r["state"]: r["n"] for r in rows}

        failed_jobs = self._query(
            "SELECT id, series_uid, route, attempts, error FROM jobs WHERE state = ? "
            "ORDER BY id DESC LIMIT 20",
            (JobState.FAILED,),
        )
        failed_cases = self._query(
            "SELECT id, route, waiting_since, updated_at, error FROM cases WHERE state = ? "
            "ORDER BY id DESC LIMIT 20",
            (CaseState.FAILED,),
        )
        series = self._query(
            _SERIES_COUNTS,
            (
                JobState.SUPERSEDED,
                JobState.RUNNING,
                JobState.PENDING,
                JobState.FAILED,
                SeriesState.QUEUED,
            ),
        )
        return {
            "series": {r["shown"]: r["n"] for r in series},
            "cases": counts("cases"),
            "jobs": counts("jobs"),
            "failed_jobs": [dict(r) for r in failed_jobs],
            "failed_cases": [dict(r) for r in failed_cases],
        }

    def send_status(self, now: float) -> dict[str, Any]:
        """Sends by state, and per destination: counts, next attempt, latest error."""
        counts = self._query("SELECT state, COUNT(*) AS n FROM sends GROUP BY state")
        per_dest = self._query(
            "SELECT destination, state, COUNT(*) AS n, MIN(next_attempt_at) AS next_at "
            "FROM sends GROUP BY destination, state"
        )
        destinations: dict[str, dict[str, Any]] = {}
        for r in per_dest:
            d = destinations.setdefault(r["destination"], {})
            d[r["state"]] = r["n"]
            if r["state"] == SendState.PENDING:
                d["next_attempt_at"] = float(r["next_at"])
                d["next_attempt_in_s"] = round(max(0.0, float(r["next_at"]) - now), 1)
        # The most recent error of sends not yet delivered (waiting or dead-lettered).
        errors = self._query(
            "SELECT destination, last_error, updated_at AS at FROM (SELECT destination, "
            "last_error, updated_at, ROW_NUMBER() OVER (PARTITION BY destination "
            "ORDER BY updated_at DESC, id DESC) AS n FROM sends "
            "WHERE state != ? AND last_error IS NOT NULL) latest WHERE n = 1",
            (SendState.DONE,),
        )
        for r in errors:
            d = destinations.setdefault(r["destination"], {})
            d["last_error"] = r["last_error"]
            d["last_error_at"] = float(r["at"])
        return {"sends": {r["state"]: r["n"] for r in counts}, "destinations": destinations}
