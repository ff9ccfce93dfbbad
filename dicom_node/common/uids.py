"""UID checks for data from the network and deterministic UIDs for outputs."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping

from pydicom.uid import UID

# PS3.5 9.1: components of digits, no leading zero (except "0" itself), dots between, <= 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_NAMESPACE = uuid.UUID("6f1c0e2a-8d3b-5b7e-9a41-2c0d5e1f7a90")  # dicom-node output UIDs


def is_valid_uid(value: object) -> bool:
    """Return True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1).

    Only such UIDs ever become part of a file path, so a value like ``1.2.3/../../etc``
    can never escape the spool.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def derive_uid(*parts: str) -> UID:
    """Return a UID determined only by ``parts`` (a ``2.25.`` UUID-derived UID).

    The same parts always give the same UID, so processing the same input twice yields the
    same output UIDs and a redelivery replaces rather than duplicates.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    # PS3.5 B.2: a UUID as a UID under the 2.25 root; a name-based (SHA-1, version 5) UUID
    # makes it deterministic. (pydicom's generate_uid ignores entropy with prefix=None.)
    name = "\x1f".join(parts)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def output_uids(
    source_series_uid: str,
    model_name: str,
    model_version: str,
    kind: str,
    source_instance_uids: Iterable[str],
) -> tuple[UID, UID]:
    """Return ``(series_uid, sop_instance_uid)`` for one output kind (``"seg"``, ``"sr"``, ...).

    ``source_series_uid`` is the case's :func:`case_key` (for one input, its Series Instance
    UID). The series UID depends on (case, model name + version, kind). The SOP Instance
    UID also depends on the set of source instances, so a reprocessing after late instances
    arrive yields a new instance in the same output series, while processing the same
    instances again yields exactly the same UIDs.
    """
    model = f"{model_name}@{model_version}"
    series_uid = derive_uid(source_series_uid, model, kind, "series")
    instances = ",".join(sorted(set(source_instance_uids)))
    sop_uid = derive_uid(source_series_uid, model, kind, "instance", instances)
    return series_uid, sop_uid


def case_key(inputs: Mapping[str, str]) -> str:
    """What a case's output series UIDs derive from: role -> Series Instance UID of its inputs.

    A case of one input is keyed by that series' UID alone, so one-input results keep the
    UIDs they had before cases had roles; several inputs give ``role=uid`` pairs in role
    order, so the same series in other roles (or another set of series) is another case.
    """
    if not inputs:
        raise ValueError("a case needs at least one input")
    if len(inputs) == 1:
        return next(iter(inputs.values()))
    return ";".join(f"{role}={uid}" for role, uid in sorted(inputs.items()))
