"""``dicom-node train`` and ``evaluate`` for 3D models (``dims: 3``) on NIfTI volumes.

The data layout, the three-part split and the cache are in :mod:`dicom_node.training.volumes`.
Training draws random patches of ``input.size`` (a share of them centred on the structure),
augments them (small rotation and scale, contrast, gamma, noise; never mirrored) and fits a
MONAI U-Net with soft Dice + BCE, AdamW with warm-up and cosine decay, mixed precision on
CUDA only (the same code on CPU). After each epoch the validation volumes are segmented on
the model grid by sliding window (the node's own inference) and the best epoch by mean
validation Dice is kept. Postprocessing is chosen on the validation cases at full
resolution; the **test** cases are evaluated once, at the end, and chose nothing.

Evaluation (:func:`evaluate_volumes`) runs :meth:`Segmenter.predict_volume` (normalise,
resample to the model spacing, sliding window, back to the source grid), the package's
threshold and postprocessing, and compares with the expert masks on the source grid:
Dice, Jaccard, precision, recall, HD95 and ASD in mm (and in source voxels in the card).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
from monai.inferers import sliding_window_inference

from dicom_node.models.inference import Segmenter, masks_from_probabilities, select_device
from dicom_node.models.postprocess import postprocess
from dicom_node.package.manifest import ModelPackage, Postprocess, load_package
from dicom_node.training import card
from dicom_node.training.data import Split, read_split
from dicom_node.training.evaluate import (
    METRICS_FILE,
    TABLE_FILE,
    EvaluationResult,
    _variants,
    choose_from_measured,
    with_postprocess,
)
from dicom_node.training.metrics import batch_dice, case_metrics, summarize
from dicom_node.training.progress import ProgressLines, format_seconds
from dicom_node.training.volumes import (
    CachedVolumes,
    PatchCases,
    VolumeAugment,
    collate_patches,
    list_volume_cases,
    make_volume_split,
    read_volume,
)

if TYPE_CHECKING:
    from dicom_node.training.train import TrainConfig, TrainResult

log = structlog.get_logger(__name__)

#: Fraction of overlap of the sliding window during validation (as in inference).
OVERLAP = 0.25


def _validate(
    network: torch.nn.Module,
    cache: CachedVolumes,
    package: ModelPackage,
    device: torch.device,
    loss_fn: Any,
) -> tuple[float, np.ndarray]:
    """Mean loss and per-structure Dice over the validation volumes, on the model grid."""
    network.eval()
    num, den, losses = None, None, []
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for image, mask in zip(cache.images, cache.masks, strict=True):
            x = torch.from_numpy(image.astype(np.float32))[None].to(device)
            y = torch.from_numpy(mask.astype(np.float32))[None].to(device)
            logits = sliding_window_inference(
                x, package.input_size, 4, network, overlap=OVERLAP, mode="gaussian"
            )
            assert isinstance(logits, torch.Tensor)
            logits = logits.float()
            losses.append(float(loss_fn(logits, y)))
            n, d = batch_dice(torch.sigmoid(logits) > package.threshold, y > 0.5)
            num = n if num is None else num + n
            den = d if den is None else den + d
    assert num is not None and den is not None
    dice = torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(den))
    return float(np.mean(losses)), dice.cpu().numpy()


def train_volumes(
    data_dir: Path,
    config: TrainConfig,
    out: Path,
    *,
    init: Path | str | None,
    epochs: int | None,
    max_minutes: float | None,
    progress: bool,
) -> TrainResult:
    """Train a 3D model on a NIfTI folder and write the package ``out`` (see the module)."""
    from dicom_node.models.networks import load_network
    from dicom_node.training.train import (
        HISTORY_FILE,
        WEIGHTS_FILE,
        TrainResult,
        build_network_from,
        optimisation,
        save_weights,
        seed_everything,
        transfer_weights,
    )

    started = time.monotonic()
    settings = config.training
    augment = config.augment
    assert isinstance(augment, VolumeAugment)
    n_epochs = epochs or settings.epochs
    budget_min = max_minutes if max_minutes is not None else settings.max_minutes
    out.mkdir(parents=True, exist_ok=True)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    seed_everything(settings.seed)
    device = select_device()
    init_package = load_package(init) if init is not None else None
    network = build_network_from(config.model, out)
    package = load_package(out)
    if init_package is not None:
        copied, total = transfer_weights(
            network, load_network(init_package, torch.device("cpu")).state_dict()
        )
        log.info("initialised from package", init=init_package.name, copied=copied, total=total)
    network.to(device)

    split = make_volume_split(
        list_volume_cases(data_dir),
        test_fraction=settings.test_fraction,
        test_seed=settings.split_seed if settings.test_seed is None else settings.test_seed,
        validation_fraction=settings.validation_fraction,
        seed=settings.split_seed,
    )
    split.write(out)
    log.info(
        "split",
        n_train=len(split.train),
        n_validation=len(split.validation),
        n_test=len(split.test),
    )
    train_cache = CachedVolumes(data_dir, split.train, package)
    val_cache = CachedVolumes(data_dir, split.validation, package)
    dataset = PatchCases(
        train_cache,
        package.input_size,
        samples=settings.patch_samples,
        positive_fraction=settings.positive_fraction,
        augment=augment,
        seed=settings.seed,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=len(dataset) > settings.batch_size,
        generator=torch.Generator().manual_seed(settings.seed),
        collate_fn=collate_patches,
    )
    steps = len(loader)
    loss_fn, optimizer, schedule, scheduler = optimisation(network, settings, steps, n_epochs)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    labels = [s.label for s in package.structures]
    planned = n_epochs
    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(network.state_dict())
    epochs_done = ProgressLines("train", n_epochs, "epochs", every_n=1, enabled=progress)
    for epoch in range(1, n_epochs + 1):
        epoch_start = time.monotonic()
        network.train()
        losses: list[float] = []
        batches = ProgressLines(
            f"train: epoch {epoch}/{planned}", steps, "batches", by_count=False, enabled=progress
        )
        for batch in loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = network(x)
            loss = loss_fn(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            batches.update(len(losses))
        validate = epoch % settings.validate_every == 0 or epoch >= planned
        if validate:
            val_loss, val_dice = _validate(network, val_cache, package, device, loss_fn)
            score = float(val_dice.mean())
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(network.state_dict())
                save_weights(network, out / WEIGHTS_FILE)
        seconds = time.monotonic() - epoch_start
        entry: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "seconds": seconds,
        }
        if validate:
            entry["val_loss"] = val_loss
            entry["val_dice"] = {lb: float(d) for lb, d in zip(labels, val_dice, strict=True)}
        history.append(entry)
        epochs_done.total = planned
        detail = f"loss {np.mean(losses):.3f}"
        if validate:
            detail += f", validation Dice {score:.4f}, best epoch {best_epoch}"
        epochs_done.update(epoch, detail)
        log.info(
            "epoch",
            epoch=epoch,
            train_loss=round(float(np.mean(losses)), 4),
            seconds=round(seconds, 1),
        )
        if epoch >= planned:
            break
        if budget_min is not None and epoch >= 2:
            left_s = budget_min * 60 - (time.monotonic() - started)
            typical_s = float(np.median([h["seconds"] for h in history[1:][-5:]]))
            fits = min(n_epochs, max(epoch, epoch + int(left_s // typical_s)))
            if fits != planned:
                planned = fits
                schedule.total_steps = max(planned * steps, schedule.warmup_steps + 1)
            if planned <= epoch:
                if not validate:
                    val_loss, val_dice = _validate(network, val_cache, package, device, loss_fn)
                    if float(val_dice.mean()) > best_score:
                        best_score, best_epoch = float(val_dice.mean()), epoch
                        best_state = copy.deepcopy(network.state_dict())
                log.warning("stopping at the time budget", epoch=epoch, max_minutes=budget_min)
                break
    train_seconds = time.monotonic() - started
    epochs_done.print(
        f"train: loop done in {format_seconds(train_seconds)}; choosing postprocessing on the "
        "validation cases, then evaluating the test cases"
    )
    network.load_state_dict(best_state)
    save_weights(network, out / WEIGHTS_FILE)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    _plot_curves(history, out / card.CURVES_FILE, best_epoch)
    return finish_volume_package(
        out,
        config,
        data_dir,
        split,
        history=history,
        best_epoch=best_epoch,
        epochs_planned=n_epochs,
        epochs_fitted=planned,
        seconds=train_seconds,
        device=device,
        init=init_package,
        progress=progress,
        result_type=TrainResult,
    )


def _plot_curves(history: list[dict[str, Any]], path: Path, best_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    axes[0].plot([h["epoch"] for h in history], [h["train_loss"] for h in history])
    axes[0].set_title("training loss (Dice + BCE)")
    axes[0].set_yscale("log")
    val = [h for h in history if "val_dice" in h]
    for label in val[0]["val_dice"] if val else []:
        axes[1].plot([h["epoch"] for h in val], [h["val_dice"][label] for h in val], label=label)
    axes[1].axvline(best_epoch, color="gray", linestyle=":", label=f"best epoch {best_epoch}")
    axes[1].set_title("validation Dice (model grid)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predict_case_masks(
    segmenter: Segmenter, pixels: np.ndarray, placement: Any, *, raw: bool = False
) -> np.ndarray:
    """Boolean masks ``(S, z, y, x)`` of one volume on its source grid, as the node makes
    them (threshold, then the package's postprocessing over the volume unless ``raw``)."""
    probs = segmenter.predict_volume(pixels, placement)
    masks = masks_from_probabilities(probs, segmenter.package)
    if not raw:
        masks = postprocess(masks, segmenter.package, per_frame=False)
    return np.moveaxis(masks, -1, 0)


def choose_postprocessing(
    package: ModelPackage,
    data_dir: Path,
    cases: Sequence[str],
    candidates: Sequence[Postprocess],
    *,
    min_gain: float,
    min_gain_mm: float,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, list[str]], dict[str, dict[str, dict[str, float]]]]:
    """The 3D counterpart of :func:`~dicom_node.training.evaluate.select_postprocessing`,
    with the same rule, on the validation volumes at full resolution."""
    segmenter = Segmenter(package, device)
    labels = [s.label for s in package.structures]
    variants = _variants(candidates)
    packages = {v: with_postprocess(package, dict.fromkeys(labels, v)) for v in variants}
    values: dict[tuple[Postprocess, ...], dict[str, list[dict[str, float]]]] = {
        v: {label: [] for label in labels} for v in variants
    }
    lines = ProgressLines("postprocessing", len(cases), "cases", enabled=progress)
    for case in cases:
        volume = read_volume(data_dir, case, package)
        raw = predict_case_masks(segmenter, volume.pixels, volume.placement, raw=True)
        last = np.moveaxis(raw, 0, -1)
        for v in variants:
            pred = np.moveaxis(postprocess(last, packages[v], per_frame=False), -1, 0)
            for label, m in case_metrics(pred, volume.masks, labels, volume.spacing_zyx).items():
                values[v][label].append(m)
        lines.update()
    return choose_from_measured(values, labels, min_gain=min_gain, min_gain_mm=min_gain_mm)


def evaluate_volumes(
    package: ModelPackage,
    data_dir: Path | str,
    out_dir: Path | str | None = None,
    *,
    cases: Sequence[str] | None = None,
    split: str = "test",
    device: torch.device | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate a 3D package on NIfTI cases: by default the **test** cases of its split
    (``split`` ``validation`` for the cases that chose the epoch; explicit ``cases`` win).

    Writes ``metrics.json`` and ``metrics.txt`` into ``out_dir`` when given.
    """
    data_dir = Path(data_dir)
    if cases is None:
        recorded: Split = read_split(package.path)
        cases = list(recorded.test if split == "test" else recorded.validation)
    labels = [s.label for s in package.structures]
    segmenter = Segmenter(package, device or select_device())
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    spacing = 1.0
    lines = ProgressLines(f"evaluate ({split})", len(cases), "cases", enabled=progress)
    for case in cases:
        volume = read_volume(data_dir, case, package)
        spacing = volume.spacing_zyx[0]
        pred = predict_case_masks(segmenter, volume.pixels, volume.placement)
        per_case[case] = case_metrics(pred, volume.masks, labels, volume.spacing_zyx)
        lines.update()
    result = EvaluationResult(list(cases), per_case, summarize(per_case.values()), spacing, {})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")
        (out / TABLE_FILE).write_text(result.table + "\n")
    return result


def _rounded(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {lb: {k: round(v, 4) for k, v in m.items()} for lb, m in summary.items()}


def finish_volume_package(  # noqa: PLR0913 - what the run leaves, passed on
    out: Path,
    config: TrainConfig,
    data_dir: Path,
    split: Split,
    *,
    history: list[dict[str, Any]],
    best_epoch: int,
    epochs_planned: int,
    epochs_fitted: int,
    seconds: float,
    device: torch.device,
    init: ModelPackage | None,
    progress: bool,
    result_type: type[TrainResult],
) -> TrainResult:
    """Choose postprocessing on the validation cases, evaluate validation and test cases,
    write ``model.yaml`` with the figures and the model card."""
    from dicom_node.training.train import write_model_yaml

    settings = config.training
    package = load_package(out)
    chosen, comparison = choose_postprocessing(
        package,
        data_dir,
        split.validation,
        [Postprocess(p) for p in settings.postprocess_candidates],
        min_gain=settings.postprocess_min_gain,
        min_gain_mm=settings.postprocess_min_gain_mm,
        device=device,
        progress=progress,
    )
    model = dict(config.model)
    model["structures"] = [
        {**s, **({"postprocess": chosen[s["label"]]} if chosen.get(s["label"]) else {})}
        for s in config.model["structures"]
    ]
    write_model_yaml(out, model)
    package = load_package(out)
    validation = evaluate_volumes(
        package,
        data_dir,
        out / "validation",
        split="validation",
        device=device,
        progress=progress,
    )
    test = evaluate_volumes(
        package, data_dir, out / "test", split="test", device=device, progress=progress
    )
    metrics = {
        "voxel_mm": test.spacing_mm,
        "best_epoch": best_epoch,
        "validation_cases": len(split.validation),
        "validation": _rounded(validation.summary),
        "test_cases": len(split.test),
        "structures": _rounded(test.summary),
    }
    model["metrics"] = metrics
    model["training"] = {
        "data": str(Path(data_dir).name),
        "split": "split.json",
        "epochs_run": len(history),
        "epochs_planned": epochs_planned,
        "epochs_fitted_to_budget": epochs_fitted,
        "best_epoch": best_epoch,
        "seconds": round(seconds, 1),
        "device": card.hardware(device),
        "init": None if init is None else f"{init.name} {init.version}",
    }
    write_model_yaml(out, model)
    package = load_package(out)
    write_volume_card(
        out,
        package,
        config,
        split,
        history,
        best_epoch,
        seconds,
        device,
        validation,
        test,
        comparison,
    )
    return result_type(
        package=package,
        history=history,
        best_epoch=best_epoch,
        seconds=seconds,
        metrics=metrics,
    )


def write_volume_card(  # noqa: PLR0913
    out: Path,
    package: ModelPackage,
    config: TrainConfig,
    split: Split,
    history: list[dict[str, Any]],
    best_epoch: int,
    seconds: float,
    device: torch.device,
    validation: EvaluationResult,
    test: EvaluationResult,
    comparison: dict[str, dict[str, dict[str, float]]],
) -> Path:
    """Write ``MODEL_CARD.md`` of a 3D package: data, split, training, figures in mm and in
    source voxels against the published ones (from the training config's ``data``)."""
    voxel = test.spacing_mm
    s = config.training
    lines = [
        f"# {package.name} {package.version}",
        "",
        package.description,
        "",
        "Not a medical device; for research and for testing the node.",
        "",
        "## Data",
        "",
        config.data.description,
        "",
        *[f"- {c}" for c in config.data.citations],
        "",
        "## Split (`split.json`)",
        "",
        f"- test: {len(split.test)} cases drawn first (seed {split.test_seed}, fraction "
        f"{split.test_fraction}) from all cases of the folder; out of training and of every "
        "choice (epoch, threshold, postprocessing); evaluated once, at the end.",
        f"- validation: {len(split.validation)} cases drawn from the rest (seed {split.seed}); "
        "they chose the epoch and the postprocessing.",
        f"- training: {len(split.train)} cases.",
        "",
        "## Model and training",
        "",
        f"- MONAI 3D U-Net {package.network}, sigmoid output, threshold {package.threshold}.",
        f"- Input: {package.normalization.kind.value} normalisation, resampled (linear) to "
        f"{package.spacing_mm} mm (z, y, x); patches {package.input_size} voxels; "
        f"sliding-window inference (overlap {OVERLAP}, Gaussian weights), back to the source "
        "grid (linear), threshold.",
        f"- Patches: {s.patch_samples} per case per step, {s.positive_fraction:.0%} centred on "
        f"the structure; batch {s.batch_size} cases; augmentation {config.augment}.",
        f"- AdamW lr {s.learning_rate}, weight decay {s.weight_decay}, warm-up "
        f"{s.warmup_epochs} epochs then cosine; Dice + BCE.",
        f"- {len(history)} epochs in {format_seconds(seconds)} on {card.hardware(device)} "
        f"(budget {s.max_minutes} min); best epoch {best_epoch} by validation Dice.",
        f"- Postprocessing chosen on validation: "
        f"{ {st.label: [p.value for p in st.postprocess] for st in package.structures} }.",
        "",
        f"## Held-out test figures (source grid, {voxel} mm voxels; HD95 and ASD also in voxels)",
        "",
        _voxel_table(test, voxel),
        "",
        "```",
        test.table,
        "```",
        "",
        "## Validation figures (these cases chose the epoch and postprocessing: optimistic)",
        "",
        "```",
        validation.table,
        "```",
        "",
        "Postprocessing compared on validation (mean Jaccard, HD95 mm):",
        "",
        "```",
        json.dumps(comparison, indent=1),
        "```",
        "",
        f"Retrain: `dicom-node train --data DATA --config {config.source} --out "
        f"config/models/{package.name}`; evaluate the test cases: `dicom-node evaluate "
        f"--model config/models/{package.name} --data DATA --split test`.",
        "",
    ]
    path = out / card.CARD_FILE
    path.write_text("\n".join(lines))
    return path


def _voxel_table(result: EvaluationResult, voxel: float) -> str:
    rows = [
        "| structure | Dice | Jaccard | HD95 (voxels) | ASD (voxels) |",
        "|---|---|---|---|---|",
    ]
    for label, m in result.summary.items():
        rows.append(
            f"| {label} | {m['dice']:.3f} ± {m['dice_std']:.3f} | {m['jaccard']:.3f} | "
            f"{m['hd95_mm'] / voxel:.2f} ± {m['hd95_mm_std'] / voxel:.2f} | "
            f"{m['asd_mm'] / voxel:.2f} |"
        )
    return "\n".join(rows) + "\n\n" + f"(per case: `test/{METRICS_FILE}`)"
