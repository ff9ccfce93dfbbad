"""End to end on colour and multi-frame sources: an rgb model on an RGB ultrasound image, and
a SEG on an enhanced (legacy converted) MR that reads back onto the right frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_node.common.errors import InputError, ModelPackageError
from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import load_series
from dicom_node.models.inference import Segmenter
from dicom_node.models.networks import build_network
from dicom_node.models.preprocess import prepare_image
from dicom_node.outputs.seg import build_seg, read_seg_masks, source_frame_keys
from dicom_node.package.manifest import ColorMode, load_package
from dicom_node.testing.dciodvfy import dciodvfy_errors, dciodvfy_path
from dicom_node.testing.random_package import make_random_package
from dicom_node.training.data import CachedCases
from dicom_node.work.segment import SegmentationResult, segment_series
from tests.imaging.test_color_multiframe import enhanced_mr

STRUCTURES = ("heart", "left_lung")


def validate(ds: pydicom.Dataset, path: Path) -> None:
    path.write_bytes(SegmentationResult.encode(ds))
    if dciodvfy_path() is not None:
        assert dciodvfy_errors(path) == [], path.name


@pytest.fixture(scope="module")
def rgb_segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    folder = tmp_path_factory.mktemp("model") / "rgb"
    package = make_random_package(folder, structures=STRUCTURES, modalities=(), color="rgb")
    return Segmenter(package)


def test_rgb_package_has_three_input_channels(rgb_segmenter: Segmenter) -> None:
    package = rgb_segmenter.package
    assert package.color is ColorMode.RGB and package.in_channels == 3
    first = next(iter(build_network(package).parameters()))
    assert first.shape[1] == 3


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "examples_palette.dcm"])
def test_rgb_model_on_colour_ultrasound_end_to_end(
    name: str, rgb_segmenter: Segmenter, tmp_path: Path
) -> None:
    path = Path(get_testdata_file(name))  # type: ignore[arg-type]
    series = load_series([path])
    assert series.rgb is not None
    # The network sees colour: its input channels differ where the image is coloured.
    prepared, _ = prepare_image(series.rgb[0], rgb_segmenter.package)
    assert prepared.shape == (3, 64, 64) and not np.allclose(prepared[0], prepared[2])
    (result,) = segment_series([path], rgb_segmenter)
    seg = result.seg
    assert seg.Rows == series.shape[1] and seg.Columns == series.shape[2]
    assert seg.PhotometricInterpretation == "MONOCHROME2" and seg.BitsAllocated == 1
    validate(seg, tmp_path / "seg.dcm")
    validate(result.sr, tmp_path / "sr.dcm")
    masks = rgb_segmenter.segment(series)
    back = read_seg_masks(pydicom.dcmread(tmp_path / "seg.dcm"), series.frame_keys)
    np.testing.assert_array_equal(back, masks)


def test_gray_image_through_an_rgb_model(rgb_segmenter: Segmenter) -> None:
    image = np.linspace(0, 100, 40 * 30, dtype=np.float32).reshape(40, 30)
    prepared, _ = prepare_image(image, rgb_segmenter.package)
    assert prepared.shape == (3, 64, 64)
    np.testing.assert_array_equal(prepared[0], prepared[1])


def test_rgb_package_trains_on_rgb_pngs(rgb_segmenter: Segmenter, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{case}.png"
        )
        for label in STRUCTURES:
            (tmp_path / "masks" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((48, 40), dtype=np.uint8)).save(
                tmp_path / "masks" / label / f"{case}.png"
            )
    cached = CachedCases(tmp_path, ["a", "b"], rgb_segmenter.package)
    assert cached[0]["image"].shape == (3, 64, 64)
    assert not np.allclose(cached[0]["image"][0], cached[0]["image"][1])


def test_rgb_is_refused_for_3d_packages(tmp_path: Path) -> None:
    make_random_package(tmp_path / "p", dims=3, structures=STRUCTURES)
    text = (tmp_path / "p" / "model.yaml").read_text().replace("color: gray", "color: rgb")
    (tmp_path / "p" / "model.yaml").write_text(text)
    with pytest.raises(ModelPackageError, match="input.color: rgb is supported for 2D"):
        load_package(tmp_path / "p")
    (tmp_path / "p" / "model.yaml").write_text(text.replace("color: rgb", "color: cmyk"))
    with pytest.raises(ModelPackageError, match="input.color: 'cmyk' is not one of gray, rgb"):
        load_package(tmp_path / "p")


def test_seg_on_enhanced_mr_lands_on_the_right_frames(tmp_path: Path) -> None:
    path, _ = enhanced_mr(tmp_path)
    series = load_series([path])
    package = make_random_package(tmp_path / "pkg", structures=STRUCTURES, modalities=())
    # A different mask on every slice (in the series' sorted order): slice k has k + 1 pixels.
    masks = np.zeros((*series.shape, 2), dtype=bool)
    for k in range(series.shape[0]):
        masks[k, 0, : k + 1, 0] = True
        masks[k, 5, : 2 * k + 1, 1] = True
    uids = output_uids(series.series_instance_uid, package.name, package.version, "seg", ("x",))
    seg = build_seg(series, masks, package, series_uid=uids[0], sop_uid=uids[1])
    validate(seg, tmp_path / "seg.dcm")
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    # In the series' frame order ...
    np.testing.assert_array_equal(read_seg_masks(back, series.frame_keys), masks)
    # ... and in the source's own frame order, frame n of the MR got its own slice's mask.
    in_source_order = read_seg_masks(back, source_frame_keys(series.datasets))
    for k, (_, number) in enumerate(series.frame_sources):
        np.testing.assert_array_equal(in_source_order[number - 1], masks[k])
    # Every SEG frame names the enhanced MR and one of its frames.
    for item in back.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == series.datasets[0].SOPInstanceUID
        assert 1 <= int(src.ReferencedFrameNumber) <= series.shape[0]


def test_enhanced_mr_end_to_end(tmp_path: Path) -> None:
    path, _ = enhanced_mr(tmp_path)
    package = make_random_package(tmp_path / "pkg", structures=STRUCTURES, modalities=("MR",))
    (result,) = segment_series([path], Segmenter(package))
    validate(result.seg, tmp_path / "seg.dcm")
    validate(result.sr, tmp_path / "sr.dcm")


def test_ultrasound_cine_without_frame_of_reference_fails_once(
    rgb_segmenter: Segmenter,
) -> None:
    path = Path(get_testdata_file("examples_ybr_color.dcm"))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="multi-frame US instance of 30 frames without"):
        segment_series([path], rgb_segmenter)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rtdose_1frame.dcm", "RT Dose Storage source: it lacks"),
        ("GDCMJ2K_TextGBR.dcm", "PatientID"),
    ],
)
def test_sources_highdicom_cannot_use_fail_with_a_reason(
    name: str, message: str, rgb_segmenter: Segmenter
) -> None:
    path = Path(get_testdata_file(name))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=message):
        segment_series([path], rgb_segmenter)
