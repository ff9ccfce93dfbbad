"""``dicom-node train``: train a multi-label U-Net and write a complete model package.

2D models train here on PNG folders; 3D models (``model.dims: 3``) on NIfTI volumes, with
the specifics in :mod:`dicom_node.training.train3d`, from the same config format
(:mod:`dicom_node.training.config`), the same command and the same loop
(:mod:`dicom_node.training.loop`: soft Dice + BCE, AdamW with warm-up and cosine decay, mixed
precision on CUDA only, validation Dice after every epoch, the best epoch's weights kept).

2D batches are the cached training cases (prepared once by the node's own preprocessing),
augmented; validation scores the validation cases on the network's input grid. Afterwards the
candidate postprocessing steps are measured on the validation cases at full resolution and
kept per structure only where they improve the mean Jaccard; the package is written and
checked with :func:`~dicom_node.package.manifest.load_package`. With a test part
(``test_fraction``) the test cases are evaluated once, last, after every choice is made; they
choose nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from dicom_node.common.errors import InputError
from dicom_node.package.manifest import Postprocess, load_package
from dicom_node.training import card
from dicom_node.training.augment import AugmentConfig, build_augmentation
from dicom_node.training.checkpoint import CHECKPOINT_FILE
from dicom_node.training.config import WEIGHTS_FILE, TrainConfig, TrainSettings, load_train_config
from dicom_node.training.data import (
    SPLIT_FILE,
    CachedCases,
    Split,
    list_cases,
    make_split,
    read_findings,
    read_split,
)
from dicom_node.training.evaluate import (
    EvaluationResult,
    evaluate,
    select_min_confidence,
    select_output_rules,
    select_postprocessing,
)
from dicom_node.training.loop import (
    LoopData,
    LossFn,
    Run,
    RunRecord,
    Sitting,
    TrainResult,
    check_checkpoint,
    run_epochs,
    save_state,
    start_run,
    training_record,
    write_chosen_postprocess,
    write_model_yaml,
)
from dicom_node.training.metrics import batch_dice
from dicom_node.training.results import rounded
from dicom_node.training.train3d import draw_volume_split, finish_volume_package, volume_loop_data

log = structlog.get_logger(__name__)

#: The keys of a 2D ``history.json`` entry, in their order (every epoch is validated).
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds")


def _validate(
    network: torch.nn.Module,
    loader: torch.utils.data.DataLoader[dict[str, torch.Tensor]],
    loss_fn: LossFn,
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
    the test part first with its own seed, then validation; the same at every run.

    A data folder with its own ``split.json`` (e.g. the crops of :mod:`dicom_node.training.crops`,
    cut from another package's split) is split as that file says; the config's split settings
    are then not used.
    """
    cases = list_cases(data_dir, labels)
    if (Path(data_dir) / SPLIT_FILE).is_file():
        split = read_split(Path(data_dir))
        listed = [*split.train, *split.validation, *split.test]
        missing = sorted(set(listed) - set(cases))
        if missing or len(set(listed)) != len(listed):
            raise InputError(
                f"{Path(data_dir) / SPLIT_FILE}: lists cases without an image and masks "
                f"({missing[:3]}) or a case twice; fix or remove the file"
            )
        log.info("split of the data folder", file=str(Path(data_dir) / SPLIT_FILE))
        return split
    return make_split(
        cases,
        read_findings(data_dir, settings.finding_pattern, cases),
        validation_fraction=settings.validation_fraction,
        seed=settings.split_seed,
        test_fraction=settings.test_fraction,
        test_seed=settings.test_seed,
    )


def drop_presence_head(out: Path, model: dict[str, Any]) -> None:
    """Take an image-level presence head whose gate validation did not choose out of the package
    in ``out``: its weights and ``network.presence_head`` (the network never runs a head
    without a gate, so the masks are the same; the package and a continued training's
    checkpoint are smaller)."""
    model["network"] = {k: v for k, v in model["network"].items() if k != "presence_head"}
    weights = out / WEIGHTS_FILE
    state = torch.load(weights, map_location="cpu", weights_only=True)
    save_state({k: v for k, v in state.items() if not k.startswith("presence.")}, weights)
    log.info("presence head not kept: its gate was not chosen", model=model.get("name"))


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
    resume: bool = False,
    checkpoint_minutes: float | None = None,
    stop_after_epochs: int | None = None,
    stop_after_minutes: float | None = None,
) -> TrainResult:
    """Train a model on a PNG folder (2D) or a NIfTI folder (3D models, see
    :mod:`dicom_node.training.train3d`) and write the model package ``out_dir``.

    Parameters
    ----------
    data_dir
        ``images/<case>.png`` and ``masks/<structure>/<case>.png`` (see
        :mod:`dicom_node.training.data`), or ``<case>/image.nii.gz`` and
        ``<case>/label.nii.gz`` (see :mod:`dicom_node.training.volumes`).
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
        Write the best/median/worst overlays of the validation cases into the package (2D).
    resume
        Continue from the checkpoint in ``out_dir`` (written by a run of the same config,
        data split and ``epochs``; ``init`` is then taken from the checkpoint): the result is
        the one of an uninterrupted run. Without it, a checkpoint in ``out_dir`` is refused.
    checkpoint_minutes
        Override ``training.checkpoint_minutes``.
    stop_after_epochs, stop_after_minutes
        End this sitting after this many epochs, or before an epoch that would end after
        this many minutes, with a checkpoint; the package is not finished
        (``TrainResult.finished`` is False) until a run with ``resume`` completes it.

    Raises
    ------
    ConfigError
        ``resume`` without a checkpoint, or with one of another run; a checkpoint in
        ``out_dir`` without ``resume``.
    """
    started = time.monotonic()
    config = (
        train_config if isinstance(train_config, TrainConfig) else load_train_config(train_config)
    )
    data_dir, out = Path(data_dir), Path(out_dir)
    volumes = config.model.get("dims") == 3
    checkpoint = check_checkpoint(out, resume=resume)
    if checkpoint is not None:
        init = None  # the checkpoint holds the weights and says what they started from
    run = start_run(config, out, init, epochs=epochs, max_minutes=max_minutes, started=started)
    labels = [s.label for s in run.package.structures]
    if volumes:
        split = draw_volume_split(data_dir, config.training)
    else:
        split = draw_split(data_dir, labels, config.training)
    split.write(out)
    log.info(
        "split",
        n_train=len(split.train),
        n_validation=len(split.validation),
        n_test=len(split.test),
    )
    data = (
        volume_loop_data(data_dir, split, run) if volumes else image_loop_data(data_dir, split, run)
    )
    sitting = Sitting(
        resume=checkpoint,
        checkpoint_minutes=checkpoint_minutes or config.training.checkpoint_minutes,
        stop_after_epochs=stop_after_epochs,
        stop_after_minutes=stop_after_minutes,
    )
    record = run_epochs(run, data, split, progress=progress, sitting=sitting)
    if not record.finished:  # this sitting ends; the checkpoint waits for --resume
        return TrainResult(
            package=run.package,
            history=record.history,
            best_epoch=record.best_epoch,
            seconds=record.seconds,
            finished=False,
        )
    if volumes:
        result = finish_volume_package(
            out, config, data_dir, record, device=run.device, progress=progress
        )
    else:
        result = finish_package(
            out, config, data_dir, record, device=run.device, overlays=overlays, progress=progress
        )
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # the package is complete
    return result


def epoch_sampler(
    masks: np.ndarray, settings: TrainSettings, generator: torch.Generator
) -> torch.utils.data.RandomSampler | torch.utils.data.WeightedRandomSampler:
    """What an epoch draws from the training images (masks ``(N, S, H, W)``), without
    replacement, from ``generator``: ``settings.epoch_images`` of them (None: all), an image
    without any structure ``settings.empty_image_weight`` times as likely as one with."""
    n_drawn = min(settings.epoch_images or len(masks), len(masks))
    if settings.empty_image_weight == 1.0:
        return torch.utils.data.RandomSampler(
            range(len(masks)), num_samples=n_drawn, generator=generator
        )
    empty = ~masks.reshape(len(masks), -1).any(axis=1)
    weights = np.where(empty, settings.empty_image_weight, 1.0)
    return torch.utils.data.WeightedRandomSampler(
        weights.tolist(), num_samples=n_drawn, replacement=False, generator=generator
    )


def image_loop_data(data_dir: Path, split: Split, run: Run) -> LoopData:
    """The 2D part of the loop: batches of augmented cached training cases, shuffled by the
    run's seed; validation on the cached validation cases (network input grid)."""
    config, package, device = run.config, run.package, run.device
    settings = config.training
    assert isinstance(config.augment, AugmentConfig)
    augmentation = build_augmentation(config.augment, package.input_size, settings.seed)
    train_set = CachedCases(data_dir, split.train, package, transform=augmentation)
    val_set = CachedCases(data_dir, split.validation, package)
    generator = torch.Generator().manual_seed(settings.seed)
    # epoch_images: a random subset per epoch (the sampler draws from the loader's generator,
    # which the checkpoint keeps)
    sampler = epoch_sampler(train_set.masks, settings, generator)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=settings.batch_size,
        sampler=sampler,
        drop_last=len(sampler) > settings.batch_size,
        generator=generator,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=settings.batch_size)

    def validate(network: torch.nn.Module, loss_fn: LossFn) -> tuple[float, np.ndarray]:
        return _validate(network, val_loader, loss_fn, package.threshold, device)

    return LoopData(
        loader=train_loader,
        validate=validate,
        validate_every=1,
        history_keys=HISTORY_KEYS,
        plot_curves=card.plot_curves,
        done_note="choosing postprocessing and evaluating the best epoch",
    )


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
    model, package = write_chosen_postprocess(out, config, chosen)
    output_rules: tuple[dict[str, Any], dict[str, float]] | None = None
    if (
        settings.min_area_fraction_candidates
        or settings.try_flip_tta
        or settings.min_presence_candidates
    ):
        rules = select_output_rules(
            package,
            data_dir,
            run.split.validation,
            settings.min_confidence_candidates,
            settings.min_area_fraction_candidates,
            presence_candidates=settings.min_presence_candidates,
            try_flip=settings.try_flip_tta,
            device=device,
        )
        chosen_rules = {
            "min_confidence": rules.min_confidence,
            "min_area_fraction": rules.min_area_fraction,
            "min_presence": rules.min_presence,
            "flip_tta": rules.flip_tta or None,
        }
        output_rules = (chosen_rules, rules.scores)
        output = {**dict(model.get("output") or {})}
        output.update({k: v for k, v in chosen_rules.items() if v is not None})
        model["output"] = output
        write_model_yaml(out, model)
        package = load_package(out)
    elif settings.min_confidence_candidates:
        gate, table = select_min_confidence(
            package,
            data_dir,
            run.split.validation,
            settings.min_confidence_candidates,
            device=device,
        )
        output_rules = ({"min_confidence": gate}, table)
        if gate is not None:
            model["output"] = {**dict(model.get("output") or {}), "min_confidence": gate}
            write_model_yaml(out, model)
            package = load_package(out)
    presence_head = (model.get("network") or {}).get("presence_head")
    if presence_head and "min_presence" not in (model.get("output") or {}):
        drop_presence_head(out, model)  # whichever rules were measured, none chose its gate
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
        "structures": rounded(result_eval.summary),
    }
    if test_eval is not None:  # as 3D packages: structures are the test figures
        metrics.update(
            validation=metrics.pop("structures"),
            test_cases=len(run.split.test),
            structures=rounded(test_eval.summary),
        )
    model["metrics"] = metrics
    model["training"] = training_record(data_dir, run, device)
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
        sittings=len(run.sittings),
        pretrained=run.pretrained,
        output_rules=output_rules,
    )
    log.info("package written", model=package.name, best_epoch=run.best_epoch)
    return TrainResult(
        package=package,
        history=run.history,
        best_epoch=run.best_epoch,
        seconds=run.seconds,
        metrics=metrics,
    )
