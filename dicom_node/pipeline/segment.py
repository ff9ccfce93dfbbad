"""One series in, SEG / SR / overlay out: the pipeline part shared by the worker and ``process``.

series files -> :func:`load_series` -> :meth:`Segmenter.segment` -> :func:`measure` ->
:func:`build_seg` + :func:`build_sr` + :func:`build_overlays`, each only when an output kind
asks for it, with output UIDs derived from (source series, model name + version, output kind,
source instances). What comes out is :attr:`SegmentationResult.outputs`: ``(kind, dataset)``
pairs, which :func:`write_outputs` writes and the worker queues per destination.

Deterministic failures on a bad dataset become :class:`~dicom_node.errors.InputError`, so the
worker fails the job at once instead of retrying it: ``AttributeError``, ``KeyError``,
``ValueError``, ``TypeError`` and ``IndexError`` raised while reading the series or while
building the outputs (pydicom and highdicom raise these on a missing or malformed attribute,
e.g. a CT without Frame of Reference UID (0020,0052)) are converted with the stage they came
from. Only these stages are converted: a bug in inference still surfaces as itself and is
retried. Every converted message is made safe with :func:`~dicom_node.redact.safe_message`
(no patient names, IDs or dates), and the original exception stays chained as ``__cause__``.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import InputError, NotApplicableError
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.applicability import check_image
from dicom_node.models.inference import Segmenter
from dicom_node.outputs.kinds import DEFAULT_OUTPUTS, OutputKind
from dicom_node.outputs.measurements import Measurements, measure
from dicom_node.outputs.overlay import build_overlays
from dicom_node.outputs.seg import build_seg, check_seg_sources
from dicom_node.outputs.sr import build_sr
from dicom_node.redact import describe, phi_values, safe_message
from dicom_node.store.spool import durable_write
from dicom_node.uids import output_uids

log = structlog.get_logger(__name__)

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
        raise type(exc)(message) from exc  # the same kind (e.g. NotApplicableError), made safe
    except DATASET_ERRORS as exc:
        if not convert:
            raise
        raise InputError(f"{stage}: {describe(exc, phi)}") from exc


@dataclass(frozen=True)
class SegmentationResult:
    """What one segmentation made: ``outputs`` holds every object built, in writing order.

    Attributes
    ----------
    series
        The source images.
    measurements
        What the SR reports (computed whatever the outputs).
    outputs
        ``(kind, dataset)`` pairs: one SEG, one SR, and one overlay per source frame, as far
        as the requested kinds ask for them.
    """

    series: ImageSeries
    measurements: Measurements
    outputs: tuple[tuple[OutputKind, Dataset], ...]

    def of_kind(self, kind: OutputKind | str) -> list[Dataset]:
        """The output objects of ``kind`` (empty when that kind was not asked for)."""
        return [ds for k, ds in self.outputs if k == OutputKind(kind)]

    @property
    def seg(self) -> Dataset:
        """The SEG (a :class:`ValueError` when it was not asked for)."""
        return self._one(OutputKind.SEG)

    @property
    def sr(self) -> Dataset:
        """The TID 1500 SR (a :class:`ValueError` when it was not asked for)."""
        return self._one(OutputKind.SR)

    def _one(self, kind: OutputKind) -> Dataset:
        found = self.of_kind(kind)
        if not found:
            raise ValueError(f"no {kind.value} output: it was not among the requested kinds")
        return found[0]

    @staticmethod
    def encode(ds: Dataset) -> bytes:
        """The Part 10 file bytes of an output dataset."""
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


class WrittenOutput(NamedTuple):
    """One output file in the outbox: its kind, path and SOP Instance UID (0008,0018)."""

    kind: OutputKind
    path: Path
    sop_uid: str


def segment_series(
    paths: Sequence[Path],
    segmenter: Segmenter,
    kinds: Collection[OutputKind] = DEFAULT_OUTPUTS,
) -> list[SegmentationResult]:
    """Segment the series made of ``paths`` and build the outputs of ``kinds``.

    A cross-sectional series (or a single radiograph) gives one result. A projection series
    of several images (e.g. PA and lateral) gives one result per image: DICOM SEG needs a
    frame of reference to span several projection images, which radiographs do not have.
    Likewise a series of several multi-frame instances (enhanced CT/MR, cine) gives one
    result per instance, as highdicom writes a SEG on one multi-frame source. One multi-frame
    instance gives one SEG over all its frames (it needs a Frame of Reference UID when it
    has several frames, see :func:`~dicom_node.outputs.seg.check_seg_sources`). Each image's
    outputs get their own instance in the same output series of each kind.

    In such a series, an image outside the model's ``applicability`` (e.g. the lateral beside
    a PA, for a PA/AP model) is skipped; the series fails only when every image is.

    Raises
    ------
    NotApplicableError
        When the series (or every image of a projection series) is outside the model's
        ``applicability``.
    InputError
        When the series cannot be read or its outputs cannot be built from it (see the
        module docstring); the message names the stage and carries no patient data.
    """
    reading = "while reading the series"
    with input_stage(reading):
        headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    phi = phi_values(headers)
    with input_stage(reading, phi):
        projection = not all("ImagePositionPatient" in h for h in headers)
        multi_frame = any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers)
    if not ((projection or multi_frame) and len(paths) > 1):
        with input_stage(reading, phi):
            series = load_series(paths)
        return [_segment(series, segmenter, kinds, instance_number=1, phi=phi)]
    order = sorted(range(len(paths)), key=lambda i: str(headers[i].SOPInstanceUID))
    results: list[SegmentationResult] = []
    refused: list[NotApplicableError] = []
    for i in order:
        try:
            with input_stage(reading, phi):
                check_image(headers[i], segmenter.package)
        except NotApplicableError as exc:
            log.info("image skipped: outside the model's applicability", image=i + 1)
            refused.append(exc)
            continue
        with input_stage(reading, phi):
            series = load_series([paths[i]])
        results.append(
            _segment(series, segmenter, kinds, instance_number=len(results) + 1, phi=phi)
        )
    if not results:
        raise refused[0]
    return results


def _segment(
    series: ImageSeries,
    segmenter: Segmenter,
    kinds: Collection[OutputKind],
    *,
    instance_number: int,
    phi: set[str],
) -> SegmentationResult:
    package = segmenter.package
    with input_stage("while reading the series", phi):
        check_seg_sources(series)  # before inference: a refusal costs nothing
    with input_stage("while running the model", phi, convert=False):
        masks = segmenter.segment(series)
        notes = segmenter.notes(series)
    with input_stage("while measuring the structures", phi):
        values = measure(series, masks, package)
    notes = (*notes, *values.omitted)
    sources = series.sop_instance_uids
    sop_class = getattr(series.datasets[0].get("SOPClassUID"), "name", "these")

    def uids(kind: OutputKind) -> tuple[str, str]:
        series_uid, sop_uid = output_uids(
            series.series_instance_uid, package.name, package.version, kind.value, sources
        )
        return str(series_uid), str(sop_uid)

    outputs: list[tuple[OutputKind, Dataset]] = []
    if OutputKind.SEG in kinds or OutputKind.SR in kinds:  # the SR references the SEG
        seg_series, seg_sop = uids(OutputKind.SEG)
        with input_stage(f"while building the SEG for {sop_class} images", phi):
            seg = build_seg(
                series,
                masks,
                package,
                series_uid=seg_series,
                sop_uid=seg_sop,
                instance_number=instance_number,
            )
        if OutputKind.SEG in kinds:
            outputs.append((OutputKind.SEG, seg))
        if OutputKind.SR in kinds:
            sr_series, sr_sop = uids(OutputKind.SR)
            with input_stage(f"while building the SR for {sop_class} images", phi):
                sr = build_sr(
                    series,
                    seg,
                    masks,
                    package,
                    values,
                    series_uid=sr_series,
                    sop_uid=sr_sop,
                    instance_number=instance_number,
                    notes=notes,
                )
            outputs.append((OutputKind.SR, sr))
    if OutputKind.OVERLAY in kinds:
        ov_series, ov_sop = uids(OutputKind.OVERLAY)
        with input_stage(f"while building the overlay for {sop_class} images", phi):
            overlays = build_overlays(
                series,
                masks,
                package,
                series_uid=ov_series,
                sop_uid=ov_sop,
                instance_number=instance_number,
            )
        outputs.extend((OutputKind.OVERLAY, ds) for ds in overlays)
    return SegmentationResult(series, values, tuple(outputs))


def write_outputs(results: Sequence[SegmentationResult], folder: Path) -> list[WrittenOutput]:
    """Write every output object of ``results`` into ``folder``, one Part 10 file each."""
    written = []
    for result in results:
        for kind, ds in result.outputs:
            path = folder / f"{kind.value}-{ds.SOPInstanceUID}.dcm"
            durable_write(path, SegmentationResult.encode(ds))
            written.append(WrittenOutput(kind, path, str(ds.SOPInstanceUID)))
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


# PLACEHOLDER (branch `cases`): the multi-input pipeline is written by the `multiin` helper
# in parallel; at merge its segment_case replaces this stub. It exists here only so that the
# worker can dispatch multi-role cases; a multi-role job fails with NotImplementedError here.
def segment_case(
    inputs: Mapping[str, Sequence[Path]],
    segmenter: Segmenter,
    kinds: Collection[OutputKind] = DEFAULT_OUTPUTS,
) -> list[SegmentationResult]:
    """Segment a case of several named inputs (role -> instance files). Not built yet."""
    raise NotImplementedError(
        f"segment_case: multi-input models are not built in this branch (roles {sorted(inputs)})"
    )
