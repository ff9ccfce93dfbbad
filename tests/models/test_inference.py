"""Segmenter: outputs on the source grid for 2D (DX, CT slices) and 3D (sliding window) models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.common.errors import InputError
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.inference import Segmenter, masks_from_probabilities, select_device
from dicom_node.package.manifest import ModelPackage
from dicom_node.testing.random_package import make_random_package
from tests.factories import ct_series, dx_from_array
from tests.imaging.test_series import write
from tests.models.test_preprocess import ct_with_box, iou

CPU = torch.device("cpu")


class Oracle(torch.nn.Module):
    """A stand-in network whose logits say "structure" where the normalised input is bright.

    With it the whole path (normalise, pad, resize, network, resize back, crop) must put the
    bright region of the source image back where it was, which random weights cannot show.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = (x - 0.5) * 40
        return logits.repeat(1, self.channels, *([1] * (x.ndim - 2)))


@pytest.fixture(scope="module")
def package_2d(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return make_random_package(tmp_path_factory.mktemp("p2"), input_size=(128, 128))


@pytest.fixture(scope="module")
def package_3d(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    return make_random_package(
        tmp_path_factory.mktemp("p3"),
        dims=3,
        input_size=(16, 32, 32),
        spacing_mm=(2.0, 1.2, 1.2),
        normalization={"kind": "window", "center": -480, "width": 1040},
        modalities=("CT",),
    )


def dx_series(folder: Path, image: np.ndarray, **kwargs: object) -> ImageSeries:
    return load_series(write([dx_from_array(image, **kwargs)], folder))  # type: ignore[arg-type]


def bright_shape(rows: int, cols: int) -> np.ndarray:
    """One connected, non-symmetric bright region: an off-centre ellipse with a bar."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    mask = ((yy - rows * 0.4) / (rows * 0.25)) ** 2 + ((xx - cols * 0.35) / (cols * 0.2)) ** 2 <= 1
    mask[int(rows * 0.4) : int(rows * 0.5), int(cols * 0.35) : int(cols * 0.9)] = True
    return mask


def test_select_device() -> None:
    device = select_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("rows", "cols"), [(300, 200), (180, 260), (128, 128)])
def test_dx_outputs_on_source_grid(
    tmp_path: Path, package_2d: ModelPackage, rows: int, cols: int
) -> None:
    series = dx_series(tmp_path, np.random.default_rng(0).random((rows, cols)))
    segmenter = Segmenter(package_2d, CPU)
    probs = segmenter.predict(series)
    assert probs.shape == (1, rows, cols, 5) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    masks = segmenter.segment(series)
    assert masks.shape == (1, rows, cols, 5) and masks.dtype == bool


def test_oracle_puts_bright_region_back_in_place(tmp_path: Path, package_2d: ModelPackage) -> None:
    shape = bright_shape(300, 200)
    image = np.where(shape, 200.0, 20.0) + np.random.default_rng(1).normal(0, 5, shape.shape)
    segmenter = Segmenter(package_2d, CPU)
    segmenter.network = Oracle(package_2d.out_channels)
    for monochrome1 in (False, True):
        series = dx_series(tmp_path / str(monochrome1), image, monochrome1=monochrome1)
        masks = segmenter.segment(series)
        for s in range(5):
            assert iou(masks[0, ..., s], shape) > 0.95


def test_ct_slices_batched_with_2d_model(tmp_path: Path, package_2d: ModelPackage) -> None:
    series = load_series(write(ct_series(n_slices=7, rows=40, cols=56), tmp_path))
    batched = Segmenter(package_2d, CPU, batch_size=3).predict(series)
    single = Segmenter(package_2d, CPU, batch_size=1).predict(series)
    assert batched.shape == (7, 40, 56, 5)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # slices differ, so their outputs must too (no frame copied to another)
    assert not np.allclose(batched[0], batched[3])
    assert Segmenter(package_2d, CPU).segment(series).shape == (7, 40, 56, 5)


def test_3d_sliding_window_on_source_grid(tmp_path: Path, package_3d: ModelPackage) -> None:
    series, box = ct_with_box(tmp_path)
    segmenter = Segmenter(package_3d, CPU, batch_size=2)
    probs = segmenter.predict(series)
    assert probs.shape == (12, 48, 40, 5) and probs.dtype == np.float32
    assert segmenter.segment(series).shape == (12, 48, 40, 5)
    segmenter.network = Oracle(package_3d.out_channels)
    masks = segmenter.segment(series)
    assert iou(masks[..., 0], box) > 0.85


def test_modality_not_accepted(tmp_path: Path, package_3d: ModelPackage) -> None:
    series = dx_series(tmp_path, np.zeros((32, 32)))
    with pytest.raises(InputError, match="accepts CT images, not DX"):
        Segmenter(package_3d, CPU).predict(series)


def test_softmax_masks_are_exclusive(tmp_path: Path) -> None:
    package = make_random_package(tmp_path / "pkg", activation="softmax", seed=3)
    series = dx_series(tmp_path, np.random.default_rng(2).random((96, 80)))
    segmenter = Segmenter(package, CPU)
    probs = segmenter.predict(series)
    assert probs.shape == (1, 96, 80, 5)
    assert probs.sum(axis=-1).max() <= 1 + 1e-5
    masks = masks_from_probabilities(probs, package)
    assert masks.sum(axis=-1).max() <= 1
    background = 1 - probs.sum(axis=-1)
    assert np.array_equal(~masks.any(axis=-1), background >= probs.max(axis=-1))


def test_sigmoid_threshold(package_2d: ModelPackage) -> None:
    probs = np.array([[0.2, 0.7], [0.5, 0.51]], dtype=np.float32)[None, None]
    package = replace(package_2d, structures=package_2d.structures[:2], threshold=0.5)
    assert masks_from_probabilities(probs, package).tolist() == [[[[False, True], [False, True]]]]
    strict = replace(package, threshold=0.6)
    assert masks_from_probabilities(probs, strict).tolist() == [[[[False, True], [False, False]]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_within_fp16(tmp_path: Path, package_2d: ModelPackage) -> None:
    series = load_series(write(ct_series(n_slices=5, rows=64, cols=64), tmp_path))
    cpu = Segmenter(package_2d, CPU).predict(series)
    gpu = Segmenter(package_2d, torch.device("cuda")).predict(series)
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)
