"""NnUNetRunner against nnunetv2's own commands, on a model nnunetv2 trains here.

The session fixture :func:`nnunet_model` builds a tiny dataset from four cases of
``../shared/data/la-mri`` (downsampled 6x to 3.75 mm, about 14 x 23 x 31 voxels), runs
``nnUNetv2_plan_and_preprocess`` (3d_fullres), trains fold ``all`` with nnunetv2's own
``nnUNetTrainer`` for 1 epoch of a few iterations on the CPU, exports it with
``nnUNetv2_export_model_to_zip`` and segments a fifth case with ``nnUNetv2_predict``.

Time: about 1 min of CPU in all; on this project's two shared cores 3 to 5 min of wall time,
paid once per session (hence ``slow`` and the longer timeout).

Training runs what ``nnUNetv2_train`` runs with the plain ``nnUNetTrainer``, its epochs and
iterations set short on the trainer instance (:data:`TRAIN_SCRIPT`), rather than
``nnUNetv2_train -tr nnUNetTrainer_1epoch``: without timm (not installed here, see the
Makefile) nnunetv2 cannot find any of its variant trainers by name, and the plain trainer's
1000 epochs are far too long. The folder is the one ``nnUNetv2_train`` writes.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.models.formats.nnunet import NnUNetRunner
from dicom_node.models.runner import VolumeGeometry
from tests.conftest import StoreSCP, require_shared_data
from tests.factories import LA_MRI, la_mri_cases

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("nnunetv2")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CPU = torch.device("cpu")
DATASET = "Dataset501_LATiny"
#: Downsampling factor of the LA-MRI volumes (0.625 mm -> 3.75 mm).
FACTOR = 6
#: Training iterations: enough for a map with both atrium and background.
ITERATIONS = 5

#: What ``nnUNetv2_train 501 3d_fullres all -device cpu`` runs after parsing its arguments
#: (nnunetv2's ``run_training``: training, final checkpoint, validation), with the trainer's
#: epochs and iterations cut short. Called directly rather than through the command, whose
#: ``torch.set_num_threads(cpu_count())`` on shared, busy cores is several times slower than
#: one thread (OpenMP threads wait on each other).
TRAIN_SCRIPT = """
import sys, torch
import nnunetv2.run.run_training as run

make_trainer = run.get_trainer_from_args
def short_trainer(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = int(sys.argv[1])
    trainer.num_val_iterations_per_epoch = 1
    return trainer
run.get_trainer_from_args = short_trainer
torch.set_num_threads(1)
run.run_training("501", "3d_fullres", "all", device=torch.device("cpu"))
"""


@dataclass(frozen=True)
class TrainedModel:
    """What the fixture made with nnunetv2's own commands."""

    folder: Path  # nnUNet_results/Dataset501_LATiny/nnUNetTrainer__nnUNetPlans__3d_fullres
    zip_path: Path  # nnUNetv2_export_model_to_zip of it
    image: Path  # the held-out case, as nnUNetv2_predict read it
    expected: np.ndarray  # nnUNetv2_predict's label map of it, (z, y, x)


def _downsampled(case: str, name: str, *, label: bool) -> sitk.Image:
    """``case``'s image (block mean) or label (every FACTOR-th voxel), FACTOR times coarser."""
    image = sitk.ReadImage(str(LA_MRI / case / name))
    array = sitk.GetArrayFromImage(image)
    z, y, x = (n // FACTOR * FACTOR for n in array.shape)
    array = array[:z, :y, :x]
    if label:
        small = array[::FACTOR, ::FACTOR, ::FACTOR].astype(np.uint8)
    else:
        blocks = array.astype(np.float32).reshape(
            z // FACTOR, FACTOR, y // FACTOR, FACTOR, x // FACTOR, FACTOR
        )
        small = blocks.mean(axis=(1, 3, 5)).astype(np.float32)
    out = sitk.GetImageFromArray(small)
    out.SetSpacing(tuple(s * FACTOR for s in image.GetSpacing()))
    return out


def _nnunet(command: str, *args: str, env: dict[str, str]) -> None:
    """Run one of nnunetv2's commands from this interpreter's environment."""
    program = Path(sys.executable).parent / command
    done = subprocess.run(
        [str(program), *args], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """A 3d_fullres nnU-Net v2 model of four LA-MRI cases, trained briefly on the CPU."""
    require_shared_data("la-mri")
    cases = la_mri_cases()[:5]
    assert len(cases) == 5, f"need 5 cases under {LA_MRI}"
    root = tmp_path_factory.mktemp("nnunet")
    raw, preprocessed, results = root / "raw", root / "preprocessed", root / "results"
    env = dict(
        os.environ,
        nnUNet_raw=str(raw),
        nnUNet_preprocessed=str(preprocessed),
        nnUNet_results=str(results),
        nnUNet_compile="false",
        OMP_NUM_THREADS="1",
    )
    dataset = raw / DATASET
    for folder in ("imagesTr", "labelsTr"):
        (dataset / folder).mkdir(parents=True)
    for index, case in enumerate(cases[:4]):
        image = _downsampled(case, "image.nii.gz", label=False)
        label = _downsampled(case, "label.nii.gz", label=True)
        label.CopyInformation(image)
        sitk.WriteImage(image, str(dataset / "imagesTr" / f"la_{index:03d}_0000.nii.gz"))
        sitk.WriteImage(label, str(dataset / "labelsTr" / f"la_{index:03d}.nii.gz"))
    (dataset / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "LGE"},
                "labels": {"background": 0, "left_atrium": 1},
                "numTraining": 4,
                "file_ending": ".nii.gz",
            }
        )
    )
    _nnunet("nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1", env=env)
    training = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(ITERATIONS)],
        env=dict(env, nnUNet_n_proc_DA="0"),  # augmentation in this process, no workers
        capture_output=True,
        text=True,
        check=False,
    )
    assert training.returncode == 0, f"training failed:\n{training.stderr[-3000:]}"
    folder = results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert (folder / "fold_all" / "checkpoint_final.pth").is_file()

    zip_path = root / "model.zip"
    _nnunet(
        "nnUNetv2_export_model_to_zip",
        *("-d", "501", "-o", str(zip_path), "-c", "3d_fullres", "-f", "all"),
        env=env,
    )
    held_out, predicted = root / "test", root / "predicted"
    held_out.mkdir()
    image_path = held_out / "la_100_0000.nii.gz"
    sitk.WriteImage(_downsampled(cases[4], "image.nii.gz", label=False), str(image_path))
    _nnunet(
        "nnUNetv2_predict",
        *("-i", str(held_out), "-o", str(predicted), "-d", "501", "-c", "3d_fullres"),
        *("-f", "all", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"),
        env=env,
    )
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / "la_100.nii.gz")))
    # The comparison must be able to fail: a map of one value would match a runner that
    # returned zeros. If this fails, raise ITERATIONS.
    assert set(np.unique(expected).tolist()) == {0, 1}, "the tiny model predicts one class only"
    return TrainedModel(folder=folder, zip_path=zip_path, image=image_path, expected=expected)


def _case(image_path: Path) -> tuple[np.ndarray, VolumeGeometry]:
    """The held-out image as a runner gets it: ``(1, z, y, x)`` float32 and its grid."""
    image = sitk.ReadImage(str(image_path))
    channels = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    geometry = VolumeGeometry(
        spacing_zyx_mm=tuple(image.GetSpacing()[::-1]),
        origin_mm=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )
    return channels, geometry


def test_folder_equals_nnunetv2_predict(nnunet_model: TrainedModel) -> None:
    runner = NnUNetRunner(nnunet_model.folder, CPU)
    assert runner.format == "nnunet-v2"
    assert runner.channel_names == ("LGE",)
    assert runner.labels == {1: "left_atrium"}
    assert runner.folds == ("all",)
    assert runner.configuration == "3d_fullres"
    channels, geometry = _case(nnunet_model.image)

    labels = runner.predict(channels, geometry)

    assert labels.shape == nnunet_model.expected.shape
    assert np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, nnunet_model.expected)


def test_exported_zip_equals_nnunetv2_predict(nnunet_model: TrainedModel) -> None:
    runner = NnUNetRunner(nnunet_model.zip_path, CPU, folds=("all",))
    unpacked = runner.model_dir
    assert unpacked.is_dir() and not unpacked.is_relative_to(nnunet_model.zip_path.parent)
    channels, geometry = _case(nnunet_model.image)

    np.testing.assert_array_equal(runner.predict(channels, geometry), nnunet_model.expected)

    del runner
    gc.collect()
    assert not unpacked.exists(), "the unpacked zip outlived its runner"


def test_variant_trainer_loads_without_timm(nnunet_model: TrainedModel, tmp_path: Path) -> None:
    """A model trained with one of nnunetv2's variant trainers (found only after its Primus
    trainers, which import timm) loads and predicts the same."""
    folder = tmp_path / "model"
    shutil.copytree(nnunet_model.folder, folder)
    checkpoint_path = folder / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer_250epochs"
    torch.save(checkpoint, checkpoint_path)

    runner = NnUNetRunner(folder, CPU)

    assert type(runner._predictor.network).__name__ == "PlainConvUNet"
    channels, geometry = _case(nnunet_model.image)
    np.testing.assert_array_equal(runner.predict(channels, geometry), nnunet_model.expected)


def test_options_reach_the_predictor(nnunet_model: TrainedModel) -> None:
    runner = NnUNetRunner(nnunet_model.folder, CPU, use_mirroring=False, step_size=0.75)

    assert runner._predictor.use_mirroring is False
    assert runner._predictor.tile_step_size == 0.75
    channels, geometry = _case(nnunet_model.image)
    with pytest.raises(InputError, match=r"1 channel\(s\) \['LGE'\]"):
        runner.predict(np.concatenate([channels, channels]), geometry)


# -- incomplete models: one line naming what is missing, before any weights are read --------


def _model_folder(root: Path, *, dataset: dict[str, object] | None = None) -> Path:
    """A trained-model folder layout with a placeholder checkpoint (never loaded)."""
    folder = root / "Dataset501_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    (folder / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}))
    if dataset is None:
        dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def _refusal(path: Path, **options: object) -> str:
    with pytest.raises(ModelPackageError) as caught:
        NnUNetRunner(path, CPU, **options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_files_are_named(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    (folder / "dataset.json").unlink()
    assert "dataset.json is missing" in _refusal(folder)

    folder = _model_folder(tmp_path / "b")
    (folder / "plans.json").unlink()
    assert "plans.json is missing" in _refusal(folder)

    folder = _model_folder(tmp_path / "c")
    assert "fold_1/checkpoint_final.pth is missing" in _refusal(folder, folds=(1,))
    assert "fold_*/checkpoint_best.pth is missing" in _refusal(
        folder, checkpoint="checkpoint_best.pth"
    )
    assert "not found" in _refusal(tmp_path / "nowhere")


def test_missing_keys_are_named(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "a", dataset={"labels": {"background": 0, "liver": 1}})
    assert "has no 'channel_names'" in _refusal(folder)

    folder = _model_folder(tmp_path / "b", dataset={"channel_names": {"0": "CT"}})
    assert "has no 'labels'" in _refusal(folder)

    folder = _model_folder(
        tmp_path / "c",
        dataset={"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": [1, 2]}},
    )
    assert "regions_class_order" in _refusal(folder)


def test_unreadable_checkpoint_is_one_line(tmp_path: Path) -> None:
    message = _refusal(_model_folder(tmp_path))
    assert "cannot load checkpoint_final.pth of folds [0]" in message


def test_region_based_labels_and_channel_order(tmp_path: Path) -> None:
    from dicom_node.models.formats.nnunet import _channel_names, _labels

    dataset = {
        "channel_names": {"1": "T1c", "0": "T1", "3": "FLAIR", "2": "T2"},
        "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enh": 3},
        "regions_class_order": [1, 2, 3],
    }
    assert _channel_names(dataset, tmp_path) == ("T1", "T1c", "T2", "FLAIR")
    assert _labels(dataset, tmp_path) == {1: "whole_tumor", 2: "tumor_core", 3: "enh"}
    assert _labels({"labels": {"background": 0, "a": 2, "ignore": 3}}, tmp_path) == {2: "a"}


def test_zip_without_a_model_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "no model here")
    assert "holds no plans.json" in _refusal(empty)

    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as archive:
        for configuration in ("2d", "3d_fullres"):
            archive.writestr(
                f"Dataset501_X/nnUNetTrainer__nnUNetPlans__{configuration}/plans.json", "{}"
            )
    assert "holds 2 trained models" in _refusal(two)

    not_zip = tmp_path / "model.bin"
    not_zip.write_bytes(b"\x00" * 10)
    assert "neither a folder nor a zip" in _refusal(not_zip)


def test_reorienting_reader_is_refused(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    (folder / "plans.json").write_text(json.dumps({"image_reader_writer": "NibabelIOWithReorient"}))
    assert "NibabelIOWithReorient" in _refusal(folder)


NODE_MAPPING = """
name: la-nnunet
modalities: [MR]
structures:
  left_atrium: {category: SCT.AnatomicalStructure, type: SCT.LeftAtrium, color: [220, 60, 60]}
"""


@pytest.mark.peers
def test_a_running_node_serves_the_model(
    nnunet_model: TrainedModel, tmp_path: Path, storescp: StoreSCP
) -> None:
    """The trained folder as a route's model of a running node: the held-out case sent by
    DCMTK ``storescu`` as an MR series gives, at a DCMTK ``storescp``, a SEG (read by
    highdicom) whose atrium is the runner's map of the same stored values (the runner being
    ``nnUNetv2_predict``, above), and within rounding of ``nnUNetv2_predict`` on the NIfTI."""
    from pydicom.uid import generate_uid

    from tests.factories import mr_series, write_files
    from tests.work.test_bundle_route import node_settings, run_node, seg_labels

    model = tmp_path / "model"
    shutil.copytree(nnunet_model.folder, model)
    (model / "dicom-node.yaml").write_text(NODE_MAPPING)
    image = sitk.ReadImage(str(nnunet_model.image))
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    volume = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    datasets = mr_series(
        volume, spacing_mm=spacing, study_uid=generate_uid(), frame_of_reference_uid=generate_uid()
    )
    paths = write_files(datasets, tmp_path / "mr")
    route = {"name": "la", "match": {"Modality": ["MR"]}, "model": str(model)}
    received = run_node(node_settings(tmp_path, storescp.port, route), [paths], storescp)

    seg = pydicom.dcmread(received["SEG"])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["Left atrium"]
    atrium = seg_labels(received["SEG"], [str(ds.SOPInstanceUID) for ds in datasets], {1: 1}) == 1
    stored = np.clip(np.round(volume), 0, 65535).astype(np.float32)[None]
    _, geometry = _case(nnunet_model.image)
    direct = NnUNetRunner(nnunet_model.folder, CPU).predict(stored, geometry) == 1
    assert direct.any() and not direct.all()
    np.testing.assert_array_equal(atrium, direct)
    expected = nnunet_model.expected == 1
    dice = 2 * (atrium & expected).sum() / (atrium.sum() + expected.sum())
    assert dice >= 0.98, f"Dice {dice:.4f} against nnUNetv2_predict on the unrounded volume"
