"""Console users (argon2 hashes, file mode 0600, password never on argv), the config section,
OIDC roles, and the audit chain's state as the console shows it."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
import yaml

from dicom_node.app.cli import main
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import ConfigError, DicomNodeError
from dicom_node.config.sections import ConsoleRole, OidcSettings
from dicom_node.config.settings import load_settings, parse_settings
from dicom_node.console.security import LoginLimiter, csrf_ok, load_session_key
from dicom_node.console.state import ChainCheck
from dicom_node.console.users import UserStore
from dicom_node.store.database import Database
from tests.factories import record_transfers


def test_users_file_holds_argon2_hashes_only_with_mode_0600(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.json")
    assert store.add("alice", "correct horse", ConsoleRole.ADMIN) is True
    text = (tmp_path / "users.json").read_text()
    assert "correct horse" not in text
    assert json.loads(text)["users"]["alice"]["hash"].startswith("$argon2id$")
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    assert store.authenticate("alice", "correct horse") is not None
    assert store.authenticate("alice", "wrong horse") is None
    assert store.authenticate("bob", "correct horse") is None
    assert store.add("alice", "another password", ConsoleRole.VIEWER) is False
    assert store.role_of("alice") == ConsoleRole.VIEWER
    with pytest.raises(DicomNodeError, match="too short"):
        store.add("bob", "short", ConsoleRole.VIEWER)
    with pytest.raises(DicomNodeError, match="user name"):
        store.add("bob smith", "long enough pass", ConsoleRole.VIEWER)


def test_cli_reads_the_password_from_stdin_never_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"storage_dir": str(tmp_path / "var")}))
    monkeypatch.setattr("sys.stdin", io.StringIO("a long password\n"))
    assert main(["console", "user", "add", "ops", "--role", "admin", "--config", str(config)]) == 0
    users = UserStore(tmp_path / "var" / "console-users.json")
    assert users.authenticate("ops", "a long password") is not None
    assert users.role_of("ops") == ConsoleRole.ADMIN
    capsys.readouterr()
    assert main(["console", "user", "list", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "ops admin\n"
    assert main(["console", "user", "remove", "ops", "--config", str(config)]) == 0
    assert main(["console", "user", "remove", "ops", "--config", str(config)]) == 2
    with pytest.raises(SystemExit):  # no --password option exists
        main(["console", "user", "add", "x", "--password", "y", "--config", str(config)])


def test_console_section_defaults_and_errors(tmp_path: Path) -> None:
    settings = parse_settings({}, tmp_path)
    assert settings.console.enabled is False and settings.console.host == "127.0.0.1"
    settings = parse_settings(
        {"console": {"enabled": True, "port": 9443, "users_file": "u.json"}}, tmp_path
    )
    assert settings.console.port == 9443 and settings.console.users_file == tmp_path / "u.json"
    with pytest.raises(ConfigError, match=r"console: unknown key\(s\) enable"):
        parse_settings({"console": {"enable": True}}, tmp_path)
    with pytest.raises(ConfigError, match="console.enabled"):
        parse_settings({"console": {"enabled": "yes"}}, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "console": {
                    "enabled": True,
                    "oidc": {
                        "issuer": "https://idp.example/realms/x",
                        "client_id": "dicom-node",
                        "client_secret_file": "secret",
                        "admins": ["ops"],
                        "viewers": ["radiographer"],
                    },
                }
            }
        )
    )
    oidc = load_settings(config).console.oidc
    assert oidc is not None and oidc.client_secret_file == secret
    assert oidc.role_of("ops") == ConsoleRole.ADMIN
    assert oidc.role_of("radiographer") == ConsoleRole.VIEWER
    assert oidc.role_of("someone") is None


def test_oidc_client_is_registered_from_the_issuer(tmp_path: Path) -> None:
    from dicom_node.console.oidc import oauth_client

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    oidc = OidcSettings(issuer="https://idp.example", client_id="c", client_secret_file=secret)
    client = oauth_client(oidc).oidc
    assert client.client_secret == "s3cret"
    assert client._server_metadata_url == "https://idp.example/.well-known/openid-configuration"


def test_session_key_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_session_key(tmp_path / "console.key")
    assert len(key) == 32 and load_session_key(tmp_path / "console.key") == key
    assert stat.S_IMODE((tmp_path / "console.key").stat().st_mode) == 0o600


def test_csrf_and_limiter() -> None:
    assert csrf_ok("abc", "abc") and not csrf_ok("abc", "abd")
    assert not csrf_ok("", "") and not csrf_ok(None, None)
    now = [0.0]
    limiter = LoginLimiter(2, 60, clock=lambda: now[0])
    limiter.failed(["a"])
    assert limiter.wait_s(["a"]) == 0
    limiter.failed(["a"])
    assert limiter.wait_s(["a", "b"]) == 60
    now[0] = 61.0
    assert limiter.wait_s(["a"]) == 0


def test_chain_state_names_the_last_verified_seq(tmp_path: Path) -> None:
    db = Database(tmp_path / "node.sqlite3")
    try:
        log = AuditLog(tmp_path / "audit.jsonl", tmp_path / "audit.key", head=db)
        record_transfers(log, 5)
        check = ChainCheck(db, tmp_path / "audit.key", tmp_path / "audit.jsonl", max_age_s=0)
        state = check.state()
        assert state.ok and state.records == 5 and state.verified_up_to == 5
        lines = (tmp_path / "audit.jsonl").read_text().splitlines()
        lines[3] = lines[3].replace('"action": "C"', '"action": "D"')
        (tmp_path / "audit.jsonl").write_text("\n".join(lines) + "\n")
        state = check.state()
        assert not state.ok and state.verified_up_to == 3 and state.problems
    finally:
        db.close()
