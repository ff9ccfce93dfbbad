"""``dicom-node process --config``: each series runs on the model of the routes that match it,
as the node routes it; a series no route takes is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import dcmread

from dicom_node.app.cli import main
from dicom_node.testing.random_package import make_random_package
from tests.factories import ct_series, dx_from_array, write_files


def chest(rows: int = 128, cols: int = 112) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.exp(-(((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3)) ** 2))


def test_process_routes_each_series_by_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_random_package(tmp_path / "ct-model", name="ct-model", modalities=("CT",))
    make_random_package(tmp_path / "dx-model", name="dx-model", modalities=("DX",))
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_dir": str(tmp_path / "var"),
                "routes": [
                    {"name": "ct", "match": {"Modality": ["CT"]}, "model": "ct-model"},
                    {"name": "dx", "match": {"Modality": ["DX"]}, "model": "dx-model"},
                    {"name": "mr", "match": {"Modality": ["MR"]}, "model": "ct-model"},
                ],
            }
        )
    )
    ct = ct_series(n_slices=3)
    dx = dx_from_array(chest())
    unrouted = ct_series(n_slices=2)
    for ds in unrouted:
        ds.Modality = "OT"
    write_files(ct, tmp_path / "in" / "ct")
    write_files([dx], tmp_path / "in" / "dx")
    write_files(unrouted, tmp_path / "in" / "ot")

    code = main(["process", "--config", str(config), str(tmp_path / "in"), str(tmp_path / "out")])
    assert code == 0
    out, err = capsys.readouterr()
    model_of = {}  # series the SEG is on -> the model that made it
    for path in map(Path, out.split()):
        seg = dcmread(path)
        if seg.Modality == "SEG":
            (series,) = seg.ReferencedSeriesSequence
            (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
            model_of[series.SeriesInstanceUID] = algorithm.AlgorithmName
    assert model_of == {ct[0].SeriesInstanceUID: "ct-model", dx.SeriesInstanceUID: "dx-model"}
    assert f"series {ct[0].SeriesInstanceUID}, route ct: 3 instance(s) -> 1 seg, 1 sr" in err
    assert f"series {dx.SeriesInstanceUID}, route dx: 1 instance(s) -> 1 seg, 1 sr" in err
    assert f"series {unrouted[0].SeriesInstanceUID} (2 file(s)): no route matches it" in err
    assert "2 run(s) ok, 0 failed, 1 series matched no route" in err
