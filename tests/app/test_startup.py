"""`dicom-node serve` that cannot start: one line that says what to do, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.app.cli import main
from tests.conftest import REPO, free_port, node_settings


def write_config(tmp_path: Path, model: Path, **overrides: object) -> Path:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(node_settings(tmp_path, model, free_port(), **overrides)))
    return config


def assert_one_line(err: str, *expected: str) -> None:
    """No traceback; the error is the last line (log lines of the start may come before)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("dicom-node: "), err
    for text in expected:
        assert text in lines[-1], lines[-1]


def test_storage_dir_that_cannot_be_created(
    tmp_path: Path, random_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    storage = tmp_path / "a-file" / "var"
    config = write_config(tmp_path, random_package, storage_dir=str(storage))
    assert main(["serve", "--config", str(config)]) == 2
    assert_one_line(
        capsys.readouterr().err, f"storage_dir: cannot create {storage}", "writable folder"
    )


def test_storage_dir_that_is_not_writable(
    tmp_path: Path, random_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.getuid() == 0:
        storage = Path("/sys")  # read-only even for root
    else:
        storage = tmp_path / "read-only"
        storage.mkdir()
        storage.chmod(0o500)
    if os.access(storage, os.W_OK) and os.getuid() != 0:
        pytest.skip(f"{storage} is writable here")
    config = write_config(tmp_path, random_package, storage_dir=str(storage))
    assert main(["serve", "--config", str(config)]) == 2
    assert_one_line(
        capsys.readouterr().err, f"storage_dir: cannot write in {storage}", "write access"
    )


@pytest.mark.parametrize("key", ["port", "metrics_port"])
def test_port_in_use(tmp_path: Path, random_package: Path, key: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        overrides: dict[str, object] = {key: port, "bind_address": "127.0.0.1"}
        config = write_config(tmp_path, random_package, **overrides)
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert_one_line(
        done.stderr,
        f"dicom-node: {key}: cannot listen on 127.0.0.1:{port}",
        f"stop it or set {key} to a free port",
    )


def test_route_roles_must_fit_the_package_roles() -> None:
    """A study route's roles are the package's roles; a one-role route fits any one-input one."""
    from dicom_node.app.node import check_roles
    from dicom_node.common.errors import StartupError
    from dicom_node.config.sections import InputRole, Route, Trigger

    two = (
        InputRole("t1", {"SeriesDescription": ("*T1*",)}),
        InputRole("t2", {"SeriesDescription": ("*T2*",)}),
    )
    study = Route("brain", {}, Path("models/b"), (), Trigger.STUDY, two)
    check_roles(study, ("t2", "t1"))  # order is the package's business
    series = Route("cxr", {}, Path("models/c"), ())
    check_roles(series, ("image",))
    check_roles(series, ("t1",))  # one input: the name does not matter
    with pytest.raises(StartupError, match=r"routes: brain: its inputs \['t1', 't2'\] do not fit"):
        check_roles(study, ("t1", "flair"))
    with pytest.raises(StartupError, match=r"routes: cxr: its inputs \['image'\] do not fit"):
        check_roles(series, ("t1", "t2"))
