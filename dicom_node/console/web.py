"""The console's pages: a Starlette application, server-rendered with Jinja2.

Pages (GET): ``/`` the overview (queue and workers, destinations with health and backlog,
failures with retry, disk space, audit chain, model packages), ``/cases`` recent cases with
their state and timings, ``/cases/<job id>`` one case with its thumbnail
(``/cases/<job id>/thumbnail.png``), ``/login``. Actions (POST, each with the session's CSRF
token): ``/login``, ``/logout``, ``/retry`` (admin only).

URLs carry internal job ids only, never patient data; the pages that show a patient's data
(a case and its thumbnail) are audited as DICOM Instances Accessed (110103, action R) with the
user, their address and the study, and every login (local or OIDC), failed login and logout
as User Authentication (110114). A view whose audit record cannot be written is refused.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import jinja2
import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from dicom_node.audit.events import (
    AuditAction,
    AuditEvent,
    AuditEventType,
    AuditOutcome,
    Participants,
)
from dicom_node.audit.log import AuditLog
from dicom_node.common.errors import AuditWriteError
from dicom_node.config.sections import ConsoleRole, ConsoleSettings
from dicom_node.console.security import LoginLimiter, csrf_ok, new_csrf_token
from dicom_node.console.state import ChainState, PackageInfo
from dicom_node.console.thumbnail import overlay_thumbnail, seg_thumbnail
from dicom_node.console.users import UserStore
from dicom_node.store.overview import Overview
from dicom_node.store.status import disk_space, format_bytes

log = structlog.get_logger(__name__)

__all__ = ["ConsoleSources", "ConsoleStore", "create_app"]

SESSION_COOKIE = "dicom_node_console"
TEMPLATES = Path(__file__).parent / "templates"


class ConsoleStore(Overview, Protocol):
    """What the console reads and the one thing it changes: dead-lettered sends re-queued."""

    def retry_failed_sends(self, destination: str | None = None) -> int: ...
    def sends_due_now(self, destination: str | None = None, now: float | None = None) -> int: ...


@dataclass(frozen=True)
class ConsoleSources:
    """What the node hands the console (built in :mod:`dicom_node.app.node`)."""

    store: ConsoleStore
    audit: AuditLog
    ae_title: str
    storage_dir: Path
    outbox_dir: Path
    min_free_disk_bytes: int
    #: Configured destinations: name -> address (``AE@host:port`` or URL).
    destinations: Mapping[str, str]
    workers: int
    role: str
    packages: Callable[[], Sequence[PackageInfo]]
    chain: Callable[[], ChainState]


def _when(epoch: float | None) -> str:
    return "" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _seconds(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return ""
    return f"{max(0.0, end - start):.1f} s"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["bytes"] = format_bytes
    env.globals["seconds"] = _seconds
    return env


_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


class Console:
    """The handlers, with what they share: sources, users, limiter, templates."""

    def __init__(
        self,
        settings: ConsoleSettings,
        sources: ConsoleSources,
        users: UserStore,
        *,
        https: bool,
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.users = users
        self.https = https
        self.limiter = LoginLimiter(settings.max_login_failures, settings.login_window_s)
        self.env = _environment()
        self.oauth: Any = None
        if settings.oidc is not None:
            from dicom_node.console.oidc import oauth_client

            self.oauth = oauth_client(settings.oidc)

    # -- helpers ---------------------------------------------------------------------------

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        user = self.user(request)
        body = self.env.get_template(name).render(
            user=user,
            csrf=self.csrf(request),
            ae_title=self.sources.ae_title,
            oidc=self.settings.oidc is not None,
            **context,
        )
        return HTMLResponse(body, status_code=status, headers=self.headers())

    def headers(self) -> dict[str, str]:
        if self.https:
            return {**_HEADERS, "Strict-Transport-Security": "max-age=31536000"}
        return dict(_HEADERS)

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str) or not token:
            token = request.session["csrf"] = new_csrf_token()
        return token

    def user(self, request: Request) -> dict[str, str] | None:
        """The signed-in user (``name``, ``role``, ``via``), checked against the users file
        (or the OIDC lists) at each request: a removed user or a changed role ends the
        session."""
        name, via = request.session.get("user"), request.session.get("via")
        role = request.session.get("role")
        if not isinstance(name, str) or not isinstance(role, str):
            return None
        if via == "oidc" and self.settings.oidc is not None:
            now = self.settings.oidc.role_of(name)
        elif via == "local":
            now = self.users.role_of(name)
        else:
            now = None
        if now is None or now.value != role:
            for key in ("user", "role", "via"):
                request.session.pop(key, None)
            return None
        return {"name": name, "role": role, "via": str(via)}

    @staticmethod
    def address(request: Request) -> str:
        return request.client.host if request.client is not None else ""

    def who(self, request: Request) -> Participants:
        return Participants(called_ae=self.sources.ae_title, peer_address=self.address(request))

    def audit_login(
        self, request: Request, name: str, method: str, outcome: AuditOutcome, reason: str = ""
    ) -> None:
        details: dict[str, Any] = {"user": name, "method": method, "via": "console"}
        if reason:
            details["reason"] = reason
        self.sources.audit.record(
            AuditEvent.USER_AUTHENTICATION,
            AuditAction.EXECUTE,
            outcome,
            self.who(request),
            event_type=AuditEventType.LOGIN,
            **details,
        )

    def audit_view(self, request: Request, user: Mapping[str, str], job_id: int, what: str) -> None:
        """DICOM Instances Accessed (110103), Read: ``user`` saw job ``job_id``'s images."""
        info = self.sources.store.job_series_info(job_id)
        self.sources.audit.record(
            AuditEvent.INSTANCES_ACCESSED,
            AuditAction.READ,
            AuditOutcome.SUCCESS,
            self.who(request),
            patient_id=info.get("patient_id"),
            study_uid=info.get("study_uid"),
            user=user["name"],
            role=user["role"],
            via="console",
            view=what,
            job_id=job_id,
            series_uid=info.get("series_uid"),
        )

    def refused(self, request: Request, status: int, message: str) -> Response:
        return self.page(request, "error.html", status=status, message=message)

    def signed_in(
        self, handler: Callable[[Request, dict[str, str], Mapping[str, Any]], Response]
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` for signed-in users (a POST with the session's CSRF token); others go
        to the login page (GET) or are refused. ``handler`` gets the user and the form, and
        runs in a worker thread: database reads, the audit record and thumbnails block."""

        async def endpoint(request: Request) -> Response:
            user = self.user(request)
            if user is None:
                if request.method == "GET":
                    return RedirectResponse("/login", status_code=303, headers=self.headers())
                return self.refused(request, 401, "Sign in first.")
            form: dict[str, Any] = {}
            if request.method == "POST":
                form = dict((await request.form()).items())
                if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
                    log.warning("console.csrf_refused", user=user["name"], path=request.url.path)
                    return self.refused(
                        request, 403, "The form was stale or not from this console; try again."
                    )
            return await run_in_threadpool(handler, request, user, form)

        return endpoint

    # -- login -----------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self.page(request, "login.html", error=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        name = str(form.get("username", ""))[:64]
        password = str(form.get("password", ""))
        if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
            return self.page(
                request, "login.html", status=403, error="The form was stale; try again."
            )
        address = self.address(request)
        keys = [f"address:{address}", f"user:{name}"]
        wait_s = self.limiter.wait_s(keys)
        if wait_s > 0:
            self.audit_login(request, name, "local", AuditOutcome.MINOR_FAILURE, "rate limited")
            log.warning("console.login_rate_limited", user=name, address=address)
            return self.page(
                request,
                "login.html",
                status=429,
                error=f"Too many failed logins; try again in {wait_s:.0f} s.",
            )
        user = await run_in_threadpool(self.users.authenticate, name, password)  # argon2: CPU
        if user is None:
            self.limiter.failed(keys)
            self.audit_login(request, name, "local", AuditOutcome.MINOR_FAILURE, "bad password")
            log.warning("console.login_failed", user=name, address=address)
            return self.page(
                request, "login.html", status=401, error="Wrong user name or password."
            )
        self.limiter.succeeded(keys)
        try:
            self.audit_login(request, name, "local", AuditOutcome.SUCCESS)
        except AuditWriteError:
            return self.refused(request, 503, "The audit trail cannot be written; sign in later.")
        return self.start_session(request, name, user.role, "local")

    def start_session(self, request: Request, name: str, role: ConsoleRole, via: str) -> Response:
        request.session.clear()  # a new session (and CSRF token) at each login
        request.session.update(
            {"user": name, "role": role.value, "via": via, "csrf": new_csrf_token()}
        )
        log.info("console.login", user=name, role=role.value, via=via)
        return RedirectResponse("/", status_code=303, headers=self.headers())

    def logout(self, request: Request, user: dict[str, str], form: Mapping[str, Any]) -> Response:
        self.sources.audit.record(
            AuditEvent.USER_AUTHENTICATION,
            AuditAction.EXECUTE,
            AuditOutcome.SUCCESS,
            self.who(request),
            event_type=AuditEventType.LOGOUT,
            user=user["name"],
            via="console",
        )
        request.session.clear()
        return RedirectResponse("/login", status_code=303, headers=self.headers())

    # -- OIDC ------------------------------------------------------------------------------

    async def oidc_start(self, request: Request) -> Response:
        if self.oauth is None:
            return self.refused(request, 404, "No OpenID Connect provider is configured.")
        redirect_uri = str(request.url_for("oidc_callback"))
        response: Response = await self.oauth.oidc.authorize_redirect(request, redirect_uri)
        return response

    async def oidc_callback(self, request: Request) -> Response:
        """The provider's redirect arrives cross-site, without the SameSite=Strict session
        cookie: bounce once through a page of this site, which sends it."""
        if self.oauth is None:
            return self.refused(request, 404, "No OpenID Connect provider is configured.")
        target = "/login/oidc/return?" + urlencode(list(request.query_params.multi_items()))
        return self.page(request, "bounce.html", target=target)

    async def oidc_return(self, request: Request) -> Response:
        if self.oauth is None or self.settings.oidc is None:
            return self.refused(request, 404, "No OpenID Connect provider is configured.")
        try:
            token = await self.oauth.oidc.authorize_access_token(request)
        except Exception as exc:  # noqa: BLE001 - authlib's OAuthError and network errors
            self.audit_login(request, "", "oidc", AuditOutcome.MINOR_FAILURE, type(exc).__name__)
            log.warning("console.oidc_failed", error=type(exc).__name__)
            return self.page(
                request, "login.html", status=401, error="The sign-in at the provider failed."
            )
        claims = token.get("userinfo") or {}
        name = str(claims.get(self.settings.oidc.username_claim, ""))
        role = self.settings.oidc.role_of(name) if name else None
        if role is None:
            self.audit_login(request, name, "oidc", AuditOutcome.MINOR_FAILURE, "not allowed")
            log.warning("console.oidc_not_allowed", user=name)
            return self.page(
                request,
                "login.html",
                status=403,
                error="Signed in at the provider, but not allowed in this console.",
            )
        self.audit_login(request, name, "oidc", AuditOutcome.SUCCESS)
        return self.start_session(request, name, role, "oidc")

    # -- pages -----------------------------------------------------------------------------

    def overview(self, request: Request, user: dict[str, str], form: Mapping[str, Any]) -> Response:
        src = self.sources
        status = src.store.status()
        destinations = []
        for name, address in src.destinations.items():
            d = status["destinations"].get(name, {})
            pending, failed = int(d.get("pending", 0)), int(d.get("failed", 0))
            destinations.append(
                {
                    "name": name,
                    "address": address,
                    "pending": pending,
                    "failed": failed,
                    "done": int(d.get("done", 0)),
                    "backlog": pending + failed,
                    "health": "failing" if "last_error" in d else "ok",
                    "last_error": d.get("last_error"),
                    "last_error_at": d.get("last_error_at"),
                    "next_attempt_in_s": d.get("next_attempt_in_s"),
                }
            )
        return self.page(
            request,
            "overview.html",
            status_counts={k: status[k] for k in ("series", "cases", "jobs", "sends")},
            instances=status["instances"],
            running=src.store.running_jobs(),
            workers=src.workers,
            role=src.role,
            destinations=destinations,
            failed_jobs=status["failed_jobs"],
            failed_cases=status["failed_cases"],
            failed_sends=src.store.failed_sends(),
            disk=disk_space(src.storage_dir, src.min_free_disk_bytes),
            chain=src.chain(),
            packages=src.packages(),
            message=request.session.pop("message", None),
        )

    def cases(self, request: Request, user: dict[str, str], form: Mapping[str, Any]) -> Response:
        return self.page(request, "cases.html", jobs=self.sources.store.recent_jobs(50))

    def _job_id(self, request: Request) -> int | None:
        try:
            return int(request.path_params["job_id"])
        except (KeyError, ValueError):
            return None

    def case(self, request: Request, user: dict[str, str], form: Mapping[str, Any]) -> Response:
        job_id = self._job_id(request)
        job = self.sources.store.job_overview(job_id) if job_id is not None else None
        if job is None or job_id is None:
            return self.refused(request, 404, "No such case.")
        try:
            self.audit_view(request, user, job_id, "case")
        except AuditWriteError:
            return self.refused(request, 503, "The audit trail cannot be written; try later.")
        outputs = self._outputs(job_id)
        return self.page(request, "case.html", job=job, has_thumbnail=bool(outputs))

    def _outputs(self, job_id: int) -> dict[str, list[Path]]:
        folder = self.sources.outbox_dir / str(job_id)
        found: dict[str, list[Path]] = {}
        if folder.is_dir():
            for kind in ("seg", "overlay"):
                paths = sorted(folder.glob(f"{kind}-*.dcm"))
                if paths:
                    found[kind] = paths
        return found

    def thumbnail(
        self, request: Request, user: dict[str, str], form: Mapping[str, Any]
    ) -> Response:
        job_id = self._job_id(request)
        outputs = self._outputs(job_id) if job_id is not None else {}
        if job_id is None or not outputs:
            return Response("no result images (not made yet, or purged)", 404)
        try:
            self.audit_view(request, user, job_id, "thumbnail")
        except AuditWriteError:
            return Response("the audit trail cannot be written", 503)
        try:
            if "seg" in outputs:
                png = seg_thumbnail(outputs["seg"][0], self.sources.store.job_input_files(job_id))
            else:
                png = overlay_thumbnail(outputs["overlay"])
        except Exception as exc:  # noqa: BLE001 - a file purged or unreadable meanwhile
            log.warning("console.thumbnail_failed", job_id=job_id, error=type(exc).__name__)
            return Response("the result images cannot be read", 404)
        return Response(png, media_type="image/png", headers=self.headers())

    def retry(self, request: Request, user: dict[str, str], form: Mapping[str, Any]) -> Response:
        if user["role"] != ConsoleRole.ADMIN:
            log.warning("console.retry_refused", user=user["name"], role=user["role"])
            self.sources.audit.security_alert(
                self.who(request), f"console: {user['name']} (role {user['role']}) may not retry"
            )
            return self.refused(request, 403, "Only an admin may retry sends.")
        destination = str(form.get("destination", "")) or None
        if destination is not None and destination not in self.sources.destinations:
            return self.refused(request, 400, "No such destination.")
        queued = self.sources.store.retry_failed_sends(destination)
        due = self.sources.store.sends_due_now(destination)
        log.info(
            "console.retry", user=user["name"], destination=destination, failed=queued, waiting=due
        )
        request.session["message"] = (
            f"{queued} failed send(s) queued again, {due} waiting send(s) made due now"
            + (f" for {destination}" if destination else "")
        )
        return RedirectResponse("/", status_code=303, headers=self.headers())


def create_app(
    settings: ConsoleSettings,
    sources: ConsoleSources,
    users: UserStore,
    session_key: bytes,
    *,
    https: bool,
) -> Starlette:
    """The console's ASGI application.

    Parameters
    ----------
    settings
        ``console:``.
    sources
        The node's state, as the console reads it.
    users
        The local users.
    session_key
        Signs the session cookie (:func:`~dicom_node.console.security.load_session_key`).
    https
        Served over TLS: the cookie gets ``Secure`` and pages send HSTS.
    """
    console = Console(settings, sources, users, https=https)
    signed = console.signed_in
    routes = [
        Route("/", signed(console.overview)),
        Route("/cases", signed(console.cases)),
        Route("/cases/{job_id:int}", signed(console.case)),
        Route("/cases/{job_id:int}/thumbnail.png", signed(console.thumbnail)),
        Route("/retry", signed(console.retry), methods=["POST"]),
        Route("/logout", signed(console.logout), methods=["POST"]),
        Route("/login", console.login_form, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/login/oidc", console.oidc_start),
        Route("/login/oidc/callback", console.oidc_callback, name="oidc_callback"),
        Route("/login/oidc/return", console.oidc_return),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=session_key.hex(),
            session_cookie=SESSION_COOKIE,
            max_age=int(settings.session_max_age_s),
            same_site="strict",
            https_only=https,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)
