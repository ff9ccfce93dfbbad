"""OIDC sign-in against a small local provider (authorization code flow, PKCE, a signed ID
token), served on loopback; the console runs under Starlette's test client.

The provider is ours (no real IdP is reachable here): it redirects at once with a code, and
its token endpoint returns an RS256 ID token with the nonce it was given. What is proven: the
console's registration from the issuer's metadata, the redirect, the bounce past the
SameSite=Strict cookie, authlib's token exchange and ID token checks, the role lists, and the
audit records. What is not: any real provider's quirks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from dicom_node.audit.log import AuditLog
from dicom_node.config.sections import ConsoleSettings, OidcSettings
from dicom_node.console.server import ConsoleServer
from dicom_node.console.state import ChainCheck
from dicom_node.console.users import UserStore
from dicom_node.console.web import ConsoleSources, create_app
from dicom_node.store.database import Database
from tests.console.test_web import records

CLIENT_ID = "dicom-node"


class Provider:
    """An OpenID Provider on loopback that signs in whoever ``user`` names."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
        self.signing_key = self.key  # what the ID token is signed with (jwks lists self.key)
        self.user = "ops"
        self.codes: dict[str, dict[str, Any]] = {}
        self.token_requests: list[dict[str, str]] = []
        app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.metadata),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
                Route("/jwks", self.jwks),
            ]
        )
        self.server = ConsoleServer(app, "127.0.0.1", 0)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def metadata(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        assert q["client_id"] == CLIENT_ID and q["response_type"] == "code"
        assert q["code_challenge_method"] == "S256" and q["code_challenge"]
        code = f"code-{len(self.codes)}"
        self.codes[code] = {"nonce": q.get("nonce"), "user": self.user}
        return RedirectResponse(
            f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}", 302
        )

    async def token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.token_requests.append(form)
        grant = self.codes.pop(form["code"])
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": "subject-1",
            "preferred_username": grant["user"],
            "nonce": grant["nonce"],
            "iat": now,
            "exp": now + 300,
        }
        id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, self.signing_key)
        return JSONResponse(
            {"access_token": "at", "token_type": "Bearer", "expires_in": 300, "id_token": id_token}
        )

    async def jwks(self, request: Request) -> Response:
        return JSONResponse({"keys": [self.key.as_dict(private=False)]})


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider()
    p.server.start()
    yield p
    p.server.stop()


@pytest.fixture
def client(tmp_path: Path, provider: Provider) -> Iterator[TestClient]:
    db = Database(tmp_path / "node.sqlite3")
    audit = AuditLog(tmp_path / "audit.jsonl", tmp_path / "audit.key", head=db)
    secret = tmp_path / "client.secret"
    secret.write_text("s3cret\n")
    oidc = OidcSettings(
        issuer=provider.issuer,
        client_id=CLIENT_ID,
        client_secret_file=secret,
        admins=("ops",),
        viewers=("radiographer",),
    )
    sources = ConsoleSources(
        store=db,
        audit=audit,
        ae_title="DICOMNODE",
        storage_dir=tmp_path,
        outbox_dir=tmp_path / "outbox",
        min_free_disk_bytes=1,
        destinations={},
        workers=1,
        role="all",
        packages=list,
        chain=ChainCheck(db, tmp_path / "audit.key", tmp_path / "audit.jsonl").state,
    )
    app = create_app(
        ConsoleSettings(enabled=True, oidc=oidc),
        sources,
        UserStore(tmp_path / "users.json"),
        b"k" * 32,
        https=False,
    )
    with TestClient(app, base_url="http://console") as test_client:
        yield test_client
    db.close()


def sign_in(client: TestClient) -> Response:
    """The browser's path: console -> provider -> console callback -> bounce -> return."""
    start = client.get("/login/oidc", follow_redirects=False)
    assert start.status_code == 302
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    assert at_provider.status_code == 302
    callback = urlsplit(at_provider.headers["location"])
    assert callback.path == "/login/oidc/callback"
    bounce = client.get(f"{callback.path}?{callback.query}")
    target = re.search(r'url=([^"]+)"', bounce.text)
    assert target, bounce.text
    returned: Response = client.get(target.group(1).replace("&amp;", "&"), follow_redirects=False)
    return returned


def test_an_admin_signs_in_at_the_provider(
    client: TestClient, provider: Provider, tmp_path: Path
) -> None:
    assert "/login/oidc" in client.get("/login").text
    response = sign_in(client)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert "ops (admin)" in client.get("/").text
    token_request = provider.token_requests[-1]
    assert token_request["grant_type"] == "authorization_code"
    assert token_request.get("code_verifier")  # PKCE
    login = records(tmp_path)[-1]
    assert login["event_id"]["code"] == "110114" and login["outcome"] == 0
    assert login["details"] == {"user": "ops", "method": "oidc", "via": "console"}


def test_a_user_in_neither_list_is_refused_and_audited(
    client: TestClient, provider: Provider, tmp_path: Path
) -> None:
    provider.user = "stranger"
    response = sign_in(client)
    assert response.status_code == 403 and "not allowed" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303
    refusal = records(tmp_path)[-1]
    assert refusal["outcome"] == 4 and refusal["details"]["reason"] == "not allowed"
    assert refusal["details"]["user"] == "stranger"


def test_a_forged_state_is_refused(client: TestClient, provider: Provider, tmp_path: Path) -> None:
    start = client.get("/login/oidc", follow_redirects=False)
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    query = parse_qs(urlsplit(at_provider.headers["location"]).query)
    forged = urlencode({"code": query["code"][0], "state": "forged"})
    response = client.get(f"/login/oidc/return?{forged}", follow_redirects=False)
    assert response.status_code == 401
    assert records(tmp_path)[-1]["outcome"] == 4


def test_an_id_token_signed_with_another_key_is_refused(
    client: TestClient, provider: Provider, tmp_path: Path
) -> None:
    provider.signing_key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    response = sign_in(client)
    assert response.status_code == 401
    assert client.get("/", follow_redirects=False).status_code == 303
    assert records(tmp_path)[-1]["outcome"] == 4
