"""la-lge end to end: a held-out LGE-MRI case as a scanner sends it, through a running node.

DCMTK storescu -> ``dicom-node serve`` (the default config's la-lge route, the shipped
package) -> DCMTK storescp. The case is one of the package's **test** cases (``split.json``:
never trained on, chose nothing), sent (a) as an oblique single-frame MR series in reverse
slice order, JPEG-LS lossless, and (b) as one Legacy Converted Enhanced MR object,
uncompressed. The returned SEG is decoded onto the source frames and compared

* with the same network run in this process on the NIfTI volume, without DICOM
  (:meth:`Segmenter.predict_volume`): the geometry must be exact, so that a mask one slice
  off, mirrored or shifted by a few voxels fails;
* with the expert mask: Dice above :data:`MIN_DICE`, which the same SEG mirrored left-right
  or shifted by a few voxels does not reach;

the SR's atrium volume with the SEG's voxels times the voxel volume and with the expert
mask's volume, and both outputs pass dciodvfy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from dicom_node.assemble.routing import routes_for
from dicom_node.config.settings import load_settings
from dicom_node.imaging.series import load_series
from dicom_node.models.inference import Segmenter, masks_from_probabilities
from dicom_node.models.postprocess import postprocess
from dicom_node.models.preprocess import volume_placement
from dicom_node.outputs.seg import read_seg_masks
from dicom_node.package.manifest import load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.conftest import REPO, NodeProcess, StoreSCP, require_shared_data, storescu
from tests.factories import write_files
from tests.la_mri import (
    LA_PACKAGE,
    dice,
    enhanced_mr,
    held_out_cases,
    mr_slices,
    read_case,
)
from tests.test_end_to_end import results

#: Dice with the expert mask the returned SEG must reach on the held-out case: the shipped
#: CPU model 1.2.0 reaches 0.905 on it through DICOM (config/models/la-lge/test/dicom_path.json;
#: 1.1.0 0.909; 1.0.0 reached 0.855, so a return to those weights fails; revisit after a
#: retraining). The same SEG
#: mirrored left-right or shifted by SHIFT voxels (3.1 mm) along any axis, either way, does
#: not. A mask one slice off is caught by the exact comparison with the network's own output
#: (MIN_SAME).
MIN_DICE = 0.885
SHIFT = 5
#: Dice between the SEG and the same network run without DICOM: exact geometry.
MIN_SAME = 0.995

#: The route of the default config/node.yaml (kept in step by test_default_route_matches).
LA_ROUTE = {
    "name": "la-lge",
    "match": {"Modality": ["MR"], "BodyPartExamined": ["HEART"], "MRAcquisitionType": ["3D", ""]},
    "model": str(LA_PACKAGE),
    "send_to": ["pacs"],
}


@pytest.fixture(scope="module")
def case() -> tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]:
    require_shared_data("la-mri")
    name = held_out_cases()[0]
    return (name, *read_case(name))


@pytest.fixture(scope="module")
def direct(case: tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]) -> np.ndarray:
    """The package's mask of the case on the NIfTI grid, without DICOM."""
    _, image, _, spacing = case
    package = load_package(LA_PACKAGE)
    z, y, x = spacing
    shape = image.shape
    placement = volume_placement(
        (shape[2], shape[1], shape[0]),
        (x, y, z),
        (0.0, 0.0, 0.0),
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        package,
    )
    probs = Segmenter(package).predict_volume(image.astype(np.float32), placement)
    masks = postprocess(masks_from_probabilities(probs, package), package, per_frame=False)
    return masks[..., 0]


def sr_volume_ml(path: Path) -> float:
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    values = [
        float(m.value)
        for g in report.get_volumetric_roi_measurement_groups()
        if g.reference_type.meaning == "Referenced Segment"
        for m in g.get_measurements()
        if m.name.meaning == "Volume" and m.unit.value == "ml"
    ]
    assert len(values) == 1, values
    return values[0]


def check_geometry(seg_path: Path, files: list[Path]) -> np.ndarray:
    """Each SEG frame lies on the plane of the source frame it names; return the masks on
    the source frames in slice order (the NIfTI's z order)."""
    seg = dcmread(seg_path)
    series = load_series(files)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(orientation, series.direction_cosines, atol=1e-6)
    position = {key: series.positions_mm[i] for i, key in enumerate(series.frame_keys)}  # type: ignore[index]
    for item in seg.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        key = (str(src.ReferencedSOPInstanceUID), int(src.get("ReferencedFrameNumber", 1)))
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, position[key], atol=1e-3)
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    return read_seg_masks(seg, series.frame_keys)[..., 0]


def check_results(
    out: dict[str, Path],
    files: list[Path],
    truth: np.ndarray,
    direct: np.ndarray,
    spacing: tuple[float, float, float],
) -> float:
    assert set(out) == {"SEG", "SR"}
    for path in out.values():
        assert dciodvfy_errors(path) == [], path
    masks = check_geometry(out["SEG"], files)
    assert masks.shape == truth.shape
    # Exact geometry: what the network makes of the NIfTI volume, voxel for voxel.
    same = dice(masks, direct)
    assert same >= MIN_SAME
    assert dice(masks, np.roll(direct, 1, axis=0)) < MIN_SAME  # one slice off
    assert dice(masks, direct[:, :, ::-1]) < MIN_SAME  # mirrored left-right
    assert dice(masks, np.roll(direct, 1, axis=2)) < MIN_SAME  # one column off
    # Against the expert: good, and not if mirrored or shifted.
    found = dice(masks, truth)
    assert found >= MIN_DICE
    assert dice(masks[:, :, ::-1], truth) < MIN_DICE
    for axis in (0, 1, 2):
        for shift in (SHIFT, -SHIFT):
            assert dice(np.roll(masks, shift, axis=axis), truth) < MIN_DICE, (axis, shift)
    # The SR's volume: the SEG's voxels times the voxel volume, to 0.1 ml, near the expert's.
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volume = sr_volume_ml(out["SR"])
    assert volume == pytest.approx(round(int(masks.sum()) * voxel_ml, 1), abs=0.051)
    assert volume == pytest.approx(int(truth.sum()) * voxel_ml, rel=0.2)
    return found


def run_node(node_factory: Callable[..., NodeProcess], storescp: StoreSCP) -> NodeProcess:
    return node_factory(LA_PACKAGE, storescp.port, routes=[LA_ROUTE]).start()


def test_default_route_sends_only_3d_heart_mr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_NODE_STORAGE_DIR", raising=False)
    settings = load_settings(REPO / "config" / "node.yaml")
    (route,) = [r for r in settings.routes if r.name == "la-lge"]
    assert route.model == LA_PACKAGE
    assert {k: list(v) for k, v in route.match.items()} == LA_ROUTE["match"]
    lge = {"Modality": "MR", "BodyPartExamined": "HEART", "MRAcquisitionType": "3D"}
    legacy_converted = {"Modality": "MR", "BodyPartExamined": "HEART"}
    assert [r.name for r in routes_for(settings.routes, lge)] == ["la-lge"]
    assert [r.name for r in routes_for(settings.routes, legacy_converted)] == ["la-lge"]
    for other in (
        {**lge, "MRAcquisitionType": "2D"},  # a cine or 2D LGE stack
        {**lge, "BodyPartExamined": "BRAIN"},
        {**lge, "Modality": "CT"},
        {"Modality": "MR", "MRAcquisitionType": "3D"},  # body part unknown
    ):
        assert routes_for(settings.routes, other) == [], other


@pytest.mark.peers
def test_oblique_reversed_compressed_single_frame_series(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    case: tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]],
    direct: np.ndarray,
) -> None:
    _, image, truth, spacing = case
    node = run_node(node_factory, storescp)
    slices = mr_slices(image, spacing)  # reverse slice order, oblique
    # Sent first and numbered 1: the last slice along the normal.
    normal = np.cross(*np.reshape(slices[0].ImageOrientationPatient, (2, 3)))
    along = [float(np.dot(ds.ImagePositionPatient, normal)) for ds in slices]
    assert slices[0].InstanceNumber == 1 and along == sorted(along, reverse=True)
    assert [round(float(v), 3) for v in slices[0].ImageOrientationPatient[:3]] != [1, 0, 0]
    for ds in slices:  # as many scanners send them: JPEG-LS lossless
        ds.compress(JPEGLSLossless)
    files = write_files(slices, tmp_path / "mr")
    done = storescu(node.port, files, "-xt")
    assert done.returncode == 0, done.stderr
    out = results(storescp, timeout_s=180)
    check_results(out, files, truth, direct, spacing)


@pytest.mark.peers
def test_enhanced_mr_object(
    tmp_path: Path,
    storescp: StoreSCP,
    node_factory: Callable[..., NodeProcess],
    case: tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]],
    direct: np.ndarray,
) -> None:
    _, image, truth, spacing = case
    node = run_node(node_factory, storescp)
    mf = enhanced_mr(mr_slices(image, spacing))
    files = write_files([mf], tmp_path / "mf")
    started = time.monotonic()
    done = storescu(node.port, files, "-R")  # propose the SOP class of the file
    assert done.returncode == 0, done.stderr
    out = results(storescp, timeout_s=180)
    check_results(out, files, truth, direct, spacing)
    assert time.monotonic() - started < 180
