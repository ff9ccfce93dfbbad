"""Overlay fallback: outlines judged from pixels, the label, references, UIDs, dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.overlay import (
    LABEL,
    build_overlay,
    build_overlays,
    outline,
    render,
    scale_factor,
    window_to_8bit,
)
from dicom_node.package.manifest import ModelPackage
from dicom_node.testing.dciodvfy import dciodvfy_errors
from tests.factories import PATIENT_NAME, dx_from_array
from tests.outputs.conftest import projection_series

#: Skipped with the reason without dciodvfy; failed under DICOM_NODE_REQUIRE_PEERS=1.
needs_dciodvfy = pytest.mark.needs_tool("dciodvfy")


def uids(series: ImageSeries, package: ModelPackage) -> tuple[str, str]:
    series_uid, sop_uid = output_uids(
        series.series_instance_uid,
        package.name,
        package.version,
        "overlay",
        series.sop_instance_uids,
    )
    return str(series_uid), str(sop_uid)


def overlays(
    series: ImageSeries, masks: np.ndarray, package: ModelPackage
) -> list[pydicom.Dataset]:
    series_uid, sop_uid = uids(series, package)
    return build_overlays(series, masks, package, series_uid=series_uid, sop_uid=sop_uid)


def saved(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """Write ``ds`` as a Part 10 file and read it back (what a PACS receives)."""
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def yellow(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the (anti-aliased) yellow label text."""
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return (r > 100) & (g > 100) & (b < 60) & (abs(r - g) < 30)


def image_part(ds: pydicom.Dataset, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The source-grid image (sampled back at scale k) and the text band under it."""
    rgb = ds.pixel_array
    k = scale_factor(cols)
    return rgb[: rows * k : k, : cols * k : k], rgb[rows * k :]


@pytest.fixture(scope="module")
def synthetic_dx_case() -> tuple[ImageSeries, np.ndarray]:
    """A 300 x 260 DX (no shared data needed) with five ellipses as the chest structures,
    asymmetric so that a flipped mask differs; two of them overlap."""
    yy, xx = np.mgrid[0:300, 0:260]
    image = np.exp(-(((yy - 150) / 90) ** 2 + ((xx - 130) / 80) ** 2))
    series = projection_series([dx_from_array(image)], "ImagerPixelSpacing")
    centres = [
        (130, 80, 60, 35),
        (140, 185, 55, 30),
        (200, 140, 40, 45),
        (40, 70, 8, 40),
        (45, 190, 8, 35),
    ]
    masks = np.stack(
        [((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1 for cy, cx, ry, rx in centres],
        axis=-1,
    )[None]
    return series, masks


@pytest.mark.parametrize("case", ["synthetic_dx_case", "jsrt_case"])
def test_outlines_are_in_each_structures_colour_exactly_on_the_mask_boundary(
    case: str,
    request: pytest.FixtureRequest,
    chest_package: ModelPackage,
    tmp_path: Path,
) -> None:
    series, masks = request.getfixturevalue(case)
    (ds,) = overlays(series, masks, chest_package)
    ds = saved(ds, tmp_path / "dx.dcm")
    _, rows, cols = series.pixels.shape
    image, band = image_part(ds, rows, cols)
    gray = window_to_8bit(series.pixels[0], series.datasets[0])
    _, drawn = render(gray, masks[0], chest_package)
    for i, structure in enumerate(chest_package.structures):
        edge = outline(masks[0, ..., i])
        assert edge.sum() > 100, structure.label
        mine = drawn == i + 1  # where no later structure's outline crosses
        assert (mine <= edge).all()
        assert mine.sum() > 0.8 * edge.sum()
        assert (image[mine] == structure.color_rgb).all(), structure.label
        # A shifted or flipped mask would not match the drawing.
        for wrong in (np.roll(edge, 3, axis=1), edge[::-1], edge[:, ::-1]):
            assert not (image[wrong & ~edge] == structure.color_rgb).all(axis=-1).all()
    # Away from every outline the image is the windowed source, grey (R = G = B).
    plain = drawn == 0
    assert (image[plain] == gray[plain][:, None]).all()
    # The band under the image carries text: label, model, legend.
    assert band.shape[0] > 40 and band.any()
    top = band[: band.shape[0] // 3]
    assert yellow(top).sum() > 50  # the label
    for structure in chest_package.structures:  # each legend swatch
        assert ((band == structure.color_rgb).all(axis=-1)).sum() >= 100


def test_header_references_and_flags(
    synthetic_dx_case: tuple[ImageSeries, np.ndarray],
    chest_package: ModelPackage,
    tmp_path: Path,
) -> None:
    series, masks = synthetic_dx_case
    source = series.datasets[0]
    (ds,) = overlays(series, masks, chest_package)
    ds = saved(ds, tmp_path / "dx.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "YES"
    assert chest_package.name in ds.DerivationDescription
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    (ref,) = ds.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    k = scale_factor(source.Columns)  # 2 for this 260-pixel-wide image
    assert ds.Columns == source.Columns * k and ds.Rows > source.Rows * k  # text band below
    assert str(PATIENT_NAME) not in str(ds.DerivationDescription)


def test_label_text_is_burned_in(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    ds = overlays(series, masks, ct_package)[0]
    _, rows, cols = series.pixels.shape
    assert scale_factor(cols) == 8  # a 64-pixel CT is enlarged so the text stays legible
    _, band = image_part(ds, rows, cols)
    ys, xs = np.nonzero(yellow(band))
    assert len(ys) > 100
    assert xs.max() - xs.min() > 150  # a line of text, not a dot
    assert LABEL == "AI RESULT - NOT FOR DIAGNOSIS"


def test_one_overlay_per_slice_with_deterministic_uids(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    series, masks = ct_case
    first = overlays(series, masks, ct_package)
    again = overlays(series, masks, ct_package)
    assert len(first) == series.pixels.shape[0]
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert len({d.SOPInstanceUID for d in first}) == len(first)
    assert {d.SeriesInstanceUID for d in first} == {uids(series, ct_package)[0]}
    assert [d.InstanceNumber for d in first] == list(range(1, len(first) + 1))
    assert [d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in first] == list(
        series.sop_instance_uids
    )
    # Each slice shows its own mask: outline pixels differ where the liver's extent does.
    _, rows, cols = series.pixels.shape
    for f, ds in enumerate(first):
        image, _ = image_part(ds, rows, cols)
        edge = outline(masks[f, ..., 0])
        assert (image[edge] == ct_package.structures[0].color_rgb).all()


def test_mismatched_masks_are_refused(
    ct_case: tuple[ImageSeries, np.ndarray], ct_package: ModelPackage
) -> None:
    from dicom_node.common.errors import InputError

    series, masks = ct_case
    with pytest.raises(InputError, match="do not fit"):
        build_overlay(series, masks[:, :, :-1], ct_package, series_uid="1.2", sop_uid="1.2.3")


@needs_dciodvfy
def test_dciodvfy_clean(
    synthetic_dx_case: tuple[ImageSeries, np.ndarray],
    ct_case: tuple[ImageSeries, np.ndarray],
    chest_package: ModelPackage,
    ct_package: ModelPackage,
    tmp_path: Path,
) -> None:
    for name, (series, masks), package in (
        ("dx", synthetic_dx_case, chest_package),
        ("ct", ct_case, ct_package),
    ):
        ds = overlays(series, masks, package)[0]
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name
