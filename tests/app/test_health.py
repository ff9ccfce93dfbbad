"""``dicom-node health``: the container's health check follows the config (AE title, port,
allowed callers, TLS) and says why when the node does not answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.app.cli import build_parser, main
from dicom_node.app.health import check_address
from tests.conftest import REPO, free_port
from tests.receive.peers import running_receiver
from tests.receive.test_tls import certificate


def node_doc(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return {
        "ae_title": "RADIOLOGY7",
        "port": free_port(),
        "bind_address": "127.0.0.1",
        "storage_dir": str(tmp_path / "node"),
        **settings,
    }


def health(
    tmp_path: Path, doc: dict[str, Any], capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(doc))
    code = main(["health", "--config", str(config), "--timeout", "5", *args])
    return code, capsys.readouterr().out.splitlines()[-1]  # after the receiver's own logs


def test_health_echoes_the_configured_ae_title_and_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOM_NODE_ROLE", raising=False)
    doc = node_doc(tmp_path, allowed_callers=["MODALITY"])  # the check calls as MODALITY
    with running_receiver(tmp_path, doc):
        code, out = health(tmp_path, doc, capsys)
    assert code == 0, out
    assert out.startswith("healthy: C-ECHO RADIOLOGY7@127.0.0.1:") and "0x0000" in out


def test_health_follows_the_environment_override_of_the_ae_title(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = node_doc(tmp_path)
    with running_receiver(tmp_path, {**doc, "ae_title": "OVERRIDE"}):
        code, out = health(tmp_path, doc, capsys)
        assert code == 1, "the config's title is not the one the node answers to"
        assert "called AE title" in out or "rejected" in out, out
        monkeypatch.setenv("DICOM_NODE_AE_TITLE", "OVERRIDE")
        code, out = health(tmp_path, doc, capsys)
    assert code == 0, out


def test_health_says_why_when_nobody_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = health(tmp_path, node_doc(tmp_path), capsys)
    assert code == 1
    assert out.startswith("unhealthy: C-ECHO RADIOLOGY7@127.0.0.1:") and "no association" in out


@pytest.mark.peers
def test_health_runs_over_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certificate(tmp_path, "ca", None)
    certificate(tmp_path, "node", "ca")
    tls = {"cert_file": "node.crt", "key_file": "node.key", "ca_file": "ca.crt"}
    doc = node_doc(tmp_path, tls=tls)
    with running_receiver(tmp_path, doc):
        code, out = health(tmp_path, doc, capsys)
        assert code == 0, out
        assert "over TLS: status 0x0000" in out
        # a plain C-ECHO (the image's old health check) does not get in
        plain = main(["echo", "127.0.0.1", str(doc["port"]), "--ae-title", "RADIOLOGY7"])
        assert plain == 1


@pytest.mark.peers
def test_health_over_tls_refuses_a_node_with_another_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate(tmp_path, "node", None)
    certificate(tmp_path, "impostor", None)
    doc = node_doc(tmp_path, tls={"cert_file": "impostor.crt", "key_file": "impostor.key"})
    with running_receiver(tmp_path, doc):
        check_doc = {**doc, "tls": {"cert_file": "node.crt", "key_file": "node.key"}}
        code, out = health(tmp_path, check_doc, capsys)
    assert code == 1 and "over TLS" in out, out


def test_health_of_a_worker_on_sqlite_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = health(tmp_path, node_doc(tmp_path), capsys, "--role", "worker")
    assert code == 1 and "need PostgreSQL" in out, out


def test_health_of_a_bad_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("ae_title: DICOMNODE\nport: 0\n")
    assert main(["health", "--config", str(config)]) == 2
    assert "port" in capsys.readouterr().err


def test_check_address_is_loopback_for_a_wildcard_bind() -> None:
    assert check_address("0.0.0.0") == "127.0.0.1"
    assert check_address("::") == "::1"
    assert check_address("10.1.2.3") == "10.1.2.3"


def test_the_image_health_check_reads_the_config_the_node_serves() -> None:
    docker = (REPO / "Dockerfile").read_text()
    check = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.+\])$", docker, re.M)
    serve = re.search(r"^CMD (\[.+\])$", docker, re.M)
    assert check is not None and serve is not None
    argv = json.loads(check.group(1))
    assert argv[0] == "dicom-node"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "health" and args.role is None  # DICOM_NODE_ROLE, as serve
    assert args.config == build_parser().parse_args(json.loads(serve.group(1))).config
    assert "--ae-title" not in argv and "11112" not in argv
