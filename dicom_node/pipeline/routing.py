"""Routing rules: which series go to which model package and destinations."""

from __future__ import annotations

from collections.abc import Mapping

from dicom_node.config import Route


def matches(route: Route, attributes: Mapping[str, str]) -> bool:
    """True when every ``match`` keyword of ``route`` has one of its accepted values.

    Multi-valued attributes (e.g. Image Type ``ORIGINAL\\PRIMARY\\AXIAL``) match when the whole
    value or any one component is accepted. Comparison ignores case and surrounding spaces.
    An attribute that is absent (or empty) matches only when ``""`` is among the accepted
    values: ``ViewPosition: [PA, AP, ""]`` takes PA, AP and images without View Position
    (0018,5101), but not laterals.
    """
    for keyword, accepted in route.match.items():
        value = attributes.get(keyword)
        if value is None or not value.strip():
            if any(not a.strip() for a in accepted):
                continue
            return False
        candidates = {value.strip().upper(), *(v.strip().upper() for v in value.split("\\"))}
        if not candidates & {a.strip().upper() for a in accepted}:
            return False
    return True


def routes_for(routes: tuple[Route, ...], attributes: Mapping[str, str]) -> list[Route]:
    """All routes whose rule matches ``attributes`` (each makes its own job)."""
    return [r for r in routes if matches(r, attributes)]
