"""A model package exported to TorchScript and ONNX, as a site would bring them (tests and
``benchmarks.model_formats``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from dicom_node.models.networks import load_network
from dicom_node.package.manifest import MODEL_FILE, load_package


def export_package(package_folder: Path, folder: Path) -> dict[str, Path]:
    """Export the package at ``package_folder`` into ``folder``.

    Returns
    -------
    dict
        ``torchscript`` and ``onnx``: package folders whose ``model.yaml`` is the package's
        with ``network: {kind, file}``; ``bare-onnx``: a lone ``cxr.onnx`` with its
        descriptor ``cxr.yaml`` beside it (``network`` left empty). The ONNX graphs have a
        dynamic batch axis. The package's crop stages (``refine``) are copied beside each as
        they are (packages of their own).
    """
    folder.mkdir(parents=True, exist_ok=True)
    package = load_package(package_folder)
    network = load_network(package, torch.device("cpu"))
    example = torch.zeros(1, package.in_channels, *package.input_size)
    doc = yaml.safe_load((package_folder / MODEL_FILE).read_text())
    doc.pop("weights", None)
    made: dict[str, Path] = {}
    for kind, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        target = folder / kind
        target.mkdir()
        if kind == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(network, example)  # type: ignore[no-untyped-call]
                traced.save(str(target / name))
        else:
            torch.onnx.export(
                network,
                (example,),
                str(target / name),
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
        (target / MODEL_FILE).write_text(
            yaml.safe_dump({**doc, "network": {"kind": kind, "file": name}})
        )
        made[kind] = target
    bare = folder / "bare"
    bare.mkdir()
    for stage in package.refine:
        where = stage.package.path.relative_to(Path(package_folder).resolve())
        for target in (made["torchscript"], made["onnx"], bare):
            shutil.copytree(stage.package.path, target / where)
    shutil.copy(made["onnx"] / "model.onnx", bare / "cxr.onnx")
    (bare / "cxr.yaml").write_text(yaml.safe_dump({**doc, "network": {}}))
    made["bare-onnx"] = bare / "cxr.onnx"
    return made
