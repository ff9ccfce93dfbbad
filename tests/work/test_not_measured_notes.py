"""A projection series with an image the model refuses: the SR says which image was not
measured and why (issue 18: a PA and a lateral in one series, the SR was silent about the
lateral).

The shipped chest model (PA and AP views) runs on CPU on synthetic radiographs (no shared
data needed): what it finds on noise does not matter here, only what the SR says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.common.errors import NotApplicableError
from dicom_node.models.inference import Segmenter
from dicom_node.package.manifest import load_package
from dicom_node.work.segment import segment_series
from tests.factories import REPO, dx_from_array, write_files
from tests.work.test_orientation_and_views import sr_notes

PACKAGE = REPO / "config" / "models" / "cxr-anatomy"


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(load_package(PACKAGE), torch.device("cpu"))


def radiographs(views: list[str]) -> list[pydicom.Dataset]:
    """One series of 96 x 96 radiographs, one per view, numbered 1, 2, ... in that order."""
    rng = np.random.default_rng(0)
    first = dx_from_array(rng.integers(0, 4096, (96, 96)))
    out = []
    for number, view in enumerate(views, start=1):
        ds = first if number == 1 else dx_from_array(rng.integers(0, 4096, (96, 96)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
        ds.InstanceNumber = number
        ds.ViewPosition = view
        if view == "LL":
            ds.PatientOrientation = ["A", "F"]
        out.append(ds)
    return out


def test_pa_and_lateral_the_sr_of_the_pa_says_the_lateral_was_not_measured(
    segmenter: Segmenter, tmp_path: Path
) -> None:
    pa, lateral = radiographs(["PA", "LL"])
    (result,) = segment_series(write_files([pa, lateral], tmp_path), segmenter)
    assert result.series.sop_instance_uids == (pa.SOPInstanceUID,)
    notes = [n for n in sr_notes(result.sr) if n.startswith("Not measured")]
    assert notes == [
        f"Not measured: image 2 of the 2 of this series (SOP Instance UID "
        f"{lateral.SOPInstanceUID}, View Position LL) was left out: model cxr-anatomy is "
        "valid for views PA, AP (ViewPosition (0018,5101)), not LL."
    ]


def test_every_measured_image_says_which_were_not(segmenter: Segmenter, tmp_path: Path) -> None:
    images = radiographs(["PA", "LL", "AP", "RL"])
    results = segment_series(write_files(images, tmp_path), segmenter)
    assert sorted(uid for r in results for uid in r.series.sop_instance_uids) == sorted(
        [images[0].SOPInstanceUID, images[2].SOPInstanceUID]
    )
    for result in results:
        notes = [n for n in sr_notes(result.sr) if n.startswith("Not measured")]
        assert len(notes) == 2
        assert any(images[1].SOPInstanceUID in n and "not LL" in n for n in notes)
        assert any(images[3].SOPInstanceUID in n and "not RL" in n for n in notes)


def test_a_series_of_laterals_alone_is_refused(segmenter: Segmenter, tmp_path: Path) -> None:
    with pytest.raises(NotApplicableError, match="not LL"):
        segment_series(write_files(radiographs(["LL", "LL"]), tmp_path), segmenter)


def test_one_pa_has_no_such_note(segmenter: Segmenter, tmp_path: Path) -> None:
    (result,) = segment_series(write_files(radiographs(["PA"]), tmp_path), segmenter)
    assert not [n for n in sr_notes(result.sr) if n.startswith("Not measured")]
