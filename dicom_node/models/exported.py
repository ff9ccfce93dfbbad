"""Networks a site exported elsewhere: a TorchScript module or an ONNX graph.

Both stand where the package's U-Net stands (``network: {kind: torchscript | onnx, file:
...}`` in ``model.yaml``), so preprocessing, batching, the sliding window, ``gpu_slots``, the
out-of-memory fallback and postprocessing stay those of
:class:`~dicom_node.models.inference.Segmenter`. Either takes ``(B, C, *input.size)`` float32
and gives logits ``(B, out_channels, *input.size)``, as the package's U-Net would.

An ONNX graph runs in :mod:`onnxruntime`, wrapped in :class:`OnnxNetwork`, a
:class:`torch.nn.Module` whose forward hands the batch to the session: on the CPU execution
provider, or CUDA's when the device is CUDA and onnxruntime has it. A graph exported with a
fixed batch of 1 gets its batch one item at a time; onnxruntime's "failed to allocate" on
CUDA becomes :class:`torch.cuda.OutOfMemoryError`, so the segmenter halves the batch and
falls back to the CPU as it does for torch.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import structlog
import torch

from dicom_node.common.errors import ModelPackageError
from dicom_node.package.manifest import ModelPackage

log = structlog.get_logger(__name__)


def is_torchscript(path: object) -> bool:
    """True when ``path`` is a TorchScript archive (``torch.jit.save``): a zip with ``code/``,
    unlike a ``torch.save`` state_dict (a zip with ``data.pkl`` only)."""
    try:
        with zipfile.ZipFile(str(path)) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_torchscript(package: ModelPackage, device: torch.device) -> torch.nn.Module:
    """The TorchScript module ``package.weights`` on ``device``, in eval mode.

    Raises
    ------
    ModelPackageError
        When the file is not a TorchScript archive (e.g. a state_dict: name it ``weights``
        with the default ``network.kind``).
    """
    if not is_torchscript(package.weights):
        raise ModelPackageError(
            f"{package.weights}: not a TorchScript file (torch.jit.save); a state_dict belongs "
            "to network kind unet (the key weights)"
        )
    try:
        module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(package.weights), map_location=device
        )
    except (RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise ModelPackageError(
            f"{package.weights}: cannot be loaded as TorchScript ({str(exc).splitlines()[0]})"
        ) from exc
    module.eval()
    log.info("model loaded", model=package.name, version=package.version, kind="torchscript")
    return module


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime's execution providers for ``device``: CUDA's first when asked for and
    available, always the CPU's."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxNetwork(torch.nn.Module):
    """An onnxruntime session that looks like a network to the segmenter.

    Parameters
    ----------
    package
        Its ``weights`` is the ``.onnx`` file (``network.file``).
    device
        CUDA: the CUDA execution provider when onnxruntime has it, else the CPU.
    """

    def __init__(self, package: ModelPackage, device: torch.device) -> None:
        super().__init__()
        import onnxruntime

        self.path = package.weights
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings of graph optimisation are not the site's
        try:
            self.session = onnxruntime.InferenceSession(
                str(package.weights), sess_options=options, providers=onnx_providers(device)
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph
            raise ModelPackageError(
                f"{package.weights}: cannot be loaded by onnxruntime "
                f"({str(exc).strip().splitlines()[0][:200]})"
            ) from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelPackageError(
                f"{package.weights}: the graph has {len(inputs)} inputs; the node feeds one "
                "tensor (batch, channels, *input.size)"
            )
        self.input_name = inputs[0].name
        self.one_at_a_time = inputs[0].shape[0] == 1  # exported with a fixed batch of 1

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the batch ``x``, on ``x``'s device."""
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        try:
            if self.one_at_a_time and batch.shape[0] > 1:
                out = np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
            else:
                out = self._run(batch)
        except Exception as exc:
            if "allocate" in str(exc).lower() and "CUDAExecutionProvider" in (
                self.session.get_providers()
            ):
                raise torch.cuda.OutOfMemoryError(str(exc)) from exc
            raise
        return torch.from_numpy(out).to(x.device)


def load_onnx(package: ModelPackage, device: torch.device) -> torch.nn.Module:
    """The ONNX graph ``package.weights`` as an :class:`OnnxNetwork` for ``device``."""
    network = OnnxNetwork(package, device)
    log.info(
        "model loaded",
        model=package.name,
        version=package.version,
        kind="onnx",
        providers=network.session.get_providers(),
    )
    return network
