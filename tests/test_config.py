"""Config validation: every error names the key and the bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import load_settings, parse_settings
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


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
        ({"port": 70000}, "port: 70000"),
        ({"port": "x"}, "port: 'x'"),
        ({"ae_title": "A" * 17}, "ae_title"),
        ({"ae_title": "BAD\\AE"}, "ae_title"),
        ({"stable_after_s": -1}, "stable_after_s: -1"),
        ({"allowed_callers": "ANY"}, "allowed_callers"),
        ({"late_instances": "sometimes"}, "late_instances: 'sometimes'"),
        ({"colour": 1}, "unknown key(s) colour"),
        ({"destinations": {"pacs": {"ae_title": "PACS", "host": "h"}}}, "destinations.pacs.port"),
        ({"send": {"max_attempts": 0}}, "send.max_attempts"),
    ],
)
def test_errors_name_key_and_value(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    doc = base(tmp_path)
    doc.update(change)
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    assert message in str(exc.value)


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


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "node.yaml"
    bad.write_text("port: [\n")
    with pytest.raises(ConfigError, match="node.yaml: not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")
    bad.write_text(yaml.safe_dump({"port": 0}))
    with pytest.raises(ConfigError, match=r"node.yaml: port: 0"):
        load_settings(bad)


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_PORT", "10400")
    monkeypatch.setenv("DICOM_NODE_AE_TITLE", "FROMENV")
    s = parse_settings(base(tmp_path))
    assert (s.port, s.ae_title) == (10400, "FROMENV")
    monkeypatch.setenv("DICOM_NODE_PORT", "many")
    with pytest.raises(ConfigError, match="DICOM_NODE_PORT"):
        parse_settings(base(tmp_path))


def test_destination_outputs(tmp_path: Path) -> None:
    from dicom_node.outputs.kinds import OutputKind

    doc = base(tmp_path)
    assert parse_settings(doc).destinations["pacs"].outputs == (OutputKind.SEG, OutputKind.SR)
    doc["destinations"]["pacs"]["outputs"] = ["overlay", "sr"]
    outputs = parse_settings(doc).destinations["pacs"].outputs
    assert outputs == (OutputKind.OVERLAY, OutputKind.SR)
    for bad, message in (
        (
            ["seg", "png"],
            "destinations.pacs.outputs: 'png' is not an output kind; allowed: seg, sr, overlay",
        ),
        ([], "destinations.pacs.outputs: [] must be a non-empty list"),
        ("seg", "destinations.pacs.outputs: 'seg' must be a non-empty list"),
        (["seg", "seg"], "destinations.pacs.outputs: 'seg' is listed twice"),
    ):
        doc["destinations"]["pacs"]["outputs"] = bad
        with pytest.raises(ConfigError) as exc:
            parse_settings(doc)
        assert message in str(exc.value)


def test_send_echo_interval(tmp_path: Path) -> None:
    doc = base(tmp_path)
    assert parse_settings(doc).send.echo_interval_s == 10.0
    doc["send"] = {"echo_interval_s": 0}
    assert parse_settings(doc).send.echo_interval_s == 0
    doc["send"] = {"echo_interval_s": -1}
    with pytest.raises(ConfigError, match="send.echo_interval_s: -1"):
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
        ({"idle_timeout_s": 0}, r"limits.idle_timeout_s: 0 must be a number >= 0.1"),
        ({"max_associations": 2.5}, r"limits.max_associations: 2.5 must be an integer"),
        ({"reserved_associations": 32}, r"limits.reserved_associations: 32 must be less than"),
        ({"max_connections": 8}, r"limits.max_connections: 8 must be at least"),
        ({"max_instance_bytes": "big"}, r"limits.max_instance_bytes: 'big'"),
        ({"slots": 1}, r"limits: unknown key\(s\) slots"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_settings({"limits": doc})


def test_gpu_slots(tmp_path: Path) -> None:
    assert parse_settings(base(tmp_path)).gpu_slots == 1
    assert parse_settings({**base(tmp_path), "gpu_slots": 3}).gpu_slots == 3
    with pytest.raises(ConfigError, match="gpu_slots"):
        parse_settings({**base(tmp_path), "gpu_slots": 0})
