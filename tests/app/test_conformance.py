"""The Conformance Statement (docs/conformance.md): generated from the code, and true.

Its tables are checked twice: the document must hold what ``dicom-node conformance`` makes
now (else it drifted), and what it says must hold against a running node (every SOP class and
transfer syntax listed as SCP accepted in a real association, every status a member of the
node's status enums, the identification the node sends in its A-ASSOCIATE-AC).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, build_context

from dicom_node.app.cli import main
from dicom_node.app.conformance import DOCUMENT, REGENERATE, fill
from dicom_node.common.status import EchoStatus, StoreStatus
from dicom_node.receive.receiver import REFUSALS, Receiver
from tests.factories import ct_series
from tests.receive.peers import running_receiver

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / DOCUMENT).read_text(encoding="utf-8")

#: pynetdicom's limit of presentation contexts in one A-ASSOCIATE-RQ.
MAX_CONTEXTS = 128


def block(name: str) -> str:
    """The body of the generated block ``name`` of the document."""
    match = re.search(
        rf"<!-- BEGIN GENERATED {name}\b[^>]*-->\n(.*?)<!-- END GENERATED {name} -->",
        TEXT,
        re.DOTALL,
    )
    assert match, f"{DOCUMENT} has no generated block {name!r}"
    return match.group(1)


def rows(name: str) -> list[list[str]]:
    """The cells of the table rows of block ``name`` (header and rule left out)."""
    lines = [ln for ln in block(name).splitlines() if ln.startswith("| ")][1:]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


def uids(cell: str) -> list[str]:
    return re.findall(r"`([0-9.]+)`", cell)


def test_the_document_holds_what_the_command_generates(tmp_path: Path) -> None:
    copy = tmp_path / "conformance.md"
    shutil.copy(REPO / DOCUMENT, copy)
    assert main(["conformance", "--write", str(copy)]) == 0
    generated = copy.read_text(encoding="utf-8")
    assert generated == TEXT, (
        f"{DOCUMENT} drifted from the code; regenerate it with `{REGENERATE}` and review the diff"
    )


def test_fill_refuses_a_document_without_a_block() -> None:
    with pytest.raises(ValueError, match="no markers for the generated blocks"):
        fill("no markers here\n", {"tls": "table\n"})


def test_every_status_in_the_tables_is_one_the_node_has() -> None:
    store_codes = {int(row[1], 16) for row in rows("store-statuses")}
    assert store_codes <= {int(s) for s in StoreStatus}
    # and every status the receiver answers is in the table
    assert {int(r.status) for r in REFUSALS.values()} | {int(StoreStatus.SUCCESS)} == store_codes
    assert {int(row[1], 16) for row in rows("echo-statuses")} <= {int(s) for s in EchoStatus}
    comments = {row[2].strip("`") for row in rows("store-statuses")}
    assert {r.comment for r in REFUSALS.values()} <= comments


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(tmp_path, min_free_disk_bytes=0) as receiver:
        yield receiver


def scp_pairs() -> list[tuple[str, str]]:
    """Every (SOP class, transfer syntax) the document says the node accepts as SCP."""
    accepted = [uids(row[1])[0] for row in rows("accepted-syntaxes")]
    pairs = []
    for row in rows("scp-contexts"):
        (sop,) = uids(row[1])
        syntaxes = accepted if "Transfer syntaxes accepted" in row[3] else uids(row[3])
        assert syntaxes, f"no transfer syntax for {row[0]}"
        pairs += [(sop, ts) for ts in syntaxes]
    return pairs


def test_every_scp_sop_class_and_syntax_is_accepted_by_a_running_node(
    receiver: Receiver,
) -> None:
    pairs = scp_pairs()
    assert len({sop for sop, _ in pairs}) > 100  # every storage SOP class, not a handful
    refused = []
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = pairs[start : start + MAX_CONTEXTS]
        ae = AE(ae_title="MODALITY")
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in chunk]
        assoc = ae.associate("127.0.0.1", receiver.settings.port, ae_title="DICOMNODE")
        assert assoc.is_established, "the node refused an association of listed contexts"
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        refused += [pair for pair in chunk if pair not in accepted]
        assoc.release()
    assert not refused, f"listed as accepted but refused: {refused[:5]}"


def test_identification_and_a_refusal_are_what_the_tables_say(receiver: Receiver) -> None:
    table = {row[0]: row[1] for row in rows("implementation")}
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assoc = ae.associate("127.0.0.1", receiver.settings.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        acceptor = assoc.acceptor
        assert f"`{acceptor.implementation_class_uid}`" == table["Implementation Class UID"]
        assert f"`{acceptor.implementation_version_name}`" == table["Implementation Version Name"]
        assert f"{acceptor.maximum_length} bytes" == table["Maximum PDU length received (SCP)"]
        # A truncated native image: the status and Error Comment of the table.
        (ds,) = ct_series(n_slices=1)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    (row,) = [r for r in rows("store-statuses") if "pixel data truncated" in r[2]]
    assert rsp.Status == int(row[1], 16)
    pattern = re.escape(row[2].strip("`")).replace(r"\{length\}", r"\d+")
    pattern = pattern.replace(r"\{expected\}", r"\d+")
    assert re.fullmatch(pattern, rsp.ErrorComment), rsp.ErrorComment
