"""Inference time per model format on the CPU: the shipped cxr-anatomy as its package, as
TorchScript and as ONNX (onnxruntime), on the same JSRT radiographs.

``.venv/bin/python -m benchmarks.model_formats [--cases N] [--repeats R] [--device cpu]
[--no-bundle] [--bundle-repeats B] [--no-nnunet] [--nnunet-repeats M]``:
each format is loaded through :func:`dicom_node.models.formats.load_model` (what a route
does), warmed up, then every radiograph (a DX file) is segmented ``R`` times through
:func:`dicom_node.work.segment.segment_series` with the SEG built (read, preprocess,
network, postprocess, SEG); prints the median and the spread of seconds per radiograph, and
the Dice of each format's masks against the package's.

Then (unless ``--no-bundle``) the MONAI spleen_ct_segmentation bundle (its published configs
from ``../shared/data/reference/monai-bundles``, its ``network_def`` with seeded random
weights: the weights cannot be downloaded here, and the time does not depend on them) on the
real Siemens CT (20 x 512 x 512, ``reference/ct-siemens-j2k``) through the same path,
``--bundle-repeats`` times: seconds per volume with the published sliding window (96^3,
overlap 0.5, 4 windows a batch).

Then (unless ``--no-nnunet``) an nnU-Net v2 3d_fullres model made the way nnunetv2 makes one:
``nnUNetv2_plan_and_preprocess -c 3d_fullres`` on three ``../shared/data/la-mri`` cases
(downsampled 2x to 1.25 mm, close to what nnU-Net planned for the MSD Heart task), then
nnunetv2's own ``nnUNetTrainer`` for those plans, initialised (random weights: the time does not
depend on them) and saved with its ``save_checkpoint`` as ``fold_0/checkpoint_final.pth``, in
the temporary folder. :class:`~dicom_node.models.formats.nnunet.NnUNetRunner` ``.predict`` is
timed on a fourth case at full size (0.625 mm, ``(1, z, y, x)`` float32 and its
:class:`~dicom_node.models.runner.VolumeGeometry`, as the node hands it over: nnU-Net resamples
it to its plans' spacing and back), step size 0.5, without and with test-time mirroring, on 1
and 2 torch threads, ``--nnunet-repeats`` times each; then ``nnUNetv2_predict`` once on the
same NIfTI (the whole command: start, load, predict, write) as the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicom_node.common.log import configure_logging
from dicom_node.common.output_kinds import OutputKind
from dicom_node.models.formats import detect_format, load_model
from dicom_node.testing.exported import export_package
from dicom_node.work.segment import segment_series
from tests.factories import jsrt_cases, jsrt_dx

PACKAGE = Path(__file__).resolve().parents[1] / "config" / "models" / "cxr-anatomy"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-bundle", action="store_true", help="skip the MONAI bundle")
    parser.add_argument("--bundle-repeats", type=int, default=2)
    parser.add_argument("--no-nnunet", action="store_true", help="skip the nnU-Net v2 model")
    parser.add_argument("--nnunet-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    device = torch.device(args.device)
    cases = jsrt_cases()[: args.cases]
    if not cases:
        print("no JSRT radiographs under ../shared/data/jsrt/images", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="model-formats-") as tmp:
        work = Path(tmp)
        models = {"package": PACKAGE, **export_package(PACKAGE, work / "exported")}
        models.pop("bare-onnx")
        images = []
        for case in cases:
            path = work / f"{case}.dcm"
            jsrt_dx(case).save_as(path, enforce_file_format=True)
            images.append(path)
        print(
            f"{len(cases)} JSRT radiographs x {args.repeats}, device {device}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        print(
            "| format | load s | first run s | median s / radiograph | min | max "
            "| Dice vs package |"
        )
        print("|---|---|---|---|---|---|---|")
        reference: list[np.ndarray] = []
        for model in models.values():
            started = time.perf_counter()
            segmenter = load_model(model, device)
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            segmenter.warm_up()
            first = time.perf_counter() - started
            seconds: list[float] = []
            masks: list[np.ndarray] = []
            for _ in range(args.repeats):
                for image in images:
                    started = time.perf_counter()
                    (result,) = segment_series([image], segmenter, [OutputKind.SEG])
                    seconds.append(time.perf_counter() - started)
                    masks.append(result.seg.pixel_array.astype(bool))
            if not reference:
                reference = masks
            dice = min(
                2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)
                for a, b in zip(masks, reference, strict=True)
            )
            print(
                f"| {detect_format(model).format} | {loaded:.2f} | {first:.2f} | "
                f"{statistics.median(seconds):.3f} | {min(seconds):.3f} | {max(seconds):.3f} "
                f"| {dice:.4f} |"
            )
        if not args.no_bundle:
            bundle_row(work, device, args.bundle_repeats)
        if not args.no_nnunet:
            nnunet_rows(work, args.nnunet_repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def bundle_row(work: Path, device: torch.device, repeats: int) -> None:
    """Print the spleen bundle's times on the real Siemens CT (see the module's doc)."""
    from tests.models.formats.test_bundle import make_bundle
    from tests.work.test_bundle_route import spleen_ct

    bundle = make_bundle(work, "spleen_ct_segmentation")
    (bundle / "dicom-node.yaml").write_text(
        "modalities: [CT]\nstructures: {spleen: {category: SCT.AnatomicalStructure, "
        "type: SCT.Spleen}}\n"
    )
    series = spleen_ct(work / "ct")
    started = time.perf_counter()
    segmenter = load_model(bundle, device)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    segmenter.warm_up()
    first = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        segment_series(series, segmenter, [OutputKind.SEG])
        seconds.append(time.perf_counter() - started)
    print(f"\nspleen_ct_segmentation on the Siemens CT (20 x 512 x 512) x {repeats}, {device}")
    print("| format | load s | first run s | median s / volume | min | max |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {detect_format(bundle).format} | {loaded:.2f} | {first:.2f} | "
        f"{statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} |"
    )


#: nnU-Net's dataset of the benchmark (id and name as nnunetv2 wants them).
NNUNET_DATASET = "Dataset502_LABench"
#: Downsampling of the planned cases (0.625 mm -> 1.25 mm).
NNUNET_FACTOR = 2
#: What nnunetv2's training does up to its first checkpoint, without the data: the plain
#: ``nnUNetTrainer`` for the plans (made as ``get_trainer_from_args`` makes it),
#: ``initialize`` (network with random weights, optimiser), the mirroring axes that training's
#: data loaders set (without them nnU-Net's predictor never mirrors), the plans and
#: dataset.json copied beside the folds (as ``on_train_start`` does), ``save_checkpoint``.
NNUNET_CHECKPOINT_SCRIPT = """
import sys, torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
preprocessed = sys.argv[1]
torch.manual_seed(0)
plans = load_json(preprocessed + "/nnUNetPlans.json")
plans["continue_training"] = False  # as nnunetv2's run_training.get_trainer_from_args sets it
trainer = nnUNetTrainer(plans, "3d_fullres", 0, load_json(preprocessed + "/dataset.json"),
                        device=torch.device("cpu"))
trainer.initialize()
# sets inference_allowed_mirroring_axes, as get_dataloaders does at the start of training
trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
save_json(trainer.plans_manager.plans, trainer.output_folder_base + "/plans.json", sort_keys=False)
save_json(trainer.dataset_json, trainer.output_folder_base + "/dataset.json", sort_keys=False)
trainer.save_checkpoint(trainer.output_folder + "/checkpoint_final.pth")
print(trainer.inference_allowed_mirroring_axes)
print(trainer.output_folder_base)
"""


def _la_mri_nifti(case: str, name: str, factor: int, out: Path, *, label: bool) -> None:
    """Write ``case``'s ``name`` ``factor`` times coarser (block mean, or every n-th label)."""
    import SimpleITK as sitk

    from tests.factories import LA_MRI

    image = sitk.ReadImage(str(LA_MRI / case / name))
    array = sitk.GetArrayFromImage(image)
    z, y, x = (n // factor * factor for n in array.shape)
    array = array[:z, :y, :x]
    if label:
        small = array[::factor, ::factor, ::factor].astype(np.uint8)
    else:
        blocks = array.astype(np.float32).reshape(
            z // factor, factor, y // factor, factor, x // factor, factor
        )
        small = blocks.mean(axis=(1, 3, 5)).astype(np.float32)
    result = sitk.GetImageFromArray(small)
    result.SetSpacing(tuple(s * factor for s in image.GetSpacing()))
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    sitk.WriteImage(result, str(out))


def _run_nnunet(args: list[str], env: dict[str, str]) -> str:
    """Run one of nnunetv2's commands (or this interpreter) and return its stdout."""
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def make_nnunet_model(work: Path, cases: list[str]) -> tuple[Path, dict[str, str], str]:
    """Plan ``cases`` with nnunetv2 and save a randomly initialised 3d_fullres checkpoint.

    Returns the trained-model folder (``dataset.json``, ``plans.json``,
    ``fold_0/checkpoint_final.pth``), the environment nnunetv2's commands need and the
    checkpoint's mirroring axes as nnunetv2 printed them.
    """
    root = work / "nnunet"
    env = dict(
        os.environ,
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_compile="false",
    )
    dataset = root / "raw" / NNUNET_DATASET
    for folder in ("imagesTr", "labelsTr"):
        (dataset / folder).mkdir(parents=True)
    for index, case in enumerate(cases):
        images, labels = dataset / "imagesTr", dataset / "labelsTr"
        image_file, label_file = f"la_{index:03d}_0000.nii.gz", f"la_{index:03d}.nii.gz"
        _la_mri_nifti(case, "image.nii.gz", NNUNET_FACTOR, images / image_file, label=False)
        _la_mri_nifti(case, "label.nii.gz", NNUNET_FACTOR, labels / label_file, label=True)
    (dataset / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "LGE"},
                "labels": {"background": 0, "left_atrium": 1},
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    bin_dir = Path(sys.executable).parent
    dataset_id = NNUNET_DATASET[len("Dataset") : len("Dataset") + 3]
    _run_nnunet(
        [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "3d_fullres"]
        + ["-np", "1"],
        env,
    )
    preprocessed = root / "preprocessed" / NNUNET_DATASET
    out = _run_nnunet([sys.executable, "-c", NNUNET_CHECKPOINT_SCRIPT, str(preprocessed)], env)
    *_, axes, folder = out.strip().splitlines()
    if axes == "None":
        raise RuntimeError("the checkpoint allows no mirroring axes; the timing would lie")
    return Path(folder), env, axes


def nnunet_rows(work: Path, repeats: int) -> None:
    """Print NnUNetRunner's and nnUNetv2_predict's times on one LA-MRI volume (module doc)."""
    import SimpleITK as sitk

    from dicom_node.models.formats.nnunet import NnUNetRunner
    from dicom_node.models.runner import VolumeGeometry
    from tests.factories import LA_MRI, la_mri_cases

    cases = la_mri_cases()
    if len(cases) < 4:
        print(f"\nnnU-Net skipped: fewer than 4 LA-MRI cases under {LA_MRI}", file=sys.stderr)
        return
    started = time.perf_counter()
    folder, env, axes = make_nnunet_model(work, cases[:3])
    made = time.perf_counter() - started
    plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    held_out = work / "nnunet" / "test"
    held_out.mkdir()
    image_path = held_out / "la_100_0000.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(LA_MRI / cases[3] / "image.nii.gz")), str(image_path))
    image = sitk.ReadImage(str(image_path))
    channels = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    geometry = VolumeGeometry(
        spacing_zyx_mm=tuple(image.GetSpacing()[::-1]),
        origin_mm=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )
    arch = plans["architecture"]["arch_kwargs"]
    print(
        f"\nnnU-Net v2 3d_fullres (plans of 3 LA-MRI cases at {NNUNET_FACTOR}x; planned and "
        f"checkpoint saved in {made:.0f} s): spacing {plans['spacing']} mm, patch "
        f"{plans['patch_size']}, {arch['n_stages']} stages, features "
        f"{arch['features_per_stage']}, mirroring axes {axes}; one volume "
        f"{tuple(channels.shape[1:])} at "
        f"{geometry.spacing_zyx_mm} mm, step 0.5, x {repeats}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| runner | threads | mirroring | load s | first run s | median s / volume | min | max |")
    print("|---|---|---|---|---|---|---|---|")
    threads_before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for mirroring in (False, True):
            started = time.perf_counter()
            runner = NnUNetRunner(
                folder, torch.device("cpu"), use_mirroring=mirroring, step_size=0.5
            )
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            runner.predict(channels, geometry)
            first = time.perf_counter() - started
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                labels = runner.predict(channels, geometry)
                seconds.append(time.perf_counter() - started)
            assert labels.shape == channels.shape[1:], labels.shape
            print(
                f"| NnUNetRunner.predict | {threads} | {'yes' if mirroring else 'no'} | "
                f"{loaded:.2f} | {first:.2f} | {statistics.median(seconds):.2f} | "
                f"{min(seconds):.2f} | {max(seconds):.2f} |"
            )
    torch.set_num_threads(threads_before)
    predicted = work / "nnunet" / "predicted"
    started = time.perf_counter()
    _run_nnunet(
        [str(Path(sys.executable).parent / "nnUNetv2_predict")]
        + ["-i", str(held_out), "-o", str(predicted), "-d", NNUNET_DATASET, "-c", "3d_fullres"]
        + ["-f", "0", "-step_size", "0.5", "-device", "cpu", "-npp", "1", "-nps", "1"]
        + ["--disable_progress_bar"],
        env,
    )
    whole = time.perf_counter() - started
    print(
        f"| nnUNetv2_predict (whole command: start, load, predict, write) | 2 | yes | - | - | "
        f"{whole:.2f} | - | - |"
    )
    print(f"load average after nnU-Net {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
