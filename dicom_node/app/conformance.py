"""The tables of the DICOM Conformance Statement (``docs/conformance.md``), from the code.

``docs/conformance.md`` holds hand-written prose in the PS3.2 structure and, between markers
``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->``, the blocks
:func:`render_blocks` makes from the constants the node itself uses: the receiver's
presentation contexts, statuses and Error Comments (:mod:`dicom_node.receive.receiver`), the
transfer syntaxes (:mod:`dicom_node.common.syntaxes`), the DIMSE statuses
(:mod:`dicom_node.common.status`), TLS (:mod:`dicom_node.common.tls`), the config keys and
their defaults (:mod:`dicom_node.config`), the output character set
(:mod:`dicom_node.outputs.charset`), and the attributes of the SEG, SR and overlay the node
creates, built here by the worker's own code (:func:`dicom_node.work.segment.segment_series`)
from synthetic radiographs with a random model package.

``dicom-node conformance`` prints the blocks; ``--write docs/conformance.md`` replaces them in
the document (its prose kept); ``tests/app/test_conformance.py`` fails when they drift.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

import dicom_node
from dicom_node.common.output_kinds import OutputKind
from dicom_node.common.status import STORED, EchoStatus, StoreStatus
from dicom_node.common.syntaxes import ACCEPTED
from dicom_node.common.tls import HANDSHAKE_TIMEOUT_S, MINIMUM_TLS_VERSION
from dicom_node.config.sections import Limits, TLSSettings
from dicom_node.config.settings import Settings
from dicom_node.outputs.charset import CHARSET_VRS, UTF8
from dicom_node.receive.receiver import (
    DIMSE_TIMEOUT_S,
    ERROR_COMMENT_MAX_CHARS,
    MAX_PDU_BYTES,
    REFUSALS,
    supported_contexts,
)
from dicom_node.send.senders.dimse import proposed_contexts

#: The document the blocks live in, relative to the repository root.
DOCUMENT = Path("docs/conformance.md")

#: The command that regenerates the document's blocks.
REGENERATE = f"dicom-node conformance --write {DOCUMENT}"

#: DICOM Application Context Name (PS3.7 Annex A.2.1), the only one DICOM defines.
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")

_BLOCK_RE = re.compile(
    r"(<!-- BEGIN GENERATED (?P<name>[a-z0-9-]+)[^>]*-->\n)(?P<body>.*?)"
    r"(<!-- END GENERATED (?P=name) -->)",
    re.DOTALL,
)

#: What each node-side config key means (listed in the Configuration section).
NODE_KEYS: dict[str, str] = {
    "ae_title": "the node's AE title: the Called AE Title it answers to, the Calling AE Title "
    "it sends with",
    "port": "TCP port of the DICOM listener (TLS on it when `tls` is set)",
    "bind_address": "the address it listens on",
    "called_ae_titles": "further Called AE Titles it answers to (one node, several titles)",
    "allowed_callers": "Calling AE Titles admitted; empty: any valid title",
    "allowed_networks": "peer addresses admitted (CIDR); empty: any",
    "tls": "TLS on the DICOM port (section below)",
    "limits": "connection, time, size and disk bounds (section below)",
}

#: What each ``limits:`` key bounds.
LIMIT_KEYS: dict[str, str] = {
    "idle_timeout_s": "seconds a connection may stay silent: before its A-ASSOCIATE-RQ (ARTIM), "
    "between PDUs and between reads inside a PDU; then A-ABORT",
    "min_bytes_per_s": "average rate a peer must keep up over a whole DIMSE message (its "
    "PDUs and the gaps between them) after the first idle_timeout_s; then A-ABORT",
    "max_associations": "associations at once; beyond, A-ASSOCIATE-RJ (rejected-transient, "
    "local limit exceeded)",
    "reserved_associations": "of max_associations, kept for C-ECHO-only associations and "
    "allowed_callers",
    "max_associations_per_peer": "connections from one host, and associations of one Calling "
    "AE Title",
    "max_connections": "open TCP connections at once, associated or not; further ones closed",
    "max_instance_bytes": "largest data set of one C-STORE: cut (A-ABORT) while it arrives, "
    "or refused (0xA700)",
    "min_free_disk_bytes": "free space of storage_dir below which C-STOREs are refused (0xA700; "
    "the data set is read and dropped)",
    "database_timeout_s": "seconds a C-STORE waits for a PostgreSQL connection before it is "
    "refused (0xA700)",
}

#: What each ``tls:`` key does.
TLS_KEYS: dict[str, str] = {
    "cert_file": "the node's certificate (PEM)",
    "key_file": "its private key (PEM)",
    "ca_file": "when set, callers must present a certificate this CA signed (mutual TLS)",
    "handshake_timeout_s": "seconds a caller has to complete the TLS handshake",
}


# -- markdown helpers ---------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _uid_name(uid: str) -> str:
    return str(UID(uid).name)


def _default(cls: type, name: str) -> object:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _show(value: object) -> str:
    if value is None:
        return "not set"
    if isinstance(value, tuple | list):
        return "`[]`" if not value else ", ".join(f"`{v}`" for v in value)
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value}`"


def _described(cls: type, described: dict[str, str], section: str) -> list[tuple[str, str]]:
    """``(key, default)`` of every field of ``cls``; a field without a description fails."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in described and section != "node"]
    if missing:
        raise KeyError(f"{section}: describe {missing} in dicom_node/app/conformance.py")
    return [(n, _show(_default(cls, n))) for n in names if n in described]


# -- the blocks that need no outputs ------------------------------------------------------------


def implementation() -> str:
    """Application Context, Implementation Class UID and Version Name, PDU size."""
    from pynetdicom import AE

    ae = AE()
    return _table(
        ("Item", "Value"),
        [
            ("Product", f"dicom-node {dicom_node.__version__}"),
            ("Application Context Name", f"`{APPLICATION_CONTEXT}`"),
            ("Implementation Class UID", f"`{ae.implementation_class_uid}`"),
            ("Implementation Version Name", f"`{ae.implementation_version_name}`"),
            ("Maximum PDU length received (SCP)", f"{MAX_PDU_BYTES} bytes"),
            ("Maximum PDU length received (SCU)", f"{ae.maximum_pdu_size} bytes"),
            ("Default AE title", f"`{_default(Settings, 'ae_title')}`"),
            ("Default port", f"`{_default(Settings, 'port')}`"),
            ("SCP/SCU role selection, extended negotiation", "not supported (ignored)"),
            ("Asynchronous operations window", "not supported: one operation at a time"),
        ],
    )


def scp_contexts() -> str:
    """The SOP classes the receiver accepts; the storage ones with the accepted syntaxes."""
    rows = []
    for sop, syntaxes in supported_contexts():
        ts = (
            "Table *Transfer syntaxes accepted*"
            if syntaxes == ACCEPTED
            else (", ".join(f"{_uid_name(t)} `{t}`" for t in syntaxes))
        )
        rows.append((_uid_name(sop), f"`{sop}`", "SCP", ts))
    return _table(("SOP Class", "UID", "Role", "Transfer Syntaxes"), rows)


def accepted_syntaxes() -> str:
    """The transfer syntaxes of every storage context, in the node's order of preference."""
    return _table(
        ("Transfer Syntax", "UID"),
        [(_uid_name(ts), f"`{ts}`") for ts in ACCEPTED],
    )


def store_statuses() -> str:
    """Every status the receiver answers a C-STORE with, with its Error Comment."""
    rows: list[tuple[str, ...]] = [
        (
            "Success",
            f"0x{StoreStatus.SUCCESS:04X}",
            "(none)",
            "the instance is durable and indexed: in the receive journal (fdatasync), "
            "in the spool, committed",
        )
    ]
    for refusal in REFUSALS.values():
        rows.append(
            (
                _status_kind(refusal.status),
                f"0x{refusal.status:04X}",
                f"`{refusal.comment}`",
                refusal.when,
            )
        )
    return _table(("Status", "Code", "Error Comment (0000,0902)", "When"), rows)


def _status_kind(status: StoreStatus) -> str:
    if status == StoreStatus.SUCCESS:
        return "Success"
    if status in STORED:
        return "Warning"
    return "Refused" if (status >> 12) == 0xA and status < 0xA900 else "Error"


def echo_statuses() -> str:
    return _table(
        ("Status", "Code", "When"),
        [(m.name.title(), f"0x{m:04X}", "always") for m in EchoStatus],
    )


def scu_statuses() -> str:
    """How the sender judges a destination's C-STORE response."""
    stored = sorted(STORED)
    return _table(
        ("Response status", "Behaviour"),
        [
            (
                ", ".join(
                    f"0x{s:04X} ({StoreStatus(s).name.lower().replace('_', ' ')})" for s in stored
                ),
                "stored: the send is done",
            ),
            (
                "any other status",
                "failed: retried with backoff (send: section), "
                "dead-lettered after send.max_attempts",
            ),
            ("no response, A-ABORT, association lost", "failed: retried with backoff"),
            ("A-ASSOCIATE-RJ", "failed: retried with backoff"),
        ],
    )


def configuration() -> str:
    return _table(
        ("Key", "Default", "Meaning"),
        [(f"`{k}`", d, NODE_KEYS[k]) for k, d in _described(Settings, NODE_KEYS, "node")],
    )


def limits() -> str:
    rows = [
        (f"`limits.{k}`", d, LIMIT_KEYS[k]) for k, d in _described(Limits, LIMIT_KEYS, "limits")
    ]
    rows.append(
        (
            "(fixed)",
            f"{DIMSE_TIMEOUT_S:g} s",
            "DIMSE timeout: wait for the next message of an operation under way",
        )
    )
    rows.append(("(fixed)", f"{ERROR_COMMENT_MAX_CHARS}", "characters of an Error Comment (LO)"))
    return _table(("Key", "Default", "Bound"), rows)


def tls() -> str:
    rows = [(f"`tls.{k}`", d, TLS_KEYS[k]) for k, d in _described(TLSSettings, TLS_KEYS, "tls")]
    version = MINIMUM_TLS_VERSION.name.replace("TLSv", "TLS ").replace("_", ".")
    rows.insert(
        0,
        (
            "(fixed)",
            f"{version} and above",
            "protocol versions, on every TLS connection (DICOM port, C-STORE SCU, syslog)",
        ),
    )
    rows.insert(
        1,
        (
            "(fixed)",
            f"{HANDSHAKE_TIMEOUT_S:g} s",
            "handshake timeout of the SCU side and the default of tls.handshake_timeout_s",
        ),
    )
    return _table(("Key", "Value / default", "Meaning"), rows)


def charsets(made: Sequence[_Made]) -> str:
    """What the receiver accepts, and what each created object carries (judged on the
    synthetic sources, which are ``ISO_IR 100``)."""
    vrs = ", ".join(sorted(CHARSET_VRS))
    rows = [
        (
            "received (C-STORE SCP)",
            "any value pydicom decodes (single-byte ISO_IR, ISO 2022 code extensions, "
            "GB18030, ISO_IR 192); not checked, not changed",
        )
    ]
    for kind in OutputKind:
        copied = all(
            "SpecificCharacterSet" in m.outputs[kind]
            and _equal(m.outputs[kind].SpecificCharacterSet, m.source.SpecificCharacterSet)
            for m in made
        )
        rows.append(
            (
                f"created: {kind.value}",
                "the source image's, copied"
                if copied
                else f"`{UTF8}` when any text ({vrs}) is not ASCII; else absent (default "
                "repertoire)",
            )
        )
    return _table(("Direction", "Specific Character Set (0008,0005)"), rows)


# -- the objects the node creates -----------------------------------------------------------


@dataclass(frozen=True)
class _Made:
    """One synthetic source and the outputs the worker built on it."""

    source: Dataset
    outputs: dict[OutputKind, Dataset]


def _synthetic_dx(variant: int) -> Dataset:
    """A DX For Presentation chest-like radiograph; ``variant`` 0 or 1 changes every value
    a source can hand on (patient, study, dates), so that copied values can be told."""
    from pydicom.uid import generate_uid

    yy, xx = np.mgrid[0:256, 0 : 256 - 32 * variant].astype(np.float64)
    body = np.exp(-(((yy - 128) / 90) ** 2 + ((xx - 128) / 100) ** 2))
    lungs = np.exp(-(((yy - 120) / 50) ** 2) - ((np.abs(xx - 128) - 50) / 25) ** 2)
    pixels = np.round((body - 0.6 * lungs).clip(0, 1) * 4000 + 50 * variant).astype(np.uint16)
    when = dt.datetime(2024, 3, 4 + variant, 9 + variant, 30, 0)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = ["Synthetic^Alpha", "Synthetic^Beta"][variant]
    ds.PatientID = f"SYNTH-{variant + 1}"
    ds.PatientBirthDate = ["19500101", "19610202"][variant]
    ds.PatientSex = ["F", "M"][variant]
    ds.AccessionNumber = f"ACC{variant + 1}"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyID = f"S{variant + 1}"
    ds.StudyDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ["Ref^One", "Ref^Two"][variant]
    ds.StudyDescription = ["Chest one", "Chest two"][variant]
    ds.Manufacturer = ["Maker A", "Maker B"][variant]
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.SeriesNumber = 1 + variant
    ds.InstanceNumber = 1 + variant
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = ds.PixelSpacing = [1.4 + 0.1 * variant] * 2
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "DIRECT"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.ImageLaterality = "U"
    ds.PresentationLUTShape = "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


#: The name of the random package the outputs are made with (its values are recognised).
_PACKAGE_NAME = "conformance-chest"


def make_outputs() -> list[_Made]:
    """Two synthetic radiographs through the worker's own code, every output kind built."""
    import torch

    from dicom_node.models.inference import Segmenter
    from dicom_node.testing.random_package import make_random_package
    from dicom_node.work.segment import segment_series

    made = []
    with tempfile.TemporaryDirectory(prefix="dicom-node-conformance-") as tmp:
        folder = Path(tmp)
        package = make_random_package(
            folder / "package", modalities=("DX",), seed=0, name=_PACKAGE_NAME
        )
        segmenter = Segmenter(package, device=torch.device("cpu"))
        for variant in (0, 1):
            source = _synthetic_dx(variant)
            path = folder / f"source{variant}.dcm"
            source.save_as(path, enforce_file_format=True)
            (result,) = segment_series([path], segmenter, list(OutputKind))
            outputs = {kind: result.of_kind(kind)[0] for kind in OutputKind}
            made.append(_Made(source, outputs))
    return made


def _iod_modules(sop_class: str) -> list[tuple[str, str, list[str]]]:
    """``(module, usage, top-level keywords)`` of the IOD of ``sop_class``, in IOD order.

    From the PS3.3 tables highdicom ships (``highdicom._standard_utils``, private API of the
    pinned highdicom).
    """
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map()[sop_class]
    attributes = get_module_attribute_map()
    out = []
    for module in get_iod_module_map()[iod]:
        keywords = [a["keyword"] for a in attributes[module["key"]] if not a["path"]]
        out.append((module["key"], module["usage"], keywords))
    return out


def _equal(a: Any, b: Any) -> bool:
    """Equal values, whatever their Python types (DA and str, MultiValue and list)."""
    return str(a) == str(b)


def _text(value: Any) -> str:
    if isinstance(value, DicomSequence):
        return f"{len(value)} item(s)"
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _source_of(keyword: str, made: Sequence[_Made], kind: OutputKind) -> str:
    """Where an output attribute's value comes from, judged over the two synthetic sources.

    ``source image``: equal to the source's value for both sources (which differ in every
    value a source can hand on); ``references the source``: a sequence naming the source's
    UIDs; ``fixed``: equal for both; ``generated``: a new UID, or the date or time of creation;
    ``computed``: anything else that differs.
    """
    values = [m.outputs[kind].get(keyword) for m in made]
    vr = made[0].outputs[kind][keyword].VR
    sources = [m.source.get(keyword) for m in made]
    if all(v is None or v == "" for v in values):
        return "empty (type 2)"
    if all(s is not None and _equal(v, s) for v, s in zip(values, sources, strict=True)):
        return "source image"
    if any(
        str(m.source.SOPInstanceUID) in str(v) or str(m.source.SeriesInstanceUID) in str(v)
        for m, v in zip(made, values, strict=True)
    ) and isinstance(values[0], DicomSequence):
        return "generated: references the source"
    if vr == "UI":
        return "generated: new UID"
    if vr in ("DA", "TM", "DT"):
        return "generated: time of creation"
    if any(_PACKAGE_NAME in str(v).lower().replace("_", "-") for v in values):
        return "model package (name, version)"
    if _equal(values[0], values[1]):
        if keyword in ("SOPClassUID", "MediaStorageSOPClassUID"):
            return f"fixed: {_uid_name(values[0])}"
        if str(values[0]) == dicom_node.__version__:
            return "fixed: the node's version"
        return f"fixed: `{_text(values[0])}`"
    return "computed"


def iod_table(kind: OutputKind, made: Sequence[_Made]) -> str:
    """The modules of the IOD ``kind`` is made of, each attribute present and its source."""
    ds = made[0].outputs[kind]
    present = {elem.keyword for elem in ds if elem.keyword}
    rows = []
    listed: set[str] = set()
    for module, usage, keywords in _iod_modules(str(ds.SOPClassUID)):
        for keyword in keywords:
            if keyword in present and keyword not in listed:
                listed.add(keyword)
                tag = Tag(keyword)
                rows.append(
                    (
                        module,
                        usage,
                        f"{keyword} ({tag.group:04X},{tag.element:04X})",
                        _source_of(keyword, made, kind),
                    )
                )
    for keyword in sorted(present - listed, key=lambda k: int(Tag(k))):
        tag = Tag(keyword)
        rows.append(
            (
                "(other)",
                "",
                f"{keyword} ({tag.group:04X},{tag.element:04X})",
                _source_of(keyword, made, kind),
            )
        )
    header = (
        f"{_uid_name(ds.SOPClassUID)} (`{ds.SOPClassUID}`), written in "
        f"{_uid_name(ds.file_meta.TransferSyntaxUID)} "
        f"(`{ds.file_meta.TransferSyntaxUID}`)\n\n"
    )
    return header + _table(("Module", "Usage", "Attribute", "Source"), rows)


def scu_contexts(made: Sequence[_Made]) -> str:
    """What the sender proposes for each output (:func:`~.dimse.proposed_contexts`): one row a
    presentation context."""
    rows = []
    for kind, ds in made[0].outputs.items():
        own = ds.file_meta.TransferSyntaxUID
        for sop_class, syntaxes in proposed_contexts([(UID(ds.SOPClassUID), UID(own))]):
            rows.append(
                (
                    kind.value,
                    _uid_name(sop_class),
                    f"`{sop_class}`",
                    "SCU",
                    ", ".join(_uid_name(ts) for ts in syntaxes),
                )
            )
    rows.append(
        ("echo", "Verification", "`1.2.840.10008.1.1`", "SCU", "pynetdicom's default syntaxes")
    )
    return _table(("Output", "SOP Class", "UID", "Role", "Transfer Syntaxes proposed"), rows)


# -- the document -------------------------------------------------------------------------------


def render_blocks() -> dict[str, str]:
    """Every generated block by name (the outputs are built once, on the CPU)."""
    made = make_outputs()
    simple: dict[str, Callable[[], str]] = {
        "implementation": implementation,
        "scp-contexts": scp_contexts,
        "accepted-syntaxes": accepted_syntaxes,
        "store-statuses": store_statuses,
        "echo-statuses": echo_statuses,
        "scu-statuses": scu_statuses,
        "configuration": configuration,
        "limits": limits,
        "tls": tls,
    }
    blocks = {name: make() for name, make in simple.items()}
    blocks["charsets"] = charsets(made)
    blocks["scu-contexts"] = scu_contexts(made)
    blocks["iod-seg"] = iod_table(OutputKind.SEG, made)
    blocks["iod-sr"] = iod_table(OutputKind.SR, made)
    blocks["iod-overlay"] = iod_table(OutputKind.OVERLAY, made)
    return blocks


def fill(document: str, blocks: dict[str, str]) -> str:
    """``document`` with the body of each marked block replaced by ``blocks[name]``.

    Raises
    ------
    ValueError
        When the document marks a block the generator does not make, or lacks one it makes.
    """
    found = {m.group("name") for m in _BLOCK_RE.finditer(document)}
    if unknown := found - set(blocks):
        raise ValueError(f"unknown generated blocks {sorted(unknown)}")
    if missing := set(blocks) - found:
        raise ValueError(f"no markers for the generated blocks {sorted(missing)}")
    return _BLOCK_RE.sub(lambda m: m.group(1) + blocks[m.group("name")] + m.group(4), document)


def blocks_text(blocks: dict[str, str]) -> str:
    """Every block, each under a heading with its name (what ``dicom-node conformance``
    prints)."""
    return "\n".join(f"## {name}\n\n{body}" for name, body in blocks.items())
