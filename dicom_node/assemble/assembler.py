"""The assembler: decides when a series or a study-level case is complete and queues its jobs.

A series is complete when nothing arrived for it for ``stable_after_s``, or sooner: once the
association that sent its last instance was released and ``release_grace_s`` passed without a
new instance (peers that send one study over several associations get that grace). A series
whose Modality is one of ``complete_at_release`` (default CR, DX, MG, IO, PX: projection
images) is complete at that release, without the grace: each of its images is segmented on
its own, so an image that a later association adds cannot change the results of those that
came before; with ``late_instances: reprocess`` it makes the series run again (same output
UIDs for the images already done, so a destination replaces those results). The node wakes
the assembler when an association is released, so such a series is queued at once. Each
matching series-level route makes one job; a series no route matches is marked unrouted.

A study-level route (``trigger: study``) opens a case for the study when a complete series
of it may fill one of its roles. The case is ready once no series of the study is still
receiving (the study has been quiet, as above) and every required role has a complete
series (chosen by :func:`~dicom_node.assemble.routing.assign_roles`); its job records which
series filled which role. At ``study_timeout_s`` after the case opened it runs with the
complete series it has, or, when a required role has none, fails: ``status`` lists the case
with the missing roles, and the log says ``case.failed``. Optional roles that no series fills
are left out. A case that waits again after a late series (``late_instances: reprocess``) but
would run on exactly the series of its last run, none of them changed, is not run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from dicom_node.assemble.routing import assign_roles, fills_a_role, routes_for
from dicom_node.config.sections import Route, Trigger
from dicom_node.store.cases import Case, CaseStore
from dicom_node.store.series import SeriesState, SeriesSummary

log = structlog.get_logger(__name__)

#: Series states that count as complete inputs of a case.
_COMPLETE = (SeriesState.QUEUED, SeriesState.UNROUTED)


@dataclass(frozen=True, kw_only=True)
class AssemblySettings:
    """What the assembler reads of the configuration (built by :mod:`dicom_node.app.node`)."""

    routes: tuple[Route, ...]
    stable_after_s: float
    release_grace_s: float
    complete_at_release: tuple[str, ...]
    #: Default of a study-level route's ``study_timeout_s``.
    study_timeout_s: float


class Assembler:
    """Queues the jobs of complete series and cases (:meth:`tick`) from the series in ``db``."""

    def __init__(self, settings: AssemblySettings, db: CaseStore) -> None:
        self.settings = settings
        self.db = db
        self._study_routes = [r for r in settings.routes if r.trigger is Trigger.STUDY]
        self._routes = {r.name: r for r in settings.routes}

    def tick(self, now: float | None = None) -> int:
        """Queue every series and case that is complete at ``now``; return how many jobs."""
        now = time.time() if now is None else now
        queued = 0
        for series_uid, attributes in self._complete(now):
            routes = routes_for(self.settings.routes, attributes)
            cases = [r for r in self._study_routes if fills_a_role(r, attributes)]
            self.db.queue_series(series_uid, [r.name for r in routes], now, in_case=bool(cases))
            queued += len(routes)
            if cases:
                info = self.db.series_info(series_uid) or {}
                for route in cases:
                    self.db.open_case(str(info.get("study_uid", "")), route.name, now)
            if routes or cases:
                log.info(
                    "series.queued",
                    routes=[r.name for r in routes],
                    cases=[r.name for r in cases],
                    modality=attributes.get("Modality", ""),
                )
            else:
                log.info("series.unrouted", modality=attributes.get("Modality", ""))
        for case in self.db.waiting_cases():
            queued += self._case(case, now)
        return queued

    def _complete(self, now: float) -> list[tuple[str, dict[str, str]]]:
        """Series complete at ``now``: quiet, released + grace, or released and of a modality
        that is complete at release."""
        stable, grace = self.settings.stable_after_s, self.settings.release_grace_s
        ready = dict(self.db.complete_series(stable, grace, now))
        at_release = set(self.settings.complete_at_release)
        if at_release and grace > 0:
            for series_uid, attributes in self.db.complete_series(stable, 0.0, now):
                modalities = set(attributes.get("Modality", "").split("\\"))
                if series_uid not in ready and modalities <= at_release:
                    ready[series_uid] = attributes
        return list(ready.items())

    def _case(self, case: Case, now: float) -> int:
        """Queue ``case`` when ready, fail it at its timeout; return 1 when a job was made."""
        route = self._routes.get(case.route)
        bound = log.bind(case_id=case.id, route=case.route)
        if route is None or route.trigger is not Trigger.STUDY:
            reason = (
                f"route {case.route} is no longer a study-level route in the configuration; "
                "add it back and send the study again to process it"
            )
            if self.db.fail_case(case.id, reason, now):
                bound.warning("case.failed", reason="route removed")
            return 0
        series = self.db.study_series(case.study_uid)
        receiving = any(s.state is SeriesState.RECEIVING for s in series)
        timeout = self._timeout(route)
        timed_out = now >= case.waiting_since + timeout
        if receiving and not timed_out:
            return 0
        complete = [s for s in series if s.state in _COMPLETE and s.instances > 0]
        inputs = assign_roles(route, complete)
        missing = [r.role for r in route.input_roles if r.required and r.role not in inputs]
        if not missing:
            if self._unchanged(case, inputs, complete):
                self.db.settle_case(case.id, now)
                bound.info("case.unchanged")
                return 0
            reference = next(r.role for r in route.input_roles if r.role in inputs)
            job_id = self.db.queue_case(case.id, inputs, reference, now)
            if job_id is None:
                return 0
            bound.info(
                "case.queued",
                job_id=job_id,
                roles=list(inputs),
                absent=[r.role for r in route.input_roles if r.role not in inputs],
                timed_out=receiving,
            )
            return 1
        if timed_out:
            reason = (
                f"no series for required input(s) {', '.join(missing)} within study_timeout_s "
                f"({timeout:g} s); the study has {len(complete)} complete series, none matched "
                "the select of those roles (check the route's inputs, or send the missing "
                "series: with late_instances: reprocess the case then runs)"
            )
            if self.db.fail_case(case.id, reason, now):
                bound.warning("case.failed", missing=missing, series=len(complete))
        return 0

    def _unchanged(self, case: Case, inputs: dict[str, str], complete: list[SeriesSummary]) -> bool:
        """True when the case's last run had these inputs and none got instances since."""
        last = self.db.last_run(case.id)
        if last is None or last[0] != inputs:
            return False
        arrived = {s.series_uid: s.last_received_at for s in complete}
        return all(arrived[uid] <= last[1] for uid in inputs.values())

    def _timeout(self, route: Route) -> float:
        if route.study_timeout_s is not None:
            return route.study_timeout_s
        return self.settings.study_timeout_s
