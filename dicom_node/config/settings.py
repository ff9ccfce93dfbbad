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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from dicom_node.common.errors import ConfigError
from dicom_node.config import checks as check
from dicom_node.config import yamlfile
from dicom_node.config.checks import problem
from dicom_node.config.destinations import Destination
from dicom_node.config.sections import (
    AETitle,
    AuditSettings,
    ConsoleSettings,
    Count,
    Device,
    LatePolicy,
    Limits,
    LogFormat,
    LogLevel,
    Modality,
    Network,
    Port,
    PositiveSeconds,
    Route,
    Seconds,
    SendPolicy,
    StrictBool,
    TLSSettings,
)
from dicom_node.config.sections import field_names as _keys

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
    "console",
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
    #: Receiver processes on ``port`` (SO_REUSEPORT); None: one per core. 1 receives in the
    #: node's own process (see :mod:`dicom_node.app.receivers`).
    receivers: Count | None = None
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
    console: ConsoleSettings = ConsoleSettings()
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
