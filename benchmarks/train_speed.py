"""Training speed on this machine: training images per second of one 2D training config.

``python -m benchmarks.train_speed --config config/train-busi-lite0.yaml --data
../shared/data/busi --steps 60 --rounds 2`` times training steps (forward, soft Dice + BCE,
backward, AdamW) of the config's network on augmented cached training images, for several
variants of the settings, interleaved (round-robin, ``--rounds`` times) so that the load other
processes put on the machine is spread over all of them. Each variant: the config's input
size or ``--sizes``, fp32 or bfloat16 autocast, contiguous or channels-last memory,
``--threads`` torch threads, ``--workers`` DataLoader worker processes. The first
``--warmup`` steps of each timing are not counted. Prints one line per variant and round and a
table of the medians (images/s) at the end.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dicom_node.package.manifest import load_package
from dicom_node.training.augment import AugmentConfig, build_augmentation
from dicom_node.training.config import load_train_config
from dicom_node.training.data import CachedCases
from dicom_node.training.loop import build_network_from, optimisation
from dicom_node.training.train import draw_split


def _time_variant(
    config_path: Path,
    data: Path,
    cases: list[str],
    *,
    size: int,
    bf16: bool,
    channels_last: bool,
    threads: int,
    workers: int,
    steps: int,
    warmup: int,
) -> float:
    config = load_train_config(config_path)
    model = dict(config.model)
    model["input"] = {**model["input"], "size": [size, size]}
    config = replace(config, model=model)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        network = build_network_from(config.model, Path(tmp))
        package = load_package(Path(tmp))
    assert isinstance(config.augment, AugmentConfig)
    augmentation = build_augmentation(config.augment, package.input_size, 0)
    dataset = CachedCases(data, cases, package, transform=augmentation)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.training.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=fmt)
    network.train()
    loss_fn, optimizer, _, scheduler = optimisation(
        network, config.training, len(loader), config.training.epochs
    )
    done, images, start = 0, 0, 0.0
    while done < steps + warmup:
        for batch in loader:
            if done == warmup:
                start, images = time.perf_counter(), 0
            x = batch["image"].contiguous(memory_format=fmt)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", enabled=bf16, dtype=torch.bfloat16):
                logits = network(x)
            loss = loss_fn(logits.float(), batch["label"])
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
            images += x.shape[0]
            if done >= steps + warmup:
                break
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Time the variants and print images/s (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config/train-busi-lite0.yaml"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/busi"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", type=int, default=64, help="training cases to cache")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--bf16", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--channels-last", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    config = load_train_config(args.config)
    sizes = args.sizes or [int(config.model["input"]["size"][0])]
    split = draw_split(args.data, ["lesion"], config.training)
    cases = list(split.train[: args.cases])
    variants = list(
        itertools.product(sizes, args.bf16, args.channels_last, args.threads, args.workers)
    )
    results: dict[tuple[int, ...], list[float]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for v in variants:
            size, bf16, cl, threads, workers = v
            rate = _time_variant(
                args.config,
                args.data,
                cases,
                size=size,
                bf16=bool(bf16),
                channels_last=bool(cl),
                threads=threads,
                workers=workers,
                steps=args.steps,
                warmup=args.warmup,
            )
            results[v].append(rate)
            print(
                f"round {round_ + 1}: size {size} bf16 {bf16} channels_last {cl} "
                f"threads {threads} workers {workers}: {rate:.2f} images/s",
                flush=True,
            )
    print("\n| size | bf16 | channels_last | threads | workers | images/s (median) |")
    print("|---|---|---|---|---|---|")
    for v, rates in results.items():
        print("| " + " | ".join(str(x) for x in v) + f" | {statistics.median(rates):.2f} |")


if __name__ == "__main__":
    main()
