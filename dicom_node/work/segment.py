"""One case in, SEG / SR / overlay out: the pipeline part shared by the worker and ``process``.

A case is one series per input role of the model package (:func:`segment_case`; one role
``image`` for a package without ``inputs``, :func:`segment_series`). Files of each role ->
:func:`load_series` -> ``segmenter.segment`` -> :func:`measure` ->
the writers of :data:`~dicom_node.outputs.writers.WRITERS` (SEG, SR, overlay), each only when
an output kind asks for it (or another kind requires it), with output UIDs derived from
(the case's role -> series, model name + version, output kind, source instances). What
comes out is :attr:`SegmentationResult.outputs`: ``(kind, dataset)`` pairs, which
:func:`write_outputs` writes and the worker queues per destination.

Deterministic failures on a bad dataset become :class:`~dicom_node.common.errors.InputError`, so the
worker fails the job at once instead of retrying it: ``AttributeError``, ``KeyError``,
``ValueError``, ``TypeError`` and ``IndexError`` raised while reading the series or while
building the outputs (pydicom and highdicom raise these on a missing or malformed attribute,
e.g. a CT without Frame of Reference UID (0020,0052)) are converted with the stage they came
from. Only these stages are converted: a bug in inference still surfaces as itself and is
retried. Every converted message is made safe with :func:`~dicom_node.common.redact.safe_message`
(no patient names, IDs or dates), and the original exception stays chained as ``__cause__``.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.common.errors import InputError, NotApplicableError
from dicom_node.common.output_kinds import DEFAULT_OUTPUTS, OutputKind
from dicom_node.common.redact import describe, phi_values, safe_message
from dicom_node.common.uids import case_key
from dicom_node.imaging.resample import resample_onto
from dicom_node.imaging.series import ImageSeries, load_series
from dicom_node.models.inference import CaseSegmenter, InferenceReport
from dicom_node.models.preprocess import model_images, stack_inputs
from dicom_node.outputs.measurements import Measurements, measure
from dicom_node.outputs.seg import check_seg_sources
from dicom_node.outputs.writers import WRITERS, SegmentationContext, kinds_to_build
from dicom_node.package.applicability import check_image
from dicom_node.store.files import durable_write

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
        Patient values of the series (:func:`~dicom_node.common.redact.phi_values`) to remove from
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
    inference
        What the model run had to do beyond the plan (CUDA out-of-memory retries, CPU
        fallback); the worker logs it with the job.
    inputs
        Role -> Series Instance UID of every input used (the reference's role included).
    """

    series: ImageSeries
    measurements: Measurements
    outputs: tuple[tuple[OutputKind, Dataset], ...]
    inference: InferenceReport = field(default_factory=InferenceReport)
    inputs: Mapping[str, str] = field(default_factory=dict)

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
    segmenter: CaseSegmenter,
    kinds: Collection[OutputKind] = DEFAULT_OUTPUTS,
) -> list[SegmentationResult]:
    """The one-input shorthand of :func:`segment_case`: ``paths`` fill the package's
    reference role (``image`` for a package without ``inputs``)."""
    return segment_case({segmenter.package.reference: paths}, segmenter, kinds)


def segment_case(
    inputs: Mapping[str, Sequence[Path]],
    segmenter: CaseSegmenter,
    kinds: Collection[OutputKind] = DEFAULT_OUTPUTS,
) -> list[SegmentationResult]:
    """Segment one case, role -> instance files of its series, and build the outputs of
    ``kinds``.

    The roles are the package's ``inputs`` (one role ``image`` without them). An optional
    role may be absent: its channels are zeros. A multi-input case gives one result, on the
    reference input's grid (see :func:`_segment_inputs`); a one-input case is segmented as
    below.

    A cross-sectional series (or a single radiograph) gives one result. A projection series
    of several images (e.g. PA and lateral) gives one result per image: DICOM SEG needs a
    frame of reference to span several projection images, which radiographs do not have.
    Likewise a series of several multi-frame instances (enhanced CT/MR, cine) gives one
    result per instance, as highdicom writes a SEG on one multi-frame source. One multi-frame
    instance gives one SEG over all its frames (it needs a Frame of Reference UID when it
    has several frames, see :func:`~dicom_node.outputs.seg.check_seg_sources`). Each image's
    outputs get their own instance in the same output series of each kind.

    In such a series, an image outside the model's ``applicability`` (e.g. the lateral beside
    a PA, for a PA/AP model) is skipped, and the SR of every measured image says in its
    notes which image was not measured and why (:func:`not_measured_note`); the series fails
    only when every image is skipped.

    Raises
    ------
    NotApplicableError
        When the series (or every image of a projection series) is outside the model's
        ``applicability``.
    InputError
        When the series cannot be read or its outputs cannot be built from it (see the
        module docstring); the message names the stage and carries no patient data. Also
        when a role is not one of the package's, a required role is missing, or a secondary
        input cannot be put on the reference grid (another Frame of Reference UID without
        ``registered: true``).
    """
    package = segmenter.package
    given = {role: list(paths) for role, paths in inputs.items() if paths}
    unknown = sorted(set(given) - set(package.roles))
    if unknown:
        raise InputError(
            f"input role(s) {', '.join(unknown)} are not inputs of model {package.name}, whose "
            f"roles are {', '.join(package.roles)}; give the route the package's roles"
        )
    missing = [spec.role for spec in package.inputs if spec.required and spec.role not in given]
    if missing:
        raise InputError(
            f"model {package.name} needs input(s) {', '.join(missing)}, which this case lacks; "
            "send the missing series, or mark the role required: false in the model package "
            "if the model was trained without it"
        )
    if len(package.inputs) > 1:
        return [_segment_inputs(given, segmenter, kinds)]
    paths = given[package.reference]
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
    measured: list[int] = []
    refused: list[NotApplicableError] = []
    not_measured: list[str] = []
    for i in order:
        try:
            with input_stage(reading, phi):
                check_image(headers[i], segmenter.package)
        except NotApplicableError as exc:
            log.info("image skipped: outside the model's applicability", image=i + 1)
            refused.append(exc)
            not_measured.append(not_measured_note(headers[i], len(paths), str(exc)))
            continue
        measured.append(i)
    if not measured:
        raise refused[0]
    results: list[SegmentationResult] = []
    for i in measured:
        with input_stage(reading, phi):
            series = load_series([paths[i]])
        results.append(
            _segment(
                series,
                segmenter,
                kinds,
                instance_number=len(results) + 1,
                phi=phi,
                series_notes=tuple(not_measured),
            )
        )
    return results


def not_measured_note(header: Dataset, n_images: int, reason: str) -> str:
    """The SR note that one image of a series was not measured, and why.

    Parameters
    ----------
    header
        The image left out (its header): named by Instance Number (0020,0013), SOP Instance
        UID (0008,0018) and View Position (0018,5101).
    n_images
        How many images the series holds.
    reason
        Why, e.g. the message of a :class:`NotApplicableError`; what it says to do after a
        ``"; "`` (advice for the node's administrator) is left out of the SR.
    """
    number = header.get("InstanceNumber")
    which = "an image" if number in (None, "") else f"image {number}"
    view = str(header.get("ViewPosition") or "").strip() or "absent"
    why = reason.split("; ")[0].strip().rstrip(".")
    return (
        f"Not measured: {which} of the {n_images} of this series (SOP Instance UID "
        f"{header.SOPInstanceUID}, View Position {view}) was left out: {why}."
    )


def _segment_inputs(
    inputs: Mapping[str, Sequence[Path]], segmenter: CaseSegmenter, kinds: Collection[OutputKind]
) -> SegmentationResult:
    """One result of a multi-input case: each input read as an :class:`ImageSeries`, the
    secondary ones resampled (linear) onto the reference input's grid in patient coordinates
    (:func:`~dicom_node.imaging.resample.resample_onto`) when they share its Frame of
    Reference UID (0020,0052) or the package says ``registered: true``; the channel stack in
    the package's order, zeros for a missing optional role."""
    package = segmenter.package
    with input_stage("while reading the inputs"):
        headers = [dcmread(p, stop_before_pixels=True) for paths in inputs.values() for p in paths]
    phi = phi_values(headers)
    series: dict[str, ImageSeries] = {}
    for role, paths in inputs.items():
        with input_stage(f"while reading input {role}", phi):
            series[role] = load_series(paths)
    reference = series[package.reference]
    if reference.is_projection and len(reference.datasets) > 1:
        raise InputError(
            f"the reference input {package.reference} holds {len(reference.datasets)} "
            "projection images; a multi-input model needs one image or one cross-sectional "
            "series as its reference"
        )
    images: list[np.ndarray | None] = []
    for role in package.roles:
        if role not in series:
            images.append(None)  # a missing optional role: zeros after normalisation
            continue
        with input_stage(f"while putting input {role} on the reference grid", phi, convert=False):
            images.append(_on_reference(role, series[role], reference, segmenter))
    stack = stack_inputs(images, package)
    roles = {role: s.series_instance_uid for role, s in series.items()}
    return _segment(
        reference,
        segmenter,
        kinds,
        instance_number=1,
        phi=phi,
        stack=stack,
        secondary={r: s for r, s in series.items() if r != package.reference},
        inputs=roles,
    )


def _on_reference(
    role: str, secondary: ImageSeries, reference: ImageSeries, segmenter: CaseSegmenter
) -> np.ndarray:
    """The model image of input ``role`` on the grid of ``reference``.

    Raises
    ------
    InputError
        When the two do not share a Frame of Reference UID (0020,0052) and the package does
        not say ``registered: true``, or (registered projection images) differ in size.
    """
    package = segmenter.package
    values = model_images(secondary, package)
    if secondary is reference:
        return values
    ref_role = package.reference
    if not package.registered and (
        secondary.frame_of_reference_uid is None
        or secondary.frame_of_reference_uid != reference.frame_of_reference_uid
    ):
        raise InputError(
            f"inputs {ref_role} and {role} of model {package.name} do not share a Frame of "
            "Reference UID (0020,0052), so the position of one in the other is unknown and "
            f"{role} cannot be resampled onto {ref_role}; send series of one frame of "
            "reference (one acquisition session), or register them at the site and set "
            "registered: true in the model package"
        )
    if secondary.is_projection or reference.is_projection:
        if secondary.shape != reference.shape:
            raise InputError(
                f"inputs {ref_role} and {role} are images without a position in patient "
                f"coordinates and of different sizes ({reference.shape[1:]} and "
                f"{secondary.shape[1:]}); registered inputs without geometry must share one grid"
            )
        return values
    return resample_onto(values, secondary, reference, default=float(np.nanmin(values)), role=role)


def _segment(
    series: ImageSeries,
    segmenter: CaseSegmenter,
    kinds: Collection[OutputKind],
    *,
    instance_number: int,
    phi: set[str],
    stack: np.ndarray | None = None,
    secondary: Mapping[str, ImageSeries] | None = None,
    inputs: Mapping[str, str] | None = None,
    series_notes: tuple[str, ...] = (),
) -> SegmentationResult:
    """One result: segment ``series``, measure, build the outputs of ``kinds``.
    ``series_notes`` go into the SR's notes after the model's own (e.g. which other images
    of the source series were not measured, :func:`not_measured_note`)."""
    package = segmenter.package
    secondary = secondary or {}
    inputs = inputs or {package.reference: series.series_instance_uid}
    with input_stage("while reading the series", phi):
        check_seg_sources(series)  # before inference: a refusal costs nothing
    report = InferenceReport()
    with input_stage("while running the model", phi, convert=False):
        masks = segmenter.segment(series, stack, report)
        notes = segmenter.notes(series)
    with input_stage("while measuring the structures", phi):
        values = measure(series, masks, package)
    context = SegmentationContext(
        series=series,
        masks=masks,
        package=package,
        measurements=values,
        notes=(*notes, *series_notes, *values.omitted),
        instance_number=instance_number,
        case_key=case_key(inputs),
        source_instances=(
            *series.sop_instance_uids,
            *(uid for other in secondary.values() for uid in other.sop_instance_uids),
        ),
        secondary=secondary,
    )
    sop_class = getattr(series.datasets[0].get("SOPClassUID"), "name", "these")
    for kind in kinds_to_build(kinds):
        writer = WRITERS[kind]
        with input_stage(f"while building {writer.what} for {sop_class} images", phi):
            context.built[kind] = writer.write(context)
    outputs = tuple((kind, ds) for kind in WRITERS if kind in kinds for ds in context.built[kind])
    return SegmentationResult(series, values, outputs, report, dict(inputs))


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
