"""The deployment files against the CLI: the compose file and the systemd units run real roles.

The compose file is checked as YAML against the command line it calls, the image it builds
and the shape docs/deployment.md describes (it is run by hand with podman-compose, not in CI).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from dicom_node.app.cli import build_parser
from dicom_node.app.roles import Role
from tests.conftest import REPO

COMPOSE = REPO / "deploy" / "compose.yaml"


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # merges the x-node anchor into each service
    assert isinstance(doc, dict)
    return doc


def node_services(doc: dict[str, Any]) -> dict[str, Role]:
    """Each service that runs ``dicom-node serve`` -> its role, checked by the CLI's parser."""
    roles = {}
    for name, service in doc["services"].items():
        command = service.get("command")
        if not command:
            continue
        args = build_parser().parse_args(command)
        assert args.command == "serve", name
        assert args.config == Path("/etc/dicom-node/node.yaml"), name
        roles[name] = Role(args.role)
    return roles


def dockerfile_env(name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", (REPO / "Dockerfile").read_text())
    assert match is not None, name
    return match.group(1)


def test_compose_runs_one_receiver_two_workers_and_a_sender_on_postgresql() -> None:
    doc = compose()
    roles = node_services(doc)
    assert sorted(roles.values()) == sorted(
        [Role.RECEIVER, Role.WORKER, Role.WORKER, Role.SENDER]
    ), roles
    db = doc["services"]["db"]
    assert (COMPOSE.parent / db["build"]["context"] / "Dockerfile").is_file()
    assert "postgresql" in (COMPOSE.parent / db["build"]["context"] / "Dockerfile").read_text()
    storage = dockerfile_env("DICOM_NODE_STORAGE_DIR")
    volumes = set()
    for name in roles:
        service = doc["services"][name]
        assert (
            service["build"]["context"] == ".." and service["build"]["dockerfile"] == "Dockerfile"
        )
        assert (COMPOSE.parent / service["build"]["context"] / "Dockerfile").is_file()
        env = service["environment"]
        assert env["DICOM_NODE_DATABASE"].startswith("postgresql://")
        assert "@db:" in env["DICOM_NODE_DATABASE"], "the database is the db service"
        assert "PGPASSWORD" in env and "password" not in env["DICOM_NODE_DATABASE"].lower()
        assert env["DICOM_NODE_STORAGE_DIR"] == storage
        assert "db" in service["depends_on"]
        mounts = [v for v in service["volumes"] if v.split(":")[1] == storage]
        assert len(mounts) == 1, (name, service["volumes"])
        volumes.add(mounts[0].split(":")[0])
        # the image's health check takes the role from the environment, as serve would
        assert Role(env["DICOM_NODE_ROLE"]) is roles[name], name
        check = service["healthcheck"]["test"]
        assert build_parser().parse_args(check[2:]).command == "health", check
        published = service.get("ports", [])
        if roles[name] is Role.RECEIVER:
            assert published == ["11112:11112"]
        else:
            assert published == [], f"{name} ({roles[name]}) has no DICOM port to publish"
    assert len(volumes) == 1, f"every node must share one storage volume, got {volumes}"
    assert volumes <= set(doc["volumes"])


def test_systemd_template_unit_takes_a_role_and_the_plain_unit_stays_all() -> None:
    template = (REPO / "systemd" / "dicom-node@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", template, re.M)
    assert exec_start is not None
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/dicom-node") and "%i" in argv
    for role in (Role.RECEIVER, Role.WORKER, Role.SENDER):
        args = build_parser().parse_args([a.replace("%i", role.value) for a in argv[1:]])
        assert (args.command, Role(args.role)) == ("serve", role)
    assert "RequiresMountsFor=/var/lib/dicom-node" in template
    assert "Environment=DICOM_NODE_STORAGE_DIR=/var/lib/dicom-node" in template

    plain = (REPO / "systemd" / "dicom-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", plain, re.M)
    assert exec_start is not None
    args = build_parser().parse_args(shlex.split(exec_start.group(1))[1:])
    assert args.command == "serve" and args.role is None  # DICOM_NODE_ROLE, else all
    assert "DICOM_NODE_ROLE" not in plain


def test_orthanc_example_sends_the_results_to_its_orthanc_service() -> None:
    import json

    folder = REPO / "deploy" / "orthanc"
    doc = yaml.safe_load((folder / "compose.yaml").read_text())
    node, orthanc = doc["services"]["node"], doc["services"]["orthanc"]
    assert node["build"]["context"] == "../.." and (folder / "../../Dockerfile").is_file()
    assert "./node.yaml:/etc/dicom-node/node.yaml:ro" in node["volumes"]
    config = yaml.safe_load((folder / "node.yaml").read_text())
    orthanc_conf = json.loads((folder / "orthanc.json").read_text())
    destination = config["destinations"]["orthanc"]
    assert destination == {
        "ae_title": orthanc_conf["DicomAet"],
        "host": "orthanc",
        "port": orthanc_conf["DicomPort"],
    }
    assert f"{orthanc_conf['DicomPort']}:{orthanc_conf['DicomPort']}" in orthanc["ports"]
    shipped = yaml.safe_load((REPO / "config" / "node.yaml").read_text())
    for route, ours in zip(shipped["routes"], config["routes"], strict=True):
        assert ours["name"] == route["name"] and ours["match"] == route["match"]
        assert ours["send_to"] == ["orthanc"]
        assert ours["model"] == "/opt/dicom-node/config/" + route["model"]
        assert (REPO / "config" / route["model"]).is_dir()
