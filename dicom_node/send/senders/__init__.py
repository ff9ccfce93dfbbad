"""Senders: one interface over every kind of destination (C-STORE, DICOMweb STOW-RS).

Delivery (``pipeline/delivery.py``) knows only :class:`Sender`: ``send(files)`` returns one
:class:`StoreResult` per file, in order, and never raises for network or peer trouble;
``echo()`` says whether the destination answers (a C-ECHO, or an authenticated QIDO-RS
search for DICOMweb), which makes its waiting sends due at once. :func:`sender_for` picks the
implementation from ``Destination.type``.

A result is ``ok`` (stored, possibly with a warning), or failed: ``permanent`` failures (the
peer refused it for good, e.g. HTTP 401/403/413) are dead-lettered at once, the others retried
with backoff. ``detail`` never carries patient data: statuses, counts and reasons only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.config.settings import Destination, DestinationType


@dataclass(frozen=True)
class StoreResult:
    """Outcome of storing one file: ``ok`` when the destination stored it (Success or Warning).

    ``permanent``: a failure retrying cannot cure; it is dead-lettered at once.
    """

    path: Path
    ok: bool
    detail: str
    permanent: bool = False


@dataclass(frozen=True)
class SendOutcome:
    """What one :meth:`Sender.send` achieved: a result per file, in the order given.

    ``answered``: the destination took part (an association or an HTTP response), whatever it
    said about each file; delivery takes an answer with a stored file as "it is back".
    """

    results: tuple[StoreResult, ...]
    answered: bool

    @classmethod
    def all_failed(
        cls, paths: Sequence[Path], detail: str, *, answered: bool = False, permanent: bool = False
    ) -> SendOutcome:
        return cls(tuple(StoreResult(p, False, detail, permanent) for p in paths), answered)


class Sender(Protocol):
    """Delivers files to one destination."""

    def send(self, files: Sequence[Path]) -> SendOutcome:
        """Store ``files``; never raises for network or peer trouble."""
        ...

    def echo(self) -> bool:
        """True when the destination answers and would accept a send (a cheap check)."""
        ...


def sender_for(destination: Destination, *, calling_ae: str = "DICOMNODE") -> Sender:
    """The :class:`Sender` for ``destination.type``; ``calling_ae`` is our AE title (DIMSE)."""
    if destination.type is DestinationType.DICOMWEB:
        from dicom_node.send.senders.dicomweb import DicomwebSender

        return DicomwebSender(destination)
    from dicom_node.send.senders.dimse import DimseSender

    return DimseSender(destination, calling_ae=calling_ae)
