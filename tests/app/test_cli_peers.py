"""``dicom-node send`` with compressed and big-endian files, and ``echo``'s reasons, against
real peers: DCMTK storescp, the node's own receiver, a closed port, a silent listener."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.app.cli import main
from dicom_node.receive.receiver import Receiver
from tests.conftest import PEER_ENV, free_port, require_shared_data, require_tool, wait_port
from tests.receive.peers import running_receiver

# DCMTK transcodes a real radiograph (highdicom's DX) into each syntax, as a modality would;
# each gets a new SOP Instance UID so that all of them arrive side by side.
TRANSCODE = {
    JPEGLSLossless: ["dcmcjpls"],
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb"],
    RLELossless: ["dcmcrle"],
    ExplicitVRBigEndian: ["dcmconv", "+tb"],
    ExplicitVRLittleEndian: ["dcmconv", "+te"],
}


@contextmanager
def storescp(folder: Path, *options: str) -> Iterator[int]:
    """A DCMTK storescp (AE title PACS) with ``options``; yields its port."""
    port = free_port()
    folder.mkdir(parents=True)
    proc = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACS", *options, "-od", str(folder), "-uf", str(port)],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def mixed_files(tmp_path: Path) -> dict[UID, list[Path]]:
    """Real files in six transfer syntaxes: transfer syntax -> files."""
    reference = require_shared_data("reference")
    folder = tmp_path / "in"
    folder.mkdir()
    files: dict[UID, list[Path]] = {}
    for syntax, command in TRANSCODE.items():
        out = folder / f"dx-{syntax.name.split()[0].lower()}-{len(files)}.dcm"
        tool = require_tool(command[0])
        source = reference / "highdicom" / "dx_image.dcm"
        subprocess.run([tool, *command[1:], str(source), str(out)], check=True, capture_output=True)
        dcmodify = require_tool("dcmodify")
        subprocess.run([dcmodify, "-gin", "-nb", str(out)], check=True, capture_output=True)
        files[syntax] = [out]
    # A Siemens CT in JPEG 2000 as the scanner wrote it; its (emptied) UIDs given back.
    files[JPEG2000Lossless] = []
    for path in sorted((reference / "ct-siemens-j2k").glob("*.dcm"))[:3]:
        ds = dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / path.name, enforce_file_format=True)
        files[JPEG2000Lossless].append(folder / path.name)
    for syntax, paths in files.items():
        for p in paths:
            assert dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return files


def by_uid(folder: Path) -> dict[str, Path]:
    return {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in folder.iterdir()}


@pytest.mark.peers
def test_send_proposes_each_files_own_syntax(
    tmp_path: Path, mixed_files: dict[UID, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """JPEG-LS, JPEG baseline, RLE, big endian, JPEG 2000 and little endian files go over one
    ``send`` to a peer that accepts every syntax, and arrive as they were: same transfer
    syntax, byte-identical pixel data."""
    sent = [p for paths in mixed_files.values() for p in paths]
    with storescp(tmp_path / "pacs", "+xa") as port:
        assert (
            main(["send", "127.0.0.1", str(port), str(tmp_path / "in"), "--ae-title", "PACS"]) == 0
        )
    assert f"sent {len(sent)} of {len(sent)}" in capsys.readouterr().out
    received = by_uid(tmp_path / "pacs")
    for syntax, paths in mixed_files.items():
        for path in paths:
            original = dcmread(path)
            arrived = dcmread(received[original.SOPInstanceUID])
            assert arrived.file_meta.TransferSyntaxUID == syntax
            assert arrived["PixelData"].value == original["PixelData"].value, syntax.name


@pytest.mark.peers
def test_send_names_each_file_a_peer_accepts_no_context_for(
    tmp_path: Path, mixed_files: dict[UID, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A peer that takes only uncompressed syntaxes (storescp's default) gets those files; each
    compressed file fails on its own line with its syntax and what the peer accepted."""
    with storescp(tmp_path / "pacs") as port:
        assert (
            main(["send", "127.0.0.1", str(port), str(tmp_path / "in"), "--ae-title", "PACS"]) == 1
        )
    out, err = capsys.readouterr()
    total = sum(len(paths) for paths in mixed_files.values())
    assert f"sent 2 of {total}" in out  # the little- and the big-endian radiograph
    lines = err.strip().splitlines()
    compressed = [JPEGLSLossless, JPEGBaseline8Bit, RLELossless, JPEG2000Lossless]
    assert len(lines) == sum(len(mixed_files[s]) for s in compressed)
    for syntax in compressed:
        for path in mixed_files[syntax]:
            (line,) = [line for line in lines if line.startswith(f"{path}: ")]
            assert f"accepted no presentation context for {dcmread(path).SOPClassUID.name}" in line
            assert f"in {syntax.name}; it accepted only " in line
            assert "decompress the file" in line
    assert {dcmread(p).file_meta.TransferSyntaxUID for p in (tmp_path / "pacs").iterdir()} == {
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    }


def test_send_names_a_file_that_cannot_be_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not DICOM, or a data set without its UIDs, is named with the reason."""
    reference = require_shared_data("reference")
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    empty_uids = sorted((reference / "ct-siemens-j2k").glob("*.dcm"))[0]
    port = free_port()  # nobody listens: the files fail before any association
    assert main(["send", "127.0.0.1", str(port), str(tmp_path / "notes.txt"), str(empty_uids)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.txt'}: not a DICOM file" in err
    assert (
        f"{empty_uids}: not sent: the file has no SOP Class UID (0008,0016) and no "
        "SOP Instance UID (0008,0018)" in err
    )


# -- echo ------------------------------------------------------------------------------------


@pytest.fixture
def node_receiver(tmp_path: Path) -> Iterator[Receiver]:
    """The node's receiver, answering only to AI-CHEST and only callers named MODALITY."""
    with running_receiver(
        tmp_path, {"called_ae_titles": ["AI-CHEST"], "allowed_callers": ["MODALITY"]}
    ) as receiver:
        yield receiver


def test_echo_says_why_the_node_rejected_it(
    node_receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    port = str(node_receiver.settings.port)
    assert (
        main(["echo", "127.0.0.1", port, "--ae-title", "AI-CHEST", "--calling-ae", "MODALITY"]) == 0
    )
    assert "status 0x0000" in capsys.readouterr().out
    assert main(["echo", "127.0.0.1", port, "--ae-title", "PACS", "--calling-ae", "MODALITY"]) == 1
    assert capsys.readouterr().err == (
        f"C-ECHO PACS@127.0.0.1:{port}: no association: association rejected permanently by the "
        "peer (service user): called AE title not recognised: the peer is not known by that AE "
        "title\n"
    )
    assert main(["echo", "127.0.0.1", port, "--ae-title", "AI-CHEST", "--calling-ae", "OTHER"]) == 1
    assert "rejected permanently by the peer (service user): calling AE title not recognised" in (
        capsys.readouterr().err
    )


@pytest.mark.peers
def test_echo_says_a_dcmtk_peer_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with storescp(tmp_path / "pacs", "--refuse") as port:
        assert main(["echo", "127.0.0.1", str(port), "--ae-title", "PACS"]) == 1
    assert (
        "no association: association rejected permanently by the peer (service user): "
        "no reason given\n"
    ) in capsys.readouterr().err


def test_echo_says_nobody_listens(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["echo", "127.0.0.1", str(port)]) == 1
    assert capsys.readouterr().err == (
        f"C-ECHO ANY-SCP@127.0.0.1:{port}: no association: connection refused: nothing listens "
        f"on 127.0.0.1:{port}\n"
    )


def test_echo_says_the_peer_did_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    """A peer that takes the connection and never answers the A-ASSOCIATE-RQ: a timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        assert main(["echo", "127.0.0.1", str(port), "--timeout", "0.5"]) == 1
    assert capsys.readouterr().err == (
        f"C-ECHO ANY-SCP@127.0.0.1:{port}: no association: no answer to the association "
        "request within 0.5 s\n"
    )
