"""The ``train`` and ``evaluate`` sub-commands of ``dicom-node``.

::

    dicom-node train --data DIR --config TRAIN.yaml --out PACKAGE_DIR [--init PACKAGE]
                     [--epochs N] [--max-minutes M] [--no-progress]
                     [--resume] [--checkpoint-minutes M] [--stop-after-minutes M]
                     [--stop-after-epochs N]
    dicom-node evaluate --model PACKAGE --data DIR [--out DIR] [--json] [--all-cases]
                        [--spacing-mm MM] [--no-progress]
    dicom-node crops --data DIR --model PACKAGE --structures S [S ...] [--mirror S ...]
                     [--margin F] --name NAME --out DIR

Both print progress lines on stderr (counts, elapsed time, time left) unless
``--no-progress``; results go to stdout.

The main parser calls :func:`add_train_parser`, :func:`add_evaluate_parser` and
:func:`add_crops_parser` with its sub-parsers; each sets ``func`` to a handler that returns
the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicom_node.common.log import configure_logging


def cmd_train(args: argparse.Namespace) -> int:
    """Run :func:`dicom_node.training.train.train` from parsed arguments."""
    from dicom_node.training.train import train

    configure_logging("console", args.log_level)
    result = train(
        args.data,
        args.config,
        args.out,
        init=args.init,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        resume=args.resume,
        checkpoint_minutes=args.checkpoint_minutes,
        stop_after_epochs=args.stop_after_epochs,
        stop_after_minutes=args.stop_after_minutes,
    )
    if not result.finished:
        done = result.history[-1]["epoch"] if result.history else 0
        print(
            f"training stopped after epoch {done} ({result.seconds / 3600:.2f} h so far); "
            f"continue with the same command and --resume (checkpoint in {args.out})"
        )
        return 0
    from dicom_node.training.metrics import format_table

    if "test_cases" in result.metrics:
        print(f"validation ({result.metrics['validation_cases']} cases, chose the epoch):")
        print(format_table(result.metrics["validation"]))
        print(f"test ({result.metrics['test_cases']} cases, chose nothing):")
    print(format_table(result.metrics["structures"]))
    print(f"package written to {result.package.path} (best epoch {result.best_epoch})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run :func:`dicom_node.training.evaluate.evaluate` from parsed arguments."""
    from dicom_node.training.evaluate import evaluate

    configure_logging("console", args.log_level)
    result = evaluate(
        args.model,
        args.data,
        args.out,
        all_cases=args.all_cases,
        spacing_mm=args.spacing_mm,
        progress=not args.no_progress,
        split=args.split,
    )
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=1)
        print()
    else:
        print(result.table)
        for rank, path in result.overlays.items():
            print(f"{rank} case overlay: {path}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level", default="warning", help="log level of the console log (default warning)"
    )


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to the ``dicom-node`` sub-parsers and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train a U-Net on PNG images or NIfTI volumes with masks, write a model package",
        description="Train a 2D multi-label U-Net from images/<case>.png and "
        "masks/<structure>/<case>.png, or a 3D one (model.dims: 3) from "
        "<case>/image.nii.gz and <case>/label.nii.gz, and write a complete model package "
        "(model.yaml, fp16 weights, MODEL_CARD.md, curves, split, figures).",
    )
    p.add_argument(
        "--data", type=Path, required=True, help="folder with images/ and masks/, or <case>/"
    )
    p.add_argument("--config", type=Path, required=True, help="training config YAML")
    p.add_argument("--out", type=Path, required=True, help="model package folder to write")
    p.add_argument("--init", type=Path, help="model package to start from (transfer learning)")
    p.add_argument("--epochs", type=int, help="override training.epochs")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="wall-clock budget of the training loop; the schedule shrinks to fit it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (same config, data and --epochs; --init "
        "is read from the checkpoint); the result is that of an uninterrupted run",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="write a checkpoint at the end of an epoch every M minutes "
        "(default training.checkpoint_minutes, 10)",
    )
    p.add_argument(
        "--stop-after-minutes",
        type=float,
        help="end this sitting, with a checkpoint, before an epoch that would end after M "
        "minutes; go on later with --resume",
    )
    p.add_argument(
        "--stop-after-epochs",
        type=int,
        help="end this sitting, with a checkpoint, after N epochs; go on later with --resume",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    _common(p)
    p.set_defaults(func=cmd_train, log_level="info")
    return p


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``dicom-node`` sub-parsers and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "evaluate",
        help="per-structure Dice, Jaccard, precision, recall, HD95 of a model package",
        description="Evaluate a model package on a PNG folder: by default on the validation "
        "cases of the package's split.json. Writes metrics.json, metrics.txt and overlays of "
        "the best, median and worst case when --out is given.",
    )
    p.add_argument("--model", type=Path, required=True, help="model package folder")
    p.add_argument("--data", type=Path, required=True, help="folder with images/ and masks/")
    p.add_argument("--out", type=Path, help="folder for metrics.json, metrics.txt and overlays")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--all-cases",
        action="store_true",
        help="every case of --data, not only the package's validation cases",
    )
    p.add_argument("--spacing-mm", type=float, help="pixel spacing of the images, for HD95")
    p.add_argument(
        "--split",
        choices=("validation", "test"),
        default="validation",
        help="the part of split.json to evaluate (test: the held-out cases that chose nothing)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    _common(p)
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_crops(args: argparse.Namespace) -> int:
    """Run :func:`dicom_node.training.crops.write_crops` from parsed arguments."""
    from dicom_node.training.crops import write_crops

    configure_logging("console", args.log_level)
    crops = write_crops(
        args.data, args.model, args.structures, args.mirror, args.margin, args.name, args.out
    )
    print(
        f"{len(crops.train)} training and {len(crops.validation)} validation crops in "
        f"{crops.out} (split.json as {args.model}'s; its test cases left out)"
    )
    return 0


def add_crops_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``crops`` to the ``dicom-node`` sub-parsers and return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "crops",
        help="cut the training crops of a crop stage (refine:) from a package's split",
        description="Write square crops around the expert masks of some structures, with "
        "their masks and a split.json, for the training and validation cases of a model "
        "package (its test cases are left out), as the node cuts them around the package's "
        "own masks; train a crop stage's network on the folder with dicom-node train.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/ and masks/")
    p.add_argument("--model", type=Path, required=True, help="the package whose split is used")
    p.add_argument("--structures", nargs="+", required=True, help="structures to crop around")
    p.add_argument(
        "--mirror", nargs="*", default=[], help="structures whose crops are mirrored left-right"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.15,
        help="the square's side is the mask box's longer side times 1 + 2 * margin",
    )
    p.add_argument("--name", required=True, help="the crop network's structure label")
    p.add_argument("--out", type=Path, required=True, help="new folder to write")
    _common(p)
    p.set_defaults(func=cmd_crops, log_level="info")
    return p
