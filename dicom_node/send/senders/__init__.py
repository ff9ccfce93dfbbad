"""Senders: one interface over every kind of destination (C-STORE, DICOMweb STOW-RS).

Delivery (:mod:`dicom_node.send.delivery`) knows only :class:`Sender`: ``send(files)`` returns one
:class:`StoreResult` per file, in order, and never raises for network or peer trouble;
``echo()`` says whether the destination answers (a C-ECHO, or an authenticated QIDO-RS
search for DICOMweb), which makes its waiting sends due at once. :func:`sender_for` picks the
implementation by the destination's type: a
:class:`~dicom_node.config.destinations.DimseDestination` gets a
:class:`~dicom_node.send.senders.dimse.DimseSender`, a
:class:`~dicom_node.config.destinations.DicomwebDestination` a
:class:`~dicom_node.send.senders.dicomweb.DicomwebSender`. The interface and its results live
in :mod:`dicom_node.send.senders.interface`.

A result is ``ok`` (stored, possibly with a warning), or failed: ``permanent`` failures (the
peer refused it for good, e.g. HTTP 401/403/413) are dead-lettered at once, the others retried
with backoff. ``detail`` never carries patient data: statuses, counts and reasons only.
"""

from __future__ import annotations

from dicom_node.config.destinations import Destination, DicomwebDestination
from dicom_node.send.senders.dicomweb import DicomwebSender
from dicom_node.send.senders.dimse import DimseSender
from dicom_node.send.senders.interface import Sender, SendOutcome, StoreResult

__all__ = ["SendOutcome", "Sender", "StoreResult", "sender_for"]


def sender_for(destination: Destination, *, calling_ae: str = "DICOMNODE") -> Sender:
    """The :class:`Sender` for the destination's type; ``calling_ae`` is our AE title (DIMSE)."""
    if isinstance(destination, DicomwebDestination):
        return DicomwebSender(destination)
    return DimseSender(destination, calling_ae=calling_ae)
