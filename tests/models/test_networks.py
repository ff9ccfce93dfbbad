"""Network construction and weight loading."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dicom_node.common.errors import ModelPackageError
from dicom_node.models.networks import build_network, load_network
from dicom_node.testing.random_package import make_random_package

CPU = torch.device("cpu")


def test_fp16_weights_load_as_fp32_and_same_seed_same_weights(tmp_path: Path) -> None:
    full = make_random_package(tmp_path / "full", seed=7)
    half = make_random_package(tmp_path / "half", seed=7, fp16=True)
    stored = torch.load(half.weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    net_full, net_half = load_network(full, CPU), load_network(half, CPU)
    assert not net_half.training
    for (name, a), (_, b) in zip(
        net_full.state_dict().items(), net_half.state_dict().items(), strict=True
    ):
        if a.is_floating_point():
            assert b.dtype == torch.float32, name
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert net_full(x).shape == (2, 5, 64, 64)


def test_different_seed_gives_different_weights(tmp_path: Path) -> None:
    a = load_network(make_random_package(tmp_path / "a", seed=0), CPU).state_dict()
    b = load_network(make_random_package(tmp_path / "b", seed=1), CPU).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_weights_that_do_not_fit_are_package_error(tmp_path: Path) -> None:
    package = make_random_package(tmp_path)
    wider = replace(package, network={**package.network, "channels": [8, 16, 64]})
    with pytest.raises(ModelPackageError, match="do not fit"):
        load_network(wider, CPU)
    fewer = replace(package, structures=package.structures[:2])
    with pytest.raises(ModelPackageError, match="do not fit"):
        load_network(fewer, CPU)


def test_unreadable_weights_and_bad_network_are_package_errors(tmp_path: Path) -> None:
    package = make_random_package(tmp_path)
    package.weights.write_bytes(b"not a torch file")
    with pytest.raises(ModelPackageError, match="cannot be read"):
        load_network(package, CPU)
    torch.save([torch.zeros(1)], package.weights)
    with pytest.raises(ModelPackageError, match="state_dict"):
        load_network(package, CPU)
    with pytest.raises(ModelPackageError, match="in_channels must not be set"):
        build_network(replace(package, network={**package.network, "in_channels": 3}))
    with pytest.raises(ModelPackageError, match="not valid arguments"):
        build_network(replace(package, network={**package.network, "depth": 3}))
