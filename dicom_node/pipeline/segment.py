"""One series in, SEG + SR out: the part of the pipeline shared by the worker and ``process``.

series files -> :func:`load_series` -> :meth:`Segmenter.segment` -> :func:`measure` ->
:func:`build_seg` + :func:`build_sr`, with output UIDs derived from (source series, model name
+ version, output kind, source instances).
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.inference import Segmenter
from dicom_node.outputs.measurements import Measurements, measure
from dicom_node.outputs.seg import build_seg
from dicom_node.outputs.sr import build_sr
from dicom_node.store.spool import durable_write
from dicom_node.uids import output_uids


@dataclass(frozen=True)
class SegmentationResult:
    series: ImageSeries
    seg: Dataset
    sr: Dataset
    measurements: Measurements

    @staticmethod
    def encode(ds: Dataset) -> bytes:
        """The Part 10 file bytes of an output dataset."""
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


def segment_series(paths: Sequence[Path], segmenter: Segmenter) -> SegmentationResult:
    """Segment the series made of ``paths`` and build its SEG and SR."""
    package = segmenter.package
    series = load_series(paths)
    masks = segmenter.segment(series)
    values = measure(series, masks, package)
    sources = series.sop_instance_uids
    seg_series, seg_sop = output_uids(
        series.series_instance_uid, package.name, package.version, "seg", sources
    )
    sr_series, sr_sop = output_uids(
        series.series_instance_uid, package.name, package.version, "sr", sources
    )
    seg = build_seg(series, masks, package, series_uid=seg_series, sop_uid=seg_sop)
    sr = build_sr(series, seg, masks, package, values, series_uid=sr_series, sop_uid=sr_sop)
    return SegmentationResult(series, seg, sr, values)


def write_outputs(result: SegmentationResult, folder: Path) -> list[Path]:
    """Write the SEG and SR of ``result`` into ``folder``; return their paths."""
    paths = []
    for kind, ds in (("seg", result.seg), ("sr", result.sr)):
        path = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
        durable_write(path, SegmentationResult.encode(ds))
        paths.append(path)
    return paths


def group_series(folder: Path) -> dict[str, list[Path]]:
    """The DICOM files under ``folder`` grouped by Series Instance UID (others skipped)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SeriesInstanceUID" in ds:
            groups[str(ds.SeriesInstanceUID)].append(path)
    return dict(groups)
