"""The assembler: decides when a series is complete and queues its jobs.

A series is complete when nothing arrived for it for ``stable_after_s``, or sooner: once the
association that sent its last instance was released and ``release_grace_s`` passed without a
new instance (peers that send one study over several associations get that grace). Each
matching route makes one job; a series no route matches is marked unrouted.
"""

from __future__ import annotations

import structlog

from dicom_node.config import Settings
from dicom_node.pipeline.routing import routes_for
from dicom_node.store.database import Database

log = structlog.get_logger(__name__)


class Assembler:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def tick(self, now: float | None = None) -> int:
        """Queue every series that is complete at ``now``; return how many."""
        ready = self.db.complete_series(
            self.settings.stable_after_s, self.settings.release_grace_s, now
        )
        for series_uid, attributes in ready:
            routes = routes_for(self.settings.routes, attributes)
            self.db.queue_series(series_uid, [r.name for r in routes], now)
            if routes:
                log.info(
                    "series.queued",
                    routes=[r.name for r in routes],
                    modality=attributes.get("Modality", ""),
                )
            else:
                log.info("series.unrouted", modality=attributes.get("Modality", ""))
        return len(ready)
