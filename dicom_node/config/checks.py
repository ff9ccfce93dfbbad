"""The value checks behind :mod:`dicom_node.config.settings`, and its error messages.

pydantic validates the structure of the config (sections, lists, mappings, enums, unknown and
missing keys, every error at once with its place); the checks here give each kind of value one
message in the node's own words, ``must be ..., got <the value>``. :func:`config_error` turns a
:class:`pydantic.ValidationError` into one :class:`~dicom_node.common.errors.ConfigError` that lists
each problem as ``key.path: message``, e.g. ``destinations.pacs.port: must be an integer
between 1 and 65535, got '4242x'``.

Numbers are strict: a quoted number (``port: "4242"``) or ``true`` where a number goes is
refused, as the node has always done; so is a quoted boolean (``delete_after_success:
"false"``, which Python would read as true). Paths are taken relative to the config file's
folder, which :func:`~dicom_node.config.settings.parse_settings` passes in the validation context
(``base``); objects built in Python without that context keep their paths as given and are not
checked against the disk.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import HttpUrl, TypeAdapter, ValidationError, ValidationInfo
from pydantic_core import ArgsKwargs, PydanticCustomError

from dicom_node.common.errors import ConfigError

#: The error type of every problem this module raises; ``ctx["at"]`` may extend its place.
ERROR_TYPE = "dicom_node_config"

# PS3.5 6.2: AE titles are up to 16 characters of the default repertoire, no backslash or
# control characters; leading and trailing spaces are not significant.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

E = TypeVar("E", bound=enum.Enum)
Loc = tuple[str | int, ...]


def problem(message: str, *, at: Loc = ()) -> PydanticCustomError:
    """An error for pydantic to collect; ``at`` names the key below the validated object."""
    return PydanticCustomError(ERROR_TYPE, "{message}", {"message": message, "at": at})


def got(value: Any) -> str:
    """The value as the message shows it: ``'4242x'``, ``-1``, ``true``; long values cut."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suggest(word: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` when ``word`` is a likely typo of one of ``known``."""
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.7)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


# -- sections ------------------------------------------------------------------------------


def section(data: Any, known: Iterable[str], what: str = "a mapping (key: value)") -> Any:
    """Refuse a section that is not a mapping, or holds keys outside ``known``.

    Objects built in Python (:class:`pydantic_core.ArgsKwargs`) pass unchanged.
    """
    if isinstance(data, ArgsKwargs):
        return data
    if not isinstance(data, Mapping):
        raise problem(f"must be {what}, got {got(data)}")
    known = list(known)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        hint = suggest(unknown[0], known) if len(unknown) == 1 else ""
        raise problem(
            f"unknown key(s) {', '.join(unknown)}{hint}; known keys: {', '.join(sorted(known))}"
        )
    return data


# -- scalars -------------------------------------------------------------------------------


def integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    """An ``int`` (not a bool, a float or a quoted number) in ``low..high``."""
    wanted = f"between {low} and {high}" if high is not None else f">= {low}"

    def check(value: Any) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise problem(f"must be an integer {wanted}, got {got(value)}")
        return value

    return check


#: A TCP port: an integer in 1..65535.
port = integer(1, 65535)


def number(low: float, *, above: bool = False) -> Callable[[Any], float]:
    """An int or float (not a bool or a quoted number) ``>= low`` (``> low`` with ``above``)."""
    wanted = f"> {low:g}" if above else f">= {low:g}"

    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value != value  # NaN
            or (value <= low if above else value < low)
        ):
            raise problem(f"must be a number {wanted}, got {got(value)}")
        return value

    return check


def boolean(value: Any) -> bool:
    """``true`` or ``false``; ``"false"`` in quotes is text, which Python reads as true."""
    if not isinstance(value, bool):
        raise problem(f"must be true or false, written without quotes, got {got(value)}")
    return value


def choice(kind: type[E]) -> Callable[[Any], E]:
    """One of the values of the enum ``kind``, as written in YAML."""
    allowed = [m.value for m in kind]

    def check(value: Any) -> E:
        if isinstance(value, kind):
            return value
        if isinstance(value, str) and value in allowed:
            return kind(value)
        hint = suggest(value, allowed) if isinstance(value, str) else ""
        raise problem(f"must be one of {', '.join(map(str, allowed))}, got {got(value)}{hint}")

    return check


def text(what: str) -> Callable[[Any], str]:
    """Non-empty text; ``what`` says what it is (``a host name or address``)."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise problem(f"must be {what}, got {got(value)}")
        return value

    return check


def name(value: Any) -> str:
    """A name (of a route, a role): text or a number, taken as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise problem(f"must be a name (text), got {got(value)}")
    return value


def ae_title(value: Any) -> str:
    """An AE title (PS3.5 6.2), leading and trailing spaces removed."""
    if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
        raise problem(
            "must be an AE title (1 to 16 printable ASCII characters, no backslash), "
            f"got {got(value)}"
        )
    return value.strip()


def network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP address or network; host bits are allowed (``10.1.2.3/8`` is ``10.0.0.0/8``)."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(value)
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise problem(
            f"must be an IP address or network (e.g. 10.0.0.0/8), got {got(value)}"
        ) from None


_HTTP_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)


def http_url(value: Any) -> str:
    """An ``http://`` or ``https://`` URL without credentials in it, as written less any
    trailing ``/`` (the DICOMweb paths are appended to it)."""
    wanted = "an http:// or https:// URL (e.g. https://pacs.example/dicom-web)"
    if not isinstance(value, str):
        raise problem(f"must be {wanted}, got {got(value)}")
    try:
        url = _HTTP_URL.validate_python(value)
    except ValidationError:
        raise problem(f"must be {wanted}, got {got(value)}") from None
    if url.username or url.password:
        raise problem(
            "must not hold a user name or password (they would show in logs); "
            "put them in auth: {username, password_file}"
        )
    return value.rstrip("/")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (in the user info and in ``password=``
    parameters), for logs, errors and ``dicom-node status``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unreadable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def database_url(value: Any) -> str:
    """A PostgreSQL URL (``postgresql://user@host:5432/dbname``); the password, when one is in
    it, never shows in a message."""
    wanted = (
        "a postgresql:// URL (e.g. postgresql://dicomnode@db.example:5432/dicomnode; the "
        "password from ~/.pgpass or PGPASSWORD), or left out for SQLite in storage_dir"
    )
    if not isinstance(value, str) or not value.strip():
        raise problem(f"must be {wanted}, got {got(value)}")
    shown = redact_url(value)
    if not value.startswith(("postgresql://", "postgres://")):
        raise problem(f"must be {wanted}, got {shown!r}")
    try:
        port = urlsplit(value).port
    except ValueError:
        raise problem(f"must be {wanted}; the port of {shown!r} is not a number") from None
    if port == 0:
        raise problem(f"must be {wanted}; the port of {shown!r} is not a number")
    return value


# -- paths ---------------------------------------------------------------------------------


def _resolve(value: Any, info: ValidationInfo, base_key: str = "base") -> Path:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise problem(f"must be a path, got {got(value)}")
    path = Path(value)
    base = (info.context or {}).get(base_key)
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def path(value: Any, info: ValidationInfo) -> Path:
    """A path, relative to the config file's folder; nothing is checked on disk."""
    return _resolve(value, info)


def storage_path(value: Any, info: ValidationInfo) -> Path:
    """``storage_dir``: relative to the config file, or to the current directory when it comes
    from ``DICOM_NODE_STORAGE_DIR`` (the context's ``storage_base``)."""
    return _resolve(value, info, "storage_base")


def existing_file(value: Any, info: ValidationInfo) -> Path:
    """A file that exists (checked when the config is read from YAML)."""
    resolved = _resolve(value, info)
    if info.context is not None and not resolved.is_file():
        raise problem(f"{got(str(value))} is not a readable file (looked for {resolved})")
    return resolved


def model_folder(value: Any, info: ValidationInfo) -> Path:
    """A model: a folder or file that exists (checked when read from YAML). Its format and
    files are checked when the node starts (``dicom_node.models.formats.detect_format``)."""
    resolved = _resolve(value, info)
    if info.context is not None and not resolved.exists():
        raise problem(
            f"{got(str(value))} is not a model package (nothing at {resolved}); give a model "
            "package folder, a MONAI bundle or nnU-Net v2 folder, or a TorchScript/ONNX file"
        )
    return resolved


# -- the node's error ----------------------------------------------------------------------


def where(loc: Loc) -> str:
    """``('routes', 0, 'send_to')`` as ``routes[0].send_to``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_BUILTIN = {
    "missing": "missing; this key is required",
    "dict_type": "must be a mapping (key: value)",
    "dataclass_type": "must be a mapping (key: value)",
    "dataclass_args_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "string_type": "must be text",
}


def _message(error: Mapping[str, Any]) -> tuple[Loc, str]:
    loc: Loc = tuple(error["loc"])
    if error["type"] == ERROR_TYPE:
        ctx = error.get("ctx") or {}
        return loc + tuple(ctx.get("at", ())), str(ctx.get("message", error["msg"]))
    if error["type"] == "missing":
        return loc, _BUILTIN["missing"]
    message = _BUILTIN.get(error["type"])
    if message is None:
        msg = str(error["msg"])
        message = msg[:1].lower() + msg[1:]
    return loc, f"{message}, got {got(error.get('input'))}"


def config_error(exc: ValidationError) -> ConfigError:
    """One :class:`ConfigError` listing each problem of ``exc`` as ``key.path: message``."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc, message = _message(error)
        line = f"{where(loc)}: {message}" if loc else message
        if line not in lines:
            lines.append(line)
    if len(lines) == 1:
        return ConfigError(lines[0])
    return ConfigError(f"{len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines))
