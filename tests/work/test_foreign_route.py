"""A route naming a foreign model (an nnU-Net-style folder run by a test VolumeRunner) through
a running node: CT by C-STORE in, a dciodvfy-clean SEG and an SR at the PACS, the SEG the
runner's label map; a broken model stops the node at start, in one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.app.node import Node
from dicom_node.common.errors import ModelPackageError
from dicom_node.config.settings import parse_settings
from dicom_node.imaging.series import load_series
from dicom_node.models import formats
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.conftest import StoreSCP, free_port, storescu, wait_for
from tests.factories import ct_series, write_files
from tests.models.fake_runner import ThresholdRunner, make_nnunet_folder

MAPPING = """
name: spleen-threshold
version: "2.0"
modalities: [CT]
structures:
  spleen: {category: SCT.AnatomicalStructure, type: SCT.Spleen, color: [255, 128, 0]}
measurements: [volume]
options: {threshold: -500}
"""


@pytest.fixture(autouse=True)
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(formats.RUNNERS, formats.NNUNET, "tests.models.fake_runner:ThresholdRunner")
    ThresholdRunner.seen.clear()
    yield


def settings(tmp_path: Path, model: Path, pacs_port: int) -> Any:
    return parse_settings(
        {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "storage_dir": str(tmp_path / "var"),
            "stable_after_s": 60,
            "release_grace_s": 0.5,
            "device": "cpu",
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
            "routes": [
                {
                    "name": "spleen",
                    "match": {"Modality": ["CT"]},
                    "model": str(model),
                    "send_to": ["pacs"],
                }
            ],
        }
    )


@pytest.mark.peers
@pytest.mark.needs_tool("dciodvfy")
def test_a_foreign_model_route_delivers_seg_and_sr(tmp_path: Path, storescp: StoreSCP) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset001_Spleen", MAPPING)
    config = settings(tmp_path, model, storescp.port)
    source = write_files(ct_series(n_slices=6), tmp_path / "ct")
    node = Node(config)
    node.start()  # loads and warms up the foreign model
    try:
        assert ThresholdRunner.seen, "the model ran once at start"
        sent = storescu(config.port, source)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(storescp.files()) >= 2, 120, "SEG and SR at the PACS")
    finally:
        node.stop()
    received = {str(ds.Modality): (p, ds) for p, ds in ((p, dcmread(p)) for p in storescp.files())}
    (seg_path, seg), (_, sr) = received["SEG"], received["SR"]
    assert dciodvfy_errors(seg_path) == []
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    series = load_series(source)
    expected = series.pixels > -500
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    assert frames.sum() == expected.sum()
    assert expected.any()
    assert any("spleen-threshold" in str(element.value) for element in sr.iterall())


def test_a_broken_foreign_model_stops_the_node_at_start(tmp_path: Path) -> None:
    model = make_nnunet_folder(tmp_path / "Dataset002_Spleen", MAPPING)
    (model / "plans.json").unlink()
    node = Node(settings(tmp_path, model, free_port()))
    with pytest.raises(ModelPackageError) as exc:
        node.start()
    node.stop()
    assert str(exc.value) == (
        f"{model}: an nnU-Net v2 model without plans.json; it is incomplete (copy the whole "
        "model folder)"
    )
