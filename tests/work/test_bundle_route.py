"""MONAI Model Zoo bundles as routes of a running node, end to end over DIMSE.

- The real Siemens CT series (20 slices, JPEG 2000) by DCMTK ``storescu`` through a route to
  the spleen_ct_segmentation bundle: the SEG at a DCMTK ``storescp`` is MONAI's own bundle
  runner's label map (``monai.bundle.run`` on the series read by SimpleITK into NIfTI), voxel
  for voxel; SEG and SR dciodvfy-clean; the SEG readable by highdicom.
- Four MR series of one study (made from one real LGE-MRI volume with four intensity
  mappings, one Frame of Reference) as the four roles of a study route to the
  brats_mri_segmentation bundle (4 channels): the SEG on the reference series is MONAI's label
  map for the four channels stacked, labels 1, 2 and 4 named and coded by ``dicom-node.yaml``.

The published weights cannot be downloaded here: as in ``tests/models/formats/test_bundle.py``
each bundle gets its network from its own ``network_def`` with seeded random weights. The
mappings (printed in ``docs/model-package.md``) shrink the sliding window through
``options.overrides`` so that a run takes seconds on a CPU; MONAI's runner gets the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK
import torch
import yaml

from dicom_node.app.node import Node
from dicom_node.config.settings import parse_settings
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.conftest import StoreSCP, free_port, require_shared_data, storescu, wait_for
from tests.factories import la_mri_cases, la_mri_volume, mr_series, write_files
from tests.models.formats.test_bundle import (
    BUNDLES,
    _require_ignite,
    make_bundle,
    monai_bundle_run,
)

#: monai.bundle.run warns that configs are code: these are the published ones, copied.
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")


def end_to_end(test: Any) -> Any:
    """The marks of a test through a running node with DCMTK peers and a bundle."""
    for mark in (
        pytest.mark.peers,
        pytest.mark.slow,
        pytest.mark.needs_tool("dciodvfy"),
        pytest.mark.shared_data(*BUNDLES),
    ):
        test = mark(test)
    return test


#: The spleen bundle's mapping, as docs/model-package.md prints it.
SPLEEN_MAPPING = """\
name: spleen-ct
modalities: [CT]
structures:
  spleen: {category: SCT.AnatomicalStructure, type: SCT.Spleen, color: [220, 60, 60]}
measurements: [volume]
options:
  # the published window is 96 x 96 x 96 with overlap 0.5 (36 windows on this CT);
  # one window layer without overlap keeps the test to seconds on a CPU
  overrides: {"inferer#roi_size": [160, 160, 32], "inferer#overlap": 0.0}
"""

#: The BraTS bundle's mapping: its four channels as case roles, its label values named.
BRATS_MAPPING = """\
name: brats-mri
modalities: [MR]
inputs:
  - {channel: T1c, role: t1c}
  - {channel: T1, role: t1}
  - {channel: T2, role: t2}
  - {channel: FLAIR, role: flair}
reference: t1c
structures:
  necrotic_core:
    {category: SCT.MorphologicallyAbnormalStructure, type: SCT.Necrosis, color: [255, 0, 0]}
  edema:
    {category: SCT.MorphologicallyAbnormalStructure, type: SCT.Edema, color: [0, 200, 0]}
  enhancing_tumor:
    {category: SCT.MorphologicallyAbnormalStructure, type: SCT.Neoplasm, color: [255, 255, 0]}
measurements: [volume]
options:
  # what the bundle's postprocessing writes (metadata names overlapping sigmoid channels)
  labels: {1: necrotic_core, 2: edema, 4: enhancing_tumor}
  # the published window is 240 x 240 x 160; the test volume is 48 x 48 x 48
  overrides: {"inferer#roi_size": [48, 48, 48]}
"""

#: The BraTS route's inputs, as docs/model-package.md prints them: ``*T1*`` matches the T1c
#: series too; the role with fewer candidates (t1c) chooses first.
BRATS_INPUTS = [
    {"role": "t1c", "select": {"SeriesDescription": ["*T1C*", "*T1*GD*"]}},
    {"role": "t1", "select": {"SeriesDescription": ["*T1*"]}},
    {"role": "t2", "select": {"SeriesDescription": ["*T2*"]}},
    {"role": "flair", "select": {"SeriesDescription": ["*FLAIR*"]}},
]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "model-package.md"


def test_the_docs_print_the_tested_mappings_and_route() -> None:
    docs = DOCS.read_text()
    assert SPLEEN_MAPPING in docs
    assert BRATS_MAPPING in docs
    for item in BRATS_INPUTS:
        select = item["select"]
        assert isinstance(select, dict)
        patterns = ", ".join(f'"{p}"' for p in select["SeriesDescription"])
        assert f"- {{role: {item['role']}, select: {{SeriesDescription: [{patterns}]}}}}" in docs


def node_settings(tmp_path: Path, pacs_port: int, route: dict[str, Any]) -> Any:
    return parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "stable_after_s": 60,
            "release_grace_s": 0.5,
            "device": "cpu",
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
            "routes": [{**route, "send_to": ["pacs"]}],
        }
    )


def run_node(
    settings: Any, batches: list[list[Path]], storescp: StoreSCP, *storescu_options: str
) -> dict[str, Path]:
    """Start the node (it loads and warms up the bundle), send each batch by ``storescu``
    (with ``storescu_options``), wait for the SEG and the SR at the PACS; their files by
    Modality."""
    node = Node(settings)
    node.start()
    try:
        for paths in batches:
            sent = storescu(settings.port, paths, *storescu_options)
            assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(storescp.files()) >= 2, 600, "SEG and SR at the PACS")
    finally:
        node.stop()
    return {str(pydicom.dcmread(p, stop_before_pixels=True).Modality): p for p in storescp.files()}


def read_series(folder: Path) -> tuple[Any, list[str]]:
    """The series in ``folder`` as SimpleITK reads it (Modality LUT applied, slices sorted
    along the normal) and the SOP Instance UIDs of its slices in that order."""
    reader: Any = SimpleITK.ImageSeriesReader()  # type: ignore[no-untyped-call]
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return reader.Execute(), uids


def as_nifti(image: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    cast: Any = SimpleITK.Cast  # untyped
    SimpleITK.WriteImage(cast(image, SimpleITK.sitkFloat32), str(path))
    return str(path)


def seg_labels(seg_path: Path, uids: list[str], values: dict[int, int]) -> np.ndarray:
    """The SEG read by highdicom as a label map ``(z, y, x)`` over the source slices
    ``uids``: segment number -> label value ``values``."""
    seg = highdicom.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=sorted(values),
        assert_missing_frames_are_empty=True,
    )
    out = np.zeros(pixels.shape[:3], dtype=np.int64)
    for i, number in enumerate(sorted(values)):
        assert not (out[pixels[..., i] > 0]).any(), "segments of a label map do not overlap"
        out[pixels[..., i] > 0] = values[number]
    return out


#: The spleen network's last layer, whose bias says how much "spleen" a voxel starts with.
SPLEEN_OUTPUT_BIAS = "model.2.1.conv.unit0.conv.bias"


def lower_spleen_bias(bundle: Path, by: float) -> None:
    """Seeded random weights call 99 % of this CT spleen; ``by`` less bias for the spleen
    channel makes a label map of both labels in good measure (what the test can tell apart)."""
    file = bundle / "models" / "model.pt"
    state = torch.load(file)
    state[SPLEEN_OUTPUT_BIAS][1] -= by
    torch.save(state, file)


def spleen_ct(folder: Path) -> list[Path]:
    """The real Siemens CT series as a scanner sends it (JPEG 2000), with the UIDs the test
    files lost given back."""
    source = require_shared_data("reference", "ct-siemens-j2k")
    folder.mkdir(parents=True)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        paths.append(folder / path.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@end_to_end
@pytest.mark.shared_data("reference", "ct-siemens-j2k")
def test_real_ct_through_a_spleen_bundle_route(tmp_path: Path, storescp: StoreSCP) -> None:
    _require_ignite()
    bundle = make_bundle(tmp_path, "spleen_ct_segmentation")
    lower_spleen_bias(bundle, 0.18)
    (bundle / "dicom-node.yaml").write_text(SPLEEN_MAPPING)
    source = spleen_ct(tmp_path / "ct")
    assert pydicom.dcmread(source[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    route = {"name": "spleen", "match": {"Modality": ["CT"]}, "model": str(bundle)}
    settings = node_settings(tmp_path, storescp.port, route)
    # -xv: propose JPEG 2000 lossless, so that the slices go as the scanner made them
    received = run_node(settings, [source], storescp, "-xv")

    seg_path, sr_path = received["SEG"], received["SR"]
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    seg = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "spleen-ct"

    # MONAI's own runner on the series as SimpleITK reads it, with the mapping's overrides.
    image, uids = read_series(tmp_path / "ct")
    overrides = yaml.safe_load(SPLEEN_MAPPING)["options"]["overrides"]
    files = [as_nifti(image, tmp_path / "nifti" / "ct.nii.gz")]
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval", overrides)
    assert theirs.shape == (20, 512, 512)
    assert 0.1 < np.mean(theirs == 1) < 0.9, "a label map the test can tell from empty/full"
    ours = seg_labels(seg_path, uids, {1: 1})
    np.testing.assert_array_equal(ours, theirs)


def brats_study(folder: Path) -> dict[str, list[Path]]:
    """Four MR series of one study and Frame of Reference from a 48-voxel cube of a real
    LGE-MRI, each with its own intensity mapping (as the bundle tests make channels) and
    Series Description ``BRAIN <ROLE> 3D``; the files by role."""
    require_shared_data("la-mri")
    data, spacing = la_mri_volume(la_mri_cases()[0])
    size = 48
    starts = [max(0, (n - size) // 2) for n in data.shape]
    crop = data[tuple(slice(s, s + size) for s in starts)].astype(np.float64)
    contrasts = {
        "t1c": crop,
        "t1": crop**1.5 / 16,
        "t2": crop.max() - crop,
        "flair": np.sqrt(crop) * 8,
    }
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = {}
    for number, (role, values) in enumerate(contrasts.items(), start=1):
        series = mr_series(
            values,
            spacing_mm=spacing,
            study_uid=study,
            frame_of_reference_uid=frame,
            origin_mm=(10.0, -20.0, 30.0),
            series_number=number,
            description=f"BRAIN {role.upper()} 3D",
        )
        for ds in series:
            ds.BodyPartExamined = "BRAIN"
        paths[role] = write_files(series, folder / role)
    return paths


@end_to_end
@pytest.mark.shared_data("la-mri")
def test_four_mr_series_of_a_study_through_a_brats_bundle_route(
    tmp_path: Path, storescp: StoreSCP
) -> None:
    _require_ignite()
    bundle = make_bundle(tmp_path, "brats_mri_segmentation")
    (bundle / "dicom-node.yaml").write_text(BRATS_MAPPING)
    paths = brats_study(tmp_path / "mr")
    route = {"name": "brats", "trigger": "study", "model": str(bundle), "inputs": BRATS_INPUTS}
    settings = node_settings(tmp_path, storescp.port, route)
    order = ["flair", "t2", "t1", "t1c"]  # arrival order does not matter
    received = run_node(settings, [paths[role] for role in order], storescp)

    seg_path, sr_path = received["SEG"], received["SR"]
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    seg, sr = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)
    series_uid = {role: str(pydicom.dcmread(p[0]).SeriesInstanceUID) for role, p in paths.items()}
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series_uid["t1c"]]
    evidence = {
        str(item.SeriesInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for item in study.ReferencedSeriesSequence
    }
    assert evidence == {*series_uid.values(), seg.SeriesInstanceUID}
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    names = [segments[n].SegmentLabel for n in sorted(segments)]
    assert names == ["Necrotic core", "Edema", "Enhancing tumor"]
    codes = [segments[n].SegmentedPropertyTypeCodeSequence[0].CodeValue for n in sorted(segments)]
    assert codes == ["6574001", "79654002", "108369006"]  # SCT Necrosis, Edema, Neoplasm

    # MONAI's own runner on the four series as SimpleITK reads them, in the bundle's channel
    # order (T1c, T1, T2, FLAIR), with the mapping's overrides.
    files: list[str] = []
    uids: list[str] = []
    for role in ("t1c", "t1", "t2", "flair"):
        image, role_uids = read_series(paths[role][0].parent)
        files.append(as_nifti(image, tmp_path / "nifti" / f"{role}.nii.gz"))
        uids = uids or role_uids  # the reference's slices
    overrides = yaml.safe_load(BRATS_MAPPING)["options"]["overrides"]
    theirs = monai_bundle_run(bundle, files, tmp_path / "eval", overrides)
    assert {0, 1, 2, 4} <= set(np.unique(theirs).tolist())
    ours = seg_labels(seg_path, uids, {1: 1, 2: 2, 3: 4})
    np.testing.assert_array_equal(ours, theirs)
