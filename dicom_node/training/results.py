"""What an evaluation measures, how it is written, and the rule that chooses postprocessing.

Shared by the 2D evaluation (:mod:`dicom_node.training.evaluate`), the 3D one
(:mod:`dicom_node.training.evaluate3d`) and training, which measures the candidate
postprocessing steps on the validation cases and keeps per structure only what improves.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from dicom_node.package.manifest import ModelPackage, Postprocess
from dicom_node.training.metrics import GROUPS, METRICS, format_table

log = structlog.get_logger(__name__)

METRICS_FILE = "metrics.json"
TABLE_FILE = "metrics.txt"


@dataclass
class EvaluationResult:
    """Per-case and summary metrics of one evaluation."""

    cases: list[str]
    per_case: dict[str, dict[str, dict[str, float]]]
    summary: dict[str, dict[str, float]]
    spacing_mm: float
    overlays: dict[str, Path]

    @property
    def table(self) -> str:
        return format_table(self.summary)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping; undefined values (NaN: HD95 with one empty mask) are null."""
        document: dict[str, Any] = _no_nan(
            {
                "metrics": list(METRICS),
                "groups": {k: list(v) for k, v in GROUPS.items()},
                "spacing_mm": self.spacing_mm,
                "cases": self.cases,
                "summary": self.summary,
                "per_case": self.per_case,
            }
        )
        return document


def _no_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_metrics(result: EvaluationResult, out: Path) -> None:
    """Write ``metrics.json`` (summary and every case) and ``metrics.txt`` (the table) in
    ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    (out / TABLE_FILE).write_text(result.table + "\n")


def postprocess_variants(candidates: Sequence[Postprocess]) -> list[tuple[Postprocess, ...]]:
    """Every combination of ``candidates`` in their order, from none (``()``) to all."""
    out: list[tuple[Postprocess, ...]] = []
    for n in range(len(candidates) + 1):
        out.extend(itertools.combinations(candidates, n))
    return out


def with_postprocess(
    package: ModelPackage, steps: dict[str, tuple[Postprocess, ...]]
) -> ModelPackage:
    """A copy of ``package`` whose structures have the postprocessing ``steps[label]``."""
    return replace(
        package,
        structures=tuple(
            replace(s, postprocess=steps.get(s.label, ())) for s in package.structures
        ),
    )


def choose_from_measured(
    values: dict[tuple[Postprocess, ...], dict[str, list[dict[str, float]]]],
    labels: Sequence[str],
    *,
    min_gain: float,
    min_gain_mm: float,
) -> tuple[dict[str, list[str]], dict[str, dict[str, dict[str, float]]]]:
    """The rule of :func:`~dicom_node.training.evaluate.select_postprocessing` applied to
    per-case metrics already measured: ``values[variant][label]`` holds one
    :func:`~dicom_node.training.metrics.case_metrics` dict per case, ``()`` being the raw
    masks. Shared by 2D and 3D training."""
    variants = list(values)
    means = {
        v: {
            label: {
                name: float(np.nanmean([m[name] for m in per[label]]))
                for name in ("jaccard", "hd95_mm")
            }
            for label in labels
        }
        for v, per in values.items()
    }
    chosen: dict[str, list[str]] = {}
    for label in labels:
        base = means[()][label]

        def delta(v: tuple[Postprocess, ...], lb: str = label) -> tuple[float, float]:
            return (
                means[v][lb]["jaccard"] - means[()][lb]["jaccard"],
                means[v][lb]["hd95_mm"] - means[()][lb]["hd95_mm"],
            )

        improving = [
            v
            for v in variants
            if v
            and (
                (delta(v)[0] > min_gain and delta(v)[1] <= min_gain_mm)
                or (delta(v)[0] >= 0 and delta(v)[1] < -min_gain_mm)
            )
        ]
        best = max(improving, key=lambda v: (delta(v)[0], -delta(v)[1], -len(v)), default=())
        chosen[label] = [p.value for p in best]
        log.info(
            "postprocessing measured",
            structure=label,
            chosen=chosen[label],
            jaccard_gain=round(delta(best)[0], 6),
            hd95_gain_mm=round(-delta(best)[1], 3),
            raw_jaccard=round(base["jaccard"], 4),
        )
    comparison = {("+".join(p.value for p in v) or "none"): per for v, per in means.items()}
    return chosen, comparison


def rounded(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``summary`` with every figure rounded to 4 decimals, as ``model.yaml`` holds them."""
    return {label: {k: round(v, 4) for k, v in m.items()} for label, m in summary.items()}
