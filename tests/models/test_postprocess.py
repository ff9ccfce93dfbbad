"""Mask postprocessing: largest component and hole filling per structure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.imaging.masks import fill_frame_holes
from dicom_node.models.postprocess import postprocess
from dicom_node.package.manifest import ModelPackage, Postprocess
from dicom_node.testing.random_package import make_random_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    # right_lung: largest_component + fill_holes; right_clavicle: largest_component only
    return make_random_package(
        tmp_path_factory.mktemp("pp"), structures=("right_lung", "right_clavicle")
    )


def ring_and_speck() -> np.ndarray:
    """A 20 x 20 ring (hole in the middle) and a separate 2 x 2 speck, in one 40 x 40 frame."""
    frame = np.zeros((40, 40), dtype=bool)
    frame[5:25, 5:25] = True
    frame[10:20, 10:20] = False
    frame[32:34, 32:34] = True
    return frame


def test_largest_component_and_fill_holes(package: ModelPackage) -> None:
    frame = ring_and_speck()
    masks = np.stack([frame, frame], axis=-1)[None]  # (1, 40, 40, 2)
    out = postprocess(masks, package)
    assert out.shape == masks.shape and out.dtype == bool
    lung, clavicle = out[0, ..., 0], out[0, ..., 1]
    expected_lung = np.zeros((40, 40), dtype=bool)
    expected_lung[5:25, 5:25] = True
    np.testing.assert_array_equal(lung, expected_lung)  # speck gone, hole filled
    ring = frame.copy()
    ring[32:34, 32:34] = False
    np.testing.assert_array_equal(clavicle, ring)  # speck gone, hole kept
    assert masks[0, 33, 33, 0], "the input must not be modified"


def test_largest_component_per_frame_or_per_volume(package: ModelPackage) -> None:
    masks = np.zeros((2, 20, 20, 2), dtype=bool)
    masks[0, 2:12, 2:12, 1] = True  # big blob in frame 0
    masks[1, 15:18, 15:18, 1] = True  # small blob, alone in frame 1
    per_frame = postprocess(masks, package, per_frame=True)
    assert per_frame[1, ..., 1].sum() == 9  # each frame keeps its own largest
    volume = postprocess(masks, package, per_frame=False)
    assert volume[1, ..., 1].sum() == 0  # over the volume the small blob is a separate speck
    assert volume[0, ..., 1].sum() == 100
    package_3d = replace(package, dims=3)
    np.testing.assert_array_equal(postprocess(masks, package_3d), volume)  # 3D default


def test_empty_masks_and_no_steps(package: ModelPackage, tmp_path: Path) -> None:
    empty = np.zeros((3, 10, 10, 2), dtype=bool)
    assert not postprocess(empty, package).any()
    plain = replace(
        package,
        structures=tuple(replace(s, postprocess=()) for s in package.structures),
    )
    masks = np.stack([ring_and_speck()] * 2, axis=-1)[None]
    np.testing.assert_array_equal(postprocess(masks, plain), masks)
    assert package.structures[0].postprocess == (
        Postprocess.LARGEST_COMPONENT,
        Postprocess.FILL_HOLES,
    )
    with pytest.raises(ValueError, match="expected masks"):
        postprocess(masks[..., :1], package)


def frames_with_holes() -> list[np.ndarray]:
    """Masks whose holes touch the box of the mask, the image edge, or nest in each other."""
    rng = np.random.default_rng(7)
    frames = [ring_and_speck(), np.zeros((9, 9), dtype=bool), np.ones((9, 9), dtype=bool)]
    edge = np.zeros((30, 30), dtype=bool)
    edge[:, :10] = True
    edge[5:8, 0:3] = False  # open to the image edge: not a hole
    edge[12:15, 3:6] = False  # closed: a hole
    frames.append(edge)
    nested = np.zeros((40, 40), dtype=bool)
    nested[2:38, 2:38] = True
    nested[6:34, 6:34] = False
    nested[12:28, 12:28] = True
    nested[16:24, 16:24] = False
    frames.append(nested)
    diagonal = np.zeros((12, 12), dtype=bool)  # background joined only diagonally: a hole
    diagonal[2:9, 2:9] = True
    diagonal[5, 5] = False
    diagonal[4, 4] = False
    frames.append(diagonal)
    for density in (0.3, 0.5, 0.7):
        frames.append(rng.random((64, 96)) < density)
        frames.append(ndimage.gaussian_filter(rng.random((128, 128)), 3) > 0.5)
    return frames


@pytest.mark.parametrize("index", range(len(frames_with_holes())))
def test_fill_frame_holes_is_scipy_binary_fill_holes(index: int) -> None:
    frame = frames_with_holes()[index]
    assert np.array_equal(fill_frame_holes(frame), ndimage.binary_fill_holes(frame))
