"""``dicom-node train`` for 3D models (``dims: 3``) on NIfTI volumes: what differs from 2D.

The data layout, the three-part split and the cache are in :mod:`dicom_node.training.volumes`;
the loop is the one of :mod:`dicom_node.training.loop`. Training draws random patches of
``input.size`` (a share of them centred on the structure), augments them (small rotation and
scale, contrast, gamma, noise; never mirrored). Every ``validate_every`` epochs (and at the
last) the validation volumes are segmented on the model grid by sliding window (the node's own
inference) and the best epoch by mean validation Dice is kept. Postprocessing is chosen on the
validation cases at full resolution; the **test** cases are evaluated once, at the end
(:func:`~dicom_node.training.evaluate3d.evaluate_volumes`), and chose nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.inferers import sliding_window_inference

from dicom_node.package.manifest import ModelPackage, Postprocess, load_package
from dicom_node.training import card
from dicom_node.training.config import TrainConfig, TrainSettings
from dicom_node.training.data import Split
from dicom_node.training.evaluate3d import choose_postprocessing, evaluate_volumes
from dicom_node.training.loop import (
    LoopData,
    LossFn,
    Run,
    RunRecord,
    TrainResult,
    training_record,
    write_chosen_postprocess,
    write_model_yaml,
)
from dicom_node.training.metrics import batch_dice
from dicom_node.training.progress import format_seconds
from dicom_node.training.results import METRICS_FILE, EvaluationResult, rounded
from dicom_node.training.volumes import (
    CachedVolumes,
    PatchCases,
    VolumeAugment,
    collate_patches,
    list_volume_cases,
    make_volume_split,
)

log = structlog.get_logger(__name__)

#: Fraction of overlap of the sliding window during validation (as in inference).
OVERLAP = 0.25

#: The keys of a 3D ``history.json`` entry, in their order (validation figures last: an
#: epoch without validation has none).
HISTORY_KEYS = ("epoch", "train_loss", "lr", "seconds", "val_loss", "val_dice")


def _validate(
    network: torch.nn.Module,
    cache: CachedVolumes,
    package: ModelPackage,
    device: torch.device,
    loss_fn: LossFn,
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


def draw_volume_split(data_dir: Path, settings: TrainSettings) -> Split:
    """The split ``settings`` draws from every case of the NIfTI folder ``data_dir``: the
    test part first (``test_seed``, else ``split_seed``), then validation; the same at every
    run (see :func:`~dicom_node.training.volumes.make_volume_split`)."""
    return make_volume_split(
        list_volume_cases(data_dir),
        test_fraction=settings.test_fraction,
        test_seed=settings.split_seed if settings.test_seed is None else settings.test_seed,
        validation_fraction=settings.validation_fraction,
        seed=settings.split_seed,
    )


def volume_loop_data(data_dir: Path, split: Split, run: Run) -> LoopData:
    """The 3D part of the loop: batches of augmented patches of the cached training volumes,
    shuffled by the run's seed; validation by sliding window over the cached validation
    volumes (model grid) every ``validate_every`` epochs."""
    config, package, device = run.config, run.package, run.device
    settings = config.training
    augment = config.augment
    assert isinstance(augment, VolumeAugment)
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

    def validate(network: torch.nn.Module, loss_fn: LossFn) -> tuple[float, np.ndarray]:
        return _validate(network, val_cache, package, device, loss_fn)

    return LoopData(
        loader=loader,
        validate=validate,
        validate_every=settings.validate_every,
        history_keys=HISTORY_KEYS,
        plot_curves=_plot_curves,
        done_note="choosing postprocessing on the validation cases, then evaluating the test cases",
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


def finish_volume_package(
    out: Path,
    config: TrainConfig,
    data_dir: Path,
    run: RunRecord,
    *,
    device: torch.device,
    progress: bool,
) -> TrainResult:
    """Choose postprocessing on the validation cases, evaluate validation and test cases,
    write ``model.yaml`` with the figures and the model card."""
    settings = config.training
    split = run.split
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
    model, package = write_chosen_postprocess(out, config, chosen)
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
        "best_epoch": run.best_epoch,
        "validation_cases": len(split.validation),
        "validation": rounded(validation.summary),
        "test_cases": len(split.test),
        "structures": rounded(test.summary),
    }
    model["metrics"] = metrics
    model["training"] = training_record(data_dir, run, device)
    write_model_yaml(out, model)
    package = load_package(out)
    write_volume_card(
        out,
        package,
        config,
        split,
        run.history,
        run.best_epoch,
        run.seconds,
        device,
        validation,
        test,
        comparison,
        sittings=len(run.sittings),
    )
    return TrainResult(
        package=package,
        history=run.history,
        best_epoch=run.best_epoch,
        seconds=run.seconds,
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
    sittings: int = 1,
) -> Path:
    """Write ``MODEL_CARD.md`` of a 3D package: data, split, training, figures in mm and in
    source voxels against the published ones (from the training config's ``data``);
    ``seconds`` is the training time of all ``sittings`` together."""
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
        f"- {len(history)} epochs in {format_seconds(seconds)}"
        + (f" ({seconds / 3600:.2f} h over {sittings} sittings)" if sittings > 1 else "")
        + f" on {card.hardware(device)} "
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
