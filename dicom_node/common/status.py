"""DIMSE status codes the node uses (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from __future__ import annotations

import enum


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses returned by the receiver."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk full, database busy)
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: dataset does not match SOP class
    CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (undecodable, invalid UIDs)
    # Warnings a destination may answer with; the instance was stored.
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007


#: Statuses from a destination that mean the instance was stored.
STORED = frozenset(
    {
        StoreStatus.SUCCESS,
        StoreStatus.COERCION_OF_DATA_ELEMENTS,
        StoreStatus.ELEMENTS_DISCARDED,
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)


class EchoStatus(enum.IntEnum):
    SUCCESS = 0x0000
