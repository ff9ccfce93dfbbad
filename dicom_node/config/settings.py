"""One typed, validated settings object read from YAML, with environment overrides.

The settings are frozen pydantic dataclasses: pydantic validates the whole file (every problem
at once, each with its place) and :mod:`dicom_node.config.checks` gives each kind of value the
node's own message, so a bad file ends in one :class:`~dicom_node.common.errors.ConfigError` listing
each problem as ``key.path: message``. Every option with a fixed set of values is an enum;
booleans and numbers are strict (``"false"`` in quotes is refused, not read as true); an
unknown key is refused with the list of known keys. The node does not start with an invalid
file. Code and tests may still build these classes directly (positional arguments too), as
plain frozen dataclasses that validate their arguments.

Relative paths in the file (``storage_dir``, route ``model``, the ``tls``, ``auth`` and
``ca_file`` files) are taken relative to the folder of the config file, so ``dicom-node status
--config /etc/dicom-node/node.yaml`` means the same from any current directory.

Environment overrides (for containers and systemd): ``DICOM_NODE_AE_TITLE``,
``DICOM_NODE_PORT``, ``DICOM_NODE_STORAGE_DIR``, ``DICOM_NODE_LOG_FORMAT``,
``DICOM_NODE_DATABASE``, ``DICOM_NODE_METRICS_PORT`` (one port per role process on a host).
A relative
``DICOM_NODE_STORAGE_DIR`` is taken relative to the current directory, as any path typed in a
shell.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BeforeValidator,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs
from pydicom.datadict import tag_for_keyword

from dicom_node.common.errors import ConfigError
from dicom_node.common.output_kinds import DEFAULT_OUTPUTS, OutputKind
from dicom_node.config import checks as check
from dicom_node.config import yamlfile
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


class DestinationType(enum.StrEnum):
    """``destinations.<name>.type``: how results reach a destination."""

    DIMSE = "dimse"  # C-STORE to ae_title@host:port (the default)
    DICOMWEB = "dicomweb"  # STOW-RS to url (POST <url>/studies)


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


def _outputs(value: Any) -> tuple[OutputKind, ...]:
    """``outputs``: a non-empty list of output kinds, each at most once."""
    allowed = ", ".join(k.value for k in OutputKind)
    if not isinstance(value, list | tuple) or not value:
        raise problem(
            f"must be a non-empty list of output kinds ({allowed}), got {check.got(value)}"
        )
    kinds: list[OutputKind] = []
    for i, item in enumerate(value):
        if not isinstance(item, OutputKind) and item not in {k.value for k in OutputKind}:
            raise problem(f"must be one of {allowed}, got {check.got(item)}", at=(i,))
        if OutputKind(item) in kinds:
            raise problem(f"{check.got(item)} is listed twice", at=(i,))
        kinds.append(OutputKind(item))
    return tuple(kinds)


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


def _keys(cls: type) -> list[str]:
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
        return check.section(data, _keys(cls))

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
        return check.section(data, _keys(cls))

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


_DIMSE_ONLY = ("ae_title", "host", "port", "tls")


def _unset_dimse_keys(data: ArgsKwargs) -> ArgsKwargs:
    """In Python, a dicomweb Destination may pass ``ae_title=""``/``None``, ``port=0``: unset."""
    kwargs = dict(data.kwargs or {})
    if kwargs.get("type") != DestinationType.DICOMWEB or len(data.args) > 1:
        return data
    for key in ("ae_title", "host", "port"):
        if key in kwargs and not kwargs[key]:
            del kwargs[key]
    return ArgsKwargs(data.args, kwargs)


_DICOMWEB_ONLY = ("url", "auth", "verify_tls", "ca_file")


@dataclass(frozen=True)
class Destination:
    """A peer that receives results: C-STORE (``dimse``) or STOW-RS (``dicomweb``).

    A ``dimse`` destination is ``ae_title``, ``host``, ``port`` (and ``tls``); a ``dicomweb``
    one is ``url`` (the DICOMweb base URL; STOW-RS posts to ``<url>/studies``), ``auth``,
    ``verify_tls`` and ``ca_file``. ``ae_title``, ``host`` and ``port`` are ``""``, ``""`` and
    ``0`` for a dicomweb destination. ``connect_timeout_s`` and ``timeout_s`` (for a response)
    bound every send of either type.

    ``outputs`` are the kinds of result it receives (``seg``, ``sr``, ``overlay``): a PACS
    that cannot show DICOM SEG asks for ``overlay``, a Secondary Capture with the outlines
    burned in.
    """

    name: str
    ae_title: AETitle = ""
    host: Annotated[str, BeforeValidator(check.text("a host name or address"))] = ""
    port: Port = 0
    tls: TLSSettings | None = None
    outputs: Annotated[tuple[OutputKind, ...], BeforeValidator(_outputs)] = DEFAULT_OUTPUTS
    type: Annotated[DestinationType, BeforeValidator(check.choice(DestinationType))] = (
        DestinationType.DIMSE
    )
    url: Annotated[str, BeforeValidator(check.http_url)] | None = None
    auth: HttpAuth | None = None
    verify_tls: StrictBool = True
    ca_file: File | None = None
    connect_timeout_s: PositiveSeconds = 10.0
    timeout_s: PositiveSeconds = 30.0

    @property
    def address(self) -> str:
        """Where it is reached, for status and logs: ``AE@host:port`` or the URL."""
        if self.type == DestinationType.DICOMWEB:
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        data = check.section(data, _keys(cls))
        if isinstance(data, ArgsKwargs):
            return _unset_dimse_keys(data)
        kind = data.get("type", DestinationType.DIMSE.value)
        if kind == DestinationType.DIMSE:
            for key in _DICOMWEB_ONLY:
                if key in data:
                    raise problem(
                        "applies to dicomweb destinations only (this one is type: dimse); "
                        f"add type: dicomweb, or remove {key}",
                        at=(key,),
                    )
        elif kind == DestinationType.DICOMWEB:
            for key in _DIMSE_ONLY:
                if key in data:
                    how = (
                        "verifies its server with verify_tls and ca_file"
                        if key == "tls"
                        else "is reached at its url"
                    )
                    raise problem(
                        f"applies to dimse destinations only; a dicomweb destination {how}",
                        at=(key,),
                    )
        return data

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.type == DestinationType.DIMSE:
            for key, value in (
                ("ae_title", self.ae_title),
                ("host", self.host),
                ("port", self.port),
            ):
                if not value:
                    raise problem(
                        "missing; a dimse destination needs ae_title, host and port", at=(key,)
                    )
            if self.tls is not None and self.tls.ca_file is None:
                raise problem(
                    "missing; the CA that signed the destination's certificate (a PEM file)",
                    at=("tls", "ca_file"),
                )
        else:
            if self.url is None:
                raise problem(
                    "missing; a dicomweb destination needs the base URL of its DICOMweb "
                    "service (e.g. https://pacs.example/dicom-web)",
                    at=("url",),
                )
            if not self.verify_tls and self.ca_file is not None:
                raise problem(
                    "is not used with verify_tls: false; keep one of them", at=("ca_file",)
                )
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
        return check.section(data, _keys(cls), "a mapping {role, select, required}")


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
        data = check.section(data, _keys(cls))
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
        return check.section(data, _keys(cls))


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
        return check.section(data, _keys(cls))

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


@dataclass(frozen=True)
class AuditSettings:
    """``audit:``: the HMAC key of the audit trail and the optional syslog export."""

    #: Default ``<storage_dir>/audit.key``; a site should keep it on another volume.
    key_file: Annotated[Path, BeforeValidator(check.path)] | None = None
    syslog: SyslogSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, _keys(cls))


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

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        return check.section(data, _keys(cls))

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


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(check.network)]

#: Keys whose empty value (``routes:`` with nothing under it) means their default.
_EMPTY_IS_DEFAULT = (
    "destinations",
    "routes",
    "send",
    "audit",
    "limits",
    "allowed_callers",
    "called_ae_titles",
    "allowed_networks",
)


@dataclass(frozen=True)
class Settings:
    """The whole node configuration. Build it with :func:`load_settings`."""

    ae_title: AETitle = "DICOMNODE"
    port: Port = 11112
    bind_address: Annotated[str, BeforeValidator(check.text("an IP address to listen on"))] = (
        "0.0.0.0"
    )
    storage_dir: Annotated[Path, BeforeValidator(check.storage_path)] = Path("var")
    allowed_callers: tuple[AETitle, ...] = ()
    called_ae_titles: tuple[AETitle, ...] = ()
    allowed_networks: tuple[Network, ...] = ()
    tls: TLSSettings | None = None
    stable_after_s: Seconds = 10.0
    release_grace_s: Seconds = 1.0
    #: Modalities whose series are complete as soon as the association that sent them is
    #: released (no ``release_grace_s``): projection images, each segmented on its own.
    complete_at_release: tuple[Modality, ...] = ("CR", "DX", "MG", "IO", "PX")
    #: Default of ``routes[].study_timeout_s``: seconds after a study's first series before a
    #: study-level case runs without its optional roles, or fails for a missing required one.
    study_timeout_s: PositiveSeconds = 600.0
    late_instances: Annotated[LatePolicy, BeforeValidator(check.choice(LatePolicy))] = (
        LatePolicy.REPROCESS
    )
    destinations: dict[str, Destination] = dataclasses.field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    send: SendPolicy = SendPolicy()
    workers: Count = 1
    #: Model runs at once on a CUDA device (jobs beyond wait for a slot).
    gpu_slots: Count = 1
    batch_size: Count = 8
    device: Annotated[Device, BeforeValidator(check.choice(Device))] = Device.AUTO
    delete_after_success: StrictBool = False
    retention_days: Annotated[float, BeforeValidator(check.number(0))] | None = None
    metrics_port: Port | None = None
    log_format: Annotated[LogFormat, BeforeValidator(check.choice(LogFormat))] = LogFormat.CONSOLE
    log_level: Annotated[LogLevel, BeforeValidator(check.choice(LogLevel))] = LogLevel.INFO
    job_lease_s: Annotated[float, BeforeValidator(check.number(1))] = 600.0
    max_job_attempts: Count = 3
    audit: AuditSettings = AuditSettings()
    limits: Limits = Limits()
    #: The state database: None for SQLite at ``<storage_dir>/node.sqlite3`` (the default), or
    #: a ``postgresql://`` URL shared by several node processes or hosts. A password comes
    #: from libpq (``~/.pgpass``, ``PGPASSFILE``, ``PGPASSWORD``); one in the URL is never
    #: shown (:func:`~dicom_node.config.checks.redact_url`).
    database: Annotated[str, BeforeValidator(check.database_url)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        data = check.section(data, _keys(cls))
        if isinstance(data, ArgsKwargs):
            return data
        data = {
            "storage_dir": "var",
            **{k: v for k, v in data.items() if not (v is None and k in _EMPTY_IS_DEFAULT)},
        }
        destinations = data.get("destinations")
        if isinstance(destinations, Mapping):
            named = {}
            for key, item in destinations.items():
                if isinstance(item, Mapping):
                    if "name" in item:
                        raise problem(
                            "not a key of a destination: its name is its key under destinations",
                            at=("destinations", str(key), "name"),
                        )
                    item = {"name": str(key), **item}
                    send = data.get("send")
                    if isinstance(send, Mapping) and "timeout_s" in send:
                        # send.timeout_s (older configs) is each destination's default timeout_s
                        item = {"timeout_s": send["timeout_s"], **item}
                named[str(key)] = item
            data["destinations"] = named
        routes = data.get("routes")
        if isinstance(routes, list):
            data["routes"] = [
                {"name": f"route-{i}", **r} if isinstance(r, Mapping) and "name" not in r else r
                for i, r in enumerate(routes)
            ]
        return data

    @field_validator("tls")
    @classmethod
    def _node_tls(cls, tls: TLSSettings | None) -> TLSSettings | None:
        if tls is not None and tls.cert_file is None:
            raise problem("missing; the path of a PEM file", at=("cert_file",))
        return tls

    @model_validator(mode="after")
    def _routes_fit(self) -> Settings:
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.name in seen:
                raise problem(
                    f"{route.name!r} is already the name of routes[{seen[route.name]}]; "
                    "give each route its own name (jobs and status are keyed by it)",
                    at=("routes", i, "name"),
                )
            seen[route.name] = i
            for dest in route.send_to:
                if dest not in self.destinations:
                    raise problem(
                        f"{dest!r} is not a destination; "
                        f"known: {', '.join(self.destinations) or 'none'}",
                        at=("routes", i, "send_to"),
                    )
        return self


_SETTINGS: TypeAdapter[Settings] = TypeAdapter(Settings)


def parse_settings(doc: Any, base: Path | None = None) -> Settings:
    """Validate a parsed YAML document into :class:`Settings`.

    Parameters
    ----------
    doc
        The parsed YAML (a mapping).
    base
        Folder that relative paths are resolved against (default: the current directory);
        :func:`load_settings` passes the config file's folder. A ``storage_dir`` from
        ``DICOM_NODE_STORAGE_DIR`` is resolved against the current directory instead.

    Raises
    ------
    ConfigError
        Listing every problem as ``key.path: message``.
    """
    base = base or Path.cwd()
    doc = doc if doc is not None else {}
    env = os.environ
    if isinstance(doc, Mapping):
        doc = dict(doc)
        for var, key, conv in (
            ("DICOM_NODE_AE_TITLE", "ae_title", str),
            ("DICOM_NODE_PORT", "port", int),
            ("DICOM_NODE_STORAGE_DIR", "storage_dir", str),
            ("DICOM_NODE_LOG_FORMAT", "log_format", str),
            ("DICOM_NODE_DATABASE", "database", str),
            ("DICOM_NODE_METRICS_PORT", "metrics_port", int),
        ):
            if var in env:
                try:
                    doc[key] = conv(env[var])
                except ValueError:
                    raise ConfigError(f"{var}: {env[var]!r} is not valid for {key}") from None
    storage_base = Path.cwd() if "DICOM_NODE_STORAGE_DIR" in env else base
    try:
        return _SETTINGS.validate_python(doc, context={"base": base, "storage_base": storage_base})
    except ValidationError as exc:
        raise check.config_error(exc) from None


def load_settings(path: Path | str) -> Settings:
    """Read and validate the YAML file at ``path``.

    Relative paths in the file are resolved against the folder that holds it.

    Raises
    ------
    ConfigError
        When the file is missing, not YAML, or a key is invalid; the message starts with the
        file name and names the key.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    try:
        doc = yamlfile.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_settings(doc, base=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
