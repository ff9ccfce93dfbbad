"""A tiny :class:`~dicom_node.models.runner.VolumeRunner` for tests: a threshold on the mean of
its channels, standing in for a format's runner (``RUNNERS`` is patched to name it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dicom_node.models.runner import VolumeGeometry


class ThresholdRunner:
    """Label 1 (``spleen``) where the mean of the channels exceeds ``threshold``.

    Options (the mapping's ``options``): ``threshold``, ``channels`` (names), ``fail`` (raise
    at load, as a broken model would). Every instance and call is recorded in :attr:`seen`.
    """

    format = "threshold"
    version = "0.9"
    seen: ClassVar[list[dict[str, Any]]] = []

    def __init__(
        self,
        path: Path,
        device: torch.device,
        *,
        threshold: float = -500.0,
        channels: tuple[str, ...] | list[str] = ("CT",),
        fail: bool = False,
    ) -> None:
        if fail:
            raise KeyError("network_def")
        self.path = path
        self.device = device
        self.threshold = float(threshold)
        self.channel_names = tuple(channels)
        self.labels = {1: "spleen"}

    def predict(self, channels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
        ThresholdRunner.seen.append(
            {"shape": channels.shape, "geometry": geometry, "channels": channels.copy()}
        )
        return (channels.mean(axis=0) > self.threshold).astype(np.uint8)


def make_nnunet_folder(folder: Path, mapping: str | None) -> Path:
    """A folder that :func:`~dicom_node.models.formats.detect_format` takes for an nnU-Net v2
    model (its files are empty: the fake runner reads none), with ``mapping`` as its
    ``dicom-node.yaml``."""
    (folder / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
        (folder / name).write_text("{}")
    if mapping is not None:
        (folder / "dicom-node.yaml").write_text(mapping)
    return folder
