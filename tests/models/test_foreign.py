"""Foreign models (a VolumeRunner and its mapping) look like the node's own Segmenter to the
work stage: detected from their folder, loaded by ``load_model``, their channels the stored
values of each role on the reference grid, their label map turned into the mapped
structures; what is missing is one line at load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.common.output_kinds import OutputKind
from dicom_node.imaging.series import load_series
from dicom_node.models import formats
from dicom_node.models.foreign import ForeignSegmenter, mapping_gaps
from dicom_node.models.formats import detect_format, load_model, open_runner
from dicom_node.models.inference import InferenceReport
from dicom_node.models.runner import VolumeGeometry
from dicom_node.work.segment import segment_case, segment_series
from tests.factories import ct_series, write_files
from tests.models.fake_runner import ThresholdRunner, make_nnunet_folder

FAKE = "tests.models.fake_runner:ThresholdRunner"

ONE_INPUT = """
name: body-ct
modalities: [CT]
structures:
  spleen: {category: SCT.AnatomicalStructure, type: SCT.Spleen, color: [200, 40, 40]}
options: {threshold: -500}
"""

TWO_INPUTS = """
name: body-2ch
modalities: [CT]
inputs:
  - {channel: late, role: late}
  - {channel: early, role: early}
reference: early
structures:
  spleen: {category: SCT.AnatomicalStructure, type: SCT.Spleen}
options: {channels: [early, late], threshold: 0}
"""


@pytest.fixture(autouse=True)
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """nnU-Net folders run the threshold runner."""
    monkeypatch.setitem(formats.RUNNERS, formats.NNUNET, FAKE)
    ThresholdRunner.seen.clear()
    yield


def second_phase(series: list[Dataset], offset_hu: int) -> list[Dataset]:
    """The same slices as another series of the study and frame of reference, ``offset_hu``
    brighter."""
    uid = generate_uid()
    out = []
    for ds in series:
        copy = deepcopy(ds)
        copy.SeriesInstanceUID, copy.SOPInstanceUID = uid, generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        copy.SeriesNumber = 3
        pixels = np.frombuffer(ds.PixelData, dtype=np.int16) + offset_hu
        copy.PixelData = pixels.astype(np.int16).tobytes()
        out.append(copy)
    return out


def test_one_input_model_segments_stored_values(tmp_path: Path) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset001_Body", ONE_INPUT)
    assert detect_format(model).format == "nnunet"
    segmenter = load_model(model, torch.device("cpu"))
    assert isinstance(segmenter, ForeignSegmenter)
    package = segmenter.package
    assert (package.name, package.version, package.roles) == ("body-ct", "0.9", ("image",))
    assert [s.label for s in package.structures] == ["spleen"]
    assert package.structures[0].type.meaning == "Spleen"
    segmenter.warm_up()
    paths = write_files(ct_series(n_slices=6), tmp_path / "ct")
    (result,) = segment_series(paths, segmenter, [OutputKind.SEG, OutputKind.SR])
    run = ThresholdRunner.seen[-1]
    assert run["shape"] == (1, 6, 64, 64)
    assert run["channels"].min() < -900 and run["channels"].max() > 0  # HU, not normalised
    assert run["geometry"].spacing_zyx_mm == pytest.approx((2.5, 0.8, 0.8))
    assert run["geometry"].direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    expected = result.series.pixels > -500
    seg = result.seg
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    frames = seg.pixel_array.reshape(-1, 64, 64).astype(bool)
    assert frames.sum() == expected.sum()
    assert result.measurements is not None and result.sr.Modality == "SR"


def test_roles_feed_the_channels_of_the_mapping(tmp_path: Path) -> None:
    """Two phases of one CT as roles: each channel gets its role's stored values in the
    runner's channel order (not the mapping's), on the reference's grid."""
    model = make_nnunet_folder(tmp_path / "Dataset002_Body", TWO_INPUTS)
    segmenter = load_model(model, torch.device("cpu"))
    assert segmenter.package.roles == ("early", "late")
    assert segmenter.package.reference == "early"
    early = ct_series(n_slices=4, shuffle=False)
    late = second_phase(early, 500)
    inputs = {
        "early": write_files(early, tmp_path / "early"),
        "late": write_files(late, tmp_path / "late"),
    }
    (result,) = segment_case(inputs, segmenter, [OutputKind.SEG])
    channels = ThresholdRunner.seen[-1]["channels"]
    assert channels.shape == (2, 4, 64, 64)
    np.testing.assert_allclose(channels[1] - channels[0], 500.0, atol=1e-3)
    assert result.inputs == {
        "early": early[0].SeriesInstanceUID,
        "late": late[0].SeriesInstanceUID,
    }


def test_what_the_mapping_lacks_is_listed_and_load_fails_on_the_first(tmp_path: Path) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset003_Raw", "options: {channels: [T1, T2]}\n")
    runner = open_runner(detect_format(model), torch.device("cpu"), {"channels": ["T1", "T2"]})
    gaps = mapping_gaps(runner, model)
    assert len(gaps) == 2
    assert "inputs: missing; the model has 2 channels (T1, T2)" in gaps[0]
    assert "structures.spleen: missing (label 1 of the model)" in gaps[1]
    with pytest.raises(ModelPackageError) as exc:
        load_model(model, torch.device("cpu"))
    assert str(exc.value) == gaps[0]


def test_a_mapping_beside_a_zip(tmp_path: Path) -> None:
    import zipfile

    archive = tmp_path / "Dataset004.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
            out.writestr(f"Dataset004/nnUNetTrainer__nnUNetPlans__3d_fullres/{name}", "{}")
    (tmp_path / "Dataset004.dicom-node.yaml").write_text(ONE_INPUT)
    assert detect_format(archive).format == "nnunet"
    assert load_model(archive, torch.device("cpu")).package.name == "body-ct"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("dataset.json", "fold_0/checkpoint_final.pth"), "without plans.json"),
        (("dataset.json", "plans.json"), "without fold_\\*/checkpoint_final.pth"),
        (("configs/metadata.json", "models/model.ts"), "without configs/inference.json"),
        (("configs/metadata.json", "configs/inference.json"), "without models/model.ts"),
        (("notes.txt",), "not a model this node knows"),
    ],
)
def test_an_incomplete_model_is_one_line_naming_the_file(
    tmp_path: Path, files: tuple[str, ...], message: str
) -> None:
    folder = tmp_path / "model"
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    with pytest.raises(ModelPackageError, match=message) as exc:
        load_model(folder, torch.device("cpu"))
    assert "\n" not in str(exc.value)


def test_a_runner_that_fails_to_load_is_one_line(tmp_path: Path) -> None:
    model = make_nnunet_folder(
        tmp_path / "Dataset005", ONE_INPUT.replace("-500}", "-500, fail: true}")
    )
    with pytest.raises(ModelPackageError) as exc:
        load_model(model, torch.device("cpu"))
    assert str(exc.value) == (
        f"{model}: the nnunet model cannot be loaded (KeyError: 'network_def')"
    )


def test_wrong_modality_is_an_input_error(tmp_path: Path) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset006", ONE_INPUT.replace("[CT]", "[MR]"))
    paths = write_files(ct_series(n_slices=2), tmp_path / "ct")
    with pytest.raises(InputError, match="accepts MR images, not CT"):
        segment_series(paths, load_model(model, torch.device("cpu")), [OutputKind.SEG])


class OomOnCuda:
    """Runs out of CUDA memory on ``cuda``, works on the CPU; counts concurrent runs."""

    format = "test"
    channel_names = ("CT",)
    labels = {1: "spleen"}

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def predict(self, channels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.05)
            if self.device.type == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return (channels[0] > -500).astype(np.uint8)
        finally:
            with self.lock:
                self.running -= 1


def test_out_of_memory_on_cuda_runs_once_on_the_cpu_and_runs_are_serial(tmp_path: Path) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset007", ONE_INPUT)
    package = load_model(model, torch.device("cpu")).package
    made: list[OomOnCuda] = []

    def reload(device: torch.device) -> OomOnCuda:
        made.append(OomOnCuda(device))
        return made[-1]

    gpu = OomOnCuda(torch.device("cuda"))
    segmenter = ForeignSegmenter(gpu, package, torch.device("cuda"), reload=reload)
    series = load_series(write_files(ct_series(n_slices=2), tmp_path / "ct"))
    report = InferenceReport()
    masks = segmenter.segment(series, None, report)
    assert masks[..., 0].sum() == (series.pixels > -500).sum()
    assert report.oom == ["CUDA out of memory; retried once on the CPU"]
    assert report.device == "cpu" and len(made) == 1  # the CPU runner is made once
    cpu = OomOnCuda(torch.device("cpu"))
    on_cpu = ForeignSegmenter(cpu, package, torch.device("cpu"))  # no GPU slot limits it
    threads = [
        threading.Thread(target=run.segment, args=(series, None, InferenceReport()))
        for run in (segmenter, segmenter, segmenter, on_cpu, on_cpu, on_cpu)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1
    assert made[0].most_at_once == 1 and gpu.most_at_once == 1 and cpu.most_at_once == 1


def test_warm_up_runs_one_slice_for_a_2d_mapping(tmp_path: Path) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset008", ONE_INPUT + "dims: 2\n")
    segmenter = load_model(model, torch.device("cpu"))
    assert segmenter.package.dims == 2
    assert [m.value for m in segmenter.package.measurements] == ["area"]
    segmenter.warm_up()
    assert ThresholdRunner.seen[-1]["shape"] == (1, 1, 64, 64)
