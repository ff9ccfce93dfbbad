"""Output writers: one per :class:`~dicom_node.common.output_kinds.OutputKind`, one interface.

A writer takes the :class:`SegmentationContext` of one result (the source images, the masks,
the package, the measurements, the output UIDs) and returns the datasets of its kind.
:data:`WRITERS` maps each kind to its writer, in writing order; a kind that needs another
(the SR references the SEG) names it in :attr:`OutputWriter.requires`, and
:func:`kinds_to_build` adds it, so the SEG is built (but not written) for an SR-only
destination. A new output kind is one writer and one entry here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.common.output_kinds import OutputKind
from dicom_node.common.uids import output_uids
from dicom_node.imaging.series import ImageSeries
from dicom_node.outputs.measurements import Measurements
from dicom_node.outputs.overlay import build_overlays
from dicom_node.outputs.seg import build_seg
from dicom_node.outputs.sr import build_sr
from dicom_node.package.manifest import ModelPackage


@dataclass
class SegmentationContext:
    """Everything a writer may use for one result.

    Attributes
    ----------
    series
        The reference input: the grid of ``masks``, what the SEG and overlay are made on.
    masks
        Boolean ``(frames, rows, cols, S)`` on the grid of ``series``.
    package
        The model package (structures, name, version).
    measurements
        What the SR reports.
    notes
        Sentences for the SR's Qualitative Evaluations (assumptions, omissions).
    instance_number
        Instance Number (0020,0013) of this result's objects in their output series.
    case_key
        What the output series UIDs derive from: the reference series' UID for a one-input
        case, else every role and its series (:func:`dicom_node.common.uids.case_key`).
    source_instances
        SOP Instance UIDs of every input image; the output SOP Instance UIDs derive from them.
    secondary
        The other inputs of a multi-input case, role -> series (the SR lists them too).
    built
        The datasets built so far, by kind (a writer reads those it ``requires``).
    """

    series: ImageSeries
    masks: np.ndarray
    package: ModelPackage
    measurements: Measurements
    notes: tuple[str, ...]
    instance_number: int
    case_key: str
    source_instances: tuple[str, ...]
    secondary: Mapping[str, ImageSeries] = field(default_factory=dict)
    built: dict[OutputKind, list[Dataset]] = field(default_factory=dict)

    def uids(self, kind: OutputKind) -> tuple[str, str]:
        """``(series_uid, sop_instance_uid)`` of the output of ``kind``
        (:func:`dicom_node.common.uids.output_uids`)."""
        series_uid, sop_uid = output_uids(
            self.case_key,
            self.package.name,
            self.package.version,
            kind.value,
            self.source_instances,
        )
        return str(series_uid), str(sop_uid)


class OutputWriter(Protocol):
    """Builds the datasets of one output kind from a :class:`SegmentationContext`."""

    kind: OutputKind
    #: Kinds whose datasets this writer reads from ``context.built``.
    requires: tuple[OutputKind, ...]
    #: How error messages name what was being built, e.g. ``"the SEG"``.
    what: str

    def write(self, context: SegmentationContext) -> list[Dataset]: ...


class SegWriter:
    """One BINARY SEG on the reference series (:func:`~dicom_node.outputs.seg.build_seg`)."""

    kind: OutputKind = OutputKind.SEG
    requires: tuple[OutputKind, ...] = ()
    what: str = "the SEG"

    def write(self, context: SegmentationContext) -> list[Dataset]:
        series_uid, sop_uid = context.uids(self.kind)
        return [
            build_seg(
                context.series,
                context.masks,
                context.package,
                series_uid=series_uid,
                sop_uid=sop_uid,
                instance_number=context.instance_number,
            )
        ]


class SrWriter:
    """One TID 1500 SR on the SEG and every input (:func:`~dicom_node.outputs.sr.build_sr`)."""

    kind: OutputKind = OutputKind.SR
    requires: tuple[OutputKind, ...] = (OutputKind.SEG,)
    what: str = "the SR"

    def write(self, context: SegmentationContext) -> list[Dataset]:
        series_uid, sop_uid = context.uids(self.kind)
        (seg,) = context.built[OutputKind.SEG]
        return [
            build_sr(
                context.series,
                seg,
                context.masks,
                context.package,
                context.measurements,
                series_uid=series_uid,
                sop_uid=sop_uid,
                instance_number=context.instance_number,
                notes=context.notes,
                secondary=tuple(context.secondary.values()),
            )
        ]


class OverlayWriter:
    """One Secondary Capture per source frame with outlines burned in
    (:func:`~dicom_node.outputs.overlay.build_overlays`)."""

    kind: OutputKind = OutputKind.OVERLAY
    requires: tuple[OutputKind, ...] = ()
    what: str = "the overlay"

    def write(self, context: SegmentationContext) -> list[Dataset]:
        series_uid, sop_uid = context.uids(self.kind)
        return build_overlays(
            context.series,
            context.masks,
            context.package,
            series_uid=series_uid,
            sop_uid=sop_uid,
            instance_number=context.instance_number,
        )


#: Each output kind's writer, in writing order (a writer after those it requires).
WRITERS: dict[OutputKind, OutputWriter] = {
    OutputKind.SEG: SegWriter(),
    OutputKind.SR: SrWriter(),
    OutputKind.OVERLAY: OverlayWriter(),
}


def kinds_to_build(kinds: Collection[OutputKind]) -> list[OutputKind]:
    """The kinds to build for ``kinds``: those and what they require, in :data:`WRITERS`
    order."""
    needed = set(kinds)
    for kind in reversed(WRITERS):  # a writer's requirements come before it
        if kind in needed:
            needed.update(WRITERS[kind].requires)
    return [kind for kind in WRITERS if kind in needed]
