"""``dicom-node process``: which model runs on which series of a folder, routed as the node does.

With ``--model`` every series runs on that package. With ``--config`` each series goes to
every series-level route that matches it (:func:`~dicom_node.assemble.routing.routes_for`,
on the union of its instances' routing attributes, as the receiver indexes them), and each
study to every study-level route one of its series may fill a role of, with its roles chosen
by :func:`~dicom_node.assemble.routing.assign_roles`: the jobs the node would make once
everything has arrived.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from dicom_node.assemble.routing import assign_roles, fills_a_role, routes_for
from dicom_node.config.sections import Route, Trigger
from dicom_node.receive.receiver import routing_attributes
from dicom_node.store.series import SeriesState, SeriesSummary, merge_attributes


@dataclass(frozen=True)
class Run:
    """One job of ``process``: a model on the files of each input role.

    ``what`` names it in messages (``series UID`` or ``study UID``); ``route`` is None with
    ``--model``; ``one_input``: run as one series (:func:`segment_series`), as the worker
    does for a route with one role.
    """

    what: str
    route: str | None
    model: Path
    inputs: dict[str, list[Path]]
    one_input: bool = True

    @property
    def files(self) -> int:
        return sum(len(paths) for paths in self.inputs.values())


@dataclass(frozen=True)
class Plan:
    """The runs, series no route takes, and study cases that cannot run (with why)."""

    runs: list[Run]
    unrouted: list[str]
    not_runnable: list[str]


def plan_model(groups: Mapping[str, list[Path]], model: Path) -> Plan:
    """Every series on ``model`` (``--model``)."""
    runs = [Run(f"series {uid}", None, model, {"image": paths}) for uid, paths in groups.items()]
    return Plan(runs, [], [])


def _series_summary(uid: str, paths: Sequence[Path]) -> tuple[str, SeriesSummary]:
    """The series' study UID and what routing sees of it (attributes over all instances)."""
    attributes: dict[str, str] = {}
    study = ""
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        attributes = merge_attributes(attributes, routing_attributes(ds))
        study = study or str(ds.get("StudyInstanceUID", ""))
    return study, SeriesSummary(uid, SeriesState.QUEUED, attributes, len(paths), 0.0)


def plan_routes(groups: Mapping[str, list[Path]], routes: Sequence[Route]) -> Plan:
    """The jobs the node would make of ``groups`` (series UID -> files) under ``routes``."""
    routes = tuple(routes)
    by_study: dict[str, list[SeriesSummary]] = defaultdict(list)
    runs: list[Run] = []
    routed: set[str] = set()
    for uid, paths in groups.items():
        study, summary = _series_summary(uid, paths)
        by_study[study].append(summary)
        for route in routes_for(routes, summary.attributes):
            runs.append(Run(f"series {uid}", route.name, route.model, {"image": paths}))
            routed.add(uid)
    not_runnable = []
    for study, series in by_study.items():
        for route in (r for r in routes if r.trigger is Trigger.STUDY):
            candidates = [s for s in series if fills_a_role(route, s.attributes)]
            if not candidates:
                continue
            routed.update(s.series_uid for s in candidates)
            chosen = assign_roles(route, series)
            missing = [r.role for r in route.input_roles if r.required and r.role not in chosen]
            if missing:
                not_runnable.append(
                    f"study {study}, route {route.name}: no series for required input(s) "
                    f"{', '.join(missing)}"
                )
                continue
            inputs = {role: groups[uid] for role, uid in chosen.items()}
            one = len(route.input_roles) == 1
            runs.append(Run(f"study {study}", route.name, route.model, inputs, one))
    unrouted = [uid for uid in groups if uid not in routed]
    return Plan(runs, unrouted, not_runnable)
