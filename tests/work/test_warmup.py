"""Warm-up at start: each route's model runs once, and a model that cannot run stops the start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
import yaml
from pydicom import dcmread

from dicom_node.app.cli import main
from dicom_node.app.node import Node
from dicom_node.common.errors import ModelPackageError, StartupError
from dicom_node.config.settings import parse_settings
from dicom_node.imaging.series import load_series
from dicom_node.models.inference import Segmenter
from dicom_node.package.manifest import load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors
from dicom_node.testing.random_package import make_random_package
from dicom_node.work.warmup import build_outputs, synthetic_image, warm_up
from tests.conftest import REPO, free_port, node_settings


def settings_with(tmp_path: Path, models: dict[str, Path]) -> Any:
    return parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "device": "cpu",
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
            "routes": [
                {"name": name, "model": str(model), "send_to": ["pacs"]}
                for name, model in models.items()
            ],
        }
    )


def test_start_runs_each_routes_model_once(tmp_path: Path, random_package: Path) -> None:
    other = tmp_path / "other"
    make_random_package(other, name="random-other", structures=("heart",))
    # Two routes share random_package: it is warmed up once.
    settings = settings_with(tmp_path, {"a": random_package, "b": random_package, "c": other})
    node = Node(settings)
    calls: list[str] = []
    for model in (random_package, other):
        segmenter = node.worker.segmenter(model)
        network = segmenter.network
        network.register_forward_hook(
            lambda module, args, output, name=segmenter.package.name: calls.append(name)
        )
    with structlog.testing.capture_logs() as logs:
        node.start()
        node.stop()
    warmed = [e for e in logs if e["event"] == "model.warmed_up"]
    assert sorted(e["model"] for e in warmed) == ["random-chest", "random-other"]
    assert all(e["seconds"] > 0 and e["device"] == "cpu" for e in warmed)
    # Each model ran (zeros, then the synthetic radiograph), the shared one not twice as often.
    assert set(calls) == {"random-chest", "random-other"}
    assert calls.count("random-chest") == calls.count("random-other") >= 1
    started = next(i for i, e in enumerate(logs) if e["event"] == "node.started")
    assert all(logs.index(e) < started for e in warmed)  # before the node accepts studies


def test_a_model_that_cannot_run_its_input_size_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It loads (weights fit the network), but 30 x 30 does not halve three times."""
    broken = tmp_path / "broken"
    make_random_package(broken, input_size=(30, 30))
    settings = settings_with(tmp_path, {"chest": broken})
    node = Node(settings)
    with pytest.raises(StartupError, match=r"routes: chest: the model package .*broken fails"):
        node.start()
    node.stop()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(node_settings(tmp_path / "cli", broken, free_port(), log_level="info"))
    )
    assert main(["serve", "--config", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dicom-node: routes: chest: the model package"), last
    assert "RuntimeError" in last and "fix or replace the package" in last


def test_a_network_without_one_channel_per_structure_is_refused(tmp_path: Path) -> None:
    package = make_random_package(tmp_path / "m", structures=("heart", "right_lung"))
    segmenter = Segmenter(package, torch.device("cpu"))
    segmenter.package = make_random_package(tmp_path / "n", structures=("heart",))
    with pytest.raises(ModelPackageError, match="one|structures need"):
        segmenter.warm_up()


@pytest.mark.parametrize("name", ["cxr-anatomy", "la-lge", "busi-lesion"])
def test_the_shipped_models_warm_up_on_a_valid_seg_and_sr(tmp_path: Path, name: str) -> None:
    """The synthetic input and its outputs are valid DICOM (checked by dicom3tools)."""
    segmenter = Segmenter(load_package(REPO / "config" / "models" / name), torch.device("cpu"))
    assert warm_up(segmenter) > 0
    path = tmp_path / "input.dcm"
    synthetic_image(segmenter.package).save_as(path, enforce_file_format=True)
    seg, sr = build_outputs(load_series([path]), segmenter)
    assert (seg.Modality, sr.Modality) == ("SEG", "SR")
    for ds in (seg, sr):
        out = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(out, enforce_file_format=True)
        assert dcmread(out).SOPInstanceUID == ds.SOPInstanceUID
        assert dciodvfy_errors(out) == []
