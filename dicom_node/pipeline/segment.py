"""One series in, SEG + SR out: the part of the pipeline shared by the worker and ``process``.

series files -> :func:`load_series` -> :meth:`Segmenter.segment` -> :func:`measure` ->
:func:`build_seg` + :func:`build_sr`, with output UIDs derived from (source series, model name
+ version, output kind, source instances).

Deterministic failures on a bad dataset become :class:`~dicom_node.errors.InputError`, so the
worker fails the job at once instead of retrying it: ``AttributeError``, ``KeyError``,
``ValueError``, ``TypeError`` and ``IndexError`` raised while reading the series or while
building the SEG or SR (pydicom and highdicom raise these on a missing or malformed attribute,
e.g. a CT without Frame of Reference UID (0020,0052)) are converted with the stage they came
from. Only these stages are converted: a bug in inference still surfaces as itself and is
retried. Every converted message is made safe with :func:`~dicom_node.redact.safe_message`
(no patient names, IDs or dates), and the original exception stays chained as ``__cause__``.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import InputError
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.inference import Segmenter
from dicom_node.outputs.measurements import Measurements, measure
from dicom_node.outputs.seg import build_seg
from dicom_node.outputs.sr import build_sr
from dicom_node.redact import describe, phi_values, safe_message
from dicom_node.store.spool import durable_write
from dicom_node.uids import output_uids

#: Exceptions that pydicom and highdicom raise on a dataset that lacks or garbles an attribute.
DATASET_ERRORS = (
    AttributeError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    InvalidDicomError,
    EOFError,
)


@contextmanager
def input_stage(stage: str, phi: set[str] | None = None, *, convert: bool = True) -> Iterator[None]:
    """Turn deterministic dataset failures inside the block into an :class:`InputError`.

    Parameters
    ----------
    stage
        What the block does, e.g. ``"while reading the series"``; starts the message.
    phi
        Patient values of the series (:func:`~dicom_node.redact.phi_values`) to remove from
        every message, including those of InputErrors raised inside the block.
    convert
        False: only make InputErrors safe, let every other exception through (for stages
        whose other failures are bugs, such as inference).

    Raises
    ------
    InputError
        ``"<stage>: <ExceptionType>: <safe message>"`` for the exceptions in
        :data:`DATASET_ERRORS`; an InputError from inside is re-raised with a safe message.
    """
    phi = phi if phi is not None else set()
    try:
        yield
    except InputError as exc:
        message = safe_message(str(exc), phi)
        if message == str(exc):
            raise
        raise InputError(message) from exc
    except DATASET_ERRORS as exc:
        if not convert:
            raise
        raise InputError(f"{stage}: {describe(exc, phi)}") from exc


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
    Each image's outputs get their own instance in the same SEG and SR output series.

    Raises
    ------
    InputError
        When the series cannot be read or its SEG or SR cannot be built from it (see the
        module docstring); the message names the stage and carries no patient data.
    """
    reading = "while reading the series"
    with input_stage(reading):
        headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    phi = phi_values(headers)
    with input_stage(reading, phi):
        projection = not all("ImagePositionPatient" in h for h in headers)
        if projection and len(paths) > 1:
            order = sorted(range(len(paths)), key=lambda i: str(headers[i].SOPInstanceUID))
            groups = [([paths[i]], n) for n, i in enumerate(order, start=1)]
        else:
            groups = [(list(paths), 1)]
    results = []
    for group, number in groups:
        with input_stage(reading, phi):
            series = load_series(group)
        results.append(_segment(series, segmenter, instance_number=number, phi=phi))
    return results


def _segment(
    series: ImageSeries, segmenter: Segmenter, *, instance_number: int, phi: set[str]
) -> SegmentationResult:
    package = segmenter.package
    with input_stage("while running the model", phi, convert=False):
        masks = segmenter.segment(series)
    with input_stage("while measuring the structures", phi):
        values = measure(series, masks, package)
    sources = series.sop_instance_uids
    uids = {
        kind: output_uids(series.series_instance_uid, package.name, package.version, kind, sources)
        for kind in ("seg", "sr")
    }
    sop_class = getattr(series.datasets[0].get("SOPClassUID"), "name", "these")
    with input_stage(f"while building the SEG for {sop_class} images", phi):
        seg = build_seg(
            series,
            masks,
            package,
            series_uid=uids["seg"][0],
            sop_uid=uids["seg"][1],
            instance_number=instance_number,
        )
    with input_stage(f"while building the SR for {sop_class} images", phi):
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
