"""The network of a model package: a U-Net built from ``model.yaml`` and its weights, or a
TorchScript or ONNX file (``network: {kind: torchscript | onnx, file: ...}``).

``network`` in ``model.yaml`` holds the keyword arguments of :class:`monai.networks.nets.UNet`
other than ``spatial_dims``, ``in_channels`` and ``out_channels``, which follow from ``dims``,
``input.color`` (1 channel for gray, 3 for rgb) and the structures (see
:attr:`ModelPackage.in_channels` and :attr:`ModelPackage.out_channels`). With
``kind: efficientnet-lite0-unet`` (2D only) it is a U-Net over an EfficientNet-Lite0 encoder
(:mod:`dicom_node.models.efficientnet_lite`), whose other keys (``decoder_channels``) are its
arguments, and ``presence_head: true`` adds its image-level head, whose gate
``output.min_presence`` sets; the package's weights hold the whole network, pretrained encoder
included.
"""

from __future__ import annotations

import pickle
from typing import Any

import structlog
import torch
from monai.networks.nets import UNet

from dicom_node.common.errors import ModelPackageError
from dicom_node.models import efficientnet_lite
from dicom_node.package.manifest import ModelPackage, NetworkKind

log = structlog.get_logger(__name__)

#: Keyword arguments of UNet that the package format sets itself.
RESERVED_KEYS = ("spatial_dims", "in_channels", "out_channels")


def build_network(package: ModelPackage) -> torch.nn.Module:
    """Return a randomly initialised U-Net with the architecture ``package`` describes.

    Raises
    ------
    ModelPackageError
        When ``network`` sets a reserved key, an unknown ``kind`` or arguments that the
        network does not accept.
    """
    if package.network_kind in (NetworkKind.TORCHSCRIPT, NetworkKind.ONNX):
        raise ModelPackageError(
            f"{package.path}: network.kind is {package.network_kind.value}; only a unet or "
            f"{efficientnet_lite.KIND} package can be built, trained or fine-tuned here (use "
            "the package it came from)"
        )
    reserved = [key for key in RESERVED_KEYS if key in package.network]
    if reserved:
        raise ModelPackageError(
            f"{package.path}: network: {', '.join(reserved)} must not be set; they follow "
            "from dims, input.color and the structures"
        )
    arguments = dict(package.network)
    kind = arguments.pop("kind", "unet")
    if kind == efficientnet_lite.KIND:
        if package.dims != 2:
            raise ModelPackageError(f"{package.path}: network: {kind} is a 2D network (dims: 2)")
        if any(side % 32 for side in package.input_size):
            raise ModelPackageError(
                f"{package.path}: input.size: {kind} needs sides that are multiples of 32, "
                f"got {list(package.input_size)}"
            )
        try:
            return efficientnet_lite.build(package.in_channels, package.out_channels, **arguments)
        except (TypeError, ValueError) as exc:
            raise ModelPackageError(
                f"{package.path}: network: not valid arguments of {kind}: {exc}"
            ) from exc
    if kind != "unet":
        raise ModelPackageError(
            f"{package.path}: network: kind {kind!r} is not known; use unet (MONAI UNet, the "
            f"default) or {efficientnet_lite.KIND}"
        )
    try:
        return UNet(
            spatial_dims=package.dims,
            in_channels=package.in_channels,
            out_channels=package.out_channels,
            **arguments,
        )
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelPackageError(
            f"{package.path}: network: not valid arguments of monai.networks.nets.UNet: {exc}"
        ) from exc


def _state_dict(raw: Any, package: ModelPackage) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelPackageError(
            f"{package.weights}: expected a state_dict (a mapping of names to tensors) saved "
            "with torch.save"
        )
    # fp16 (or bf16) weights are kept small on disk; the network computes in fp32.
    return {str(k): v.float() if v.is_floating_point() else v for k, v in raw.items()}


def load_network(package: ModelPackage, device: torch.device) -> torch.nn.Module:
    """The network of ``package`` on ``device``, in eval mode: its U-Net with its weights
    (:func:`load_unet`), or its TorchScript module or ONNX graph
    (:mod:`dicom_node.models.exported`).

    Raises
    ------
    ModelPackageError
        When the weights (or the file) cannot be read or do not fit the architecture.
    """
    if package.network_kind in (NetworkKind.UNET, NetworkKind.EFFICIENTNET_LITE0_UNET):
        return load_unet(package, device)
    from dicom_node.models.exported import load_onnx, load_torchscript

    if package.network_kind is NetworkKind.TORCHSCRIPT:
        return load_torchscript(package, device)
    return load_onnx(package, device)


def load_unet(package: ModelPackage, device: torch.device) -> torch.nn.Module:
    """Build the network of ``package``, load its weights and move it to ``device``.

    The weights file (``weights`` in ``model.yaml``) is a ``state_dict`` saved with
    :func:`torch.save`; it is read with ``weights_only=True`` so that it cannot run code.
    Floating-point tensors stored in fp16 are cast to fp32. The network is returned in eval
    mode.

    Raises
    ------
    ModelPackageError
        When the weights cannot be read or do not fit the architecture.
    """
    network = build_network(package)
    try:
        raw = torch.load(package.weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ModelPackageError(
            f"{package.weights}: cannot be read as torch weights ({exc})"
        ) from exc
    state = _state_dict(raw, package)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelPackageError(
            f"{package.weights}: the weights do not fit the network in model.yaml "
            f"(dims, network, structures): {exc}"
        ) from exc
    if package.min_presence is not None:
        if not isinstance(network, efficientnet_lite.EfficientNetLite0UNet):
            raise ModelPackageError(
                f"{package.path}: output.min_presence needs network.kind "
                f"{efficientnet_lite.KIND} with presence_head: true"
            )
        try:
            network.set_presence_gate(package.min_presence, package.threshold)
        except ValueError as exc:
            raise ModelPackageError(f"{package.path}: output.min_presence: {exc}") from exc
    network.to(device)
    network.eval()
    log.info(
        "model loaded",
        model=package.name,
        version=package.version,
        device=str(device),
        parameters=sum(p.numel() for p in network.parameters()),
    )
    return network
