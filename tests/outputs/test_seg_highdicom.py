"""Every bundled model's SEG round-trips through ``highdicom.seg.segread`` and dciodvfy.

One input of the kind each package of ``config/models/`` segments, built by the factories
(no shared data needed) and read as the node reads it (:func:`load_series`): a DX chest
radiograph (cxr-anatomy), a colour JPEG breast ultrasound image (busi-lesion) and a 3D MR
series of single-frame slices (la-lge). Each SEG is written by :func:`build_seg` with the
package's own structures, read back with highdicom's reader (segments and masks compared with
what was written) and checked with dciodvfy. (OHIF showing the radiograph's SEG, which needs
its Pixel Measures Sequence, is judged in ``tests/viewer/test_ohif.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.outputs.seg import NOMINAL_SLICE_THICKNESS_MM, build_seg
from dicom_node.package.manifest import ModelPackage, load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.factories import REPO, dx_from_array, mr_series, us_from_array, write_files

MODELS = REPO / "config" / "models"

#: Skipped with the reason without dciodvfy; failed under DICOM_NODE_REQUIRE_PEERS=1.
needs_dciodvfy = pytest.mark.needs_tool("dciodvfy")


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.asarray((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2)


def radiograph(folder: Path) -> tuple[list[Path], np.ndarray]:
    """A 96 x 80 DX chest radiograph and five overlapping masks (lungs, heart, clavicles)."""
    shape = (96, 80)
    pixels = np.random.default_rng(1).integers(0, 4096, shape)
    files = write_files([dx_from_array(pixels)], folder)
    masks = np.stack(
        [
            _disc(shape, (48, 22), 18),
            _disc(shape, (48, 58), 18),
            _disc(shape, (60, 45), 14),  # overlaps the left lung
            _disc(shape, (10, 20), 5),
            np.zeros(shape, dtype=bool),  # an empty segment keeps its frame
        ],
        axis=-1,
    )[None]
    return files, masks


def ultrasound(folder: Path) -> tuple[list[Path], np.ndarray]:
    """A 72 x 88 colour JPEG breast ultrasound image and one lesion mask."""
    shape = (72, 88)
    gray = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    files = write_files([us_from_array(gray)], folder)
    return files, _disc(shape, (36, 40), 12)[None, ..., None]


def mr_volume(folder: Path) -> tuple[list[Path], np.ndarray]:
    """A 3D MR series of 6 single-frame slices (sent in reverse order) and a left atrium mask
    on some of them, in the frame order of the loaded series (along the normal)."""
    volume = np.random.default_rng(3).integers(0, 1000, (6, 40, 48)).astype(np.float64)
    slices = mr_series(
        volume,
        spacing_mm=(2.0, 1.25, 1.25),
        study_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
    )
    files = write_files(slices[::-1], folder)
    masks = np.zeros((6, 40, 48, 1), dtype=bool)
    for k in (2, 3, 4):
        masks[k, ..., 0] = _disc((40, 48), (20, 24), 6 + k)
    return files, masks


#: package folder -> builder of (input files, masks in the loaded series' frame order)
CASES: dict[str, Callable[[Path], tuple[list[Path], np.ndarray]]] = {
    "cxr-anatomy": radiograph,
    "busi-lesion": ultrasound,
    "la-lge": mr_volume,
}


def test_every_bundled_model_is_covered() -> None:
    bundled = sorted(p.parent.name for p in MODELS.glob("*/model.yaml"))
    assert bundled == sorted(CASES)


def write_seg(series: ImageSeries, masks: np.ndarray, package: ModelPackage, path: Path) -> Path:
    series_uid, sop_uid = output_uids(
        series.series_instance_uid, package.name, package.version, "seg", series.sop_instance_uids
    )
    seg = build_seg(series, masks, package, series_uid=series_uid, sop_uid=sop_uid)
    seg.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("model", sorted(CASES))
def test_seg_round_trips_through_highdicom(model: str, tmp_path: Path) -> None:
    package = load_package(MODELS / model)
    files, masks = CASES[model](tmp_path / "input")
    series = load_series(files)
    assert masks.shape == (*series.shape, len(package.structures))

    path = write_seg(series, masks, package, tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)  # highdicom 0.28.2 refused the radiograph's SEG here

    assert seg.number_of_segments == len(package.structures)
    for number, structure in enumerate(package.structures, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == structure.name
        assert description.tracking_id == structure.label
        assert description.segmented_property_type == structure.type
    uids = [uid for uid, _ in series.frame_keys]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        combine_segments=False,
        skip_overlap_checks=True,
    )
    assert pixels.shape == masks.shape
    for index, structure in enumerate(package.structures):
        assert np.array_equal(pixels[..., index].astype(bool), masks[..., index]), structure.label
    assert masks.any()
    source = series.datasets[0]
    shared = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0]
    if "PixelSpacing" not in source:  # the ultrasound image: no Pixel Measures to give
        assert "PixelMeasuresSequence" not in shared
    else:
        measures = shared.PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in source.PixelSpacing]
        expected_mm = float(source.get("SliceThickness") or NOMINAL_SLICE_THICKNESS_MM)
        assert float(measures.SliceThickness) == expected_mm


@needs_dciodvfy
@pytest.mark.parametrize("model", sorted(CASES))
def test_seg_of_every_bundled_model_is_valid(model: str, tmp_path: Path) -> None:
    package = load_package(MODELS / model)
    files, masks = CASES[model](tmp_path / "input")
    path = write_seg(load_series(files), masks, package, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
