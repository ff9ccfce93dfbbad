"""TorchScript and ONNX on the node's own package path: the shipped cxr-anatomy exported to
each gives the same SEG as the package itself on a real JSRT radiograph, whether the route
names a package folder (``network: {kind, file}``) or the exported file with its descriptor
beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.common.errors import ModelPackageError
from dicom_node.common.output_kinds import OutputKind
from dicom_node.models.exported import OnnxNetwork
from dicom_node.models.formats import detect_format, load_model
from dicom_node.models.inference import Segmenter
from dicom_node.testing.exported import export_package
from dicom_node.work.segment import segment_series
from tests.factories import jsrt_dx

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "config" / "models" / "cxr-anatomy"
CASE = "JPCLN001"
MIN_DICE = 0.999


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_package(PACKAGE, tmp_path_factory.mktemp("exported"))


def seg_masks(model: Path, image: Path) -> np.ndarray:
    segmenter = load_model(model, torch.device("cpu"))
    (result,) = segment_series([image], segmenter, [OutputKind.SEG])
    seg = result.seg
    assert seg.Modality == "SEG"
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    n = len(seg.SegmentSequence)
    masks = np.zeros((n, seg.Rows, seg.Columns), dtype=bool)
    for frame, number in zip(pixels, numbers, strict=True):
        masks[number - 1] |= frame.astype(bool)
    return masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_formats_are_detected(exported: dict[str, Path]) -> None:
    assert detect_format(PACKAGE).format == "package"
    assert detect_format(exported["torchscript"]).format == "torchscript"
    assert detect_format(exported["onnx"]).format == "onnx"
    assert detect_format(exported["onnx"] / "model.onnx").format == "onnx"
    bare = detect_format(exported["bare-onnx"])
    assert (bare.format, bare.descriptor) == ("onnx", exported["bare-onnx"].with_suffix(".yaml"))
    ts = detect_format(exported["torchscript"] / "model.ts")
    assert (ts.format, ts.network_file) == ("torchscript", exported["torchscript"] / "model.ts")


@pytest.mark.shared_data("jsrt", "images")
def test_exports_give_the_packages_seg(tmp_path: Path, exported: dict[str, Path]) -> None:
    image = tmp_path / "cxr.dcm"
    jsrt_dx(CASE).save_as(image, enforce_file_format=True)
    reference = seg_masks(PACKAGE, image)
    assert reference.shape[0] == 5 and all(m.any() for m in reference)
    for kind in ("torchscript", "onnx", "bare-onnx"):
        masks = seg_masks(exported[kind], image)
        assert masks.shape == reference.shape, kind
        for s in range(len(reference)):
            assert dice(masks[s], reference[s]) >= MIN_DICE, (kind, s)


def test_onnx_runs_in_onnxruntime_batched_like_the_package(exported: dict[str, Path]) -> None:
    """The ONNX segmenter's network is onnxruntime's session (not torch), takes a batch and
    gives the package's logits."""
    onnx = load_model(exported["onnx"], torch.device("cpu"))
    package = load_model(PACKAGE, torch.device("cpu"))
    assert isinstance(onnx, Segmenter) and isinstance(package, Segmenter)
    assert isinstance(onnx.network, OnnxNetwork)
    assert onnx.network.session.get_providers() == ["CPUExecutionProvider"]
    rows, cols = package.package.input_size  # the export's fixed input: the package's
    x = torch.from_numpy(np.random.default_rng(0).random((3, 1, rows, cols), dtype=np.float32))
    with torch.inference_mode():
        got, want = onnx.network(x), package.network(x)
    assert got.shape == (3, 5, rows, cols)  # one sigmoid channel per structure
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-3)
    onnx.warm_up()


def test_a_broken_export_fails_in_one_line(tmp_path: Path, exported: dict[str, Path]) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(exported["onnx"], folder)
    (folder / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelPackageError, match=r"model.onnx: cannot be loaded by onnxruntime"):
        load_model(folder, torch.device("cpu"))
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelPackageError, match=r"network.file: file .*model.onnx does not exist"):
        load_model(folder, torch.device("cpu"))
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported["onnx"] / "model.onnx", lone)
    with pytest.raises(ModelPackageError, match="without its descriptor; write lone.yaml") as exc:
        detect_format(lone)
    assert "\n" not in str(exc.value)
    state_dict = tmp_path / "weights.pt"
    shutil.copy(PACKAGE / "model.pt", state_dict)
    with pytest.raises(ModelPackageError, match="not a TorchScript file"):
        detect_format(state_dict)


def test_an_exported_package_cannot_be_built_as_a_unet(exported: dict[str, Path]) -> None:
    """Training and --init need the UNet's state_dict; an export says so instead of building
    a UNet of default arguments."""
    from dicom_node.models.networks import build_network
    from dicom_node.package.manifest import load_package

    with pytest.raises(ModelPackageError, match="network.kind is torchscript; only a unet"):
        build_network(load_package(exported["torchscript"]))
