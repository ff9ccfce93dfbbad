"""Fixtures of the output tests: model packages, a JSRT DX series with its expert masks, a CT.

Packages are written in the ``model.yaml`` format and loaded with
:func:`dicom_node.package.manifest.load_package`; the weights file is an empty placeholder, as
no network runs here. Series are built directly as :class:`ImageSeries` from the factories.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dicom_node.imaging.series import ImageSeries
from dicom_node.package.manifest import ModelPackage, load_package
from tests.conftest import require_shared_data
from tests.factories import JSRT_SPACING_MM, ct_series, jsrt_dx, jsrt_mask

#: A normal chest (no nodule) of the JSRT set.
JSRT_CASE = "JPCNN002"
JSRT_STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")

CHEST_STRUCTURES: list[dict[str, Any]] = [
    {
        "label": "right_lung",
        "name": "Right lung",
        "category": "SCT.Organ",
        "type": "SCT.Lung",
        "type_modifier": "SCT.Right",
        "color": [128, 174, 128],
    },
    {
        "label": "left_lung",
        "name": "Left lung",
        "category": "SCT.Organ",
        "type": "SCT.Lung",
        "type_modifier": "SCT.Left",
        "color": [111, 184, 210],
    },
    {
        "label": "heart",
        "name": "Heart",
        "category": "SCT.Organ",
        "type": "SCT.Heart",
        "color": [206, 110, 84],
    },
    {
        "label": "right_clavicle",
        "name": "Right clavicle",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Clavicle",
        "type_modifier": "SCT.Right",
        "color": [241, 214, 145],
    },
    {
        "label": "left_clavicle",
        "name": "Left clavicle",
        "category": "SCT.AnatomicalStructure",
        "type": "SCT.Clavicle",
        "type_modifier": "SCT.Left",
        "color": [216, 101, 79],
    },
]

CT_STRUCTURES: list[dict[str, Any]] = [
    {
        "label": "liver",
        "name": "Liver",
        "category": "SCT.Organ",
        "type": "SCT.Liver",
        "color": [221, 130, 101],
    },
    {
        "label": "left_kidney",
        "name": "Left kidney",
        "category": "SCT.Organ",
        "type": "SCT.Kidney",
        "type_modifier": "SCT.Left",
        "color": [185, 102, 83],
    },
]

MakePackage = Callable[..., ModelPackage]


def write_package(
    folder: Path,
    structures: list[dict[str, Any]],
    measurements: list[str],
    *,
    dims: int = 2,
    name: str = "chest-xray-anatomy",
    version: str = "1.2.0",
) -> ModelPackage:
    """Write a model package folder and load it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(b"")  # placeholder: no network runs in these tests
    doc = {
        "name": name,
        "version": version,
        "dims": dims,
        "modalities": ["DX", "CR"] if dims == 2 else ["CT"],
        "input": {"size": [256, 256] if dims == 2 else [8, 64, 64]},
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "structures": structures,
        "measurements": measurements,
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(doc))
    return load_package(folder)


@pytest.fixture(scope="session")
def make_package(tmp_path_factory: pytest.TempPathFactory) -> MakePackage:
    """Factory of packages: ``make_package(structures, measurements, **kwargs)``."""

    def make(
        structures: list[dict[str, Any]], measurements: list[str], **kwargs: Any
    ) -> ModelPackage:
        return write_package(tmp_path_factory.mktemp("package"), structures, measurements, **kwargs)

    return make


@pytest.fixture(scope="session")
def chest_package(make_package: MakePackage) -> ModelPackage:
    return make_package(CHEST_STRUCTURES, ["area", "cardiothoracic_ratio"])


@pytest.fixture(scope="session")
def ct_package(make_package: MakePackage) -> ModelPackage:
    return make_package(CT_STRUCTURES, ["volume"], dims=3, name="abdomen-ct", version="0.3.1")


def projection_series(datasets: list[Any], spacing_source: str | None) -> ImageSeries:
    """An ImageSeries of projection images as the loader makes it (raw pixels suffice)."""
    pixels = np.stack([ds.pixel_array.astype(np.float32) for ds in datasets])
    spacing = (JSRT_SPACING_MM, JSRT_SPACING_MM) if spacing_source else None
    return ImageSeries(
        datasets=tuple(datasets),
        pixels=pixels,
        pixel_spacing_mm=spacing,
        spacing_source=spacing_source,
        slice_spacing_mm=None,
        is_projection=True,
    )


def ct_slice_series() -> ImageSeries:
    """One synthetic 64 x 64 CT slice at 0.8 mm as the loader makes it: a planar image."""
    ds = ct_series(n_slices=1)[0]
    return ImageSeries(
        datasets=(ds,),
        pixels=ds.pixel_array.astype(np.float32)[None],
        pixel_spacing_mm=(0.8, 0.8),
        spacing_source="PixelSpacing",
        slice_spacing_mm=None,
        is_projection=False,
    )


@pytest.fixture(scope="session")
def jsrt_case() -> tuple[ImageSeries, np.ndarray]:
    """The JSRT DX of :data:`JSRT_CASE` and its five expert masks ``(1, 1024, 1024, 5)``."""
    require_shared_data("jsrt", "images", f"{JSRT_CASE}.png")
    ds = jsrt_dx(JSRT_CASE)
    # DX with Imager Pixel Spacing and an uncalibrated Pixel Spacing: the loader picks the
    # former (spacing at the detector).
    series = projection_series([ds], "ImagerPixelSpacing")
    masks = np.stack([jsrt_mask(JSRT_CASE, s) for s in JSRT_STRUCTURES], axis=-1)[None]
    return series, masks


def ct_volume_series() -> ImageSeries:
    """The synthetic CT of :func:`tests.factories.ct_series` (8 x 64 x 64, 0.8 x 0.8 x 2.5 mm)
    as the loader makes it: sorted along z, in HU."""
    datasets = sorted(ct_series(), key=lambda ds: float(ds.ImagePositionPatient[2]))
    return ImageSeries(
        datasets=tuple(datasets),
        pixels=np.stack([ds.pixel_array.astype(np.float32) - 1024.0 for ds in datasets]),
        pixel_spacing_mm=(0.8, 0.8),
        spacing_source="PixelSpacing",
        slice_spacing_mm=2.5,
        is_projection=False,
    )


@pytest.fixture(scope="session")
def ct_case() -> tuple[ImageSeries, np.ndarray]:
    """A synthetic CT (8 x 64 x 64) sorted along z; liver = the bright ellipsoid, kidney empty."""
    series = ct_volume_series()
    liver = series.pixels > -500.0
    masks = np.stack([liver, np.zeros_like(liver)], axis=-1)
    return series, masks
