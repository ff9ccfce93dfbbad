"""``dicom-node evaluate``: per-structure metrics of a model package on a PNG folder.

Each image goes through the node's own inference path,
:meth:`~dicom_node.models.inference.Segmenter.predict_image` (the shared preprocessing, the
network, back to the full source grid), the package's threshold and its postprocessing; the
masks are compared with the expert masks at full resolution. By default the cases are the
validation cases of the package's ``split.json`` (``split="test"``: its test cases);
``all_cases`` takes every case of the folder (then cases the model was trained on are
included, and the figures are optimistic).

Outputs: a table (:func:`~dicom_node.training.metrics.format_table`), ``metrics.json`` with the
summary and every case, and PNG overlays of the best, median and worst case (by mean Jaccard):
the expert outline dashed, the model's solid, in each structure's colour. 3D packages are
evaluated by :mod:`dicom_node.training.evaluate3d`; the result and the rule that chooses
postprocessing are in :mod:`dicom_node.training.results`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import structlog
import torch

from dicom_node.common.errors import InputError
from dicom_node.models.inference import (
    Segmenter,
    confidence_gate,
    masks_from_probabilities,
    select_device,
)
from dicom_node.models.postprocess import postprocess
from dicom_node.package.manifest import ModelPackage, Postprocess, load_package
from dicom_node.training.data import (
    IMAGES_DIR,
    check_cases,
    list_cases,
    read_image,
    read_masks,
    read_split,
)
from dicom_node.training.evaluate3d import evaluate_volumes
from dicom_node.training.metrics import case_metrics, summarize
from dicom_node.training.progress import ProgressLines
from dicom_node.training.results import (
    EvaluationResult,
    choose_from_measured,
    postprocess_variants,
    with_postprocess,
    write_metrics,
)
from dicom_node.training.volumes import list_volume_cases

log = structlog.get_logger(__name__)


def predict_masks(segmenter: Segmenter, image: np.ndarray, *, raw: bool = False) -> np.ndarray:
    """Boolean masks ``(S, rows, cols)`` of one image: thresholded and, unless ``raw``,
    postprocessed, exactly as the node does for a radiograph
    (:meth:`~dicom_node.models.inference.Segmenter.predict_image`,
    :func:`~dicom_node.models.inference.masks_from_probabilities`,
    :func:`~dicom_node.models.postprocess.postprocess` per frame).
    """
    package = segmenter.package
    probs = segmenter.predict_image(image)[None]
    masks = masks_from_probabilities(probs, package)
    if not raw:
        masks = confidence_gate(postprocess(masks, package, per_frame=True), probs, package)
    return np.moveaxis(masks[0], -1, 0)


def select_min_confidence(
    package: ModelPackage,
    data_dir: Path | str,
    cases: Sequence[str],
    candidates: Sequence[float],
    *,
    device: torch.device | None = None,
) -> tuple[float | None, dict[str, float]]:
    """Choose ``output.min_confidence`` on ``cases`` (validation cases only).

    Each candidate is scored by the mean over the cases and structures of the Dice of the
    final masks, where a structure absent from the expert mask scores 1 when nothing is
    returned and 0 otherwise (so a normal image with a returned lesion costs as much as a
    missed lesion). The best candidate is kept when it beats no gate; ties keep the lower one.

    Returns
    -------
    tuple
        The chosen value (None: no gate) and ``{candidate: mean score}`` (``"none"`` for no
        gate).
    """
    rules = select_output_rules(package, data_dir, cases, candidates, device=device)
    prefix, suffix = "flip=false presence=none conf=", " area=none"
    table = {k.removeprefix(prefix).removesuffix(suffix): v for k, v in rules.scores.items()}
    log.info("min_confidence chosen", chosen=rules.min_confidence, scores=table)
    return rules.min_confidence, table


@dataclass(frozen=True)
class OutputRules:
    """What :func:`select_output_rules` chose on the validation cases, and what it measured.

    ``scores`` maps ``"flip=<bool> presence=<value> conf=<value> area=<value>"`` (``none``
    where a rule is off) to the mean score; ``ms_per_image`` the mean network time per image
    without and with the flip.
    """

    min_confidence: float | None
    min_area_fraction: float | None
    flip_tta: bool
    scores: dict[str, float]
    ms_per_image: dict[str, float]
    min_presence: float | None = None


@dataclass(frozen=True)
class _Rule:
    flip: bool
    presence: float | None
    conf: float | None
    area: float | None

    def name(self) -> str:
        def value(v: float | None) -> str:
            return "none" if v is None else f"{v:g}"

        return (
            f"flip={str(self.flip).lower()} presence={value(self.presence)} "
            f"conf={value(self.conf)} area={value(self.area)}"
        )

    def strictness(self) -> tuple[float, float, float]:
        """Ties keep the lower thresholds."""
        return (-(self.presence or 0.0), -(self.conf or 0.0), -(self.area or 0.0))


def select_output_rules(
    package: ModelPackage,
    data_dir: Path | str,
    cases: Sequence[str],
    confidence_candidates: Sequence[float],
    area_candidates: Sequence[float] = (),
    *,
    presence_candidates: Sequence[float] = (),
    try_flip: bool = False,
    flip_min_gain: float = 0.005,
    device: torch.device | None = None,
) -> OutputRules:
    """Choose ``output.min_confidence``, ``output.min_area_fraction``,
    ``output.min_presence`` (networks with a presence head) and ``output.flip_tta`` together
    on ``cases`` (validation cases only).

    Every combination is scored as in :func:`select_min_confidence` (mean Dice of the final
    masks, 1 for an absent structure with nothing returned, 0 for one returned where the
    expert drew none: a normal breast with a lesion costs as much as a missed lesion). Each
    presence candidate runs the network again with its gate, as the node does. The mirrored
    pass (``try_flip``) doubles the network's time: it is kept only when its best score beats
    the best without it by more than ``flip_min_gain``. Ties keep the lower thresholds.
    """
    device = device or select_device()
    data_dir = Path(data_dir)
    labels = [s.label for s in package.structures]
    conf_options: list[float | None] = [None, *sorted(confidence_candidates)]
    area_options: list[float | None] = [None, *sorted(area_candidates)]
    presence_options: list[float | None] = [None, *sorted(presence_candidates)]
    flips = [False, True] if try_flip else [False]
    scores: dict[_Rule, list[float]] = {}
    seconds: dict[bool, float] = {}
    truths = {case: read_masks(data_dir, case, labels) for case in cases}
    images = {case: read_image(data_dir, case, package.color) for case in cases}
    for flip in flips:
        seconds[flip] = 0.0
        for presence in presence_options:
            segmenter = Segmenter(
                replace(
                    package,
                    min_confidence=None,
                    min_area_fraction=None,
                    min_presence=presence,
                    flip_tta=flip,
                ),
                device,
            )
            for case in cases:
                started = time.perf_counter()
                probs = segmenter.predict_image(images[case])[None]
                if presence is None:
                    seconds[flip] += time.perf_counter() - started
                base = postprocess(
                    masks_from_probabilities(probs, package), package, per_frame=True
                )
                for conf in conf_options:
                    for area in area_options:
                        rule = replace(package, min_confidence=conf, min_area_fraction=area)
                        gated = confidence_gate(base, probs, rule)
                        for i in range(len(labels)):
                            found, expert = gated[0, ..., i], truths[case][i]
                            total = int(found.sum() + expert.sum())
                            inter = int(np.logical_and(found, expert).sum())
                            scores.setdefault(_Rule(flip, presence, conf, area), []).append(
                                1.0 if total == 0 else 2 * inter / total
                            )
    means = {k: float(np.mean(v)) for k, v in scores.items()}

    def best_of(flip: bool) -> _Rule:
        keys = [k for k in means if k.flip == flip]
        return max(keys, key=lambda k: (means[k], k.strictness()))

    chosen = best_of(False)
    if try_flip and means[best_of(True)] > means[chosen] + flip_min_gain:
        chosen = best_of(True)
    table = {k.name(): round(m, 4) for k, m in means.items()}
    ms = {
        ("flip" if f else "plain"): round(1000 * t / max(1, len(cases)), 1)
        for f, t in seconds.items()
    }
    log.info("output rules chosen", chosen=chosen.name(), ms_per_image=ms)
    return OutputRules(chosen.conf, chosen.area, chosen.flip, table, ms, chosen.presence)


def select_postprocessing(
    package: ModelPackage,
    data_dir: Path | str,
    cases: Sequence[str],
    candidates: Sequence[Postprocess],
    *,
    spacing_mm: float = 1.0,
    min_gain: float = 0.0,
    min_gain_mm: float = 0.0,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[dict[str, list[str]], dict[str, dict[str, dict[str, float]]]]:
    """Measure every combination of ``candidates`` per structure; keep what improves.

    For each structure a combination improves on the raw masks when it raises the mean Jaccard
    by more than ``min_gain`` without raising the mean HD95 by more than ``min_gain_mm``, or
    lowers the mean HD95 by more than ``min_gain_mm`` without lowering the mean Jaccard (a
    stray island hardly changes the Jaccard but moves the surface distances). Of the
    combinations that improve, the one with the highest Jaccard, then the lowest HD95, then
    the fewest steps, is chosen.

    Returns
    -------
    tuple
        ``{label: [step, ...]}`` chosen per structure (empty when nothing improves), and
        ``{variant: {label: {"jaccard": mean, "hd95_mm": mean}}}`` measured, where a variant is
        the steps joined by ``+`` (``none`` for the raw masks).
    """
    device = device or select_device()
    data_dir = Path(data_dir)
    segmenter = Segmenter(package, device)
    labels = [s.label for s in package.structures]
    variants = postprocess_variants(candidates)
    packages = {v: with_postprocess(package, dict.fromkeys(labels, v)) for v in variants}
    values: dict[tuple[Postprocess, ...], dict[str, list[dict[str, float]]]] = {
        v: {label: [] for label in labels} for v in variants
    }
    lines = ProgressLines(
        f"postprocessing ({len(variants)} variants)", len(cases), "cases", enabled=progress
    )
    for case in cases:
        truth = read_masks(data_dir, case, labels)
        raw = predict_masks(segmenter, read_image(data_dir, case, package.color), raw=True)
        channels_last = np.moveaxis(raw, 0, -1)[None]
        for v in variants:
            done = postprocess(channels_last, packages[v], per_frame=True)
            pred = np.moveaxis(done[0], -1, 0)
            for label, m in case_metrics(pred, truth, labels, (spacing_mm, spacing_mm)).items():
                values[v][label].append(m)
        lines.update()
    return choose_from_measured(values, labels, min_gain=min_gain, min_gain_mm=min_gain_mm)


def evaluate(
    package: ModelPackage | Path | str,
    data_dir: Path | str,
    out_dir: Path | str | None = None,
    *,
    all_cases: bool = False,
    cases: Sequence[str] | None = None,
    spacing_mm: float | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    split: str = "validation",
) -> EvaluationResult:
    """Evaluate ``package`` on the cases of ``data_dir``.

    3D packages are evaluated on NIfTI volumes by
    :func:`~dicom_node.training.evaluate3d.evaluate_volumes`, on the ``split`` part of their
    ``split.json`` (``test`` or ``validation``) unless ``all_cases``.

    Parameters
    ----------
    package
        A model package or its folder.
    data_dir
        PNG folder (``images/``, ``masks/<structure>/``).
    out_dir
        Where to write ``metrics.json``, ``metrics.txt`` and the overlays; nothing written
        when None.
    all_cases
        Every case of the folder instead of the ``split`` part of the package's split.
    split
        ``validation`` (the cases that chose the epoch and postprocessing) or ``test`` (the
        held-out cases that chose nothing) of the package's ``split.json``.
    cases
        Explicit case ids (overrides both).
    spacing_mm
        Pixel spacing of the images for HD95; default the one the package was trained with
        (``metrics.spacing_mm`` of ``model.yaml``), else 1 (HD95 then in pixels).
    device
        Default :func:`select_device`.
    progress
        Print a progress line on stderr now and then (:class:`ProgressLines`).
    """
    if not isinstance(package, ModelPackage):
        package = load_package(package)
    if package.dims == 3:
        return evaluate_volumes(
            package,
            data_dir,
            out_dir,
            cases=list_volume_cases(data_dir) if all_cases else cases,
            split=split,
            device=device,
            progress=progress,
        )
    data_dir = Path(data_dir)
    labels = [s.label for s in package.structures]
    from_split = cases is None and not all_cases
    if cases is None:
        if all_cases:
            cases = list_cases(data_dir, labels)
        else:
            recorded = read_split(package.path)
            cases = list(recorded.test if split == "test" else recorded.validation)
            if not cases:
                raise InputError(
                    f"{package.path}: split.json has no {split} cases; evaluate another part "
                    "(--split validation) or every case (--all-cases)"
                )
    if from_split:
        missing = [c for c in cases if not (data_dir / IMAGES_DIR / f"{c}.png").is_file()]
        if missing:
            raise InputError(
                f"case {missing[0]}: image {data_dir / IMAGES_DIR / missing[0]}.png not found "
                f"({len(missing)} of the {len(cases)} {split} cases of {package.path}/"
                "split.json are not in --data); give --data the folder the model was trained "
                "on, or add --all-cases to evaluate every case of this folder"
            )
    check_cases(data_dir, list(cases), labels)
    if spacing_mm is None:
        spacing_mm = float(package.metrics.get("spacing_mm", 1.0))
        if "spacing_mm" not in package.metrics:
            log.warning("no pixel spacing known; HD95 is in pixels", model=package.name)
    device = device or select_device()
    segmenter = Segmenter(package, device)
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    lines = ProgressLines("evaluate", len(cases), "cases", enabled=progress)
    for case in cases:
        image = read_image(data_dir, case, package.color)
        pred = predict_masks(segmenter, image)
        truth = read_masks(data_dir, case, labels)
        per_case[case] = case_metrics(pred, truth, labels, (spacing_mm, spacing_mm))
        lines.update()
    summary = summarize(per_case.values())
    result = EvaluationResult(list(cases), per_case, summary, spacing_mm, {})
    log.info("evaluated", model=package.name, n_cases=len(cases))
    if out_dir is not None:
        out = Path(out_dir)
        write_metrics(result, out)
        lines.print(f"evaluate: writing metrics and overlays to {out}")
        result.overlays = write_overlays(segmenter, data_dir, per_case, out)
    return result


def rank_cases(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """The best, median and worst case by mean Jaccard over structures."""
    score = {c: float(np.mean([m["jaccard"] for m in s.values()])) for c, s in per_case.items()}
    order = sorted(score, key=lambda c: (score[c], c))
    return {"best": order[-1], "median": order[len(order) // 2], "worst": order[0]}


def write_overlays(
    segmenter: Segmenter,
    data_dir: Path,
    per_case: dict[str, dict[str, dict[str, float]]],
    out: Path,
) -> dict[str, Path]:
    """Write ``overlay_best.png``, ``overlay_median.png`` and ``overlay_worst.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    package = segmenter.package
    labels = [s.label for s in package.structures]
    paths: dict[str, Path] = {}
    for rank, case in rank_cases(per_case).items():
        image = read_image(data_dir, case, package.color)
        pred = predict_masks(segmenter, image)
        truth = read_masks(data_dir, case, labels)
        fig, ax = plt.subplots(figsize=(8, 8.6), dpi=110)
        ax.imshow(image, cmap="gray")
        handles = []
        for i, s in enumerate(package.structures):
            r, g, b = s.color_rgb
            color = (r / 255, g / 255, b / 255)
            ax.contour(truth[i], levels=[0.5], colors=[color], linewidths=1.0, linestyles="--")
            ax.contour(pred[i], levels=[0.5], colors=[color], linewidths=1.4)
            jac = per_case[case][s.label]["jaccard"]
            handles.append(Line2D([], [], color=color, label=f"{s.name}: J={jac:.3f}"))
        ax.legend(handles=handles, loc="lower center", fontsize=8, ncol=3, framealpha=0.7)
        ax.set_title(f"{rank} case {case}: model solid, expert dashed", fontsize=10)
        ax.axis("off")
        path = out / f"overlay_{rank}.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        paths[rank] = path
    return paths
