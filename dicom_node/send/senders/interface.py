"""The interface every sender implements, and what a send returns.

:class:`Sender` is what delivery calls; :class:`SendOutcome` holds one :class:`StoreResult`
per file sent. See :mod:`dicom_node.send.senders` for the meaning of ``ok``, ``permanent`` and
``answered``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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
