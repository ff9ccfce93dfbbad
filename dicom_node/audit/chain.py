"""The audit chain: how a record is sealed, and the contract of the stores that keep it.

Both stores (:class:`~dicom_node.audit.file_chain.FileChain`, the JSON-lines file;
:class:`~dicom_node.audit.database_chain.DatabaseChain`, the table ``audit_records``) seal a
record the same way and keep the same canonical JSON line: sequence number, SHA-256 of the
previous record (:data:`GENESIS` before the first), SHA-256 of this one (:func:`digest`), and
HMAC-SHA256 of that hash under ``audit.key_file`` (:func:`mac`). The chain head (last sequence
number and hash) is kept in the node database (:class:`HeadStore`, name :data:`HEAD`).

A failed append raises :class:`~dicom_node.common.errors.AuditWriteError` and leaves nothing of the
record behind, in either store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Protocol

GENESIS = "0" * 64
#: Name of the chain head in the database table ``audit_head``.
HEAD = "head"


def digest(prev: str, body: dict[str, Any]) -> str:
    """SHA-256 of ``prev`` and the canonical JSON of ``body`` (sorted keys, no spaces, ASCII)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev + canonical).encode()).hexdigest()


def mac(key: bytes, record_hash: str) -> str:
    """HMAC-SHA256 of a record's hash (the hash already covers ``prev``, ``seq`` and the body)."""
    return hmac.new(key, record_hash.encode(), hashlib.sha256).hexdigest()


def seal(body: dict[str, Any], seq: int, prev: str, key: bytes) -> tuple[str, str]:
    """Number and chain ``body`` (in place); return its hash and its line (no end of line)."""
    body["seq"] = seq
    body["prev"] = prev
    record_hash = digest(prev, body)
    return record_hash, json.dumps({**body, "hash": record_hash, "hmac": mac(key, record_hash)})


class HeadStore(Protocol):
    """Where the chain head and export positions are kept (the node database)."""

    def audit_mark(self, name: str) -> tuple[int, str] | None: ...

    def set_audit_mark(self, name: str, seq: int, digest: str) -> None: ...


class ChainReader(Protocol):
    """Reads a chain forward, record by record, from where it last stopped."""

    def pending(self, after: int) -> list[dict[str, Any]]:
        """Whole records not yet returned by this reader whose ``seq`` is above ``after``."""
        ...


class AuditChain(Protocol):
    """A chain store: appends sealed records, reads them back."""

    #: Where the chain is, for messages (a file path or ``database``).
    location: str

    def startup_alerts(self) -> list[dict[str, Any]]:
        """What the chain found wrong when it was opened (each becomes a Security Alert)."""
        ...

    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        """Seal and store one record whole, durably; return it (with seq, prev, hash, hmac).

        Raises
        ------
        AuditWriteError
            When the record cannot be stored; nothing of it stays.
        """
        ...

    def reader(self) -> ChainReader: ...

    def take_lease(self, name: str, owner: str, now: int, until: int) -> bool:
        """Take or renew the lease ``name`` for ``owner`` until ``until`` (epoch seconds).

        The syslog exporter sends only while it holds its repository's lease.
        """
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease ``name`` back when ``owner`` holds it (an exporter that stops)."""
        ...
