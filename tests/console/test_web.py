"""The console's pages through Starlette's test client: login, roles, CSRF, rate limit, audit.

A real node database (SQLite) and audit chain; the browser test (test_browser.py) runs the
same pages in a node process with Chromium.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from dicom_node.audit.log import AuditLog
from dicom_node.config.sections import ConsoleRole, ConsoleSettings
from dicom_node.console.state import ChainCheck, PackageInfo
from dicom_node.console.users import UserStore
from dicom_node.console.web import SESSION_COOKIE, ConsoleSources, create_app
from dicom_node.store.database import Database, SendState

PASSWORDS = {"alice": "alice-secret-1", "victor": "victor-secret-1"}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "node.sqlite3")
    yield database
    database.close()


@pytest.fixture
def audit(tmp_path: Path, db: Database) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl", tmp_path / "audit.key", head=db)


def records(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def failed_job(db: Database, tmp_path: Path) -> int:
    """A done job of patient PAT-7 whose one send to ``pacs`` is dead-lettered."""
    db.record_instance(
        sop_instance_uid="1.2.3.4.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        patient_id="PAT-7",
        attributes={"Modality": "CT"},
        path=tmp_path / "x.dcm",
        association_id="a1",
        late_policy="reprocess",
        now=100.0,
    )
    db.queue_series("1.2.3.4", ["chest"], now=101.0)
    job = db.claim_job("w", lease_s=60, now=102.0)
    assert job is not None
    db.finish_job(job.id, "w", [("seg", tmp_path / "seg.dcm", "9.9")], {"pacs": {"seg"}}, 103.0)
    send = db.due_sends(now=104.0)[0]
    assert db.send_failed(send.id, "no association (peer down?)", next_attempt_at=None)
    return job.id


def make_client(
    tmp_path: Path, db: Database, audit: AuditLog, *, https: bool = False, **settings: Any
) -> TestClient:
    users = UserStore(tmp_path / "users.json")
    users.add("alice", PASSWORDS["alice"], ConsoleRole.ADMIN)
    users.add("victor", PASSWORDS["victor"], ConsoleRole.VIEWER)
    sources = ConsoleSources(
        store=db,
        audit=audit,
        ae_title="DICOMNODE",
        storage_dir=tmp_path,
        outbox_dir=tmp_path / "outbox",
        min_free_disk_bytes=1,
        destinations={"pacs": "PACS@127.0.0.1:104"},
        workers=2,
        role="all",
        packages=lambda: [PackageInfo("chest", "random-chest", "0.0.0", 2, ("heart",), tmp_path)],
        chain=ChainCheck(db, tmp_path / "audit.key", tmp_path / "audit.jsonl").state,
    )
    app = create_app(
        ConsoleSettings(enabled=True, **settings), sources, users, b"k" * 32, https=https
    )
    return TestClient(app, base_url="https://console" if https else "http://console")


@pytest.fixture
def client(tmp_path: Path, db: Database, audit: AuditLog) -> TestClient:
    return make_client(tmp_path, db, audit)


def csrf_of(client: TestClient, path: str = "/login") -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert match, "no CSRF token in the form"
    return match.group(1)


def login(client: TestClient, name: str, password: str | None = None) -> Any:
    token = csrf_of(client)
    return client.post(
        "/login",
        data={"username": name, "password": password or PASSWORDS[name], "csrf": token},
        follow_redirects=False,
    )


def test_pages_need_a_login(client: TestClient) -> None:
    for path in ("/", "/cases", "/cases/1", "/cases/1/thumbnail.png"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
    assert client.post("/retry", data={}).status_code == 401


def test_login_and_its_cookie(client: TestClient, tmp_path: Path) -> None:
    response = login(client, "alice")
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain HTTP (a test): no Secure flag
    page = client.get("/")
    assert page.status_code == 200 and "alice (admin)" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    last = records(tmp_path)[-1]
    assert last["event_id"]["code"] == "110114" and last["event_type"]["code"] == "110122"
    assert last["outcome"] == 0 and last["details"]["user"] == "alice"
    assert last["peer_address"] == "testclient"


def test_cookie_is_secure_under_https(tmp_path: Path, db: Database, audit: AuditLog) -> None:
    client = make_client(tmp_path, db, audit, https=True)
    response = login(client, "alice")
    assert "secure" in response.headers["set-cookie"].lower()
    assert "max-age=31536000" in client.get("/").headers["strict-transport-security"]


def test_wrong_password_is_refused_and_audited(client: TestClient, tmp_path: Path) -> None:
    response = login(client, "alice", "not-her-password")
    assert response.status_code == 401 and "Wrong user name or password" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303
    last = records(tmp_path)[-1]
    assert last["event_id"]["code"] == "110114" and last["outcome"] == 4
    assert last["details"] == {
        "user": "alice",
        "method": "local",
        "via": "console",
        "reason": "bad password",
    }
    assert "not-her-password" not in (tmp_path / "audit.jsonl").read_text()
    assert login(client, "nobody", "whatever-pass").status_code == 401


def test_login_without_the_csrf_token_is_refused(client: TestClient) -> None:
    client.get("/login")
    response = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"]})
    assert response.status_code == 403
    response = client.post(
        "/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf": "forged"}
    )
    assert response.status_code == 403


def test_failed_logins_are_rate_limited(tmp_path: Path, db: Database, audit: AuditLog) -> None:
    client = make_client(tmp_path, db, audit, max_login_failures=3, login_window_s=600)
    for _ in range(3):
        assert login(client, "alice", "wrong-password").status_code == 401
    response = login(client, "alice")  # the right password, but too late
    assert response.status_code == 429 and "Too many failed logins" in response.text
    assert records(tmp_path)[-1]["details"]["reason"] == "rate limited"
    # another user from the same address is refused too (the address is limited)
    assert login(client, "victor").status_code == 429


def test_viewer_may_not_retry(client: TestClient, db: Database, tmp_path: Path) -> None:
    failed_job(db, tmp_path)
    assert login(client, "victor").status_code == 303
    page = client.get("/")
    assert "no association (peer down?)" in page.text  # the failure and its reason
    assert 'id="retry-pacs"' not in page.text  # no button for a viewer
    response = client.post("/retry", data={"destination": "pacs", "csrf": csrf_of(client, "/")})
    assert response.status_code == 403 and "Only an admin" in response.text
    assert [s["state"] for s in db.sends()] == [SendState.FAILED]
    alert = records(tmp_path)[-1]
    assert alert["event_id"]["code"] == "110113" and "may not retry" in alert["details"]["reason"]


def test_admin_retry_needs_the_csrf_token(client: TestClient, db: Database, tmp_path: Path) -> None:
    failed_job(db, tmp_path)
    assert login(client, "alice").status_code == 303
    page = client.get("/")
    assert 'id="retry-pacs"' in page.text
    response = client.post("/retry", data={"destination": "pacs"})
    assert response.status_code == 403
    response = client.post("/retry", data={"destination": "pacs", "csrf": "guessed"})
    assert response.status_code == 403
    assert [s["state"] for s in db.sends()] == [SendState.FAILED]
    token = csrf_of(client, "/")
    response = client.post("/retry", data={"destination": "pacs", "csrf": token})
    assert response.status_code == 200  # followed back to the overview
    assert "1 failed send(s) queued again" in response.text
    assert [s["state"] for s in db.sends()] == [SendState.PENDING]
    assert client.post("/retry", data={"destination": "x", "csrf": token}).status_code == 400


def test_the_session_csrf_token_changes_at_login(client: TestClient) -> None:
    before = csrf_of(client)
    login(client, "alice")
    assert csrf_of(client, "/") != before


def test_case_view_is_audited_with_the_patient_and_user(
    client: TestClient, db: Database, tmp_path: Path
) -> None:
    job_id = failed_job(db, tmp_path)
    login(client, "victor")
    cases = client.get("/cases")
    assert f'href="/cases/{job_id}"' in cases.text and "PAT-7" not in cases.text
    page = client.get(f"/cases/{job_id}")
    assert page.status_code == 200 and "1.2.3.4" in page.text
    last = records(tmp_path)[-1]
    assert last["event_id"]["code"] == "110103" and last["action"] == "R"
    assert last["patient_id"] == "PAT-7" and last["study_uid"] == "1.2.3"
    assert last["details"]["user"] == "victor" and last["details"]["view"] == "case"
    assert last["details"]["job_id"] == job_id
    assert client.get("/cases/999").status_code == 404


def test_a_removed_user_is_signed_out(client: TestClient, tmp_path: Path) -> None:
    login(client, "victor")
    assert client.get("/", follow_redirects=False).status_code == 200
    assert UserStore(tmp_path / "users.json").remove("victor")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_logout_is_audited(client: TestClient, tmp_path: Path) -> None:
    login(client, "alice")
    response = client.post("/logout", data={"csrf": csrf_of(client, "/")}, follow_redirects=False)
    assert response.status_code == 303
    assert records(tmp_path)[-1]["event_type"]["code"] == "110123"
    assert client.get("/", follow_redirects=False).status_code == 303


def test_overview_shows_queue_disk_chain_and_packages(
    client: TestClient, db: Database, tmp_path: Path
) -> None:
    failed_job(db, tmp_path)
    login(client, "alice")
    text = client.get("/").text
    assert "2 worker thread(s)" in text
    assert "jobs</td><td>done 1" in text
    assert "free on" in text and "limits.min_free_disk_bytes" in text
    assert re.search(r"intact: verified up to seq \d+", text)
    assert "random-chest" in text and "heart" in text
    assert 'class="bad">failing' in text  # the destination's health
