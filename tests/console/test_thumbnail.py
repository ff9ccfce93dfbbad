"""Thumbnails: the SEG's masks over the source image in the palette colour, pixel for pixel."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_node.common.uids import output_uids
from dicom_node.console.thumbnail import (
    ALPHA,
    GAP_PX,
    PALETTE,
    overlay_thumbnail,
    pick_frames,
    scale_of,
    seg_thumbnail,
)
from dicom_node.outputs.overlay import build_overlays
from dicom_node.outputs.seg import build_seg
from dicom_node.package.manifest import ModelPackage
from tests.factories import write_files
from tests.outputs.conftest import ct_volume_series


def coloured(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels blended with ``colour`` (gray pixels have R = G = B)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    want = np.asarray(colour) * ALPHA
    # blended = (1 - ALPHA) * gray + ALPHA * colour: the channel differences are the colour's
    return (np.abs((r - g) - (want[0] - want[1])) <= 1) & (
        np.abs((g - b) - (want[1] - want[2])) <= 1
    )


def write_ct_seg(
    tmp_path: Path, package: ModelPackage, liver: np.ndarray
) -> tuple[Path, dict[str, Path]]:
    series = ct_volume_series()
    masks = np.stack([liver, np.zeros_like(liver)], axis=-1)
    uids = output_uids(
        series.series_instance_uid, package.name, package.version, "seg", series.sop_instance_uids
    )
    seg = build_seg(series, masks, package, series_uid=uids[0], sop_uid=uids[1])
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    files = write_files(list(series.datasets), tmp_path / "ct")
    return seg_path, {
        str(ds.SOPInstanceUID): p for ds, p in zip(series.datasets, files, strict=True)
    }


def test_3d_strip_shows_the_mask_in_its_colour_on_the_frames_that_have_it(
    tmp_path: Path, ct_package: ModelPackage
) -> None:
    series = ct_volume_series()
    liver = series.pixels > -500.0
    liver[:2] = False  # the first two slices show nothing: not in the strip
    seg_path, sources = write_ct_seg(tmp_path, ct_package, liver)
    png = seg_thumbnail(seg_path, sources)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    up, down = scale_of(64, 64)
    assert (up, down) == (3, 1)
    tile = 64 * up
    # The strip follows Instance Number (here the reverse of z), frames with a mask only.
    by_number = sorted(range(len(series.datasets)), key=lambda z: series.datasets[z].InstanceNumber)
    shown = [z for z in by_number if liver[z].any()]
    assert len(shown) == 6
    assert rgb.shape == (tile, len(shown) * tile + GAP_PX * (len(shown) - 1), 3)
    for i, z in enumerate(shown):
        part = rgb[:, i * (tile + GAP_PX) : i * (tile + GAP_PX) + tile]
        expected = np.repeat(np.repeat(liver[z], up, axis=0), up, axis=1)
        red = coloured(part, PALETTE[0])
        gray = (part[..., 0] == part[..., 1]) & (part[..., 1] == part[..., 2])
        assert red[expected].all(), f"slice {z}: a masked pixel without the liver's colour"
        assert gray[~expected].all(), f"slice {z}: an unmasked pixel is not gray"


def test_a_flipped_mask_would_not_pass_the_judgement(
    tmp_path: Path, ct_package: ModelPackage
) -> None:
    series = ct_volume_series()
    liver = series.pixels > -500.0
    liver[:, :, :20] = False  # asymmetric
    seg_path, sources = write_ct_seg(tmp_path, ct_package, liver)
    rgb = np.asarray(Image.open(io.BytesIO(seg_thumbnail(seg_path, sources))).convert("RGB"))
    tile = rgb[:, :192]  # the first tile: the highest slice (Instance Number 1)
    first = max(range(len(series.datasets)), key=lambda z: -series.datasets[z].InstanceNumber)
    assert coloured(tile, PALETTE[0])[np.repeat(np.repeat(liver[first], 3, 0), 3, 1)].all()
    flipped = np.repeat(np.repeat(liver[first][:, ::-1], 3, axis=0), 3, axis=1)
    assert not coloured(tile, PALETTE[0])[flipped].all()


def test_pick_frames_spreads_over_frames_with_a_structure() -> None:
    assert pick_frames([False, True, True, False]) == [1, 2]
    assert pick_frames([False] * 3) == [0, 1, 2]
    picks = pick_frames([True] * 100, limit=8)
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 99
    assert scale_of(1024, 1024) == (1, 6)


def test_overlay_thumbnail_when_only_the_overlay_was_written(
    tmp_path: Path, ct_package: ModelPackage
) -> None:
    series = ct_volume_series()
    liver = series.pixels > -500.0
    masks = np.stack([liver, np.zeros_like(liver)], axis=-1)
    overlays = build_overlays(series, masks, ct_package, series_uid="2.25.1", sop_uid="2.25.2")
    paths = []
    for i, ds in enumerate(overlays):
        path = tmp_path / f"overlay-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    rgb = np.asarray(Image.open(io.BytesIO(overlay_thumbnail(paths))).convert("RGB"))
    assert rgb.shape[1] > rgb.shape[0]  # a strip of 8 overlays
    assert (rgb[..., 0] != rgb[..., 1]).any()  # the outlines' colours
