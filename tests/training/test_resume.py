"""Training that resumes: a run stopped after some epochs and continued with ``--resume`` ends
bit for bit as the uninterrupted run (2D and 3D); checkpoints are atomic, due every
``checkpoint_minutes``, small, and refused when they belong to another run."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dicom_node.app.cli import main
from dicom_node.common.errors import ConfigError
from dicom_node.models.networks import build_network
from dicom_node.package.manifest import load_package
from dicom_node.training import checkpoint as checkpoint_module
from dicom_node.training import loop as loop_module
from dicom_node.training.checkpoint import (
    CHECKPOINT_FILE,
    half_state,
    read_checkpoint,
    save_checkpoint,
)
from dicom_node.training.config import load_train_config, parse_train_config
from dicom_node.training.data import read_split
from dicom_node.training.train import train
from tests.training.test_train import needs_jsrt, tiny_config, tiny_data  # noqa: F401
from tests.training.test_volumes import tiny_config as tiny_3d_config
from tests.training.test_volumes import volumes  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


class CheckpointSpy:
    """Records the epoch of every checkpoint written and keeps a copy of each file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, keep: Path) -> None:
        self.keep = keep
        self.epochs: list[int] = []
        real = loop_module.save_checkpoint

        def spy(path: Path, state: dict[str, Any]) -> Path:
            written = real(path, state)
            self.epochs.append(state["epoch"])
            shutil.copy(written, keep / f"epoch{state['epoch']}.pt")
            return written

        monkeypatch.setattr(loop_module, "save_checkpoint", spy)

    def last(self) -> dict[str, Any]:
        return read_checkpoint(self.keep / f"epoch{self.epochs[-1]}.pt")

    def reset(self) -> None:
        self.epochs.clear()


def _same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Assert two nested structures of tensors, numbers and strings are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _without_seconds(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _compare_runs(whole: dict[str, Any], resumed: dict[str, Any], a: Path, b: Path) -> None:
    """The final checkpoints and the packages of two runs are the same, bit for bit."""
    for part in ("network", "optimizer", "scheduler", "best_state"):
        _same_tensors(whole[part], resumed[part], part)
    for part in ("epoch", "planned", "best_epoch", "best_score", "fingerprint"):
        assert whole[part] == resumed[part], part
    for rng in ("python", "numpy", "torch", "loader", "sources"):
        _same_tensors(whole["rng"][rng], resumed["rng"][rng], rng)
    assert whole["rng"]["sources"], "the augmentation's random states are in the checkpoint"
    assert _without_seconds(whole["history"]) == _without_seconds(resumed["history"])
    _same_tensors(
        torch.load(a / "model.pt", weights_only=True),
        torch.load(b / "model.pt", weights_only=True),
        "model.pt",
    )
    pa, pb = load_package(a), load_package(b)
    assert pa.metrics == pb.metrics
    assert not (a / CHECKPOINT_FILE).exists() and not (b / CHECKPOINT_FILE).exists()


@needs_jsrt
def test_2d_training_resumed_twice_ends_as_the_uninterrupted_run(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = parse_train_config(tiny_config(3))
    (tmp_path / "keep-a").mkdir()
    (tmp_path / "keep-b").mkdir()
    a, b = tmp_path / "a", tmp_path / "b"
    opts: dict[str, Any] = {"progress": False, "overlays": False}

    spy = CheckpointSpy(monkeypatch, tmp_path / "keep-a")
    whole = train(tiny_data, config, a, checkpoint_minutes=1e-6, **opts)
    assert whole.finished and spy.epochs == [1, 2, 3]  # due after every epoch
    whole_last = spy.last()

    spy = CheckpointSpy(monkeypatch, tmp_path / "keep-b")
    first = train(tiny_data, config, b, stop_after_epochs=1, **opts)
    assert not first.finished and len(first.history) == 1
    assert (b / CHECKPOINT_FILE).is_file() and spy.epochs == [1]  # at the stop, not before
    assert not (b / "MODEL_CARD.md").exists()
    second = train(
        tiny_data, config, b, resume=True, stop_after_epochs=1, progress=True, **{"overlays": False}
    )
    assert not second.finished and [h["epoch"] for h in second.history] == [1, 2]
    err = capsys.readouterr().err
    assert "train: 2/3 epochs, " in err and "this sitting stopped after epoch 2 of 3" in err
    third = train(tiny_data, config, b, resume=True, **opts)
    assert third.finished and spy.epochs == [1, 2, 3]
    _compare_runs(whole_last, spy.last(), a, b)
    assert [h["val_dice"] for h in third.history] == [h["val_dice"] for h in whole.history]
    assert third.best_epoch == whole.best_epoch

    # the time of the three sittings is summed in model.yaml and the card
    training = yaml.safe_load((b / "model.yaml").read_text())["training"]
    assert training["sittings"] == 3
    assert yaml.safe_load((a / "model.yaml").read_text())["training"]["sittings"] == 1
    assert training["seconds"] >= round(sum(spy.last()["sittings"]), 1) - 0.1
    assert sum(spy.last()["sittings"]) >= first.seconds
    assert " over 3 sittings" in (b / "MODEL_CARD.md").read_text()
    assert " sittings" not in (a / "MODEL_CARD.md").read_text()


def test_3d_training_resumed_ends_as_the_uninterrupted_run(
    volumes: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = tiny_3d_config()
    doc["training"].update(epochs=3, validate_every=2)  # epoch 1 is not validated
    config = parse_train_config(doc)
    (tmp_path / "keep-a").mkdir()
    (tmp_path / "keep-b").mkdir()
    a, b = tmp_path / "a", tmp_path / "b"
    spy = CheckpointSpy(monkeypatch, tmp_path / "keep-a")
    whole = train(volumes, config, a, progress=False)
    assert spy.epochs == [3]  # only at the end: the default interval is 10 min
    whole_last = spy.last()
    spy = CheckpointSpy(monkeypatch, tmp_path / "keep-b")
    assert not train(volumes, config, b, progress=False, stop_after_epochs=1).finished
    resumed = train(volumes, config, b, progress=False, resume=True)
    assert spy.epochs == [1, 3]
    _compare_runs(whole_last, spy.last(), a, b)
    assert resumed.best_epoch == whole.best_epoch
    assert "over 2 sittings" in (b / "MODEL_CARD.md").read_text()


@needs_jsrt
def test_resume_refuses_a_missing_or_foreign_checkpoint_in_one_line(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config_a, config_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    doc = tiny_config(2)
    config_a.write_text(yaml.safe_dump(doc))
    doc["training"]["seed"] = 5
    config_b.write_text(yaml.safe_dump(doc))
    out = tmp_path / "pkg"
    base = ["train", "--data", str(tiny_data), "--out", str(out), "--no-progress"]
    base += ["--log-level", "warning"]

    assert main([*base, "--config", str(config_a), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint to resume from" in err
    assert not out.exists()  # refused before anything is written

    assert main([*base, "--config", str(config_a), "--stop-after-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "training stopped after epoch 1" in printed and "--resume" in printed
    before = (out / CHECKPOINT_FILE).read_bytes()

    assert main([*base, "--config", str(config_b), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another training config" in err
    assert main([*base, "--config", str(config_a), "--resume", "--epochs", "3"]) == 2
    assert "--epochs" in capsys.readouterr().err
    # a fresh run does not overwrite the checkpoint of an unfinished one
    assert main([*base, "--config", str(config_a)]) == 2
    assert "continue it with --resume" in capsys.readouterr().err
    assert (out / CHECKPOINT_FILE).read_bytes() == before

    (out / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    assert main([*base, "--config", str(config_a), "--resume"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_a_checkpoint_is_replaced_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, {"fingerprint": "x", "epoch": 1})
    good = path.read_bytes()

    def torn_write(obj: object, f: Any) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"fingerprint": "x", "epoch": 2})
    assert path.read_bytes() == good  # the previous checkpoint is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temporary left
    assert read_checkpoint(path)["epoch"] == 1


@pytest.mark.parametrize("name", ["cxr-anatomy", "busi-lesion", "la-lge"])
def test_checkpoints_of_the_bundled_models_stay_under_50_mb(name: str, tmp_path: Path) -> None:
    package = load_package(REPO / "config" / "models" / name)
    network = build_network(package)
    optimizer = torch.optim.AdamW(network.parameters())
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's two moments per weight exist from the first step
    path = save_checkpoint(
        tmp_path / CHECKPOINT_FILE,
        {
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_state": half_state(network.state_dict()),
        },
    )
    assert path.stat().st_size < 50e6, f"{name}: {path.stat().st_size / 1e6:.1f} MB"


def test_check_checkpoint_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        loop_module.check_checkpoint(tmp_path, resume=True)
    assert loop_module.check_checkpoint(tmp_path, resume=False) is None


@needs_jsrt
def test_resume_after_a_crash_while_finishing_only_finishes(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dicom_node.training.train as train_module

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed while choosing postprocessing")

    config = parse_train_config(tiny_config(1))
    out = tmp_path / "pkg"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "finish_package", crash)
        with pytest.raises(RuntimeError):
            train(tiny_data, config, out, progress=False, overlays=False)
    assert read_checkpoint(out / CHECKPOINT_FILE)["epoch"] == 1
    result = train(tiny_data, config, out, progress=False, overlays=False, resume=True)
    assert result.finished and [h["epoch"] for h in result.history] == [1]  # no epoch 2
    assert (out / "MODEL_CARD.md").is_file() and not (out / CHECKPOINT_FILE).exists()


#: ``fingerprint`` of the la-lge stage-2 checkpoint as committed at epoch 188 (31e2e10).
LA_STAGE2_FINGERPRINT = "9884d5457817bad2b38f5e40273e6dee2f2258cc37b980cb6a9ab54c377c0d92"


def test_settings_added_later_keep_an_older_checkpoint_resumable() -> None:
    """The la-lge stage-2 checkpoint was written before the 2D settings of ``LATER_SETTINGS``
    existed, and resumed after them (sittings 2 and 3, 2026-12-06): at their defaults they
    leave the fingerprint that checkpoint holds (pinned here from it, git 31e2e10, since the
    finished run deleted it); set to anything else, the fingerprint changes (another run)."""
    train_config = load_train_config(REPO / "config" / "train-la-lge-stage2.yaml")
    split = read_split(REPO / "config" / "models" / "la-lge")
    epochs = train_config.training.epochs
    expected = checkpoint_module.fingerprint(train_config, split, epochs, "la-lge 1.0.0")
    assert expected == LA_STAGE2_FINGERPRINT

    for name, value in (("channels_last", True), ("epoch_images", 8), ("try_flip_tta", True)):
        changed = dataclasses.replace(
            train_config, training=dataclasses.replace(train_config.training, **{name: value})
        )
        assert checkpoint_module.fingerprint(changed, split, epochs, "la-lge 1.0.0") != expected
