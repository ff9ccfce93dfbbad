"""Specific Character Set (0008,0005) of the objects the node writes.

Source images arrive with any character set pydicom decodes: none or an empty value (the
default repertoire), single-byte sets (``ISO_IR 100``...), ISO 2022 code extensions with an
empty first value (``\\ISO 2022 IR 87``), ``GB18030``, ``ISO_IR 192`` (UTF-8). highdicom copies
the first source's Specific Character Set into a SEG or SR and refuses the values its
:class:`highdicom.SpecificCharacterSetValues` lacks (an empty value, ``GB18030``...).

The node therefore never lets highdicom copy it: outputs are built with ``ISO_IR 192``, the
text copied from the sources is decoded to ``str`` by pydicom on the way, and
:func:`set_output_character_set` then keeps ``ISO_IR 192`` only when some text is not ASCII.
An all-ASCII output carries no Specific Character Set (the default repertoire), like the
sources of most scanners.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom

#: Specific Character Set (0008,0005) of outputs with non-ASCII text: Unicode in UTF-8.
UTF8 = "ISO_IR 192"

#: Value Representations whose text is encoded with the Specific Character Set (PS3.5 6.1.2.3).
CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


def _texts(value: Any) -> Iterator[str | bytes]:
    if value is None:
        return
    if isinstance(value, str | bytes):
        yield value
    elif isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        for item in value:
            yield from _texts(item)
    else:  # PersonName: its decoded form, all component groups joined with "="
        yield str(value)


def has_non_ascii_text(ds: pydicom.Dataset) -> bool:
    """True when a text element of ``ds`` or of its sequences (VR SH, LO, ST, LT, UC, UT or
    PN) holds a character outside the default repertoire (ASCII)."""
    for elem in ds.iterall():
        if elem.VR not in CHARSET_VRS:
            continue
        for text in _texts(elem.value):
            if isinstance(text, bytes):
                if any(b >= 0x80 or b == 0x1B for b in text):
                    return True
            elif not text.isascii():
                return True
    return False


def set_output_character_set(ds: pydicom.Dataset) -> None:
    """Give an output dataset the Specific Character Set (0008,0005) its text needs.

    ``ISO_IR 192`` (UTF-8) when any text is not ASCII, else none (the default repertoire).
    Text values must already be ``str`` or :class:`pydicom.valuerep.PersonName` (as highdicom
    leaves them); pydicom encodes them with this character set when the dataset is written.
    """
    if has_non_ascii_text(ds):
        ds.SpecificCharacterSet = UTF8
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
