"""Thumbnails of a result: the SEG's masks over the source image, as a PNG.

Rendered server-side from the received source instances and the SEG in the job's outbox
(:func:`seg_thumbnail`), or, for a job that wrote only the Secondary Capture overlay, from
that overlay (:func:`overlay_thumbnail`). A series of several frames gives a strip: up to
:data:`MAX_TILES` frames that show a structure, left to right in source order (Instance
Number), :data:`GAP_PX` black pixels apart.

Each structure is blended over the windowed gray image in :data:`PALETTE` colour with
opacity :data:`ALPHA`; pixels outside every mask stay gray (R = G = B). Tiles are scaled by
an integer factor (repeated pixels up to :data:`TILE_PX`, every n-th pixel down to it), so a
thumbnail pixel is exactly one source pixel's colour.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicom_node.imaging.frames import frame_modality_luts
from dicom_node.imaging.pixels import decode_instance
from dicom_node.outputs.overlay import window_to_8bit
from dicom_node.outputs.seg import read_seg_masks, source_frame_keys

__all__ = ["ALPHA", "GAP_PX", "MAX_TILES", "PALETTE", "overlay_thumbnail", "seg_thumbnail"]

#: Colour of segment n (1-based) is ``PALETTE[(n - 1) % len(PALETTE)]``: saturated, so a
#: masked pixel never looks gray.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 96, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
)
ALPHA = 0.5
TILE_PX = 192
MAX_TILES = 8
GAP_PX = 4


def scale_of(rows: int, cols: int) -> tuple[int, int]:
    """``(up, down)``: repeat each pixel ``up`` times, or keep every ``down``-th pixel, so the
    larger side is near :data:`TILE_PX` (one of the two is 1)."""
    side = max(rows, cols)
    if side < TILE_PX:
        return max(1, TILE_PX // side), 1
    return 1, -(-side // TILE_PX)


def _scaled(tile: np.ndarray) -> np.ndarray:
    up, down = scale_of(tile.shape[0], tile.shape[1])
    if up > 1:
        return np.repeat(np.repeat(tile, up, axis=0), up, axis=1)
    return tile[::down, ::down]


def blend(gray: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``uint8 (rows, cols)`` and boolean ``(rows, cols, segments)`` -> ``uint8`` RGB."""
    rgb = np.repeat(gray[..., None].astype(np.float64), 3, axis=2)
    for s in range(masks.shape[-1]):
        colour = np.asarray(PALETTE[s % len(PALETTE)], dtype=np.float64)
        m = masks[..., s]
        rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * colour
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _strip(tiles: Sequence[np.ndarray]) -> bytes:
    tiles = [_scaled(t) for t in tiles]
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + GAP_PX * (len(tiles) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    x = 0
    for t in tiles:
        canvas[: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + GAP_PX
    out = io.BytesIO()
    Image.fromarray(canvas, "RGB").save(out, format="PNG")
    return out.getvalue()


def _order(ds: pydicom.Dataset) -> tuple[int, str]:
    number = ds.get("InstanceNumber")
    return (int(number) if number not in (None, "") else 0, str(ds.SOPInstanceUID))


def pick_frames(shown: Sequence[bool], limit: int = MAX_TILES) -> list[int]:
    """Indexes of up to ``limit`` frames, evenly spread over those that show a structure
    (all frames when none does), in order."""
    candidates = [i for i, s in enumerate(shown) if s] or list(range(len(shown)))
    if len(candidates) <= limit:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, limit).round().astype(int)
    return [candidates[i] for i in sorted(set(picks.tolist()))]


def seg_thumbnail(seg_path: Path, sources: Mapping[str, Path]) -> bytes:
    """The PNG of the SEG at ``seg_path`` over its source instances.

    Parameters
    ----------
    seg_path
        A BINARY SEG the node wrote.
    sources
        SOP Instance UID -> file of the source series' instances (the spool).

    Raises
    ------
    ValueError
        When the SEG names a source frame that is not among ``sources``.
    """
    seg = pydicom.dcmread(seg_path)
    datasets = sorted((pydicom.dcmread(p) for p in sources.values()), key=_order)
    keys = source_frame_keys(datasets)
    masks = read_seg_masks(seg, keys)  # (frames, rows, cols, segments)
    owner = [ds for ds in datasets for _ in range(int(ds.get("NumberOfFrames", 1) or 1))]
    tiles = []
    for i in pick_frames([bool(m.any()) for m in masks]):  # decode only the frames shown
        ds, frame_number = owner[i], keys[i][1]
        gray = decode_instance(ds, frame_modality_luts(ds)).gray[frame_number - 1]
        tiles.append(blend(window_to_8bit(gray, ds), masks[i]))
    return _strip(tiles)


def overlay_thumbnail(overlay_paths: Sequence[Path]) -> bytes:
    """The PNG of the node's Secondary Capture overlays (RGB), as a strip."""
    datasets = sorted((pydicom.dcmread(p) for p in overlay_paths), key=_order)
    picks = pick_frames([True] * len(datasets))
    tiles = [np.asarray(datasets[i].pixel_array, dtype=np.uint8) for i in picks]
    return _strip(tiles)
