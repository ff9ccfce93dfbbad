"""One series in, SEG + SR out, on files (the path shared by the worker and `process`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.app.cli import main
from dicom_node.models.inference import Segmenter
from dicom_node.package.manifest import load_package
from dicom_node.work.segment import group_series, segment_series, write_outputs
from tests.factories import ct_series, dx_from_array, write_files


def chest(rows: int = 200, cols: int = 180) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.exp(-(((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3)) ** 2))


def test_two_radiographs_in_one_series_give_one_seg_each(
    tmp_path: Path, random_package: Path
) -> None:
    pa = dx_from_array(chest())
    lateral = dx_from_array(
        chest(220, 160), study_uid=pa.StudyInstanceUID, series_uid=pa.SeriesInstanceUID
    )
    paths = write_files([pa, lateral], tmp_path / "in")
    results = segment_series(paths, Segmenter(load_package(random_package)))
    assert len(results) == 2
    segs = [r.seg for r in results]
    assert segs[0].SeriesInstanceUID == segs[1].SeriesInstanceUID
    assert segs[0].SOPInstanceUID != segs[1].SOPInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for seg in segs
        for ref in seg.ReferencedSeriesSequence
        for item in ref.ReferencedInstanceSequence
    }
    assert referenced == {pa.SOPInstanceUID, lateral.SOPInstanceUID}
    assert {(s.Rows, s.Columns) for s in segs} == {(200, 180), (220, 160)}
    # Deterministic: the same images give the same UIDs again.
    again = segment_series(paths, Segmenter(load_package(random_package)))
    assert [r.seg.SOPInstanceUID for r in again] == [s.SOPInstanceUID for s in segs]


def test_write_outputs_and_group_series(tmp_path: Path, random_package: Path) -> None:
    ct = ct_series(n_slices=4)
    write_files(ct, tmp_path / "in" / "ct")
    write_files([dx_from_array(chest())], tmp_path / "in" / "dx")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    groups = group_series(tmp_path / "in")
    assert sorted(len(v) for v in groups.values()) == [1, 4]
    results = segment_series(
        groups[ct[0].SeriesInstanceUID], Segmenter(load_package(random_package))
    )
    written = write_outputs(results, tmp_path / "out")
    assert [dcmread(w.path).Modality for w in written] == ["SEG", "SR"]
    assert [w.kind.value for w in written] == ["seg", "sr"]
    assert [str(dcmread(w.path).SOPInstanceUID) for w in written] == [w.sop_uid for w in written]


def test_process_command(
    tmp_path: Path, random_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_files(ct_series(n_slices=3), tmp_path / "in")
    code = main(
        ["process", "--model", str(random_package), str(tmp_path / "in"), str(tmp_path / "out")]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and all(Path(p).is_file() for p in printed)


def test_process_command_says_what_is_wrong(
    tmp_path: Path, random_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code = main(
        ["process", "--model", str(random_package), str(tmp_path / "empty"), str(tmp_path / "out")]
    )
    assert code == 2
    assert "no DICOM files found" in capsys.readouterr().err
    code = main(
        [
            "process",
            "--model",
            str(tmp_path / "nope"),
            str(tmp_path / "empty"),
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "model.yaml" in capsys.readouterr().err


def test_process_goes_on_past_a_failing_series_and_names_it(
    tmp_path: Path, random_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ct_series(n_slices=2)
    for ds in bad:
        del ds.FrameOfReferenceUID
    good = ct_series(n_slices=3)
    write_files(bad, tmp_path / "in" / "a-bad")  # sorted first: the good one comes after
    write_files(good, tmp_path / "in" / "b-good")
    code = main(
        ["process", "--model", str(random_package), str(tmp_path / "in"), str(tmp_path / "out")]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 2  # the good series' SEG + SR
    err = captured.err
    assert f"series {bad[0].SeriesInstanceUID} (2 file(s)) failed: InputError: " in err
    assert "FrameOfReferenceUID (0020,0052)" in err
    assert f"series {good[0].SeriesInstanceUID}: 3 instance(s)" in err
    assert "1 series ok, 1 failed" in err
    assert str(bad[0].PatientID) not in err
