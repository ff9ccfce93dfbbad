"""MONAI Model Zoo bundles (configs as published) served by BundleRunner, checked against
MONAI's own bundle runner (``monai.bundle.run``: the bundle's evaluator) on the same volume
saved as NIfTI, voxel for voxel.

The weights of the published bundles cannot be downloaded here: each test builds the network
from the bundle's own ``network_def`` with seeded random weights and saves it where the bundle
expects it. Where a bundle's sliding window is far larger than the small test volume (BraTS
240 x 240 x 160), both runners get the same ``inferer#roi_size`` override, so that the test
takes seconds on a CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK
import torch
from monai.bundle import ConfigParser

from dicom_node.common.errors import ModelPackageError
from dicom_node.imaging.series import load_series
from dicom_node.imaging.sitk import read_image
from dicom_node.models.formats.bundle import BundleRunner
from dicom_node.models.runner import VolumeGeometry
from tests.conftest import REQUIRE_PEERS, require_shared_data

CPU = torch.device("cpu")
BUNDLES = ("reference", "monai-bundles")

pytestmark = [
    pytest.mark.shared_data(*BUNDLES),
    # monai.bundle.run warns that configs are code: these are the published ones, copied.
    pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning"),
]


def _require_ignite() -> None:
    """MONAI's bundle runner (its SupervisedEvaluator) needs pytorch-ignite (dev extra)."""
    try:
        import ignite  # noqa: F401
    except ImportError:
        message = (
            "pytorch-ignite is not installed (pip install -e '.[dev]'); MONAI's runner needs it"
        )
        if REQUIRE_PEERS:
            pytest.fail(message)
        pytest.skip(message)


def make_bundle(
    tmp_path: Path, name: str, overrides: dict[str, Any] | None = None, *, script: bool = False
) -> Path:
    """A copy of a published bundle's configs with seeded random weights from its network_def:
    ``models/model.pt`` (or the file its config names), or with ``script`` ``models/model.ts``."""
    source = require_shared_data(*BUNDLES, name)
    bundle = tmp_path / (name + ("-ts" if script else ""))
    shutil.copytree(source / "configs", bundle / "configs")
    parser: Any = ConfigParser(ConfigParser.load_config_file(bundle / "configs" / "inference.json"))
    for key, value in (overrides or {}).items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (bundle / "models").mkdir()
    if script:
        torch.jit.script(network.eval()).save(str(bundle / "models" / "model.ts"))
    else:
        file = parser.get_parsed_content("modelname") if "modelname" in parser.get() else "model.pt"
        torch.save(network.state_dict(), bundle / "models" / file)
    return bundle


def write_nifti(channels: np.ndarray, geometry: VolumeGeometry, folder: Path) -> list[str]:
    """Each channel as a NIfTI file, the way SimpleITK writes a DICOM volume (LPS -> RAS)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, channel in enumerate(channels):
        image: Any = SimpleITK.GetImageFromArray(channel)
        image.SetSpacing(geometry.spacing_zyx_mm[::-1])
        image.SetOrigin(geometry.origin_mm)
        image.SetDirection(geometry.direction)
        path = folder / f"case_{i}.nii.gz"
        SimpleITK.WriteImage(image, str(path))
        paths.append(str(path))
    return paths


def monai_bundle_run(
    bundle: Path, files: list[str], out: Path, overrides: dict[str, Any] | None = None
) -> np.ndarray:
    """What ``monai.bundle run`` writes for ``files`` (one case), as ``(z, y, x)`` labels; its
    affine must be the input's."""
    from monai.bundle import run

    run(
        run_id="run",
        init_id="initialize",
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,
        bundle_root=str(bundle),
        **{
            "dataset#data": [{"image": files[0] if len(files) == 1 else files}],
            "output_dir": str(out),
            "dataloader#num_workers": 0,
            "device": "$torch.device('cpu')",
            **(overrides or {}),
        },
    )
    (written,) = out.rglob("*.nii.gz")
    image: Any = nibabel.load(written)
    source: Any = nibabel.load(files[0])
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
    return np.rint(np.asarray(image.dataobj)).reshape(image.shape[:3]).transpose(2, 1, 0)


def siemens_ct(tmp_path: Path) -> tuple[np.ndarray, VolumeGeometry]:
    """A 128 x 128 crop of the real Siemens CT (20 axial slices, HU), read by the node."""
    folder = require_shared_data("reference", "ct-siemens-j2k")
    paths = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        # UIDs were emptied in these test files; give them back.
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = (
            "1.2.826.0.1.3680043.8.498.1",
            "1.2.826.0.1.3680043.8.498.2",
        )
        paths.append(tmp_path / "ct" / path.name)
        paths[-1].parent.mkdir(exist_ok=True)
        ds.save_as(paths[-1], enforce_file_format=True)
    series = load_series(paths)
    y0, x0, size = 160, 200, 128
    orientation = series.orientation
    assert orientation is not None and series.origin_mm is not None
    assert series.pixel_spacing_mm is not None and series.slice_spacing_mm is not None
    row_mm, col_mm = series.pixel_spacing_mm
    origin = series.origin_mm + orientation[0] * col_mm * x0 + orientation[1] * row_mm * y0
    geometry = VolumeGeometry(
        spacing_zyx_mm=(series.slice_spacing_mm, row_mm, col_mm),
        origin_mm=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in orientation.T.ravel()),
    )
    return series.pixels[None, :, y0 : y0 + size, x0 : x0 + size].copy(), geometry


def la_mri(channels: int, size: int, direction: np.ndarray) -> tuple[np.ndarray, VolumeGeometry]:
    """A ``size``-cube crop of a real LGE-MRI, placed with ``direction`` (columns: the x, y and
    z axes in LPS); further channels are made from it (co-registered "sequences")."""
    folder = require_shared_data("la-mri")
    values, grid = read_image(next(iter(sorted(folder.glob("*/image.nii.gz")))))
    starts = [max(0, (n - size) // 2) for n in values.shape]
    crop = values[tuple(slice(s, s + size) for s in starts)].astype(np.float32)
    made = [crop, crop**1.5 / 16, 255 - crop, np.sqrt(crop) * 8][:channels]
    geometry = VolumeGeometry(
        spacing_zyx_mm=tuple(grid.spacing_mm[::-1]),  # type: ignore[arg-type]
        origin_mm=(10.0, -20.0, 30.0),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return np.stack(made).astype(np.float32), geometry


AXIAL = np.diag([1.0, -1.0, 1.0])  # rows flipped: x along L, y along A
#: A sagittal-like placement: x along P, y along F (feet), z along L; MONAI reorients to RAS.
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).T
#: The sagittal placement tilted by 0.3 rad about the patient's z axis: an oblique MR.
OBLIQUE = (
    np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]) @ SAGITTAL
)


def assert_same(
    ours: np.ndarray, theirs: np.ndarray, at_least: set[int] | int, *, agree: float = 1.0
) -> None:
    """Equal voxel for voxel (or in the fraction ``agree`` of voxels), with ``at_least`` these
    labels (or this many) present, so that a label map of background only cannot pass."""
    assert ours.shape == theirs.shape
    present = set(np.unique(theirs).astype(int).tolist())
    enough = len(present) >= at_least if isinstance(at_least, int) else at_least <= present
    assert enough, f"the labels {present} are too few for the test to tell"
    if agree < 1.0:
        assert np.mean(ours == theirs) >= agree
        return
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.shared_data("reference", "ct-siemens-j2k")
def test_spleen_ct_equals_monai_bundle_run(tmp_path: Path) -> None:
    _require_ignite()
    bundle = make_bundle(tmp_path, "spleen_ct_segmentation")
    channels, geometry = siemens_ct(tmp_path)
    runner = BundleRunner(bundle, CPU)
    assert runner.format == "monai-bundle"
    assert runner.channel_names == ("image",) and runner.labels == {1: "spleen"}
    ours = runner.predict(channels, geometry)
    files = write_nifti(channels, geometry, tmp_path / "in")
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval")
    assert ours.shape == channels.shape[1:] and ours.dtype == np.uint8
    assert_same(ours, theirs, {0, 1})
    # The same network scripted to models/model.ts (no model.pt) gives the same labels.
    scripted = make_bundle(tmp_path, "spleen_ct_segmentation", script=True)
    np.testing.assert_array_equal(BundleRunner(scripted, CPU).predict(channels, geometry), ours)


@pytest.mark.slow
@pytest.mark.shared_data("la-mri")
def test_brats_four_mr_inputs_equal_monai_bundle_run(tmp_path: Path) -> None:
    _require_ignite()
    overrides = {"inferer#roi_size": [48, 48, 48]}
    bundle = make_bundle(tmp_path, "brats_mri_segmentation")
    labels = {1: "necrotic tumour core", 2: "oedema", 4: "enhancing tumour"}
    runner = BundleRunner(bundle, CPU, overrides=overrides, labels=labels)
    assert runner.channel_names == ("T1c", "T1", "T2", "FLAIR") and runner.labels == labels
    channels, geometry = la_mri(4, 48, AXIAL)
    ours = runner.predict(channels, geometry)
    files = write_nifti(channels, geometry, tmp_path / "in")
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval", overrides)
    assert_same(ours, theirs, {0, 1, 2, 4})


@pytest.mark.slow
@pytest.mark.shared_data("la-mri")
def test_prostate_mr_equals_monai_bundle_run(tmp_path: Path) -> None:
    _require_ignite()
    overrides = {"inferer#roi_size": [64, 64, 64]}
    bundle = make_bundle(tmp_path, "prostate_mri_anatomy")
    runner = BundleRunner(bundle, CPU, overrides=overrides)
    assert runner.channel_names == ("image",)
    assert runner.labels == {1: "central gland", 2: "peripheral zone"}
    channels, geometry = la_mri(1, 40, SAGITTAL)  # 0.625 mm -> the bundle's 0.5 mm
    ours = runner.predict(channels, geometry)
    files = write_nifti(channels, geometry, tmp_path / "sagittal")
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval-sagittal", overrides)
    assert_same(ours, theirs, {0, 1, 2})

    # Oblique: SimpleITK's float32 sform differs from ours in the last bit, and this bundle
    # interpolates its label map linearly back to the input grid (Invertd, nearest_interp
    # false), so a few border voxels round the other way; with the affine as nibabel stores
    # ours, the labels are the same voxel for voxel.
    channels, geometry = la_mri(1, 40, OBLIQUE)
    ours = runner.predict(channels, geometry)
    files = write_nifti(channels, geometry, tmp_path / "oblique")
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval-oblique", overrides)
    assert_same(ours, theirs, {0, 1, 2}, agree=0.995)
    nifti = tmp_path / "oblique-nibabel" / "case_0.nii.gz"
    nifti.parent.mkdir()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine_lps()
    nibabel.save(nibabel.Nifti1Image(channels[0].transpose(2, 1, 0), affine), nifti)
    theirs = monai_bundle_run(bundle, [str(nifti)], tmp_path / "eval-nibabel", overrides)
    assert_same(ours, theirs, {0, 1, 2})


@pytest.mark.slow
@pytest.mark.shared_data("reference", "ct-siemens-j2k")
def test_whole_body_ct_low_resolution_equals_monai_bundle_run(tmp_path: Path) -> None:
    _require_ignite()
    overrides = {"displayable_configs#highres": False, "inferer#roi_size": [48, 48, 16]}
    bundle = make_bundle(tmp_path, "wholeBody_ct_segmentation", overrides)
    assert (bundle / "models" / "model_lowres.pt").is_file()
    runner = BundleRunner(bundle, CPU, overrides=overrides, sw_batch_size=2)
    assert len(runner.labels) == 104 and runner.labels[5] == "liver"
    assert runner.inferer.sw_batch_size == 2
    channels, geometry = siemens_ct(tmp_path)
    ours = runner.predict(channels, geometry)
    files = write_nifti(channels, geometry, tmp_path / "in")
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval", overrides)
    assert_same(ours, theirs, 20)


# -- a broken or incomplete bundle fails at load, with one line naming what is missing ------


def _one_line(error: pytest.ExceptionInfo[ModelPackageError], *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_files_and_keys_are_named(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "spleen_ct_segmentation")
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(tmp_path / "nowhere", CPU)
    _one_line(error, "not a folder")

    (bundle / "models" / "model.pt").rename(tmp_path / "model.pt")
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "models/model.pt", "models/model.ts")

    other = make_bundle(tmp_path, "prostate_mri_anatomy")
    shutil.copy(other / "models" / "model.pt", bundle / "models" / "model.pt")
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "model.pt does not fit network_def")
    shutil.copy(tmp_path / "model.pt", bundle / "models" / "model.pt")

    config = bundle / "configs" / "inference.json"
    parsed = ConfigParser.load_config_file(config)
    parsed["imports"].append("$import dicom_node_no_such_package")
    parsed["preprocessing"]["transforms"][-1]["dtype"] = "$dicom_node_no_such_package.dtype"
    ConfigParser.export_config_file(parsed, str(config))
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "'preprocessing' needs a package not installed", "dicom_node_no_such_package")

    parsed = ConfigParser.load_config_file(config)
    parsed["preprocessing"]["transforms"][-1].pop("dtype")
    parsed["network_def"]["channels"] = "$nonsense"
    ConfigParser.export_config_file(parsed, str(config))
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "'network_def'", "nonsense")

    del parsed["inferer"]
    ConfigParser.export_config_file(parsed, str(config))
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "'inferer'")

    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "configs/metadata.json")


def test_label_values_the_metadata_does_not_say_must_be_given(tmp_path: Path) -> None:
    """BraTS names three overlapping sigmoid channels, not the 1, 2, 4 its postprocessing
    writes: the node cannot guess them."""
    bundle = make_bundle(tmp_path, "brats_mri_segmentation")
    with pytest.raises(ModelPackageError) as error:
        BundleRunner(bundle, CPU)
    _one_line(error, "Tumor core", "labels option")
