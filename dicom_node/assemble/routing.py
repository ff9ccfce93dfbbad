"""Routing rules: which series go to which route, and which series fill which role of a case.

A selector (a route's ``match``, a role's ``select``) maps DICOM keywords to accepted values;
each value is a case-insensitive shell pattern (``*``, ``?``; ``[`` is literal), so a plain
value matches exactly. A series matches when every keyword has an accepted value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from dicom_node.config.sections import InputRole, Route, Trigger
from dicom_node.store.cases import SeriesSummary

Selector = Mapping[str, Sequence[str]]


def _accepts(pattern: str, value: str) -> bool:
    pattern = pattern.strip().upper().replace("[", "[[]")
    return fnmatchcase(value, pattern)


def matches(selector: Route | Selector, attributes: Mapping[str, str]) -> bool:
    """True when every keyword of ``selector`` (a route: its ``match``) has an accepted value.

    Multi-valued attributes (e.g. Image Type ``ORIGINAL\\PRIMARY\\AXIAL``) match when the whole
    value or any one component is accepted ("contains"). Comparison ignores case and
    surrounding spaces; accepted values are shell patterns (``*T1*``). An attribute that is
    absent (or empty) matches only when ``""`` is among the accepted values: ``ViewPosition:
    [PA, AP, ""]`` takes PA, AP and images without View Position (0018,5101), but not
    laterals.
    """
    rules = selector.match if isinstance(selector, Route) else selector
    for keyword, accepted in rules.items():
        value = attributes.get(keyword)
        if value is None or not value.strip():
            if any(not a.strip() for a in accepted):
                continue
            return False
        candidates = {value.strip().upper(), *(v.strip().upper() for v in value.split("\\"))}
        if not any(_accepts(a, c) for a in accepted if a.strip() for c in candidates):
            return False
    return True


def routes_for(routes: tuple[Route, ...], attributes: Mapping[str, str]) -> list[Route]:
    """All series-level routes whose rule matches ``attributes`` (each makes its own job)."""
    return [r for r in routes if r.trigger is Trigger.SERIES and matches(r, attributes)]


def fills_a_role(route: Route, attributes: Mapping[str, str]) -> bool:
    """True when a series with ``attributes`` may fill a role of study-level ``route``."""
    return matches(route, attributes) and any(
        matches(r.select, attributes) for r in route.input_roles
    )


def assign_roles(route: Route, series: Sequence[SeriesSummary]) -> dict[str, str]:
    """Which of the study's complete ``series`` fills which role of ``route``: role -> UID.

    A series fills at most one role. Roles are served fewest candidates first (the most
    specific selector: ``*T1*C*`` before ``*T1*``), ties in the route's order; each takes its
    best candidate not taken yet: the most instances, then the latest last arrival, then the
    lowest Series Instance UID. So the choice depends only on what was received. Roles no
    series fills are absent from the result (in the route's role order).
    """
    roles = route.input_roles
    ranked = {
        role.role: sorted(
            (
                s
                for s in series
                if matches(route, s.attributes) and matches(role.select, s.attributes)
            ),
            key=lambda s: (-s.instances, -s.last_received_at, s.series_uid),
        )
        for role in roles
    }
    order: list[InputRole] = sorted(roles, key=lambda r: (len(ranked[r.role]), roles.index(r)))
    chosen: dict[str, str] = {}
    for role in order:
        for s in ranked[role.role]:
            if s.series_uid not in chosen.values():
                chosen[role.role] = s.series_uid
                break
    return {r.role: chosen[r.role] for r in roles if r.role in chosen}
