"""The sections of the settings: their enums, value types and one frozen class per section.

Each class validates its own keys (:func:`~dicom_node.config.checks.section` refuses unknown
ones with the list of known ones) and the rules between them; :mod:`dicom_node.config.settings`
puts them together into :class:`~dicom_node.config.settings.Settings`, and
:mod:`dicom_node.config.destinations` holds the destinations. Paths (``File``) are taken
relative to the config file's folder, which the validation context passes in.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainValidator, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs
from pydicom.datadict import tag_for_keyword

from dicom_node.config import checks as check
from dicom_node.config.checks import problem


class LatePolicy(enum.StrEnum):
    """``late_instances``: what instances arriving after their series ran cause."""

    REPROCESS = "reprocess"  # the series runs again; new outputs supersede the old
    IGNORE = "ignore"  # kept, not processed


class Device(enum.StrEnum):
    """``device``: where models run."""

    AUTO = "auto"  # CUDA when present, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


class LogFormat(enum.StrEnum):
    CONSOLE = "console"
    JSON = "json"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class SyslogTransport(enum.StrEnum):
    """``audit.syslog.transport``."""

    TLS = "tls"  # RFC 5425 (ca_file required)
    TCP = "tcp"  # RFC 6587 octet counting, no encryption: a trusted network only
    UDP = "udp"  # RFC 5426, no delivery guarantee


class Trigger(enum.StrEnum):
    """``routes[].trigger``: what one job of a route is made of."""

    SERIES = "series"  # one complete series that matches the route (the default)
    STUDY = "study"  # the series of one study that fill the route's input roles


#: Series-level attributes the index keeps for routing; ``match`` and ``select`` may use these.
ROUTING_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "SOPClassUID",
    "ViewPosition",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "ScanningSequence",
    "SequenceName",
    "ContrastBolusAgent",
    "MRAcquisitionType",
)

#: The role of a route that names no ``inputs``: its one series.
IMPLICIT_ROLE = "image"

_ROLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _selector(value: Any) -> dict[str, tuple[str, ...]]:
    """``match`` / ``select``: DICOM keyword -> accepted values (shell patterns, any of them)."""
    if not isinstance(value, Mapping):
        raise problem(
            f"must be a mapping of DICOM keyword to accepted values, got {check.got(value)}"
        )
    out: dict[str, tuple[str, ...]] = {}
    for key, values in value.items():
        if not isinstance(key, str) or tag_for_keyword(key) is None:
            raise problem(
                "not a DICOM keyword" + check.suggest(str(key), ROUTING_KEYWORDS),
                at=(str(key),),
            )
        if key not in ROUTING_KEYWORDS:
            raise problem(
                f"cannot route on this attribute; use one of {', '.join(ROUTING_KEYWORDS)}",
                at=(key,),
            )
        items = values if isinstance(values, list | tuple) else [values]
        if not items or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in items
        ):
            raise problem(
                "must be a value or a list of values (text; quote yes/no/on/off), "
                f"got {check.got(values)}",
                at=(key,),
            )
        out[key] = tuple(str(v) for v in items)
    return out


def _role(value: Any) -> str:
    if not isinstance(value, str) or not _ROLE_RE.match(value):
        raise problem(
            "must be a role name (letters, digits, '_', '.', '-'; e.g. t1c), "
            f"got {check.got(value)}"
        )
    return value


_MODALITY_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def _modality(value: Any) -> str:
    """A Modality (0008,0060) code: upper-case letters, digits, ``_`` (a CS value)."""
    if not isinstance(value, str) or not _MODALITY_RE.match(value) or not value.strip():
        raise problem(
            f"must be a Modality (0008,0060) code such as DX or CR, got {check.got(value)}"
        )
    return value.strip()


def field_names(cls: type) -> list[str]:
    """The keys of a section: the names of its dataclass fields, in order."""
    return [f.name for f in dataclasses.fields(cls)]


Port = Annotated[int, BeforeValidator(check.port)]
AETitle = Annotated[str, BeforeValidator(check.ae_title)]
File = Annotated[Path, BeforeValidator(check.existing_file)]
Selector = Annotated[dict[str, tuple[str, ...]], BeforeValidator(_selector)]
Seconds = Annotated[float, BeforeValidator(check.number(0))]
PositiveSeconds = Annotated[float, BeforeValidator(check.number(0, above=True))]
StrictBool = Annotated[bool, BeforeValidator(check.boolean)]
Count = Annotated[int, BeforeValidator(check.integer(1))]
Modality = Annotated[str, BeforeValidator(_modality)]

Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(check.network)]


@dataclass(frozen=True)
class TLSSettings:
    """TLS 1.2+ (PS3.15 B.1) on the node's DICOM port or towards a destination.

    On the node's port ``cert_file`` and ``key_file`` are required, and with ``ca_file`` callers
    must present a certificate that CA signed. Towards a destination ``ca_file`` is required (the
    destination's certificate must be signed by it), and ``cert_file`` + ``key_file`` are the
    node's client certificate for destinations that ask for one.
    """

    cert_file: File | None = None
    key_file: File | None = None
    ca_file: File | None = None
    #: On the node's port: seconds a caller has to complete the TLS handshake.
    handshake_timeout_s: PositiveSeconds = 10.0

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))

    @model_validator(mode="after")
    def _pairs(self) -> TLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise problem("cert_file and key_file go together")
        return self


@dataclass(frozen=True)
class HttpAuth:
    """``auth`` of a DICOMweb destination: HTTP Basic or a bearer token, read from files.

    Exactly one form: ``username`` + ``password_file``, or ``token_file``. The secrets stay in
    their files (readable only by the node's user), never in the config or the logs.
    """

    username: str | None = None
    password_file: File | None = None
    token_file: File | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for secret, home in (("password", "password_file"), ("token", "token_file")):
                if secret in data:
                    raise problem(
                        f"a {secret} is not written in the config; put it in a file that only "
                        f"the node's user can read and name that file in {home}",
                        at=(secret,),
                    )
        return check.section(data, field_names(cls))

    @field_validator("username", mode="before")
    @classmethod
    def _username(cls, value: Any) -> Any:
        return None if value is None else check.text("a user name")(value)

    @model_validator(mode="after")
    def _one_form(self) -> HttpAuth:
        basic = self.username is not None or self.password_file is not None
        if basic and self.token_file is not None:
            raise problem(
                "give either username and password_file (HTTP Basic) or token_file "
                "(a bearer token), not both"
            )
        if not basic and self.token_file is None:
            raise problem("give username and password_file (HTTP Basic), or token_file")
        if basic and self.password_file is None:
            raise problem("missing; username goes with password_file", at=("password_file",))
        if basic and self.username is None:
            raise problem("missing; password_file goes with username", at=("username",))
        return self


@dataclass(frozen=True)
class InputRole:
    """One named input of a route: which series of the study fills it.

    ``select`` maps DICOM keywords to accepted values, as ``match`` does (case-insensitive
    shell patterns); ``required: false`` lets the case run without it.
    """

    role: Annotated[str, BeforeValidator(_role)]
    select: Selector = dataclasses.field(default_factory=dict)
    required: StrictBool = True

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls), "a mapping {role, select, required}")


@dataclass(frozen=True)
class Route:
    """Which series (or studies) go to which model package, and where the results go.

    A route with no ``inputs`` has one implicit required role, ``image``: the series that
    matches ``match`` (``trigger: series``, today's behaviour). With ``inputs`` its roles are
    exactly those listed; ``trigger: study`` needs them. ``match`` filters every series the
    route sees; a role's ``select`` then says which of them fills the role.
    """

    name: Annotated[str, BeforeValidator(check.name)]
    match: Selector  # DICOM keyword -> accepted values (any of them)
    model: Annotated[Path, BeforeValidator(check.model_folder)]
    send_to: tuple[Annotated[str, BeforeValidator(check.text("a destination name"))], ...]
    trigger: Annotated[Trigger, BeforeValidator(check.choice(Trigger))] = Trigger.SERIES
    inputs: tuple[InputRole, ...] = ()
    #: Seconds after a study's first series before its case runs without its missing
    #: roles (or fails when a required one is missing); None: ``Settings.study_timeout_s``.
    study_timeout_s: PositiveSeconds | None = None

    @property
    def input_roles(self) -> tuple[InputRole, ...]:
        """The route's roles: its ``inputs``, or the one implicit role ``image``."""
        return self.inputs or (InputRole(IMPLICIT_ROLE, self.match, True),)

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        data = check.section(data, field_names(cls))
        if isinstance(data, ArgsKwargs):
            return data
        if "model" not in data:
            raise problem("missing; the path of a model package folder", at=("model",))
        if "inputs" in data and data["inputs"] in ([], ()):
            raise problem(
                f"must list at least one role; leave inputs out for the one implicit role "
                f"{IMPLICIT_ROLE}",
                at=("inputs",),
            )
        return {"match": {}, "send_to": [], **data}

    @model_validator(mode="after")
    def _roles(self) -> Route:
        if self.trigger == Trigger.STUDY and not self.inputs:
            raise problem(
                "missing; a route with trigger: study names its inputs (a role and a select "
                "for each series it needs); for one series per job use trigger: series",
                at=("inputs",),
            )
        if self.trigger == Trigger.SERIES:
            if self.inputs:
                raise problem(
                    "named inputs need trigger: study; a route with trigger: series runs "
                    "each matching series on its own (leave inputs out)",
                    at=("inputs",),
                )
            if self.study_timeout_s is not None:
                raise problem("applies to trigger: study only", at=("study_timeout_s",))
        seen: dict[str, int] = {}
        for j, role in enumerate(self.inputs):
            if role.role in seen:
                raise problem(
                    f"{role.role!r} is already the role of inputs[{seen[role.role]}]; "
                    "give each role its own name",
                    at=("inputs", j, "role"),
                )
            seen[role.role] = j
            if len(self.inputs) > 1 and not role.select:
                raise problem(
                    "missing; with several roles, each role's select says which series it takes",
                    at=("inputs", j, "select"),
                )
        if self.inputs and not any(role.required for role in self.inputs):
            raise problem(
                "needs at least one role with required: true (the default); a case runs on "
                "the series of its required roles",
                at=("inputs",),
            )
        return self


@dataclass(frozen=True)
class SendPolicy:
    """Retries of sends to destinations, persisted across restarts."""

    max_attempts: Count = 20
    initial_backoff_s: Seconds = 2.0
    max_backoff_s: Seconds = 300.0
    timeout_s: Annotated[float, BeforeValidator(check.number(1))] = 30.0
    #: Seconds between C-ECHOs to a destination whose sends wait for their backoff; when it
    #: answers, they are sent at once. 0 turns the probing off.
    echo_interval_s: Seconds = 10.0

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))


@dataclass(frozen=True)
class SyslogSettings:
    """An audit repository (IHE ATNA) that receives every audit record as RFC 5424 syslog.

    ``transport``: ``tls`` (RFC 5425, ``ca_file`` required; ``cert_file`` + ``key_file`` for
    mutual TLS), ``tcp`` (RFC 6587 octet counting, no encryption: a trusted network only) or
    ``udp`` (RFC 5426: no delivery guarantee).
    """

    host: Annotated[str, BeforeValidator(check.text("a host name or address"))]
    port: Port
    transport: Annotated[SyslogTransport, BeforeValidator(check.choice(SyslogTransport))] = (
        SyslogTransport.TLS
    )
    ca_file: File | None = None
    cert_file: File | None = None
    key_file: File | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))

    @model_validator(mode="after")
    def _tls(self) -> SyslogSettings:
        if self.transport == SyslogTransport.TLS and self.ca_file is None:
            raise problem(
                "missing; the CA of the audit repository (required with transport: tls)",
                at=("ca_file",),
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise problem("cert_file and key_file go together")
        return self


class ConsoleRole(enum.StrEnum):
    """A console user's role: ``viewer`` reads every page, ``admin`` may also retry sends."""

    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True)
class OidcSettings:
    """``console.oidc``: sign-in at an OpenID Connect provider (authorization code flow).

    The provider's metadata is read from ``<issuer>/.well-known/openid-configuration``; the
    client secret stays in ``client_secret_file``. A user signs in with the name in
    ``username_claim`` and gets ``admin`` when that name is in ``admins``, ``viewer`` when in
    ``viewers``; anyone else is refused (and the refusal audited).
    """

    issuer: Annotated[str, BeforeValidator(check.http_url)]
    client_id: Annotated[str, BeforeValidator(check.text("the client id at the provider"))]
    client_secret_file: File
    username_claim: Annotated[str, BeforeValidator(check.text("a claim name"))] = (
        "preferred_username"
    )
    admins: tuple[str, ...] = ()
    viewers: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))

    def role_of(self, username: str) -> ConsoleRole | None:
        """The console role of a signed-in provider user, or None: not allowed in."""
        if username in self.admins:
            return ConsoleRole.ADMIN
        if username in self.viewers:
            return ConsoleRole.VIEWER
        return None


@dataclass(frozen=True)
class ConsoleSettings:
    """``console:``: the web console the node serves (off by default; docs/security.md).

    HTTPS with the node's ``tls.cert_file``/``key_file`` when ``tls:`` is configured, plain
    HTTP otherwise (keep ``host`` on loopback then). Local users and their argon2 hashes are
    in ``users_file`` (default ``<storage_dir>/console-users.json``; ``dicom-node console user
    add``); the session cookies are signed with a key in ``<storage_dir>/console.key``.
    """

    enabled: StrictBool = False
    host: Annotated[str, BeforeValidator(check.text("an IP address to listen on"))] = "127.0.0.1"
    port: Port = 8443
    users_file: Annotated[Path, BeforeValidator(check.path)] | None = None
    #: Seconds a login lasts (the signed session cookie's lifetime).
    session_max_age_s: Annotated[float, BeforeValidator(check.number(60))] = 28800.0
    #: Failed logins from one address (or for one user name) within ``login_window_s``
    #: before further attempts are refused until the window has passed.
    max_login_failures: Count = 5
    login_window_s: PositiveSeconds = 300.0
    oidc: OidcSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))


@dataclass(frozen=True)
class AuditSettings:
    """``audit:``: the HMAC key of the audit trail and the optional syslog export."""

    #: Default ``<storage_dir>/audit.key``; a site should keep it on another volume.
    key_file: Annotated[Path, BeforeValidator(check.path)] | None = None
    syslog: SyslogSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer can hold: connections, time, memory and disk (``limits:``).

    See docs/security.md, "Connections and memory", for what each bound protects.
    """

    #: Seconds a connection may stay silent: before its A-ASSOCIATE-RQ, between PDUs, and
    #: between two reads inside a PDU.
    idle_timeout_s: Annotated[float, BeforeValidator(check.number(0.1))] = 30.0
    #: Inside a PDU, after the first ``idle_timeout_s``, the peer must keep up this rate.
    min_bytes_per_s: Count = 1024
    #: Associations admitted at once (A-ASSOCIATE-RJ, transient, local limit exceeded, beyond).
    max_associations: Count = 32
    #: Of ``max_associations``, kept for C-ECHO-only associations and ``allowed_callers``.
    reserved_associations: Annotated[int, BeforeValidator(check.integer(0))] = 4
    #: Concurrent connections from one host, and associations of one calling AE title.
    max_associations_per_peer: Count = 8
    #: Open TCP connections at once, associated or not; further ones are closed at accept.
    max_connections: Count = 128
    #: Largest data set of one C-STORE; a larger one is cut (A-ABORT) or refused (0xA700).
    max_instance_bytes: Annotated[int, BeforeValidator(check.integer(1024))] = 2 * 1024**3
    #: Below this free space on ``storage_dir`` (or the temp folder) C-STOREs are refused.
    min_free_disk_bytes: Annotated[int, BeforeValidator(check.integer(0))] = 1024**3
    #: Seconds a transaction waits for a PostgreSQL connection (the database down or out of
    #: connections) before it fails: a C-STORE is then refused (0xA700) within about this.
    database_timeout_s: Annotated[float, BeforeValidator(check.number(0.1))] = 5.0

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, field_names(cls))

    @model_validator(mode="after")
    def _consistent(self) -> Limits:
        if self.reserved_associations >= self.max_associations:
            raise problem(
                f"must be less than limits.max_associations ({self.max_associations}), "
                f"got {self.reserved_associations}",
                at=("reserved_associations",),
            )
        if self.max_connections < self.max_associations:
            raise problem(
                f"must be at least limits.max_associations ({self.max_associations}), "
                f"got {self.max_connections}",
                at=("max_connections",),
            )
        return self
