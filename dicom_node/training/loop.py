"""The training loop, written once for 2D and 3D models, and the run around it.

:func:`start_run` seeds Python, NumPy, torch and MONAI, writes the draft package (the one
validator, :func:`~dicom_node.package.manifest.load_package`, checks the config before any
time is spent), builds the network and copies the tensors of an ``--init`` package into it.
:func:`run_epochs` then trains: soft Dice + BCE on the sigmoid channels (multi-label: the
structures overlap), AdamW with linear warm-up and cosine decay per step, mixed precision
(autocast + gradient scaling) on CUDA only, one code path for CPU and CUDA. The validation
cases are scored after every epoch (3D: every ``validate_every`` epochs and at the last); the
best epoch by mean validation Dice is kept, and with a wall-clock budget the schedule shrinks
to what fits. What differs between 2D and 3D inside the loop (how batches are drawn, how the
validation cases are scored, the curves) comes in as a :class:`LoopData`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import yaml
from monai.losses import DiceLoss
from monai.utils import set_determinism

from dicom_node.models.inference import select_device
from dicom_node.models.networks import build_network, load_network
from dicom_node.package.manifest import MODEL_FILE, ModelPackage, load_package
from dicom_node.training import card
from dicom_node.training.config import HISTORY_FILE, WEIGHTS_FILE, TrainConfig, TrainSettings
from dicom_node.training.data import Split
from dicom_node.training.progress import ProgressLines, format_seconds

log = structlog.get_logger(__name__)

#: The loss: logits and target, both ``(N, S, ...)``, to a scalar tensor.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
) -> tuple[LossFn, torch.optim.Optimizer, _Schedule, torch.optim.lr_scheduler.LambdaLR]:
    """The loss (weighted soft Dice + BCE), AdamW, and its warm-up + cosine schedule over
    ``n_epochs`` of ``steps`` batches: the same for 2D and 3D training."""
    dice_loss = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    bce_loss = torch.nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = settings.dice_weight * dice_loss(
            logits, target
        ) + settings.bce_weight * bce_loss(logits, target)
        return loss

    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = _Schedule(settings.warmup_epochs * steps, n_epochs * steps)
    return loss_fn, optimizer, schedule, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class TrainResult:
    """What :func:`~dicom_node.training.train.train` produced."""

    package: ModelPackage
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """A training run set up by :func:`start_run`: seeded, its draft package written."""

    config: TrainConfig
    out: Path
    network: torch.nn.Module
    package: ModelPackage
    device: torch.device
    init: ModelPackage | None
    epochs: int
    budget_min: float | None
    started: float


def start_run(
    config: TrainConfig,
    out: Path,
    init: Path | str | None,
    *,
    epochs: int | None,
    max_minutes: float | None,
    started: float,
) -> Run:
    """Seed everything, write the draft package ``out`` and build its network on the device.

    ``init`` (a package folder, possibly ``out`` itself: its weights are read before anything
    is written) gives the tensors that fit; ``epochs`` and ``max_minutes`` override the
    config's; ``started`` is the :func:`time.monotonic` the budget counts from.
    """
    settings = config.training
    n_epochs = epochs or settings.epochs
    budget_min = max_minutes if max_minutes is not None else settings.max_minutes
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
    return Run(config, out, network, package, device, init_package, n_epochs, budget_min, started)


@dataclass(frozen=True)
class LoopData:
    """What differs between 2D and 3D training inside :func:`run_epochs`.

    Attributes
    ----------
    loader
        The training batches of one epoch: ``image`` ``(N, C, ...)`` and ``label``
        ``(N, S, ...)`` (2D: augmented cached cases; 3D: patches of the cached volumes).
    validate
        Scores the validation cases: ``(network, loss_fn)`` to the mean loss and the Dice per
        structure (on the network's grid).
    validate_every
        Validate every this many epochs, and at the last.
    history_keys
        The keys of a ``history.json`` entry, in their order (a key missing in an epoch
        without validation is left out).
    plot_curves
        Draws the curves of the history: ``(history, path, best_epoch)``.
    done_note
        What the progress line at the end of the loop says comes next.
    """

    loader: torch.utils.data.DataLoader[Any]
    validate: Callable[[torch.nn.Module, LossFn], tuple[float, np.ndarray]]
    validate_every: int
    history_keys: tuple[str, ...]
    plot_curves: Callable[[list[dict[str, Any]], Path, int], object]
    done_note: str


@dataclass(frozen=True)
class RunRecord:
    """What the training loop leaves for the package to be finished."""

    split: Split
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_planned: int
    epochs_fitted: int
    seconds: float
    init: ModelPackage | None = None


def run_epochs(run: Run, data: LoopData, split: Split, *, progress: bool) -> RunRecord:
    """Train ``run.network`` on ``data`` and leave the best epoch's weights, ``history.json``
    and the curves in ``run.out`` (see the module docstring).

    ``progress`` prints a line per epoch (counts, loss, elapsed time) and one at least every
    30 s within an epoch on stderr (:class:`~dicom_node.training.progress.ProgressLines`).
    """
    settings, network, device, out = run.config.training, run.network, run.device, run.out
    labels = [s.label for s in run.package.structures]
    n_epochs, budget_min = run.epochs, run.budget_min
    steps = len(data.loader)
    loss_fn, optimizer, schedule, scheduler = optimisation(network, settings, steps, n_epochs)
    planned = n_epochs
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(network.state_dict())

    def keep_if_best(score: float, epoch: int) -> None:
        nonlocal best_score, best_epoch, best_state
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(network.state_dict())
            save_weights(network, out / WEIGHTS_FILE)

    epochs_done = ProgressLines("train", n_epochs, "epochs", every_n=1, enabled=progress)
    for epoch in range(1, n_epochs + 1):
        epoch_start = time.monotonic()
        network.train()
        losses: list[float] = []
        batches = ProgressLines(  # within a long epoch: a line every 30 s
            f"train: epoch {epoch}/{planned}", steps, "batches", by_count=False, enabled=progress
        )
        for batch in data.loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = network(x)
            loss = loss_fn(logits.float(), y)
            torch.autograd.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            batches.update(len(losses))
        train_loss = float(np.mean(losses))
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
        detail = f"loss {train_loss:.3f}"
        validated = epoch % data.validate_every == 0 or epoch >= planned
        if validated:
            val_loss, val_dice = data.validate(network, loss_fn)
            score = float(val_dice.mean())
            keep_if_best(score, epoch)
            entry["val_loss"] = val_loss
            entry["val_dice"] = {lb: float(d) for lb, d in zip(labels, val_dice, strict=True)}
            detail += f", validation Dice {score:.4f}, best epoch {best_epoch}"
        seconds = time.monotonic() - epoch_start
        entry.update(lr=float(optimizer.param_groups[0]["lr"]), seconds=seconds)
        history.append({key: entry[key] for key in data.history_keys if key in entry})
        epochs_done.total = planned
        epochs_done.update(epoch, detail)
        figures = {"val_loss": round(val_loss, 4), "val_dice": round(score, 4)} if validated else {}
        log.info(
            "epoch",
            epoch=epoch,
            train_loss=round(train_loss, 4),
            **figures,
            seconds=round(seconds, 1),
        )
        if epoch >= planned:
            break
        if budget_min is not None and epoch >= 2:
            # re-plan from the typical recent epoch (the first one is slower: warm-up)
            left_s = budget_min * 60 - (time.monotonic() - run.started)
            typical_s = float(np.median([h["seconds"] for h in history[1:][-5:]]))
            fits = min(n_epochs, max(epoch, epoch + int(left_s // typical_s)))
            if fits != planned:
                planned = fits
                schedule.total_steps = max(planned * steps, schedule.warmup_steps + 1)
                log.info("epochs re-planned to fit the time budget", epochs=planned)
            if planned <= epoch:
                if not validated:  # the last epoch run is a candidate too
                    _, val_dice = data.validate(network, loss_fn)
                    keep_if_best(float(val_dice.mean()), epoch)
                log.warning("stopping at the time budget", epoch=epoch, max_minutes=budget_min)
                break
    train_seconds = time.monotonic() - run.started
    epochs_done.print(f"train: loop done in {format_seconds(train_seconds)}; {data.done_note}")

    network.load_state_dict(best_state)
    save_weights(network, out / WEIGHTS_FILE)
    data.plot_curves(history, out / card.CURVES_FILE, best_epoch)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    return RunRecord(
        split=split,
        history=history,
        best_epoch=best_epoch,
        epochs_planned=n_epochs,
        epochs_fitted=planned,
        seconds=train_seconds,
        init=run.init,
    )


def training_record(data_dir: Path, run: RunRecord, device: torch.device) -> dict[str, Any]:
    """The ``training:`` record of the ``model.yaml`` training writes: data, split, epochs,
    time and device (no host names), and the package it started from."""
    return {
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


def write_chosen_postprocess(
    out: Path, config: TrainConfig, chosen: dict[str, list[str]]
) -> tuple[dict[str, Any], ModelPackage]:
    """Write ``model.yaml`` of ``config.model`` with the postprocessing ``chosen`` per
    structure (none where the list is empty); return the model document and the package."""
    model = dict(config.model)
    model["structures"] = [
        {**s, **({"postprocess": chosen[s["label"]]} if chosen.get(s["label"]) else {})}
        for s in config.model["structures"]
    ]
    write_model_yaml(out, model)
    return model, load_package(out)
