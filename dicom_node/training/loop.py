"""The training loop, written once for 2D and 3D models, and the run around it.

:func:`start_run` seeds Python, NumPy, torch and MONAI, writes the draft package (the one
validator, :func:`~dicom_node.package.manifest.load_package`, checks the config before any
time is spent), builds the network and copies the tensors of an ``--init`` package into it.
:func:`run_epochs` then trains: soft Dice + BCE on the sigmoid channels (multi-label: the
structures overlap), AdamW with linear warm-up and cosine decay per step, mixed precision
(autocast + gradient scaling) on CUDA only, one code path for CPU and CUDA. The validation
cases are scored after every epoch (3D: every ``validate_every`` epochs and at the last); the
best epoch by mean validation Dice is kept, and with a wall-clock budget the schedule shrinks
to what fits. A checkpoint (:mod:`~dicom_node.training.checkpoint`) is written every
``checkpoint_minutes`` at an epoch's end, when a sitting stops early and at the end; a run
continued from it (:class:`Sitting`, ``--resume``) ends as the uninterrupted run would have,
bit for bit. What differs between 2D and 3D inside the loop (how batches are drawn, how the
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

from dicom_node.common.errors import ConfigError
from dicom_node.models.efficientnet_lite import EfficientNetLite0UNet
from dicom_node.models.inference import select_device
from dicom_node.models.networks import build_network, load_network
from dicom_node.package.manifest import MODEL_FILE, ModelPackage, load_package
from dicom_node.training import card
from dicom_node.training.checkpoint import (
    CHECKPOINT_FILE,
    PackageRef,
    capture_rng,
    check_fingerprint,
    fingerprint,
    half_state,
    random_states_of,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from dicom_node.training.config import HISTORY_FILE, WEIGHTS_FILE, TrainConfig, TrainSettings
from dicom_node.training.data import Split
from dicom_node.training.pretrained import load_pretrained_encoder
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
    save_state(network.state_dict(), path)


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a ``state_dict`` in half precision, as :func:`save_weights`."""
    torch.save(half_state(state), path)


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


def forward_for_training(
    network: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mask logits of ``x`` and, for a network with an image-level presence head
    (:class:`~dicom_node.models.efficientnet_lite.EfficientNetLite0UNet` with
    ``presence_head``), its presence logits ``(N, S)`` (else None)."""
    if isinstance(network, EfficientNetLite0UNet) and network.presence is not None:
        return network.forward_with_presence(x)
    return network(x), None


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
    #: False when the sitting stopped early (``stop_after_*``): the package is a draft
    #: and the checkpoint waits for ``resume``.
    finished: bool = True


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
    #: The pretrained encoder weights the network started from
    #: (:func:`~dicom_node.training.pretrained.load_pretrained_encoder`), or None.
    pretrained: dict[str, Any] | None = None


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
    pretrained = None
    if settings.pretrained_encoder is not None:
        kind = str(package.network.get("kind", "unet"))
        pretrained = load_pretrained_encoder(network, kind, settings.pretrained_encoder)
    if init_package is not None and init_state is not None:
        copied, total = transfer_weights(network, init_state)
        log.info("initialised from package", init=init_package.name, copied=copied, total=total)
    network.to(device)
    if settings.channels_last:
        network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return Run(
        config,
        out,
        network,
        package,
        device,
        init_package,
        n_epochs,
        budget_min,
        started,
        pretrained,
    )


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
    """What the training loop leaves for the package to be finished.

    ``seconds`` is the time of every sitting together (``sittings``: each one's seconds, up
    to its last checkpoint for the earlier ones); ``finished`` is False when the sitting
    stopped before the end of training (``--stop-after-*``), leaving a checkpoint.
    """

    split: Split
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_planned: int
    epochs_fitted: int
    seconds: float
    init: ModelPackage | PackageRef | None = None
    sittings: tuple[float, ...] = ()
    finished: bool = True
    pretrained: dict[str, Any] | None = None


@dataclass(frozen=True)
class Sitting:
    """How this sitting of a training run goes.

    Attributes
    ----------
    resume
        The checkpoint to continue from (:func:`~dicom_node.training.checkpoint.read_checkpoint`),
        or None to start afresh.
    checkpoint_minutes
        Write a checkpoint at the end of the first epoch that ends this many minutes after the
        last checkpoint (or the start of the sitting); always at the end of training and when
        the sitting stops early.
    stop_after_epochs, stop_after_minutes
        End this sitting, with a checkpoint, after this many epochs, or before an epoch that
        would end after this many minutes of the sitting; training goes on with ``--resume``.
    """

    resume: dict[str, Any] | None = None
    checkpoint_minutes: float = 10.0
    stop_after_epochs: int | None = None
    stop_after_minutes: float | None = None


def check_checkpoint(out: Path, *, resume: bool) -> dict[str, Any] | None:
    """Before anything is written to ``out``: the checkpoint to resume from (``resume``), or
    None after making sure that a fresh run does not overwrite a checkpoint.

    Raises
    ------
    ConfigError
        ``--resume`` without a readable checkpoint, or a checkpoint in ``out`` without it.
    """
    path = out / CHECKPOINT_FILE
    if resume:
        return read_checkpoint(path)
    if path.exists():
        raise ConfigError(
            f"{path}: a checkpoint of an unfinished training is there; continue it with "
            "--resume, or delete it to start afresh"
        )
    return None


def _init_ref(init: ModelPackage | PackageRef | None) -> dict[str, str] | None:
    return None if init is None else {"name": init.name, "version": init.version}


def run_epochs(  # noqa: PLR0915 - the loop is written once, for 2D and 3D
    run: Run, data: LoopData, split: Split, *, progress: bool, sitting: Sitting | None = None
) -> RunRecord:
    """Train ``run.network`` on ``data`` and leave the best epoch's weights, ``history.json``
    and the curves in ``run.out`` (see the module docstring).

    ``progress`` prints a line per epoch (counts, loss, elapsed time, time left) and one at
    least every 30 s within an epoch on stderr
    (:class:`~dicom_node.training.progress.ProgressLines`). ``sitting`` says whether to
    resume from a checkpoint, how often to write one and when to stop this sitting
    (:class:`Sitting`); a resumed run ends with the result of an uninterrupted one.
    """
    sitting = sitting or Sitting()
    settings, network, device, out = run.config.training, run.network, run.device, run.out
    labels = [s.label for s in run.package.structures]
    n_epochs, budget_min = run.epochs, run.budget_min
    steps = len(data.loader)
    loss_fn, optimizer, schedule, scheduler = optimisation(network, settings, steps, n_epochs)
    presence_loss = torch.nn.BCEWithLogitsLoss()
    planned = n_epochs
    use_amp = device.type == "cuda"
    cpu_bf16 = device.type == "cpu" and settings.cpu_autocast == "bfloat16"
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(network.state_dict())

    # what a checkpoint keeps beyond the tensors: the random states of the data and
    # augmentation, the sittings so far, what the run started from
    checkpoint_path = out / CHECKPOINT_FILE
    sources = random_states_of(data.loader.dataset, "dataset")
    generator = data.loader.generator
    init = _init_ref(run.init)
    done, before_s = 0, []

    def run_key(init: dict[str, str] | None) -> str:
        start = None if init is None else f"{init['name']} {init['version']}"
        return fingerprint(run.config, split, n_epochs, start)

    if sitting.resume is not None:
        state = sitting.resume
        init = state["init"]  # --init is not read again: the checkpoint says what it was
        check_fingerprint(state, run_key(init), checkpoint_path)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])  # the schedule's total steps too
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], sources, generator)
        history = list(state["history"])
        done, planned = int(state["epoch"]), int(state["planned"])
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        best_state = dict(state["best_state"])
        before_s = [float(s) for s in state["sittings"]]
        save_state(best_state, out / WEIGHTS_FILE)
        log.info(
            "resumed from checkpoint",
            epoch=done,
            epochs=planned,
            sittings=len(before_s),
            seconds_before=round(sum(before_s), 1),
        )
    last_checkpoint = run.started

    def keep_if_best(score: float, epoch: int) -> None:
        nonlocal best_score, best_epoch, best_state
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(network.state_dict())
            save_weights(network, out / WEIGHTS_FILE)

    def write_checkpoint(epoch: int) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "fingerprint": run_key(init),
                "epoch": epoch,
                "planned": planned,
                "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": capture_rng(sources, generator),
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_state": half_state(best_state),
                "sittings": [*before_s, time.monotonic() - run.started],
                "init": init,
            },
        )
        log.info(
            "checkpoint written", epoch=epoch, mb=round(checkpoint_path.stat().st_size / 1e6, 1)
        )

    epochs_done = ProgressLines(
        "train", n_epochs, "epochs", every_n=1, enabled=progress, already_done=done
    )
    epochs_done.total = planned
    epoch, finished = done, done >= planned
    while not finished:
        epoch += 1
        epoch_start = time.monotonic()
        network.train()
        losses: list[float] = []
        batches = ProgressLines(  # within a long epoch: a line every 30 s
            f"train: epoch {epoch}/{planned}", steps, "batches", by_count=False, enabled=progress
        )
        for batch in data.loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(
                device.type, enabled=use_amp or cpu_bf16, dtype=torch.bfloat16 if cpu_bf16 else None
            ):
                logits, presence = forward_for_training(network, x)
            loss = loss_fn(logits.float(), y)
            if presence is not None:
                loss = loss + settings.presence_weight * presence_loss(
                    presence.float(), y.flatten(2).amax(-1)
                )
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
        finished = epoch >= planned
        if not finished and budget_min is not None and epoch >= 2:
            # re-plan from the typical recent epoch (the first one is slower: warm-up); the
            # budget counts the earlier sittings too
            spent_s = sum(before_s) + time.monotonic() - run.started
            left_s = budget_min * 60 - spent_s
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
                finished = True
        stop = not finished and _sitting_ends(sitting, epoch - done, run.started, history)
        if (
            finished
            or stop
            or time.monotonic() - last_checkpoint >= sitting.checkpoint_minutes * 60
        ):
            write_checkpoint(epoch)
            last_checkpoint = time.monotonic()
        if stop:
            break
    sitting_s = time.monotonic() - run.started
    train_seconds = sum(before_s) + sitting_s
    sittings = (*before_s, sitting_s)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    if not finished:
        epochs_done.print(
            f"train: this sitting stopped after epoch {epoch} of {planned} "
            f"({format_seconds(sitting_s)}); checkpoint {checkpoint_path}: continue with the "
            "same command and --resume"
        )
    else:
        over = f" over {len(sittings)} sittings" if len(sittings) > 1 else ""
        epochs_done.print(
            f"train: loop done in {format_seconds(train_seconds)}{over}; {data.done_note}"
        )
        network.load_state_dict(best_state)
        save_weights(network, out / WEIGHTS_FILE)
        data.plot_curves(history, out / card.CURVES_FILE, best_epoch)
    return RunRecord(
        split=split,
        history=history,
        best_epoch=best_epoch,
        epochs_planned=n_epochs,
        epochs_fitted=planned,
        seconds=train_seconds,
        init=None if init is None else (run.init or PackageRef(**init)),
        sittings=sittings,
        finished=finished,
        pretrained=run.pretrained,
    )


def _sitting_ends(
    sitting: Sitting, epochs: int, started: float, history: list[dict[str, Any]]
) -> bool:
    """Whether this sitting stops after ``epochs`` epochs of its own: by count, or because
    the next epoch (at the pace of the last ones) would end after its minutes."""
    if sitting.stop_after_epochs is not None and epochs >= sitting.stop_after_epochs:
        return True
    if sitting.stop_after_minutes is None:
        return False
    typical_s = float(np.median([h["seconds"] for h in history[-3:]]))
    return time.monotonic() - started + typical_s > sitting.stop_after_minutes * 60


def training_record(data_dir: Path, run: RunRecord, device: torch.device) -> dict[str, Any]:
    """The ``training:`` record of the ``model.yaml`` training writes: data, split, epochs,
    time (every sitting together) and device (no host names), and the package it started
    from."""
    return {
        "data": str(Path(data_dir).name),
        "split": "split.json",
        "epochs_run": len(run.history),
        "epochs_planned": run.epochs_planned,
        "epochs_fitted_to_budget": run.epochs_fitted,
        "best_epoch": run.best_epoch,
        "seconds": round(run.seconds, 1),
        "sittings": len(run.sittings),
        "device": card.hardware(device),
        "init": None if run.init is None else f"{run.init.name} {run.init.version}",
        **({} if run.pretrained is None else {"pretrained": _pretrained_record(run.pretrained)}),
    }


def _pretrained_record(pretrained: dict[str, Any]) -> dict[str, Any]:
    keys = ("package", "version", "file", "sha256")
    return {k: pretrained[k] for k in keys}


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
