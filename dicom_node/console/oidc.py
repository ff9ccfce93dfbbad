"""Sign-in at an OpenID Connect provider with authlib (authorization code flow, PKCE).

The provider's endpoints come from ``<issuer>/.well-known/openid-configuration``; the ID
token is checked by authlib (signature against the provider's keys, issuer, audience, nonce).
Which users get in, and with which role: :meth:`~dicom_node.config.sections.OidcSettings.role_of`.
"""

from __future__ import annotations

from typing import Any

from authlib.integrations.starlette_client import OAuth

from dicom_node.common.errors import StartupError
from dicom_node.config.sections import OidcSettings

__all__ = ["oauth_client"]


def oauth_client(settings: OidcSettings) -> Any:
    """An authlib OAuth registry with the provider registered as ``oidc``.

    Raises
    ------
    StartupError
        When the client secret file cannot be read.
    """
    try:
        secret = settings.client_secret_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StartupError(
            f"console.oidc.client_secret_file: cannot read {settings.client_secret_file}: "
            f"{exc.strerror}"
        ) from None
    oauth = OAuth()
    oauth.register(
        name="oidc",
        server_metadata_url=f"{settings.issuer}/.well-known/openid-configuration",
        client_id=settings.client_id,
        client_secret=secret,
        client_kwargs={"scope": "openid profile email", "code_challenge_method": "S256"},
    )
    return oauth
