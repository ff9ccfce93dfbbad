"""The kinds of result the node can write, as named in ``destinations.<name>.outputs``."""

from __future__ import annotations

import enum


class OutputKind(enum.StrEnum):
    """One kind of output object, written once per result and sent to who asked for it."""

    SEG = "seg"  # Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4), BINARY
    SR = "sr"  # Comprehensive 3D SR, TID 1500 Measurement Report (references the SEG)
    OVERLAY = "overlay"  # Secondary Capture Image Storage, outlines burned in (no SEG needed)


#: What a destination receives when its config names no ``outputs``.
DEFAULT_OUTPUTS: tuple[OutputKind, ...] = (OutputKind.SEG, OutputKind.SR)
