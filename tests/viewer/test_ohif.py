"""OHIF 3.13 in headless Chromium shows our SEGs in place and opens our SRs, judged from pixels.

Each test writes a study (source images, SEG and SR from :mod:`dicom_node.outputs`) into an
Orthanc with its DICOMweb plugin, opens ``/viewer?StudyInstanceUIDs=...`` in OHIF, loads the
SEG as a user does (double-click in the study browser, "Yes" on the prompt), and compares
screenshots of the viewport with the segmentation shown and hidden against the masks, mapped
with the viewport's own image-to-canvas transform (:mod:`tests.viewer.judge`). A SEG flipped
left-right against its radiograph is loaded too and must fail the same judgement: the test
can fail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.measurements import measure
from dicom_node.outputs.seg import build_seg
from dicom_node.outputs.sr import build_sr
from dicom_node.package.manifest import ModelPackage
from tests.conftest import require_shared_data, wait_for
from tests.factories import JSRT, dx_from_array, jsrt_mask, write_files
from tests.outputs.conftest import (
    CHEST_STRUCTURES,
    CT_STRUCTURES,
    ct_volume_series,
    projection_series,
    write_package,
)
from tests.viewer.conftest import STEP_TIMEOUT_S, Viewer, sr_polylines, upload
from tests.viewer.judge import Verdict, drawn_fraction, judge
from tests.viewer.peers import DicomWebOrthanc
from tests.viewer.server import ViewerServer

pytestmark = [pytest.mark.peers, pytest.mark.viewer, pytest.mark.slow]

JSRT_CASE = "JPCNN002"
DX_SIZE = 512  # the JSRT image at half size: 0.7 mm pixels
DX_STRUCTURES = CHEST_STRUCTURES[:3]  # right lung, left lung, heart


@dataclass
class Study:
    """A study written to Orthanc: the source series, its masks and our SEG and SR."""

    series: ImageSeries
    masks: np.ndarray  # (frames, rows, cols, S), what the SEG should show
    colours: np.ndarray  # (S, 3) RGB
    study_uid: str
    sr_path: Path


def _write(
    series: ImageSeries,
    masks: np.ndarray,
    seg_masks: np.ndarray,
    package: ModelPackage,
    folder: Path,
    orthanc: DicomWebOrthanc,
    *,
    strip_sr_geometry: bool = False,
    notes: tuple[str, ...] = (),
) -> Study:
    model = (series.series_instance_uid, package.name, package.version)
    seg_uids = output_uids(*model, "seg", series.sop_instance_uids)
    sr_uids = output_uids(*model, "sr", series.sop_instance_uids)
    seg = build_seg(series, seg_masks, package, series_uid=seg_uids[0], sop_uid=seg_uids[1])
    sr = build_sr(
        series,
        seg,
        seg_masks,
        package,
        measure(series, seg_masks, package),
        series_uid=sr_uids[0],
        sop_uid=sr_uids[1],
        notes=notes,
    )
    if strip_sr_geometry:
        _strip_geometry(sr)
    upload(orthanc, write_files([*series.datasets, seg, sr], folder))
    colours = np.array([s.color_rgb for s in package.structures], dtype=float)
    study_uid = str(series.datasets[0].StudyInstanceUID)
    return Study(series, masks, colours, study_uid, folder / f"{sr.SOPInstanceUID}.dcm")


def _strip_geometry(sr: pydicom.Dataset) -> None:
    """Remove every SCOORD and every group holding one: the SR as it was before outlines."""

    def strip(item: pydicom.Dataset) -> None:
        children = item.get("ContentSequence", [])
        keep = [
            c
            for c in children
            if c.ValueType != "SCOORD"
            and not any(g.ValueType == "SCOORD" for g in c.get("ContentSequence", []))
            or c.ValueType == "NUM"
        ]
        for child in keep:
            strip(child)
        if children:
            item.ContentSequence = keep

    strip(sr)


def dx_study(
    folder: Path,
    orthanc: DicomWebOrthanc,
    *,
    flip_seg: bool = False,
    strip_sr_geometry: bool = False,
) -> Study:
    """A JSRT chest radiograph with its expert lung and heart masks (a new study each call);
    with ``flip_seg`` its SEG is mirrored left-right: the bug the judge must catch; with
    ``strip_sr_geometry`` its SR has no outlines or lines, as before they were written."""
    require_shared_data()
    size = (DX_SIZE, DX_SIZE)
    png = Image.open(JSRT / "images" / f"{JSRT_CASE}.png").convert("L").resize(size)
    ds = dx_from_array(np.asarray(png), spacing_mm=0.7)
    masks = np.stack(
        [
            np.asarray(Image.fromarray(jsrt_mask(JSRT_CASE, s["label"])).resize(size, 0))
            for s in DX_STRUCTURES
        ],
        axis=-1,
    )[None]
    package = write_package(folder / "package", DX_STRUCTURES, ["area", "cardiothoracic_ratio"])
    series = projection_series([ds], "ImagerPixelSpacing")
    seg_masks = np.ascontiguousarray(masks[:, :, ::-1] if flip_seg else masks)
    # The SR carries notes, as the node's do (Qualitative Evaluations, outside the groups).
    notes = ("Patient Orientation (0020,0020) L\\F is the model's: image used as stored.",)
    return _write(
        series,
        masks,
        seg_masks,
        package,
        folder,
        orthanc,
        strip_sr_geometry=strip_sr_geometry,
        notes=notes,
    )


def ct_study(folder: Path, orthanc: DicomWebOrthanc, *, nothing_found: bool = False) -> Study:
    """A synthetic 8-slice CT; two segments that no flip or shift maps onto themselves (or,
    with ``nothing_found``, two empty segments: an SR of notes only)."""
    series = ct_volume_series()
    hu = series.pixels
    _, rows, cols = hu.shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    body = hu > -500.0
    first = body & (cc < 0.55 * cols) & (rr < 0.6 * rows)  # upper left part of the body
    second = np.zeros_like(body)
    second[2:6] = ((rr - 44) ** 2 + (cc - 46) ** 2 <= 36)[None]  # a disc at lower right
    masks = np.stack([first, second], axis=-1)
    if nothing_found:
        masks = np.zeros_like(masks)
    package = write_package(
        folder / "package", CT_STRUCTURES, ["volume"], dims=3, name="abdomen-ct", version="0.3.1"
    )
    return _write(series, masks, masks, package, folder, orthanc)


def seg_verdict(viewer: Viewer, server: ViewerServer, study: Study) -> Verdict:
    """Open ``study`` in OHIF, load its SEG and judge the displayed image's masks."""
    viewer.open_study(server.url, study.study_uid)
    segmentation = viewer.load_seg()
    frame_masks = study.masks.reshape(-1, *study.masks.shape[1:])
    if len(study.series.datasets) > 1:
        # The slice where every segment is largest in sum, shown explicitly.
        best = int(frame_masks.sum(axis=(1, 2)).min(axis=-1).argmax())
        viewer.show_image(str(study.series.datasets[best].SOPInstanceUID))
    uid = viewer.current_sop_instance_uid()
    index = [str(ds.SOPInstanceUID) for ds in study.series.datasets].index(uid)
    shown = viewer.canvas_screenshot()
    viewer.set_segmentation_visible(segmentation, False)
    hidden = viewer.canvas_screenshot(different_from=shown)
    return judge(shown, hidden, viewer.transform(), frame_masks[index], study.colours)


def test_dx_seg_is_shown_in_place_in_its_colours(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    verdict = seg_verdict(viewer, viewer_server, dx_study(tmp_path, orthanc_dicomweb))
    assert verdict.failures == [], verdict
    assert viewer.type_errors() == []


def test_a_flipped_dx_seg_is_caught(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    """Negative control: OHIF shows a mirrored SEG, and the judge says it is misplaced."""
    verdict = seg_verdict(
        viewer, viewer_server, dx_study(tmp_path, orthanc_dicomweb, flip_seg=True)
    )
    failures = verdict.failures
    assert any("inner canvas pixels changed" in f for f in failures), verdict
    assert any("outside every segment" in f for f in failures), verdict


def test_ct_seg_is_shown_in_place_in_its_colours(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    verdict = seg_verdict(viewer, viewer_server, ct_study(tmp_path, orthanc_dicomweb))
    assert verdict.failures == [], verdict
    assert viewer.type_errors() == []


def sr_check(viewer: Viewer, server: ViewerServer, study: Study, measurements: int) -> None:
    """Open the study's SR as a user does: the viewport keeps its image, no TypeError, OHIF
    makes ``measurements`` annotations (one per Tracking UID), and the SR's polylines on the
    displayed image are drawn where they belong."""
    viewer.open_study(server.url, study.study_uid)
    viewer.double_click_series("SR")
    viewer.accept_prompt(timeout_s=5)
    polylines = sr_polylines(pydicom.dcmread(study.sr_path))
    viewer.wait(
        "() => window.cornerstoneTools.annotation.state.getAllAnnotations()"
        f".filter(a => a.metadata.toolName === 'DICOMSRDisplay').length >= {measurements}",
        "the SR's annotations",
    )
    # OHIF draws the annotations after it has re-rendered the image: poll, with a deadline.
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        assert viewer.type_errors() == []
        shown = viewer.canvas_screenshot()
        uid = viewer.current_sop_instance_uid()
        here = [points for image, points in polylines if image == uid]
        assert here, "the SR draws nothing on the image OHIF shows"
        transform = viewer.transform()
        points = np.vstack(here)
        drawn = drawn_fraction(shown, transform, points)
        if drawn > 0.8 or time.monotonic() > deadline:
            break
        viewer.render()
    assert shown.mean() > 30 and shown.std() > 10, "the viewport went black"
    assert drawn > 0.8, f"only {drawn:.0%} of the SR's polyline points are drawn in place"
    # The same polylines moved by 20 image pixels are not where OHIF drew them.
    assert drawn_fraction(shown, transform, points + 20) < 0.5


def test_dx_sr_opens_and_draws_its_outlines(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    study = dx_study(tmp_path, orthanc_dicomweb)
    sr_check(viewer, viewer_server, study, measurements=len(DX_STRUCTURES) + 1)  # and the CTR


def test_ct_sr_opens_and_draws_its_outlines(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    study = ct_study(tmp_path, orthanc_dicomweb)
    sr_check(viewer, viewer_server, study, measurements=len(CT_STRUCTURES))


def test_an_sr_without_geometry_breaks_ohif(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    """Negative control of the SR tests: the report as it was before its outlines (segment
    references only) makes OHIF 3.13 throw the reported TypeError, which the tests catch."""
    study = dx_study(tmp_path, orthanc_dicomweb, strip_sr_geometry=True)
    assert sr_polylines(pydicom.dcmread(study.sr_path)) == []
    viewer.open_study(viewer_server.url, study.study_uid)
    viewer.double_click_series("SR")
    viewer.accept_prompt(timeout_s=5)
    wait_for(
        lambda: any("ReferencedSOPSequence" in e for e in viewer.type_errors()),
        STEP_TIMEOUT_S,
        "OHIF's TypeError on an SR without geometry",
    )


def test_an_sr_of_nothing_found_opens_and_draws_the_region_analysed(
    viewer: Viewer,
    viewer_server: ViewerServer,
    orthanc_dicomweb: DicomWebOrthanc,
    tmp_path: Path,
) -> None:
    """No structure found: the SR's one group is the region analysed (the image border) with
    every structure Absent. OHIF's SR viewport breaks on a report with no drawable group
    ("Cannot destructure property 'displaySetInstanceUID' of 'measurement'"); this opens
    and draws the border in place."""
    study = ct_study(tmp_path, orthanc_dicomweb, nothing_found=True)
    (polyline,) = sr_polylines(pydicom.dcmread(study.sr_path))
    assert len(polyline[1]) == 5  # the closed border of the image
    sr_check(viewer, viewer_server, study, measurements=1)
