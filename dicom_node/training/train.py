"""``dicom-node train``: train a multi-label U-Net and write a complete model package.

2D models train here on PNG folders; 3D models (``model.dims: 3``) on NIfTI volumes in
:mod:`dicom_node.training.train3d`, from the same config format and command.

The training config (see ``config/train-cxr.yaml``) has four parts: ``model`` is the
``model.yaml`` of the package to produce (less ``weights`` and ``metrics``, which training
writes), ``training`` the optimisation settings (:class:`TrainSettings`), ``augment`` the
augmentation ranges (:class:`~dicom_node.training.augment.AugmentConfig`) and ``data`` what
the model card says about the data (:class:`DataInfo`).

One code path for CPU and CUDA: mixed precision (autocast + gradient scaling) is enabled on
CUDA only. Loss: soft Dice + binary cross-entropy on the sigmoid channels (multi-label: the
structures overlap). AdamW with linear warm-up and cosine decay per step. Validation Dice on the
held-out cases after every epoch; the best epoch's weights are kept. Afterwards the candidate
postprocessing steps are measured on the validation cases at full resolution and kept per
structure only where they improve the mean Jaccard; the package is written and checked with
:func:`~dicom_node.package.manifest.load_package`. With a test part (``test_fraction``) the
test cases are evaluated once, last, after every choice is made; they choose nothing.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import yaml
from monai.losses import DiceLoss
from monai.utils import set_determinism

from dicom_node.common.errors import ConfigError
from dicom_node.config import yamlfile
from dicom_node.models.inference import select_device
from dicom_node.models.networks import build_network, load_network
from dicom_node.package.manifest import MODEL_FILE, ModelPackage, Postprocess, load_package
from dicom_node.training import card
from dicom_node.training.augment import AugmentConfig, build_augmentation
from dicom_node.training.data import (
    CachedCases,
    Split,
    list_cases,
    make_split,
    read_findings,
)
from dicom_node.training.evaluate import (
    EvaluationResult,
    evaluate,
    select_min_confidence,
    select_postprocessing,
)
from dicom_node.training.metrics import batch_dice
from dicom_node.training.progress import ProgressLines, format_seconds
from dicom_node.training.volumes import VolumeAugment

log = structlog.get_logger(__name__)

WEIGHTS_FILE = "model.pt"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class TrainSettings:
    """The ``training:`` part of the training config.

    Attributes
    ----------
    seed
        Seed of weights, batches and augmentation.
    epochs
        Number of epochs (the schedule is laid out over them).
    max_minutes
        Wall-clock budget: stop before an epoch that would end after it (best weights kept).
    batch_size, learning_rate, weight_decay, warmup_epochs
        AdamW and its schedule (linear warm-up, then cosine decay to 1% of the rate).
    dice_weight, bce_weight
        Weights of the soft Dice and binary cross-entropy terms of the loss.
    validation_fraction, split_seed
        The held-out fraction of cases and the seed of the split.
    test_fraction, test_seed
        Fraction of cases kept apart first as a test part, out of training and every choice
        (0: none), and its own seed (None: ``split_seed``); evaluated once at the end, they
        choose nothing (2D: stratified by finding; 3D: drawn from all cases).
    finding_pattern
        Without ``cases.csv``: a regular expression whose first group, searched in the case
        id, is the finding that stratifies the split (e.g. ``^([a-z]+)_``).
    spacing_mm
        Pixel spacing of the training images (PNG has none), for HD95 in mm.
    postprocess_candidates
        Postprocessing steps to measure on the validation cases.
    postprocess_min_gain, postprocess_min_gain_mm
        Smallest gain of mean validation Jaccard, or of mean HD95 in mm, for which a step is
        kept (a few pixels' worth of change is noise, not an improvement).
    num_threads
        CPU threads of torch (None: torch's default).
    patch_samples, positive_fraction
        3D: patches drawn per case per step, and the share centred on a structure voxel.
    validate_every
        3D: validate every this many epochs (and at the last).
    min_confidence_candidates
        Values of ``output.min_confidence`` to measure on the validation cases after the
        postprocessing is chosen (empty: no gate); see
        :func:`~dicom_node.training.evaluate.select_min_confidence`.
    """

    seed: int = 0
    epochs: int = 100
    max_minutes: float | None = None
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    validation_fraction: float = 0.2
    split_seed: int = 0
    test_fraction: float = 0.0
    test_seed: int | None = None
    finding_pattern: str | None = None
    spacing_mm: float = 1.0
    postprocess_candidates: tuple[str, ...] = ("largest_component", "fill_holes")
    postprocess_min_gain: float = 0.0005
    postprocess_min_gain_mm: float = 0.1
    num_threads: int | None = None
    # 3D models (dims: 3) only: patches, validation interval
    patch_samples: int = 2
    positive_fraction: float = 0.67
    validate_every: int = 1
    min_confidence_candidates: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> TrainSettings:
        doc = dict(doc or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise ConfigError(f"training: unknown keys {unknown}; known keys are {sorted(known)}")
        if "postprocess_candidates" in doc:
            steps = doc["postprocess_candidates"] or []
            allowed = [p.value for p in Postprocess]
            bad = [s for s in steps if s not in allowed]
            if bad:
                raise ConfigError(f"training.postprocess_candidates: {bad} not in {allowed}")
            doc["postprocess_candidates"] = tuple(steps)
        if "min_confidence_candidates" in doc:
            values = doc["min_confidence_candidates"] or []
            if not all(isinstance(v, int | float) and 0 <= v < 1 for v in values):
                raise ConfigError(
                    f"training.min_confidence_candidates: numbers in [0, 1), got {values!r}"
                )
            doc["min_confidence_candidates"] = tuple(float(v) for v in values)
        settings = cls(**doc)
        if settings.epochs < 1 or settings.batch_size < 1:
            raise ConfigError("training.epochs and training.batch_size must be >= 1")
        if settings.learning_rate <= 0 or settings.spacing_mm <= 0:
            raise ConfigError("training.learning_rate and training.spacing_mm must be > 0")
        return settings


@dataclass(frozen=True)
class DataInfo:
    """The ``data:`` part of the training config: what the model card says about the data."""

    description: str = ""
    citations: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> DataInfo:
        doc = dict(doc or {})
        unknown = sorted(set(doc) - {"description", "citations"})
        if unknown:
            raise ConfigError(f"data: unknown keys {unknown}; known: description, citations")
        citations = doc.get("citations") or []
        if not isinstance(citations, list) or not all(isinstance(c, str) for c in citations):
            raise ConfigError("data.citations: expected a list of strings")
        return cls(str(doc.get("description", "")), tuple(citations))


@dataclass(frozen=True)
class TrainConfig:
    """A parsed training config: the package to produce, the settings, the augmentation."""

    model: dict[str, Any]
    training: TrainSettings
    augment: AugmentConfig | VolumeAugment
    data: DataInfo = field(default_factory=DataInfo)
    source: str = ""


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    package: ModelPackage
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


def load_train_config(path: Path | str) -> TrainConfig:
    """Read a training config YAML file.

    Raises
    ------
    ConfigError
        When the file is missing, not YAML, or a key is invalid; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: training config not found")
    try:
        doc = yamlfile.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_train_config(doc, source=str(path))


def parse_train_config(doc: Any, source: str = "<config>") -> TrainConfig:
    """Validate a training config document (see the module docstring)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ConfigError(
            f"{source}: expected a mapping with model:, training:, augment: and data:"
        )
    unknown = sorted(set(doc) - {"model", "training", "augment", "data"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown}")
    model = dict(doc["model"])
    for key in ("weights", "metrics"):
        if key in model:
            raise ConfigError(f"{source}: model.{key} is written by training; remove it")
    return TrainConfig(
        model=model,
        training=TrainSettings.from_dict(doc.get("training")),
        augment=(
            VolumeAugment.from_dict(doc.get("augment"))
            if model.get("dims") == 3
            else AugmentConfig.from_dict(doc.get("augment"))
        ),
        data=DataInfo.from_dict(doc.get("data")),
        source=source,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and MONAI."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def save_weights(network: torch.nn.Module, path: Path) -> None:
    """Save the network's ``state_dict`` in half precision (small files; inference casts back)."""
    state = {
        k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
        for k, v in network.state_dict().items()
    }
    torch.save(state, path)


def write_model_yaml(folder: Path, model: dict[str, Any]) -> Path:
    """Write ``model.yaml`` with ``weights`` pointing at :data:`WEIGHTS_FILE`."""
    doc = dict(model)
    doc["weights"] = WEIGHTS_FILE
    path = folder / MODEL_FILE
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=None)
    path.write_text(text)
    return path


def transfer_weights(network: torch.nn.Module, source: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Copy the tensors of ``source`` (a state dict) into ``network`` where names and shapes match.

    Returns the number of tensors copied and the number of tensors of ``network``; tensors that
    do not fit (e.g. the last layer when the structures differ) keep their initialisation.
    """
    target = network.state_dict()
    copied = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    target.update(copied)
    network.load_state_dict(target)
    return len(copied), len(target)


class _Schedule:
    """Linear warm-up then cosine decay to 1% per optimiser step, over a shrinkable total.

    With a wall-clock budget the planned number of epochs (at most ``training.epochs``) is set
    after each epoch to what fits in the remaining time at the pace of the last epochs, so that
    the learning rate still anneals before training stops.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.01 + 0.99 * step / max(1, self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def optimisation(
    network: torch.nn.Module, settings: TrainSettings, steps: int, n_epochs: int
) -> tuple[
    Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    torch.optim.Optimizer,
    _Schedule,
    torch.optim.lr_scheduler.LambdaLR,
]:
    """The loss (weighted soft Dice + BCE), AdamW, and its warm-up + cosine schedule over
    ``n_epochs`` of ``steps`` batches: the same for 2D and 3D training."""
    dice_loss = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    bce_loss = torch.nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return settings.dice_weight * dice_loss(logits, target) + settings.bce_weight * bce_loss(
            logits, target
        )

    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = _Schedule(settings.warmup_epochs * steps, n_epochs * steps)
    return loss_fn, optimizer, schedule, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _validate(
    network: torch.nn.Module,
    loader: torch.utils.data.DataLoader[dict[str, torch.Tensor]],
    loss_fn: Any,
    threshold: float,
    device: torch.device,
) -> tuple[float, np.ndarray]:
    network.eval()
    num, den, losses = None, None, []
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for batch in loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            logits = network(x).float()
            losses.append(float(loss_fn(logits, y)))
            n, d = batch_dice(torch.sigmoid(logits) > threshold, y > 0.5)
            num = n if num is None else num + n
            den = d if den is None else den + d
    assert num is not None and den is not None
    dice = torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(den))
    return float(np.mean(losses)), dice.cpu().numpy()


def draw_split(data_dir: Path, labels: list[str], settings: TrainSettings) -> Split:
    """The split ``settings`` draws from every case of ``data_dir`` with masks for ``labels``:
    the test part first with its own seed, then validation; the same at every run."""
    cases = list_cases(data_dir, labels)
    return make_split(
        cases,
        read_findings(data_dir, settings.finding_pattern, cases),
        validation_fraction=settings.validation_fraction,
        seed=settings.split_seed,
        test_fraction=settings.test_fraction,
        test_seed=settings.test_seed,
    )


def train(
    data_dir: Path | str,
    train_config: Path | str | TrainConfig,
    out_dir: Path | str,
    init: Path | str | None = None,
    *,
    epochs: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    overlays: bool = True,
) -> TrainResult:
    """Train a model on a PNG folder (2D) or a NIfTI folder (3D models, see
    :mod:`dicom_node.training.train3d`) and write the model package ``out_dir``.

    Parameters
    ----------
    data_dir
        ``images/<case>.png`` and ``masks/<structure>/<case>.png`` (see
        :mod:`dicom_node.training.data`).
    train_config
        Path of the training config, or a parsed one.
    out_dir
        The model package folder to write (created; existing package files are replaced).
    init
        A model package to start from (transfer learning); tensors that fit are copied.
    epochs, max_minutes
        Override ``training.epochs`` and ``training.max_minutes``.
    progress
        Print progress lines on stderr: one per epoch (counts, loss, elapsed time), one at
        least every 30 s within an epoch, and per cases while postprocessing is chosen and the
        package evaluated (:class:`~dicom_node.training.progress.ProgressLines`).
    overlays
        Write the best/median/worst overlays of the validation cases into the package.
    """
    started = time.monotonic()
    config = (
        train_config if isinstance(train_config, TrainConfig) else load_train_config(train_config)
    )
    if config.model.get("dims") == 3:
        from dicom_node.training.train3d import train_volumes

        return train_volumes(
            Path(data_dir),
            config,
            Path(out_dir),
            init=init,
            epochs=epochs,
            max_minutes=max_minutes,
            progress=progress,
        )
    assert isinstance(config.augment, AugmentConfig)
    settings = config.training
    n_epochs = epochs or settings.epochs
    budget_min = max_minutes if max_minutes is not None else settings.max_minutes
    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    seed_everything(settings.seed)
    device = select_device()

    # The init weights are read before anything is written: --init may be --out itself.
    init_package = load_package(init) if init is not None else None
    init_state = (
        None
        if init_package is None
        else load_network(init_package, torch.device("cpu")).state_dict()
    )
    # The package is validated by the one validator before any time is spent training.
    network = build_network_from(config.model, out)
    package = load_package(out)
    if init_package is not None and init_state is not None:
        copied, total = transfer_weights(network, init_state)
        log.info("initialised from package", init=init_package.name, copied=copied, total=total)
    network.to(device)

    labels = [s.label for s in package.structures]
    split = draw_split(data_dir, labels, settings)
    split.write(out)
    log.info(
        "split",
        n_train=len(split.train),
        n_validation=len(split.validation),
        n_test=len(split.test),
    )
    augmentation = build_augmentation(config.augment, package.input_size, settings.seed)
    train_set = CachedCases(data_dir, split.train, package, transform=augmentation)
    val_set = CachedCases(data_dir, split.validation, package)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=len(train_set) > settings.batch_size,
        generator=generator,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=settings.batch_size)

    steps = len(train_loader)
    loss_fn, optimizer, schedule, scheduler = optimisation(network, settings, steps, n_epochs)
    planned = n_epochs
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(network.state_dict())
    epochs_done = ProgressLines("train", n_epochs, "epochs", every_n=1, enabled=progress)
    for epoch in range(1, n_epochs + 1):
        epoch_start = time.monotonic()
        network.train()
        losses = []
        batches = ProgressLines(  # within a long epoch: a line every 30 s
            f"train: epoch {epoch}/{planned}", steps, "batches", by_count=False, enabled=progress
        )
        for batch in train_loader:
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
        val_loss, val_dice = _validate(network, val_loader, loss_fn, package.threshold, device)
        score = float(val_dice.mean())
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(network.state_dict())
            save_weights(network, out / WEIGHTS_FILE)
        seconds = time.monotonic() - epoch_start
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_dice": {label: float(d) for label, d in zip(labels, val_dice, strict=True)},
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": seconds,
            }
        )
        epochs_done.total = planned
        epochs_done.update(
            epoch,
            f"loss {np.mean(losses):.3f}, validation Dice {score:.4f}, best epoch {best_epoch}",
        )
        log.info(
            "epoch",
            epoch=epoch,
            train_loss=round(float(np.mean(losses)), 4),
            val_loss=round(val_loss, 4),
            val_dice=round(score, 4),
            seconds=round(seconds, 1),
        )
        if epoch >= planned:
            break
        if budget_min is not None and epoch >= 2:
            # re-plan from the typical recent epoch (the first one is slower: warm-up)
            left_s = budget_min * 60 - (time.monotonic() - started)
            typical_s = float(np.median([h["seconds"] for h in history[1:][-5:]]))
            fits = min(n_epochs, max(epoch, epoch + int(left_s // typical_s)))
            if fits != planned:
                planned = fits
                schedule.total_steps = max(planned * steps, schedule.warmup_steps + 1)
                log.info("epochs re-planned to fit the time budget", epochs=planned)
            if planned <= epoch:
                log.warning("stopping at the time budget", epoch=epoch, max_minutes=budget_min)
                break
    train_seconds = time.monotonic() - started
    epochs_done.print(
        f"train: loop done in {format_seconds(train_seconds)}; choosing postprocessing and "
        "evaluating the best epoch"
    )

    network.load_state_dict(best_state)
    save_weights(network, out / WEIGHTS_FILE)
    card.plot_curves(history, out / card.CURVES_FILE, best_epoch)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")

    return finish_package(
        out,
        config,
        data_dir,
        RunRecord(
            split=split,
            history=history,
            best_epoch=best_epoch,
            epochs_planned=n_epochs,
            epochs_fitted=planned,
            seconds=train_seconds,
            init=init_package,
        ),
        device=device,
        overlays=overlays,
        progress=progress,
    )


@dataclass(frozen=True)
class RunRecord:
    """What the training loop leaves for :func:`finish_package`."""

    split: Split
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_planned: int
    epochs_fitted: int
    seconds: float
    init: ModelPackage | None = None


def finish_package(
    out: Path,
    config: TrainConfig,
    data_dir: Path,
    run: RunRecord,
    *,
    device: torch.device,
    overlays: bool = True,
    progress: bool = False,
) -> TrainResult:
    """Complete the package in ``out`` whose best weights are written: postprocessing, figures.

    Measures the postprocessing candidates on the validation cases and keeps, per structure,
    the combination that improves the mean Jaccard or HD95 (see
    :func:`~dicom_node.training.evaluate.select_postprocessing`);
    evaluates the package on the validation cases as ``evaluate`` does, then (once, choosing
    nothing) on the test cases of the split if it has any; writes ``model.yaml`` with the
    figures (``metrics.structures``: the test figures when there is a test part, as for 3D
    packages, with the validation figures under ``metrics.validation``) and the model card.
    """
    settings = config.training
    package = load_package(out)
    chosen, comparison = select_postprocessing(
        package,
        data_dir,
        run.split.validation,
        [Postprocess(p) for p in settings.postprocess_candidates],
        spacing_mm=settings.spacing_mm,
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
    if settings.min_confidence_candidates:
        gate, _ = select_min_confidence(
            package,
            data_dir,
            run.split.validation,
            settings.min_confidence_candidates,
            device=device,
        )
        if gate is not None:
            model["output"] = {**dict(model.get("output") or {}), "min_confidence": gate}
            write_model_yaml(out, model)
            package = load_package(out)

    def evaluate_part(part: str, cases: Sequence[str]) -> EvaluationResult:
        return evaluate(
            package,
            data_dir,
            out / part if overlays else None,
            cases=cases,
            spacing_mm=settings.spacing_mm,
            device=device,
            progress=progress,
        )

    result_eval = evaluate_part("validation", run.split.validation)
    # Every choice is made: the test part (if any) is evaluated once, and chooses nothing.
    test_eval = evaluate_part("test", run.split.test) if run.split.test else None
    metrics: dict[str, Any] = {
        "validation_cases": len(run.split.validation),
        "spacing_mm": settings.spacing_mm,
        "best_epoch": run.best_epoch,
        "structures": _rounded(result_eval.summary),
    }
    if test_eval is not None:  # as 3D packages: structures are the test figures
        metrics.update(
            validation=metrics.pop("structures"),
            test_cases=len(run.split.test),
            structures=_rounded(test_eval.summary),
        )
    model["metrics"] = metrics
    model["training"] = {
        "data": str(Path(data_dir).name),
        "split": "split.json",
        "epochs_run": len(run.history),
        "epochs_planned": run.epochs_planned,
        "epochs_fitted_to_budget": run.epochs_fitted,
        "best_epoch": run.best_epoch,
        "seconds": round(run.seconds, 1),
        "device": card.hardware(device),
        "init": None if run.init is None else f"{run.init.name} {run.init.version}",
    }
    write_model_yaml(out, model)
    package = load_package(out)
    card.write_model_card(
        out,
        package=package,
        config=config,
        split=run.split,
        history=run.history,
        best_epoch=run.best_epoch,
        seconds=run.seconds,
        device=device,
        summary=result_eval.summary,
        postprocess_comparison=comparison,
        init=run.init,
        test_summary=None if test_eval is None else test_eval.summary,
    )
    log.info("package written", model=package.name, best_epoch=run.best_epoch)
    return TrainResult(
        package=package,
        history=run.history,
        best_epoch=run.best_epoch,
        seconds=run.seconds,
        metrics=metrics,
    )


def _rounded(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {label: {k: round(v, 4) for k, v in summary[label].items()} for label in summary}


def build_network_from(model: dict[str, Any], out: Path) -> torch.nn.Module:
    """Write a draft package (``model.yaml`` + initial weights) in ``out`` and build its network.

    Writing first lets :func:`load_package`, the one validator of packages, check the config.
    """
    write_model_yaml(out, model)
    if not (out / WEIGHTS_FILE).is_file():
        torch.save({}, out / WEIGHTS_FILE)  # placeholder so that the draft validates
    network = build_network(load_package(out))
    save_weights(network, out / WEIGHTS_FILE)
    return network
