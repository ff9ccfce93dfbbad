"""``dicom-node model check PATH``: format, inputs, labels, spacing, device, one run on a
synthetic input, and what a route still needs; a broken model is one line and exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from dicom_node.app.cli import main
from dicom_node.models import formats
from dicom_node.models.networks import load_network
from dicom_node.testing.random_package import make_random_package
from tests.models.fake_runner import ThresholdRunner, make_nnunet_folder

MAPPING = """
modalities: [CT]
structures:
  spleen: {category: SCT.AnatomicalStructure, type: SCT.Spleen}
"""


@pytest.fixture(autouse=True)
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(formats.RUNNERS, formats.NNUNET, "tests.models.fake_runner:ThresholdRunner")
    ThresholdRunner.seen.clear()
    yield


def test_a_ready_foreign_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset001_Spleen", MAPPING)
    assert main(["model", "check", str(model), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "format: nnunet\n" in out
    assert "inputs: CT (the model's channels)\n" in out
    assert "labels: 1 spleen\n" in out
    assert "device: cpu\n" in out
    assert "ran once on zeros [1, 16, 64, 64]: ok" in out
    assert "structures: spleen (SCT 78961009 Spleen)" in out
    assert f"a route needs nothing more: model: {model}\n" in out
    assert ThresholdRunner.seen[0]["shape"] == (1, 16, 64, 64)


def test_a_foreign_model_without_its_mapping_lists_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset002", None)
    (tmp_path / "Dataset002.dicom-node.yaml").write_text("options: {channels: [T1, FLAIR]}\n")
    assert main(["model", "check", str(model), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "inputs: T1, FLAIR (the model's channels)" in out
    assert "ran once on zeros [2, 16, 64, 64]: ok" in out
    needs = out.split("a route still needs", 1)[1].splitlines()[1:]
    assert len(needs) == 2
    assert "inputs: missing; the model has 2 channels (T1, FLAIR)" in needs[0]
    assert "structures.spleen: missing (label 1 of the model)" in needs[1]


def test_a_broken_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset003", MAPPING)
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    assert main(["model", "check", str(model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"dicom-node: {model}: an nnU-Net v2 model without fold_*/checkpoint_final.pth; train "
        "at least one fold to the end, or name the fold's checkpoint in options\n"
    )


def test_an_onnx_file_with_its_descriptor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = make_random_package(tmp_path / "pkg", structures=("heart",), input_size=(64, 64))
    network = load_network(package, torch.device("cpu"))
    onnx = tmp_path / "heart.onnx"
    torch.onnx.export(network, (torch.zeros(1, 1, 64, 64),), str(onnx), dynamo=False)
    doc = yaml.safe_load((tmp_path / "pkg" / "model.yaml").read_text())
    (tmp_path / "heart.yaml").write_text(yaml.safe_dump({**doc, "network": {}}))
    assert main(["model", "check", str(onnx), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "format: onnx\n" in out
    assert f"described by: {tmp_path / 'heart.yaml'}\n" in out
    assert "labels: heart (SCT 80891009 Heart)" in out
    assert "ran once on zeros [1, 64, 64]: ok" in out
    (tmp_path / "heart.yaml").unlink()
    assert main(["model", "check", str(onnx), "--device", "cpu"]) == 2
    assert "an ONNX file without its descriptor; write heart.yaml" in capsys.readouterr().err


def test_process_runs_a_foreign_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``process --model`` loads any format through the same loader as the node."""
    from pydicom import dcmread

    from tests.factories import ct_series, write_files

    model = make_nnunet_folder(tmp_path / "Dataset004_Spleen", MAPPING)
    write_files(ct_series(n_slices=3), tmp_path / "in")
    assert (
        main(["process", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model)]) == 0
    )
    made = sorted(dcmread(p).Modality for p in (tmp_path / "out").iterdir())
    assert made == ["SEG", "SR"]
    assert ThresholdRunner.seen[-1]["shape"] == (1, 3, 64, 64)
