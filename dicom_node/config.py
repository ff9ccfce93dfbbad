"""One typed, validated settings object read from YAML, with environment overrides.

Every error names the key and the bad value, and the node does not start with an invalid file.
Relative paths in the file (``storage_dir``, route ``model``, the ``tls`` files) are taken
relative to the folder of the config file, so ``dicom-node status --config
/etc/dicom-node/node.yaml`` means the same from any current directory.

Environment overrides (for containers and systemd): ``DICOM_NODE_AE_TITLE``,
``DICOM_NODE_PORT``, ``DICOM_NODE_STORAGE_DIR``, ``DICOM_NODE_LOG_FORMAT``. A relative
``DICOM_NODE_STORAGE_DIR`` is taken relative to the current directory, as any path typed in a
shell.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dicom_node import yamlfile
from dicom_node.errors import ConfigError
from dicom_node.outputs.kinds import DEFAULT_OUTPUTS, OutputKind

# PS3.5 6.2: AE titles are up to 16 characters of the default repertoire, no backslash or
# control characters; leading and trailing spaces are not significant.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class DestinationType(enum.StrEnum):
    """How results reach a destination: C-STORE (``dimse``) or STOW-RS (``dicomweb``)."""

    DIMSE = "dimse"
    DICOMWEB = "dicomweb"


@dataclass(frozen=True)
class HttpAuth:
    """HTTP authentication towards a DICOMweb destination, read from files at each request.

    Basic auth: ``username`` + ``password_file``; bearer token: ``token_file``. A file's
    trailing newline is not part of the secret.
    """

    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class Destination:
    """A peer that receives results: a C-STORE SCP (``dimse``) or a STOW-RS service
    (``dicomweb``).

    ``outputs`` are the kinds of result it receives (``seg``, ``sr``, ``overlay``): a PACS
    that cannot show DICOM SEG asks for ``overlay``, a Secondary Capture with the outlines
    burned in. ``dimse`` needs ``ae_title``, ``host`` and ``port`` (``tls`` optional);
    ``dicomweb`` needs ``url`` (the STOW-RS base; ``/studies`` is appended), with optional
    ``auth``, ``verify_tls`` and ``ca_file``. ``connect_timeout_s`` bounds the connection (and
    for DIMSE the association negotiation), ``timeout_s`` each response.
    """

    name: str
    type: DestinationType = DestinationType.DIMSE
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: TLSSettings | None = None
    outputs: tuple[OutputKind, ...] = DEFAULT_OUTPUTS
    url: str | None = None
    auth: HttpAuth | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    connect_timeout_s: float = 10.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        key = f"destinations.{self.name}"
        if self.type is DestinationType.DICOMWEB:
            if not self.url:
                raise ConfigError(f"{key}.url: missing; the STOW-RS base URL of a dicomweb one")
        elif not (self.ae_title and self.host and self.port):
            raise ConfigError(f"{key}: a dimse destination needs ae_title, host and port")

    @property
    def address(self) -> str:
        """Where it is, for status and audit: ``AE@host:port`` or the URL."""
        if self.type is DestinationType.DICOMWEB:
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Route:
    """Which series go to which model package, and where the results go."""

    name: str
    match: dict[str, tuple[str, ...]]  # DICOM keyword -> accepted values (any of them)
    model: Path
    send_to: tuple[str, ...]


@dataclass(frozen=True)
class TLSSettings:
    """TLS 1.2+ (PS3.15 B.1) on the node's DICOM port or towards a destination.

    On the node's port ``cert_file`` and ``key_file`` are required, and with ``ca_file`` callers
    must present a certificate that CA signed. Towards a destination ``ca_file`` is required (the
    destination's certificate must be signed by it), and ``cert_file`` + ``key_file`` are the
    node's client certificate for destinations that ask for one.
    """

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    #: On the node's port: seconds a caller has to complete the TLS handshake.
    handshake_timeout_s: float = 10.0


@dataclass(frozen=True)
class SendPolicy:
    """Retries of sends to destinations, persisted across restarts.

    ``timeout_s`` is the default of each destination's ``timeout_s`` when set here.
    """

    max_attempts: int = 20
    initial_backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    timeout_s: float = 30.0
    #: Seconds between C-ECHOs to a destination whose sends wait for their backoff; when it
    #: answers, they are sent at once. 0 turns the probing off.
    echo_interval_s: float = 10.0


@dataclass(frozen=True)
class SyslogSettings:
    """An audit repository (IHE ATNA) that receives every audit record as RFC 5424 syslog.

    ``transport``: ``tls`` (RFC 5425, ``ca_file`` required; ``cert_file`` + ``key_file`` for
    mutual TLS), ``tcp`` (RFC 6587 octet counting, no encryption: a trusted network only) or
    ``udp`` (RFC 5426: no delivery guarantee).
    """

    host: str
    port: int
    transport: str = "tls"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class AuditSettings:
    """``audit:``: the HMAC key of the audit trail and the optional syslog export."""

    #: Default ``<storage_dir>/audit.key``; a site should keep it on another volume.
    key_file: Path | None = None
    syslog: SyslogSettings | None = None


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer can hold: connections, time, memory and disk (``limits:``).

    See docs/security.md, "Connections and memory", for what each bound protects.
    """

    #: Seconds a connection may stay silent: before its A-ASSOCIATE-RQ, between PDUs, and
    #: between two reads inside a PDU.
    idle_timeout_s: float = 30.0
    #: Inside a PDU, after the first ``idle_timeout_s``, the peer must keep up this rate.
    min_bytes_per_s: int = 1024
    #: Associations admitted at once (A-ASSOCIATE-RJ, transient, local limit exceeded, beyond).
    max_associations: int = 32
    #: Of ``max_associations``, kept for C-ECHO-only associations and ``allowed_callers``.
    reserved_associations: int = 4
    #: Concurrent connections from one host, and associations of one calling AE title.
    max_associations_per_peer: int = 8
    #: Open TCP connections at once, associated or not; further ones are closed at accept.
    max_connections: int = 128
    #: Largest data set of one C-STORE; a larger one is cut (A-ABORT) or refused (0xA700).
    max_instance_bytes: int = 2 * 1024**3
    #: Below this free space on ``storage_dir`` (or the temp folder) C-STOREs are refused.
    min_free_disk_bytes: int = 1024**3


@dataclass(frozen=True)
class Settings:
    """The whole node configuration. Build it with :func:`load_settings`."""

    ae_title: str = "DICOMNODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    storage_dir: Path = Path("var")
    allowed_callers: tuple[str, ...] = ()
    called_ae_titles: tuple[str, ...] = ()
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tls: TLSSettings | None = None
    stable_after_s: float = 10.0
    release_grace_s: float = 1.0
    late_instances: str = "reprocess"
    destinations: dict[str, Destination] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    send: SendPolicy = SendPolicy()
    workers: int = 1
    batch_size: int = 8
    device: str = "auto"
    delete_after_success: bool = False
    retention_days: float | None = None
    metrics_port: int | None = None
    log_format: str = "console"
    log_level: str = "info"
    job_lease_s: float = 600.0
    max_job_attempts: int = 3
    audit: AuditSettings = AuditSettings()
    limits: Limits = Limits()

    @property
    def spool_dir(self) -> Path:
        return self.storage_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.storage_dir / "outbox"

    @property
    def database_path(self) -> Path:
        return self.storage_dir / "node.sqlite3"

    @property
    def audit_path(self) -> Path:
        return self.storage_dir / "audit.jsonl"

    @property
    def audit_key_file(self) -> Path:
        return self.audit.key_file or self.storage_dir / "audit.key"


#: Series-level attributes the index keeps for routing; ``routes[].match`` may use these.
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
)

_TOP_KEYS = set(Settings.__dataclass_fields__)
_LATE_POLICIES = ("reprocess", "ignore")
_LOG_FORMATS = ("console", "json")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_DEVICES = ("auto", "cpu", "cuda")


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise ConfigError(
            f"{key}: {value!r} is not a valid AE title (1 to 16 printable ASCII characters, "
            "no backslash)"
        )
    return value.strip()


def _ae_titles(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of AE titles, got {value!r}")
    return tuple(_ae_title(v, f"{key}[{i}]") for i, v in enumerate(value))


def _networks(value: Any, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of addresses or networks, got {value!r}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError as exc:
            raise ConfigError(
                f"{key}[{i}]: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from exc
    return tuple(out)


def _port(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{key}: {value!r} is not a TCP port (an integer in 1..65535)")
    return value


def _number(value: Any, key: str, *, minimum: float = 0.0, integer: bool = False) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
        or value < minimum
    ):
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key}: {value!r} must be {what} >= {minimum:g}")
    return value


def _choice(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} must be one of {', '.join(allowed)}")
    return str(value)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


_DIMSE_KEYS = {"ae_title", "host", "port", "tls"}
_DICOMWEB_KEYS = {"url", "auth", "verify_tls", "ca_file"}
_COMMON_DEST_KEYS = {"type", "outputs", "connect_timeout_s", "timeout_s"}


def _destinations(doc: Any, base: Path, timeout_s: float | None) -> dict[str, Destination]:
    """``destinations``; ``timeout_s`` (``send.timeout_s`` when set) is the default of theirs."""
    out = {}
    for name, item in _mapping(doc, "destinations").items():
        key = f"destinations.{name}"
        item = _mapping(item, key)
        kind = DestinationType(
            _choice(item.get("type", "dimse"), f"{key}.type", tuple(DestinationType))
        )
        own = _DIMSE_KEYS if kind is DestinationType.DIMSE else _DICOMWEB_KEYS
        unknown = set(item) - own - _COMMON_DEST_KEYS
        if unknown:
            raise ConfigError(
                f"{key}: unknown key(s) for a {kind.value} destination: "
                f"{', '.join(sorted(unknown))}"
            )
        timeouts = {
            "connect_timeout_s": float(
                _number(
                    item.get("connect_timeout_s", 10.0), f"{key}.connect_timeout_s", minimum=0.1
                )
            ),
            "timeout_s": float(
                _number(item.get("timeout_s", timeout_s or 30.0), f"{key}.timeout_s", minimum=0.1)
            ),
        }
        outputs = _outputs(item.get("outputs", list(DEFAULT_OUTPUTS)), f"{key}.outputs")
        if kind is DestinationType.DICOMWEB:
            out[str(name)] = _dicomweb(str(name), item, base, outputs, timeouts)
            continue
        for required in ("ae_title", "host", "port"):
            if required not in item:
                raise ConfigError(f"{key}.{required}: missing")
        host = item["host"]
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{key}.host: {host!r} must be a host name or address")
        out[str(name)] = Destination(
            name=str(name),
            ae_title=_ae_title(item["ae_title"], f"{key}.ae_title"),
            host=host,
            port=_port(item["port"], f"{key}.port"),
            tls=_tls(item.get("tls"), base, f"{key}.tls", ("ca_file",)),
            outputs=outputs,
            connect_timeout_s=timeouts["connect_timeout_s"],
            timeout_s=timeouts["timeout_s"],
        )
    return out


def _file(value: Any, base: Path, key: str) -> Path:
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"{key}: {value!r} is not a readable file")
    return path


def _dicomweb(
    name: str,
    item: dict[str, Any],
    base: Path,
    outputs: tuple[OutputKind, ...],
    timeouts: dict[str, float],
) -> Destination:
    key = f"destinations.{name}"
    url = item.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://[^/]+", url):
        raise ConfigError(
            f"{key}.url: {url!r} must be the http(s) base URL of a DICOMweb service "
            "(e.g. https://pacs.example/dicom-web; /studies is appended)"
        )
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise ConfigError(
            f"{key}.url: credentials in the URL would show in status and logs; "
            "use auth: {username, password_file} instead"
        )
    auth = None
    if item.get("auth") is not None:
        doc = _mapping(item["auth"], f"{key}.auth")
        if set(doc) - {"username", "password_file", "token_file"}:
            raise ConfigError(
                f"{key}.auth: unknown key(s) "
                f"{', '.join(sorted(set(doc) - {'username', 'password_file', 'token_file'}))}"
            )
        basic = "username" in doc or "password_file" in doc
        if basic == ("token_file" in doc) or (
            basic and not {"username", "password_file"} <= set(doc)
        ):
            raise ConfigError(
                f"{key}.auth: give either username + password_file (HTTP basic) "
                "or token_file (bearer token)"
            )
        auth = HttpAuth(
            username=str(doc["username"]) if basic else None,
            password_file=_file(doc["password_file"], base, f"{key}.auth.password_file")
            if basic
            else None,
            token_file=None if basic else _file(doc["token_file"], base, f"{key}.auth.token_file"),
        )
    verify = item.get("verify_tls", True)
    if not isinstance(verify, bool):
        raise ConfigError(f"{key}.verify_tls: {verify!r} must be true or false")
    ca_file = (
        None if item.get("ca_file") is None else _file(item["ca_file"], base, f"{key}.ca_file")
    )
    return Destination(
        name=name,
        type=DestinationType.DICOMWEB,
        url=url.rstrip("/"),
        auth=auth,
        verify_tls=verify,
        ca_file=ca_file,
        outputs=outputs,
        connect_timeout_s=timeouts["connect_timeout_s"],
        timeout_s=timeouts["timeout_s"],
    )


def _outputs(value: Any, key: str) -> tuple[OutputKind, ...]:
    """``destinations.<name>.outputs``: a non-empty list of output kinds, each at most once."""
    allowed = ", ".join(k.value for k in OutputKind)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: {value!r} must be a non-empty list of output kinds ({allowed})")
    kinds = []
    for item in value:
        if item not in {k.value for k in OutputKind}:
            raise ConfigError(f"{key}: {item!r} is not an output kind; allowed: {allowed}")
        if OutputKind(item) in kinds:
            raise ConfigError(f"{key}: {item!r} is listed twice")
        kinds.append(OutputKind(item))
    return tuple(kinds)


def _routes(doc: Any, destinations: dict[str, Destination], base: Path) -> tuple[Route, ...]:
    if not isinstance(doc, list):
        raise ConfigError(f"routes: expected a list, got {doc!r}")
    routes = []
    seen: dict[str, int] = {}
    for i, item in enumerate(doc):
        key = f"routes[{i}]"
        item = _mapping(item, key)
        unknown = set(item) - {"name", "match", "model", "send_to"}
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(sorted(unknown))}")
        name = str(item.get("name", f"route-{i}"))
        if name in seen:
            raise ConfigError(
                f"{key}.name: {name!r} is already the name of routes[{seen[name]}]; "
                "give each route its own name (jobs and status are keyed by it)"
            )
        seen[name] = i
        match: dict[str, tuple[str, ...]] = {}
        for attr, values in _mapping(item.get("match", {}), f"{key}.match").items():
            if attr not in ROUTING_KEYWORDS:
                raise ConfigError(
                    f"{key}.match.{attr}: cannot route on this attribute; "
                    f"use one of {', '.join(ROUTING_KEYWORDS)}"
                )
            vals = values if isinstance(values, list) else [values]
            if not vals or not all(isinstance(v, str | int | float) for v in vals):
                raise ConfigError(f"{key}.match.{attr}: expected a value or a list of values")
            match[str(attr)] = tuple(str(v) for v in vals)
        if "model" not in item or not isinstance(item["model"], str):
            raise ConfigError(f"{key}.model: missing; the path of a model package folder")
        model = Path(item["model"])
        if not model.is_absolute():
            model = base / model
        if not (model / "model.yaml").is_file():
            raise ConfigError(
                f"{key}.model: {item['model']!r} is not a model package (no model.yaml in {model})"
            )
        send_to = item.get("send_to", [])
        if not isinstance(send_to, list):
            raise ConfigError(f"{key}.send_to: expected a list of destination names")
        for dest in send_to:
            if dest not in destinations:
                raise ConfigError(
                    f"{key}.send_to: {dest!r} is not a destination; "
                    f"known: {', '.join(destinations) or 'none'}"
                )
        routes.append(Route(str(name), match, model, tuple(send_to)))
    return tuple(routes)


def _tls(doc: Any, base: Path, where: str, required: tuple[str, ...]) -> TLSSettings | None:
    if doc is None:
        return None
    doc = _mapping(doc, where)
    unknown = set(doc) - {"cert_file", "key_file", "ca_file", "handshake_timeout_s"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if ("cert_file" in doc) != ("key_file" in doc):
        raise ConfigError(f"{where}: cert_file and key_file go together")
    paths: dict[str, Path | None] = {}
    for key in ("cert_file", "key_file", "ca_file"):
        value = doc.get(key)
        if value is None:
            if key in required:
                raise ConfigError(f"{where}.{key}: missing; the path of a PEM file")
            paths[key] = None
            continue
        path = Path(str(value))
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ConfigError(f"{where}.{key}: {value!r} is not a readable file")
        paths[key] = path
    timeout = _number(doc.get("handshake_timeout_s", 10.0), f"{where}.handshake_timeout_s")
    if not timeout > 0:
        raise ConfigError(f"{where}.handshake_timeout_s: must be more than 0 seconds")
    return TLSSettings(paths["cert_file"], paths["key_file"], paths["ca_file"], float(timeout))


_SYSLOG_TRANSPORTS = ("tls", "tcp", "udp")


def _audit(doc: Any, base: Path) -> AuditSettings:
    """``audit: {key_file, syslog: {host, port, transport, ca_file, cert_file, key_file}}``."""
    doc = _mapping(doc or {}, "audit")
    unknown = set(doc) - {"key_file", "syslog"}
    if unknown:
        raise ConfigError(f"audit: unknown key(s) {', '.join(sorted(unknown))}")
    key_file = None
    if doc.get("key_file") is not None:
        key_file = Path(str(doc["key_file"]))
        key_file = key_file if key_file.is_absolute() else base / key_file
    syslog = None
    if doc.get("syslog") is not None:
        item = _mapping(doc["syslog"], "audit.syslog")
        known = {"host", "port", "transport", "ca_file", "cert_file", "key_file"}
        if set(item) - known:
            raise ConfigError(
                f"audit.syslog: unknown key(s) {', '.join(sorted(set(item) - known))}"
            )
        for required in ("host", "port"):
            if required not in item:
                raise ConfigError(f"audit.syslog.{required}: missing")
        transport = _choice(
            item.get("transport", "tls"), "audit.syslog.transport", _SYSLOG_TRANSPORTS
        )
        tls = _tls(
            {k: item[k] for k in ("ca_file", "cert_file", "key_file") if k in item} or None,
            base,
            "audit.syslog",
            ("ca_file",) if transport == "tls" else (),
        )
        if transport == "tls" and tls is None:
            raise ConfigError("audit.syslog.ca_file: missing; the CA of the audit repository")
        syslog = SyslogSettings(
            host=str(item["host"]),
            port=_port(item["port"], "audit.syslog.port"),
            transport=transport,
            ca_file=tls.ca_file if tls else None,
            cert_file=tls.cert_file if tls else None,
            key_file=tls.key_file if tls else None,
        )
    return AuditSettings(key_file=key_file, syslog=syslog)


def _limits(doc: Any) -> Limits:
    """``limits:``: every key optional, each a number within its range."""
    doc = _mapping(doc if doc is not None else {}, "limits")
    unknown = set(doc) - set(Limits.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"limits: unknown key(s) {', '.join(sorted(unknown))}")
    d = Limits()

    def integer(key: str, minimum: int) -> int:
        value: int = _number(
            doc.get(key, getattr(d, key)), f"limits.{key}", minimum=minimum, integer=True
        )
        return value

    limits = Limits(
        idle_timeout_s=_number(
            doc.get("idle_timeout_s", d.idle_timeout_s), "limits.idle_timeout_s", minimum=0.1
        ),
        min_bytes_per_s=integer("min_bytes_per_s", 1),
        max_associations=integer("max_associations", 1),
        reserved_associations=integer("reserved_associations", 0),
        max_associations_per_peer=integer("max_associations_per_peer", 1),
        max_connections=integer("max_connections", 1),
        max_instance_bytes=integer("max_instance_bytes", 1024),
        min_free_disk_bytes=integer("min_free_disk_bytes", 0),
    )
    if limits.reserved_associations >= limits.max_associations:
        raise ConfigError(
            f"limits.reserved_associations: {limits.reserved_associations} must be less than "
            f"limits.max_associations ({limits.max_associations})"
        )
    if limits.max_connections < limits.max_associations:
        raise ConfigError(
            f"limits.max_connections: {limits.max_connections} must be at least "
            f"limits.max_associations ({limits.max_associations})"
        )
    return limits


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
    """
    base = base or Path.cwd()
    doc = dict(_mapping(doc or {}, "top level"))
    storage_base = Path.cwd() if "DICOM_NODE_STORAGE_DIR" in os.environ else base
    env = os.environ
    for var, key, conv in (
        ("DICOM_NODE_AE_TITLE", "ae_title", str),
        ("DICOM_NODE_PORT", "port", int),
        ("DICOM_NODE_STORAGE_DIR", "storage_dir", str),
        ("DICOM_NODE_LOG_FORMAT", "log_format", str),
    ):
        if var in env:
            try:
                doc[key] = conv(env[var])
            except ValueError:
                raise ConfigError(f"{var}: {env[var]!r} is not valid for {key}") from None
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(sorted(unknown))}; "
            f"known keys: {', '.join(sorted(_TOP_KEYS))}"
        )
    defaults = Settings()
    callers = doc.get("allowed_callers", [])
    if not isinstance(callers, list):
        raise ConfigError(f"allowed_callers: expected a list of AE titles, got {callers!r}")
    send_doc = _mapping(doc.get("send", {}), "send")
    unknown_send = set(send_doc) - set(SendPolicy.__dataclass_fields__)
    if unknown_send:
        raise ConfigError(f"send: unknown key(s) {', '.join(sorted(unknown_send))}")
    send = SendPolicy(
        max_attempts=_number(
            send_doc.get("max_attempts", 20), "send.max_attempts", minimum=1, integer=True
        ),
        initial_backoff_s=_number(send_doc.get("initial_backoff_s", 2.0), "send.initial_backoff_s"),
        max_backoff_s=_number(send_doc.get("max_backoff_s", 300.0), "send.max_backoff_s"),
        timeout_s=_number(send_doc.get("timeout_s", 30.0), "send.timeout_s", minimum=1),
        echo_interval_s=_number(
            send_doc.get("echo_interval_s", SendPolicy.echo_interval_s), "send.echo_interval_s"
        ),
    )
    destinations = _destinations(
        doc.get("destinations", {}), base, send.timeout_s if "timeout_s" in send_doc else None
    )
    storage = Path(str(doc.get("storage_dir", defaults.storage_dir)))
    retention = doc.get("retention_days")
    metrics_port = doc.get("metrics_port")
    return Settings(
        ae_title=_ae_title(doc.get("ae_title", defaults.ae_title), "ae_title"),
        port=_port(doc.get("port", defaults.port), "port"),
        bind_address=str(doc.get("bind_address", defaults.bind_address)),
        storage_dir=storage if storage.is_absolute() else storage_base / storage,
        allowed_callers=tuple(_ae_title(c, f"allowed_callers[{i}]") for i, c in enumerate(callers)),
        called_ae_titles=_ae_titles(doc.get("called_ae_titles", []), "called_ae_titles"),
        allowed_networks=_networks(doc.get("allowed_networks", []), "allowed_networks"),
        tls=_tls(doc.get("tls"), base, "tls", ("cert_file", "key_file")),
        stable_after_s=_number(
            doc.get("stable_after_s", defaults.stable_after_s), "stable_after_s"
        ),
        release_grace_s=_number(
            doc.get("release_grace_s", defaults.release_grace_s), "release_grace_s"
        ),
        late_instances=_choice(
            doc.get("late_instances", defaults.late_instances), "late_instances", _LATE_POLICIES
        ),
        destinations=destinations,
        routes=_routes(doc.get("routes", []), destinations, base),
        send=send,
        workers=_number(doc.get("workers", 1), "workers", minimum=1, integer=True),
        batch_size=_number(doc.get("batch_size", 8), "batch_size", minimum=1, integer=True),
        device=_choice(doc.get("device", "auto"), "device", _DEVICES),
        delete_after_success=bool(doc.get("delete_after_success", False)),
        retention_days=None if retention is None else _number(retention, "retention_days"),
        metrics_port=None if metrics_port is None else _port(metrics_port, "metrics_port"),
        log_format=_choice(doc.get("log_format", "console"), "log_format", _LOG_FORMATS),
        log_level=_choice(doc.get("log_level", "info"), "log_level", _LOG_LEVELS),
        job_lease_s=_number(doc.get("job_lease_s", 600.0), "job_lease_s", minimum=1),
        max_job_attempts=_number(
            doc.get("max_job_attempts", 3), "max_job_attempts", minimum=1, integer=True
        ),
        audit=_audit(doc.get("audit"), base),
        limits=_limits(doc.get("limits")),
    )


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
