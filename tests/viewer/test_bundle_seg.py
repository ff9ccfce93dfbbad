"""The SEG of a MONAI bundle route (spleen_ct_segmentation on the real Siemens CT, JPEG 2000)
in OHIF, judged from pixels like the node's own SEGs (:mod:`tests.viewer.test_ohif`).

Seeded random weights of the bundle's UNet paint a fine grid over the whole CT, which no
viewer judgement can tell from its mirror image. Here the bundle's ``network_def`` is a 1 x 1
x 1 convolution instead, "spleen" where the bundle's soft-tissue window puts a voxel above its
middle (about 53 HU: the contrast-filled liver, spleen, vessels, bone), so the SEG shows
anatomy, left and right differ, and a mirrored SEG fails the judge; everything else is the
bundle's own pipeline (orientation, 1.5 x 1.5 x 2 mm spacing, window, sliding window, softmax,
Invertd back onto 512 x 512, argmax).

The SEG and SR are what the route's worker writes (``load_model`` on the bundle folder with
its ``dicom-node.yaml``, ``segment_series``); ``tests/work/test_bundle_route.py`` shows the same
objects come out of a running node over DIMSE and equal MONAI's own runner's labels.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.common.output_kinds import OutputKind
from dicom_node.models.formats import load_model
from dicom_node.work.segment import segment_series
from tests.conftest import require_shared_data
from tests.factories import write_files
from tests.models.formats.test_bundle import BUNDLES, _require_ignite
from tests.viewer.conftest import Viewer, upload
from tests.viewer.peers import DicomWebOrthanc
from tests.viewer.server import ViewerServer
from tests.viewer.test_ohif import Study, seg_verdict
from tests.work.test_bundle_route import (
    SPLEEN_MAPPING,
    seg_labels,
    spleen_ct,
)

pytestmark = [
    pytest.mark.peers,
    pytest.mark.viewer,
    pytest.mark.slow,
    pytest.mark.shared_data(*BUNDLES),
    pytest.mark.shared_data("reference", "ct-siemens-j2k"),
]


def window_bundle(bundle: Path) -> Path:
    """The spleen bundle's configs with a 1 x 1 x 1 convolution as its network: logits
    ``(10 - 20 x, 20 x - 10)`` of the windowed intensity ``x`` in 0..1."""
    shutil.copytree(
        require_shared_data(*BUNDLES, "spleen_ct_segmentation") / "configs", bundle / "configs"
    )
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["network_def"] = {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": 1,
    }
    config_file.write_text(json.dumps(config))
    network = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1, 1))
        network.bias.copy_(torch.tensor([10.0, -10.0]))
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.mark.skipif(
    os.environ.get("DICOM_NODE_VIEWER_J2K") != "1",
    reason="flaky in CI: OHIF sometimes takes over 60 s to decode and show the JPEG 2000 CT "
    "stack (2 of 4 runs passed); run with DICOM_NODE_VIEWER_J2K=1 until it is made reliable",
)
@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
def test_a_bundle_seg_on_a_real_ct_is_shown_in_place(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    _require_ignite()
    bundle = window_bundle(tmp_path / "spleen_ct_segmentation")
    (bundle / "dicom-node.yaml").write_text(SPLEEN_MAPPING)
    source = spleen_ct(tmp_path / "ct")
    segmenter = load_model(bundle, torch.device("cpu"))
    (result,) = segment_series(source, segmenter, [OutputKind.SEG, OutputKind.SR])
    seg, sr = result.seg, result.sr
    written = write_files([seg, sr], tmp_path / "outputs")
    upload(orthanc_dicomweb, [*source, *written])  # the CT as sent: JPEG 2000
    seg_path, sr_path = written
    uids = [str(ds.SOPInstanceUID) for ds in result.series.datasets]
    masks = (seg_labels(seg_path, uids, {1: 1}) == 1)[..., None]
    assert 0.1 < masks.mean() < 0.9
    colours = np.array([s.color_rgb for s in segmenter.package.structures], dtype=float)
    study = Study(
        result.series,
        masks,
        colours,
        str(result.series.datasets[0].StudyInstanceUID),
        sr_path,
    )
    verdict = seg_verdict(viewer, viewer_server, study)
    assert verdict.failures == [], verdict
    assert viewer.type_errors() == []

    # The same screenshots judged against the mirrored masks: the judge can tell.
    study.masks[:] = study.masks[:, :, ::-1].copy()
    mirrored = seg_verdict(viewer, viewer_server, study)
    assert any("outside every segment" in f for f in mirrored.failures), mirrored
