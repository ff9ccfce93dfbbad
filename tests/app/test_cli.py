"""The command line against real peers, and the deployment files that call it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.app.cli import build_parser, main
from tests.conftest import StoreSCP, free_port
from tests.factories import ct_series

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.peers
def test_echo_and_send_to_dcmtk(
    tmp_path: Path, storescp: StoreSCP, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["echo", "127.0.0.1", str(storescp.port), "--ae-title", "PACS"]) == 0
    assert "status 0x0000" in capsys.readouterr().out
    files = []
    for ds in ct_series(n_slices=3):
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    assert main(["send", "127.0.0.1", str(storescp.port), str(tmp_path), "--ae-title", "PACS"]) == 0
    assert "sent 3 of 3" in capsys.readouterr().out
    received = {dcmread(p).SOPInstanceUID for p in storescp.files()}
    assert received == {dcmread(p).SOPInstanceUID for p in files}


def test_echo_to_nobody_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["echo", "127.0.0.1", str(free_port())]) == 1
    assert "no association" in capsys.readouterr().err


def test_status_before_first_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"storage_dir: {tmp_path / 'var'}\n")
    assert main(["status", "--config", str(config)]) == 0
    assert "has not run yet" in capsys.readouterr().out


def test_bad_config_is_refused_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("port: 99999\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "port: must be an integer between 1 and 65535, got 99999" in capsys.readouterr().err


def test_send_refuses_a_bad_called_ae_title(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", "127.0.0.1", "104", str(tmp_path), "--ae-title", "A" * 17]) == 2
    assert capsys.readouterr().err == (
        "dicom-node: ae_title: must be an AE title (1 to 16 printable ASCII characters, "
        f"no backslash), got {'A' * 17!r}\n"
    )


def test_systemd_unit_and_dockerfile_run_a_valid_command() -> None:
    unit = (REPO / "systemd" / "dicom-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M)
    assert exec_start is not None
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/dicom-node") and "User=dicom-node" in unit
    assert "Restart=on-failure" in unit
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"

    docker = (REPO / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.+\])$", docker, re.M)
    assert cmd is not None and "USER dicom-node" in docker
    import json

    assert build_parser().parse_args(json.loads(cmd.group(1))).command == "serve"
    # relative paths in /etc/dicom-node/node.yaml are taken from /etc/dicom-node
    assert "ln -s /opt/dicom-node/config/models /etc/dicom-node/models" in docker
    deployment = (REPO / "docs" / "deployment.md").read_text()
    assert "ln -s /opt/dicom-node/config/models /etc/dicom-node/models" in deployment
    shipped = (REPO / "config" / "node.yaml").read_text()
    assert "model: models/cxr-anatomy" in shipped


def test_status_with_an_absolute_config_path_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.store.database import Database

    monkeypatch.delenv("DICOM_NODE_STORAGE_DIR", raising=False)
    etc = tmp_path / "etc" / "dicom-node"
    etc.mkdir(parents=True)
    (etc / "node.yaml").write_text("storage_dir: ../../lib/dicom-node\n")
    storage = tmp_path / "lib" / "dicom-node"
    storage.mkdir(parents=True)
    Database(storage / "node.sqlite3").close()
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--config", str(etc / "node.yaml")]) == 0
    out = capsys.readouterr().out
    assert "has not run yet" not in out and "instances indexed: 0" in out
