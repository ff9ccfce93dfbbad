"""Config validation: every error names the key and the bad value."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from dicom_node.common.errors import ConfigError
from dicom_node.common.output_kinds import OutputKind
from dicom_node.config.destinations import (
    DestinationType,
    DicomwebDestination,
    DimseDestination,
)
from dicom_node.config.sections import (
    IMPLICIT_ROLE,
    ROUTING_KEYWORDS,
    AuditSettings,
    Device,
    HttpAuth,
    InputRole,
    LatePolicy,
    Limits,
    LogFormat,
    LogLevel,
    Route,
    SendPolicy,
    SyslogSettings,
    SyslogTransport,
    Trigger,
)
from dicom_node.config.settings import Settings, load_settings, parse_settings
from dicom_node.store.files import StorageLayout

REPO = Path(__file__).resolve().parents[2]


def package(tmp_path: Path) -> Path:
    folder = tmp_path / "pkg"
    folder.mkdir(exist_ok=True)
    (folder / "model.yaml").write_text("name: x\n")
    return folder


def base(tmp_path: Path) -> dict[str, Any]:
    return {
        "ae_title": "NODE",
        "port": 11112,
        "storage_dir": str(tmp_path / "var"),
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        "routes": [
            {
                "name": "r",
                "match": {"Modality": ["DX"]},
                "model": str(package(tmp_path)),
                "send_to": ["pacs"],
            }
        ],
    }


def test_issue_shape_parses(tmp_path: Path) -> None:
    s = parse_settings(base(tmp_path))
    assert s.ae_title == "NODE" and s.port == 11112
    assert s.destinations["pacs"].port == 4242
    assert s.routes[0].match == {"Modality": ("DX",)}
    assert s.routes[0].send_to == ("pacs",)


def test_shipped_config_is_valid_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOM_NODE_STORAGE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    s = load_settings(REPO / "config" / "node.yaml")
    assert s.routes and s.routes[0].model == REPO / "config" / "models" / "cxr-anatomy"
    assert s.storage_dir.resolve() == REPO / "var"


def test_relative_paths_are_taken_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOM_NODE_STORAGE_DIR", raising=False)
    folder = tmp_path / "etc"
    (folder / "tls").mkdir(parents=True)
    for name in ("node.crt", "node.key"):
        (folder / "tls" / name).write_text("PEM")
    doc = base(folder)
    doc["storage_dir"] = "state"
    doc["routes"][0]["model"] = "pkg"
    doc["tls"] = {"cert_file": "tls/node.crt", "key_file": "tls/node.key"}
    (folder / "node.yaml").write_text(yaml.safe_dump(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(folder / "node.yaml")
    assert s.storage_dir == folder / "state"
    assert s.routes[0].model == folder / "pkg"
    assert s.tls is not None and s.tls.cert_file == folder / "tls" / "node.crt"
    monkeypatch.setenv("DICOM_NODE_STORAGE_DIR", "from-env")
    assert load_settings(folder / "node.yaml").storage_dir == elsewhere / "from-env"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"port": 70000}, "port: must be an integer between 1 and 65535, got 70000"),
        ({"port": "x"}, "port: must be an integer between 1 and 65535, got 'x'"),
        ({"port": True}, "port: must be an integer between 1 and 65535, got True"),
        (
            {"destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": "4242x"}}},
            "destinations.pacs.port: must be an integer between 1 and 65535, got '4242x'",
        ),
        (
            {"ae_title": "A" * 17},
            "ae_title: must be an AE title (1 to 16 printable ASCII characters, no backslash), "
            "got 'AAAAAAAAAAAAAAAAA'",
        ),
        (
            {"ae_title": "BAD\\AE"},
            "ae_title: must be an AE title (1 to 16 printable ASCII characters, no backslash), "
            "got 'BAD\\\\AE'",
        ),
        ({"stable_after_s": -1}, "stable_after_s: must be a number >= 0, got -1"),
        ({"stable_after_s": "10"}, "stable_after_s: must be a number >= 0, got '10'"),
        ({"workers": 2.5}, "workers: must be an integer >= 1, got 2.5"),
        ({"workers": "2"}, "workers: must be an integer >= 1, got '2'"),
        ({"gpu_slots": 0}, "gpu_slots: must be an integer >= 1, got 0"),
        ({"study_timeout_s": 0}, "study_timeout_s: must be a number > 0, got 0"),
        ({"allowed_callers": "ANY"}, "allowed_callers: must be a list, got 'ANY'"),
        (
            {"late_instances": "sometimes"},
            "late_instances: must be one of reprocess, ignore, got 'sometimes'",
        ),
        (
            {"destinations": {"pacs": {"ae_title": "PACS", "host": "h"}}},
            "destinations.pacs.port: missing; a dimse destination needs ae_title, host and port",
        ),
        ({"send": {"max_attempts": 0}}, "send.max_attempts: must be an integer >= 1, got 0"),
        ({"metrics_port": 0}, "metrics_port: must be an integer between 1 and 65535, got 0"),
        ({"send": [1]}, "send: must be a mapping (key: value), got [1]"),
    ],
)
def test_errors_name_key_and_value(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    doc = base(tmp_path)
    doc.update(change)
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    assert str(exc.value) == message


def test_route_errors(tmp_path: Path) -> None:
    doc = base(tmp_path)
    doc["routes"][0]["send_to"] = ["nowhere"]
    with pytest.raises(ConfigError, match=r"routes\[0\].send_to: 'nowhere' is not a destination"):
        parse_settings(doc)
    doc = base(tmp_path)
    doc["routes"][0]["model"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"routes\[0\].model: .* is not a model package"):
        parse_settings(doc)
    doc = base(tmp_path)
    doc["routes"][0]["match"] = {"PatientName": ["x"]}
    with pytest.raises(ConfigError, match=r"match.PatientName: cannot route"):
        parse_settings(doc)
    doc["routes"][0]["match"] = {"Modalty": ["x"]}
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    assert str(exc.value) == (
        "routes[0].match.Modalty: not a DICOM keyword (did you mean Modality?)"
    )
    doc["routes"][0]["match"] = {"Modality": [None]}
    with pytest.raises(ConfigError, match=r"routes\[0\].match.Modality: must be a value or a list"):
        parse_settings(doc)
    doc = base(tmp_path)
    del doc["routes"][0]["model"]
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    assert str(exc.value) == "routes[0].model: missing; the path of a model package folder"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "node.yaml"
    bad.write_text("port: [\n")
    with pytest.raises(ConfigError, match="node.yaml: not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")
    bad.write_text(yaml.safe_dump({"port": 0}))
    with pytest.raises(ConfigError) as exc:
        load_settings(bad)
    assert str(exc.value) == f"{bad}: port: must be an integer between 1 and 65535, got 0"


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_PORT", "10400")
    monkeypatch.setenv("DICOM_NODE_AE_TITLE", "FROMENV")
    monkeypatch.setenv("DICOM_NODE_METRICS_PORT", "9102")
    s = parse_settings({**base(tmp_path), "metrics_port": 9100})
    assert (s.port, s.ae_title, s.metrics_port) == (10400, "FROMENV", 9102)
    monkeypatch.setenv("DICOM_NODE_METRICS_PORT", "0")
    with pytest.raises(ConfigError, match="metrics_port"):
        parse_settings(base(tmp_path))
    monkeypatch.delenv("DICOM_NODE_METRICS_PORT")
    monkeypatch.setenv("DICOM_NODE_PORT", "many")
    with pytest.raises(ConfigError, match="DICOM_NODE_PORT"):
        parse_settings(base(tmp_path))


def test_destination_outputs(tmp_path: Path) -> None:
    from dicom_node.common.output_kinds import OutputKind

    doc = base(tmp_path)
    assert parse_settings(doc).destinations["pacs"].outputs == (OutputKind.SEG, OutputKind.SR)
    doc["destinations"]["pacs"]["outputs"] = ["overlay", "sr"]
    outputs = parse_settings(doc).destinations["pacs"].outputs
    assert outputs == (OutputKind.OVERLAY, OutputKind.SR)
    for bad, message in (
        (
            ["seg", "png"],
            "destinations.pacs.outputs[1]: must be one of seg, sr, overlay, got 'png'",
        ),
        (
            [],
            "destinations.pacs.outputs: must be a non-empty list of output kinds "
            "(seg, sr, overlay), got []",
        ),
        (
            "seg",
            "destinations.pacs.outputs: must be a non-empty list of output kinds "
            "(seg, sr, overlay), got 'seg'",
        ),
        (["seg", "seg"], "destinations.pacs.outputs[1]: 'seg' is listed twice"),
    ):
        doc["destinations"]["pacs"]["outputs"] = bad
        with pytest.raises(ConfigError) as exc:
            parse_settings(doc)
        assert str(exc.value) == message


def test_send_echo_interval(tmp_path: Path) -> None:
    doc = base(tmp_path)
    assert parse_settings(doc).send.echo_interval_s == 10.0
    doc["send"] = {"echo_interval_s": 0}
    assert parse_settings(doc).send.echo_interval_s == 0
    doc["send"] = {"echo_interval_s": -1}
    with pytest.raises(ConfigError, match="send.echo_interval_s: must be a number >= 0, got -1"):
        parse_settings(doc)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "ae_title: A\nport: 104\nae_title: B\n",
            "duplicate key 'ae_title' on line 3 (first on line 1)",
        ),
        (
            "destinations:\n"
            "  pacs: {ae_title: P, host: h, port: 1}\n"
            "  pacs: {ae_title: Q, host: h, port: 2}\n",
            "duplicate key 'pacs' on line 3 (first on line 2)",
        ),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(config)
    assert str(exc.value).startswith(f"{config}: not valid YAML: {message}")


def test_yaml_merge_keys_still_override(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        "destinations:\n  a: &pacs {ae_title: PACS, host: h, port: 1}\n  b: {<<: *pacs, port: 2}\n"
    )
    assert load_settings(config).destinations["b"].port == 2


def test_two_routes_of_one_name_are_refused(tmp_path: Path) -> None:
    doc = base(tmp_path)
    doc["routes"].append(dict(doc["routes"][0]))
    with pytest.raises(
        ConfigError, match=r"routes\[1\].name: 'r' is already the name of routes\[0\]"
    ):
        parse_settings(doc)


def test_limits_have_documented_defaults_and_are_validated() -> None:
    limits = parse_settings({}).limits
    assert (limits.idle_timeout_s, limits.min_bytes_per_s) == (30.0, 1024)
    assert (limits.max_associations, limits.reserved_associations) == (32, 4)
    assert (limits.max_associations_per_peer, limits.max_connections) == (8, 128)
    assert parse_settings({"limits": {"idle_timeout_s": 2}}).limits.idle_timeout_s == 2
    for doc, message in [
        ({"idle_timeout_s": 0}, "limits.idle_timeout_s: must be a number >= 0.1, got 0"),
        ({"max_associations": 2.5}, "limits.max_associations: must be an integer >= 1, got 2.5"),
        (
            {"reserved_associations": 32},
            "limits.reserved_associations: must be less than limits.max_associations (32), got 32",
        ),
        (
            {"max_connections": 8},
            "limits.max_connections: must be at least limits.max_associations (32), got 8",
        ),
        (
            {"max_instance_bytes": "big"},
            "limits.max_instance_bytes: must be an integer >= 1024, got 'big'",
        ),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_settings({"limits": doc})
        assert str(exc.value) == message
    with pytest.raises(ConfigError, match=r"^limits: unknown key\(s\) slots; known keys: "):
        parse_settings({"limits": {"slots": 1}})


# -- strict values, enums, unknown keys ----------------------------------------------------


def load_yaml(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "node.yaml"
    config.write_text(text)
    return load_settings(config)


def yaml_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_yaml(tmp_path, text)
    prefix = f"{tmp_path / 'node.yaml'}: "
    assert str(exc.value).startswith(prefix)
    return str(exc.value)[len(prefix) :]


def test_a_quoted_boolean_is_refused_not_read_as_true(tmp_path: Path) -> None:
    """``delete_after_success: "false"`` once purged studies; now it names the key and the fix."""
    assert load_yaml(tmp_path, "delete_after_success: false\n").delete_after_success is False
    assert load_yaml(tmp_path, "delete_after_success: true\n").delete_after_success is True
    for written in ('"false"', "'true'", "0", "1", '"no"'):
        assert yaml_error(tmp_path, f"delete_after_success: {written}\n") == (
            "delete_after_success: must be true or false, written without quotes, "
            f"got {yaml.safe_load(written)!r}"
        )


def test_strict_numbers_and_ports(tmp_path: Path) -> None:
    s = load_yaml(tmp_path, "port: 104\nstable_after_s: 2.5\nworkers: 3\njob_lease_s: 900\n")
    assert (s.port, s.stable_after_s, s.workers, s.job_lease_s) == (104, 2.5, 3, 900)
    assert yaml_error(tmp_path, 'port: "4242"\n') == (
        "port: must be an integer between 1 and 65535, got '4242'"
    )
    assert yaml_error(tmp_path, "workers: true\n") == "workers: must be an integer >= 1, got True"
    assert yaml_error(tmp_path, "stable_after_s: 10s\n") == (
        "stable_after_s: must be a number >= 0, got '10s'"
    )
    assert yaml_error(tmp_path, "stable_after_s: .nan\n") == (
        "stable_after_s: must be a number >= 0, got nan"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("device: gpu\n", "device: must be one of auto, cpu, cuda, got 'gpu'"),
        (
            "log_level: INFO\n",
            "log_level: must be one of debug, info, warning, error, got 'INFO' "
            "(did you mean info?)",
        ),
        ("log_format: text\n", "log_format: must be one of console, json, got 'text'"),
        (
            "late_instances: [reprocess]\n",
            "late_instances: must be one of reprocess, ignore, got ['reprocess']",
        ),
        (
            "audit: {syslog: {host: a, port: 514, transport: relp}}\n",
            "audit.syslog.transport: must be one of tls, tcp, udp, got 'relp'",
        ),
        (
            "destinations: {web: {type: dicom-web, url: 'https://x'}}\n",
            "destinations.web.type: must be one of dimse, dicomweb, got 'dicom-web' "
            "(did you mean dicomweb?)",
        ),
    ],
)
def test_enum_errors_list_the_allowed_values(tmp_path: Path, text: str, message: str) -> None:
    assert yaml_error(tmp_path, text) == message


def test_options_are_enums_that_compare_as_text(tmp_path: Path) -> None:
    s = load_yaml(tmp_path, "device: cpu\nlog_format: json\nlate_instances: ignore\n")
    assert s.device is Device.CPU and s.device == "cpu"
    assert s.log_format is LogFormat.JSON and s.log_level is LogLevel.INFO
    assert s.late_instances is LatePolicy.IGNORE and s.late_instances == "ignore"


def test_unknown_keys_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    message = yaml_error(tmp_path, "delete_after_sucess: true\n")
    assert message.startswith(
        "unknown key(s) delete_after_sucess (did you mean delete_after_success?); known keys: "
    )
    known = message.split("known keys: ")[1].split(", ")
    assert known == sorted(f.name for f in dataclasses.fields(Settings))
    assert {"gpu_slots", "study_timeout_s", "routes"} <= set(known)
    assert yaml_error(tmp_path, "send: {retries: 3}\n") == (
        "send: unknown key(s) retries; known keys: echo_interval_s, initial_backoff_s, "
        "max_attempts, max_backoff_s, timeout_s"
    )
    named = "destinations: {pacs: {name: P, ae_title: P, host: h, port: 1}}\n"
    assert yaml_error(tmp_path, named) == (
        "destinations.pacs.name: not a key of a destination: its name is its key under destinations"
    )


def test_every_problem_is_listed(tmp_path: Path) -> None:
    text = (
        "port: '104'\n"
        "delete_after_success: 'false'\n"
        "destinations: {pacs: {ae_title: PACS, host: h, port: 4242x}}\n"
        "workers: 0\n"
    )
    assert yaml_error(tmp_path, text) == (
        "4 problems:\n"
        "  port: must be an integer between 1 and 65535, got '104'\n"
        "  destinations.pacs.port: must be an integer between 1 and 65535, got '4242x'\n"
        "  workers: must be an integer >= 1, got 0\n"
        "  delete_after_success: must be true or false, written without quotes, got 'false'"
    )


def test_empty_sections_take_their_defaults(tmp_path: Path) -> None:
    s = load_yaml(tmp_path, "destinations:\nroutes:\nsend:\nlimits:\naudit:\nallowed_callers:\n")
    assert s.destinations == {} and s.routes == () and s.send == SendPolicy()
    assert s.limits == Limits() and s.audit == AuditSettings() and s.allowed_callers == ()
    assert yaml_error(tmp_path, "port:\n") == (
        "port: must be an integer between 1 and 65535, got None"
    )


def test_contract_defaults() -> None:
    s = parse_settings({})
    assert (s.workers, s.gpu_slots, s.study_timeout_s, s.job_lease_s) == (1, 1, 600.0, 600.0)
    d = DimseDestination(name="pacs", ae_title="PACS", host="h", port=104)
    assert d.type is DestinationType.DIMSE and d.tls is None
    assert not hasattr(d, "url")  # each type holds only its own keys
    assert (d.connect_timeout_s, d.timeout_s) == (10.0, 30.0)
    w = DicomwebDestination(name="w", url="https://pacs.example/dicom-web")
    assert w.type is DestinationType.DICOMWEB and not hasattr(w, "ae_title")
    assert (w.auth, w.verify_tls, w.ca_file) == (None, True, None)
    assert (w.connect_timeout_s, w.timeout_s) == (10.0, 30.0)
    r = Route(name="r", match={}, model=Path("m"), send_to=())
    assert (r.trigger, r.inputs, r.study_timeout_s) == (Trigger.SERIES, (), None)
    assert r.input_roles == (InputRole(IMPLICIT_ROLE, {}, True),)
    assert InputRole("t1", {"Modality": ("MR",)}).required is True


# -- destinations: dimse and dicomweb -------------------------------------------------------


def cloud(tmp_path: Path, **item: Any) -> dict[str, Any]:
    doc = base(tmp_path)
    doc["destinations"]["cloud"] = {"type": "dicomweb", "url": "https://pacs.example/dicom-web"}
    doc["destinations"]["cloud"].update(item)
    return doc


def destination_error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    return str(exc.value)


def test_a_dicomweb_destination(tmp_path: Path) -> None:
    (tmp_path / "stow.pw").write_text("secret\n")
    (tmp_path / "ca.pem").write_text("PEM")
    doc = cloud(
        tmp_path,
        auth={"username": "node", "password_file": "stow.pw"},
        ca_file="ca.pem",
        connect_timeout_s=5,
        timeout_s=60,
        outputs=["sr"],
    )
    doc["routes"][0]["send_to"] = ["pacs", "cloud"]
    d = parse_settings(doc, base=tmp_path).destinations["cloud"]
    assert d.name == "cloud" and d.type is DestinationType.DICOMWEB
    assert d.url == "https://pacs.example/dicom-web"
    assert d.auth == HttpAuth(username="node", password_file=tmp_path / "stow.pw")
    assert (d.verify_tls, d.ca_file) == (True, tmp_path / "ca.pem")
    assert (d.connect_timeout_s, d.timeout_s, d.outputs) == (5, 60, (OutputKind.SR,))
    assert isinstance(d, DicomwebDestination)  # the dimse keys are not there at all
    assert not any(hasattr(d, key) for key in ("ae_title", "host", "port", "tls"))
    assert d.address == "https://pacs.example/dicom-web"
    assert parse_settings(doc, base=tmp_path).destinations["pacs"].address == "PACS@127.0.0.1:4242"
    (tmp_path / "token").write_text("t")
    doc = cloud(tmp_path, auth={"token_file": str(tmp_path / "token")}, verify_tls=False)
    d = parse_settings(doc).destinations["cloud"]
    assert d.auth == HttpAuth(token_file=tmp_path / "token") and d.verify_tls is False


@pytest.mark.parametrize(
    "item, message",
    [
        (
            {"url": None},
            "destinations.cloud.url: missing; a dicomweb destination needs the base URL of its "
            "DICOMweb service (e.g. https://pacs.example/dicom-web)",
        ),
        (
            {"url": "ftp://pacs.example/"},
            "destinations.cloud.url: must be an http:// or https:// URL "
            "(e.g. https://pacs.example/dicom-web), got 'ftp://pacs.example/'",
        ),
        (
            {"url": "https://node:secret@pacs.example/"},
            "destinations.cloud.url: must not hold a user name or password (they would show in "
            "logs); put them in auth: {username, password_file}",
        ),
        (
            {"host": "pacs.example"},
            "destinations.cloud.host: applies to dimse destinations only; a dicomweb "
            "destination is reached at its url",
        ),
        (
            {"tls": {"ca_file": "ca.pem"}},
            "destinations.cloud.tls: applies to dimse destinations only; a dicomweb "
            "destination verifies its server with verify_tls and ca_file",
        ),
        (
            {"verify_tls": "false"},
            "destinations.cloud.verify_tls: must be true or false, written without quotes, "
            "got 'false'",
        ),
        (
            {"verify_tls": False, "ca_file": __file__},
            "destinations.cloud.ca_file: is not used with verify_tls: false; keep one of them",
        ),
        (
            {"ca_file": "nope.pem"},
            "destinations.cloud.ca_file: 'nope.pem' is not a readable file (looked for "
            "{tmp}/nope.pem)",
        ),
        (
            {"timeout_s": 0},
            "destinations.cloud.timeout_s: must be a number > 0, got 0",
        ),
        (
            {"auth": {"username": "node", "password": "secret"}},
            "destinations.cloud.auth.password: a password is not written in the config; put it "
            "in a file that only the node's user can read and name that file in password_file",
        ),
        (
            {"auth": {"username": "node"}},
            "destinations.cloud.auth.password_file: missing; username goes with password_file",
        ),
        (
            {"auth": {"username": "node", "password_file": __file__, "token_file": __file__}},
            "destinations.cloud.auth: give either username and password_file (HTTP Basic) or "
            "token_file (a bearer token), not both",
        ),
        (
            {"auth": {}},
            "destinations.cloud.auth: give username and password_file (HTTP Basic), or token_file",
        ),
    ],
)
def test_dicomweb_destination_errors(tmp_path: Path, item: dict[str, Any], message: str) -> None:
    doc = cloud(tmp_path, **item)
    if item.get("url", "") is None:
        del doc["destinations"]["cloud"]["url"]
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc, base=tmp_path)
    assert str(exc.value) == message.replace("{tmp}", str(tmp_path))


@pytest.mark.parametrize(
    "item, message",
    [
        (
            {"url": "https://pacs.example/dicom-web"},
            "destinations.pacs.url: applies to dicomweb destinations only (this one is type: "
            "dimse); add type: dicomweb, or remove url",
        ),
        (
            {"verify_tls": False},
            "destinations.pacs.verify_tls: applies to dicomweb destinations only (this one is "
            "type: dimse); add type: dicomweb, or remove verify_tls",
        ),
        (
            {"host": ""},
            "destinations.pacs.host: must be a host name or address, got ''",
        ),
        (
            {"type": "dimse", "ae_title": None},
            "destinations.pacs.ae_title: missing; a dimse destination needs ae_title, host and "
            "port",
        ),
    ],
)
def test_dimse_destination_errors(tmp_path: Path, item: dict[str, Any], message: str) -> None:
    doc = base(tmp_path)
    doc["destinations"]["pacs"].update(item)
    if "ae_title" in item:
        del doc["destinations"]["pacs"]["ae_title"]
    assert destination_error(doc) == message


# -- routes: triggers and input roles -------------------------------------------------------


BRAIN_INPUTS = [
    {"role": "t1", "select": {"SeriesDescription": ["*T1*"], "ContrastBolusAgent": [""]}},
    {"role": "t1c", "select": {"SeriesDescription": ["*T1*"], "ContrastBolusAgent": ["*"]}},
    {"role": "t2", "select": {"SeriesDescription": "*T2*"}},
    {"role": "flair", "select": {"SeriesDescription": ["*FLAIR*"]}, "required": False},
]


def brain(tmp_path: Path, **route: Any) -> dict[str, Any]:
    doc = base(tmp_path)
    doc["routes"][0].update(
        {"trigger": "study", "match": {"Modality": ["MR"]}, "inputs": BRAIN_INPUTS, **route}
    )
    return doc


def route_error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    return str(exc.value)


def test_a_study_route_with_four_roles(tmp_path: Path) -> None:
    (route,) = parse_settings(brain(tmp_path, study_timeout_s=900)).routes
    assert route.trigger is Trigger.STUDY and route.study_timeout_s == 900
    assert [r.role for r in route.inputs] == ["t1", "t1c", "t2", "flair"]
    assert route.inputs[0] == InputRole(
        "t1", {"SeriesDescription": ("*T1*",), "ContrastBolusAgent": ("",)}, True
    )
    assert route.inputs[2].select == {"SeriesDescription": ("*T2*",)}
    assert [r.required for r in route.inputs] == [True, True, True, False]
    assert route.input_roles == route.inputs
    (series,) = parse_settings(base(tmp_path)).routes
    assert series.trigger is Trigger.SERIES and series.inputs == ()
    assert series.input_roles == (InputRole("image", {"Modality": ("DX",)}, True),)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"inputs": BRAIN_INPUTS + [{"role": "t2", "select": {"Modality": "MR"}}]},
            "routes[0].inputs[4].role: 't2' is already the role of inputs[2]; give each role "
            "its own name",
        ),
        (
            {"inputs": []},
            "routes[0].inputs: must list at least one role; leave inputs out for the one "
            "implicit role image",
        ),
        (
            {"inputs": None},
            "routes[0].inputs: missing; a route with trigger: study names its inputs (a role "
            "and a select for each series it needs); for one series per job use trigger: series",
        ),
        (
            {"trigger": "series"},
            "routes[0].inputs: named inputs need trigger: study; a route with trigger: series "
            "runs each matching series on its own (leave inputs out)",
        ),
        (
            {"trigger": "series", "inputs": None, "study_timeout_s": 60},
            "routes[0].study_timeout_s: applies to trigger: study only",
        ),
        (
            {"trigger": "studies"},
            "routes[0].trigger: must be one of series, study, got 'studies'",
        ),
        (
            {"inputs": BRAIN_INPUTS[:3] + [{"role": "flair"}]},
            "routes[0].inputs[3].select: missing; with several roles, each role's select says "
            "which series it takes",
        ),
        (
            {"inputs": [{"role": "t 1", "select": {"Modality": "MR"}}]},
            "routes[0].inputs[0].role: must be a role name (letters, digits, '_', '.', '-'; "
            "e.g. t1c), got 't 1'",
        ),
        (
            {"inputs": [{"role": "t1", "select": {"SeriesDesc": "*T1*"}}]},
            "routes[0].inputs[0].select.SeriesDesc: not a DICOM keyword "
            "(did you mean SeriesDescription?)",
        ),
        (
            {"inputs": [{"role": "t1", "select": {"PatientID": "1"}}]},
            "routes[0].inputs[0].select.PatientID: cannot route on this attribute; use one of "
            + ", ".join(ROUTING_KEYWORDS),
        ),
        (
            {"inputs": [{"role": "t1", "select": {"Modality": "MR"}, "required": "false"}]},
            "routes[0].inputs[0].required: must be true or false, written without quotes, "
            "got 'false'",
        ),
        (
            {"inputs": [{"role": "t1", "selector": {"Modality": "MR"}}]},
            "routes[0].inputs[0]: unknown key(s) selector (did you mean select?); known keys: "
            "required, role, select",
        ),
        (
            {"study_timeout_s": "15m"},
            "routes[0].study_timeout_s: must be a number > 0, got '15m'",
        ),
    ],
)
def test_route_role_errors(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    doc = brain(tmp_path, **change)
    if change.get("inputs", "") is None:
        del doc["routes"][0]["inputs"]
    assert route_error(doc) == message


# -- existing configs and the Python API ----------------------------------------------------


def readme_examples() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)


def test_readme_examples_load(tmp_path: Path) -> None:
    """Every YAML example of the README's config section loads, with its files in place."""
    examples = readme_examples()
    assert examples and any("role: flair" in e and "type: dicomweb" in e for e in examples)
    for i, example in enumerate(examples):
        folder = tmp_path / f"example-{i}"
        doc = yaml.safe_load(example)
        for route in doc.get("routes") or []:
            touch(folder / route["model"] / "model.yaml")
        for dest in (doc.get("destinations") or {}).values():
            for key in ("ca_file",):
                if key in dest:
                    touch(folder / dest[key])
            for value in (dest.get("auth") or {}).values():
                if "/" in str(value):
                    touch(folder / value)
        for value in (doc.get("tls") or {}).values():
            touch(folder / value)
        config = folder / "node.yaml"
        config.write_text(example)
        settings = load_settings(config)
        if "console:" in example:
            assert settings.console.enabled and settings.console.port == 8443
            assert (
                settings.tls is not None and settings.tls.cert_file == folder / "secrets/node.crt"
            )
        if "brain-tumour" in example:
            (route,) = settings.routes
            assert [r.role for r in route.inputs] == ["t1", "t1c", "t2", "flair"]
            assert settings.destinations["cloud"].type is DestinationType.DICOMWEB
            assert settings.destinations["cloud"].auth == HttpAuth(
                username="dicom-node", password_file=folder / "secrets" / "stow.pw"
            )


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


def test_positional_construction_frozen_and_replace() -> None:
    """Code and tests build these objects directly, positional arguments included."""
    route = Route("chest", {"Modality": ("CR", "DX")}, Path("m"), ("pacs",))
    assert route.model == Path("m") and route.send_to == ("pacs",)
    assert DimseDestination("cli", "PACS", "127.0.0.1", 104).port == 104
    assert SyslogSettings("127.0.0.1", 514, "udp").transport is SyslogTransport.UDP
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.name = "x"  # type: ignore[misc]
    moved = dataclasses.replace(parse_settings({}), workers=4, storage_dir=Path("/srv/node"))
    assert moved.workers == 4 and StorageLayout.at(moved.storage_dir).outbox_dir == Path(
        "/srv/node/outbox"
    )
    with pytest.raises(ValidationError, match="must be an integer between 1 and 65535"):
        DimseDestination("cli", "PACS", "127.0.0.1", 70000)
    web = DicomwebDestination("w", "http://127.0.0.1:8042/dicom-web/")
    assert (web.url, web.address, web.type) == (
        "http://127.0.0.1:8042/dicom-web",
        "http://127.0.0.1:8042/dicom-web",
        DestinationType.DICOMWEB,
    )
    with pytest.raises(ValidationError, match="dicomweb destination needs the base URL"):
        DicomwebDestination(name="w")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="applies to dimse destinations only"):
        DicomwebDestination(name="w", url="http://x", host="h")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="trigger: study names its inputs"):
        Route("r", {}, Path("m"), (), Trigger.STUDY)


def test_gpu_slots(tmp_path: Path) -> None:
    assert parse_settings(base(tmp_path)).gpu_slots == 1
    assert parse_settings({**base(tmp_path), "gpu_slots": 3}).gpu_slots == 3
    with pytest.raises(ConfigError, match="gpu_slots"):
        parse_settings({**base(tmp_path), "gpu_slots": 0})


def test_send_timeout_is_the_default_of_each_destination_timeout(tmp_path: Path) -> None:
    """Configs written before destinations had ``timeout_s`` keep the meaning of send.timeout_s."""
    dests = {
        "a": {"ae_title": "A", "host": "h", "port": 104},
        "b": {"ae_title": "B", "host": "h", "port": 104, "timeout_s": 5},
    }
    settings = parse_settings({"send": {"timeout_s": 90}, "destinations": dests})
    assert (settings.destinations["a"].timeout_s, settings.destinations["b"].timeout_s) == (90, 5)
    assert parse_settings({"destinations": dests}).destinations["a"].timeout_s == 30


def test_database_is_sqlite_by_default_or_a_postgresql_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOM_NODE_DATABASE", raising=False)
    assert parse_settings(base(tmp_path)).database is None
    doc = base(tmp_path)
    doc["database"] = "postgresql://dicomnode@db.example:5432/dicomnode"
    assert parse_settings(doc).database == doc["database"]
    doc["database"] = "postgres://db.example/dicomnode"
    assert parse_settings(doc).database == doc["database"]
    monkeypatch.setenv("DICOM_NODE_DATABASE", "postgresql://node@from-env/state")
    assert parse_settings(base(tmp_path)).database == "postgresql://node@from-env/state"


@pytest.mark.parametrize(
    "value, shown",
    [
        ("mysql://node:s3cret@db/x", "'mysql://node:***@db/x'"),
        ("sqlite:///var/node.sqlite3", "'sqlite:///var/node.sqlite3'"),
        ("postgresql://node:s3cret@db:port/x", "the port of 'postgresql://node:***@db:port/x'"),
        (5432, "5432"),
        ("", "''"),
    ],
)
def test_a_bad_database_is_refused_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: Any, shown: str
) -> None:
    monkeypatch.delenv("DICOM_NODE_DATABASE", raising=False)
    doc = base(tmp_path)
    doc["database"] = value
    message = destination_error(doc)
    assert message.startswith("database: must be a postgresql:// URL"), message
    assert shown in message and "s3cret" not in message
    monkeypatch.setenv("DICOM_NODE_DATABASE", "mysql://node:s3cret@db/x")
    message = destination_error(base(tmp_path))
    assert message.startswith("database: must be") and "s3cret" not in message


def test_redact_url_hides_passwords() -> None:
    from dicom_node.config.checks import redact_url

    assert redact_url("postgresql://node:pw@db:5432/x") == "postgresql://node:***@db:5432/x"
    assert redact_url("postgresql://node@db/x?password=pw&sslmode=require") == (
        "postgresql://node@db/x?password=***&sslmode=require"
    )
    assert redact_url("postgresql://db/x") == "postgresql://db/x"
