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
from dicom_node.outputs.seg import build_seg, check_seg_sources
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


def segment_series(paths: Sequence[Path], segmenter: Segmenter) -> list[SegmentationResult]:
    """Segment the series made of ``paths`` and build its SEG and SR.

    A cross-sectional series (or a single radiograph) gives one SEG + SR. A projection series
    of several images (e.g. PA and lateral) gives one SEG + SR per image: DICOM SEG needs a
    frame of reference to span several projection images, which radiographs do not have.
    Likewise a series of several multi-frame instances (enhanced CT/MR, cine) gives one SEG +
    SR per instance, as highdicom writes a SEG on one multi-frame source. One multi-frame
    instance gives one SEG over all its frames (it needs a Frame of Reference UID when it
    has several frames, see :func:`~dicom_node.outputs.seg.check_seg_sources`). Each
    image's outputs get their own instance in the same SEG and SR output series.
    """
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    projection = not all("ImagePositionPatient" in h for h in headers)
    multi_frame = any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers)
    if (projection or multi_frame) and len(paths) > 1:
        order = sorted(range(len(paths)), key=lambda i: str(headers[i].SOPInstanceUID))
        return [
            _segment(load_series([paths[i]]), segmenter, instance_number=n)
            for n, i in enumerate(order, start=1)
        ]
    return [_segment(load_series(paths), segmenter, instance_number=1)]


def _segment(
    series: ImageSeries, segmenter: Segmenter, *, instance_number: int
) -> SegmentationResult:
    package = segmenter.package
    check_seg_sources(series)  # before inference: a refusal costs nothing
    masks = segmenter.segment(series)
    values = measure(series, masks, package)
    sources = series.sop_instance_uids
    uids = {
        kind: output_uids(series.series_instance_uid, package.name, package.version, kind, sources)
        for kind in ("seg", "sr")
    }
    seg = build_seg(
        series,
        masks,
        package,
        series_uid=uids["seg"][0],
        sop_uid=uids["seg"][1],
        instance_number=instance_number,
    )
    sr = build_sr(
        series,
        seg,
        masks,
        package,
        values,
        series_uid=uids["sr"][0],
        sop_uid=uids["sr"][1],
        instance_number=instance_number,
    )
    return SegmentationResult(series, seg, sr, values)


def write_outputs(results: Sequence[SegmentationResult], folder: Path) -> list[tuple[Path, str]]:
    """Write every SEG and SR of ``results`` into ``folder``; return (path, SOP Instance UID)."""
    written = []
    for result in results:
        for kind, ds in (("seg", result.seg), ("sr", result.sr)):
            path = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
            durable_write(path, SegmentationResult.encode(ds))
            written.append((path, str(ds.SOPInstanceUID)))
    return written


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
