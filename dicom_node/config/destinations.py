"""Destinations: the peers that receive results, one class per way of reaching them.

:data:`Destination` is a tagged union on ``type``: a :class:`DimseDestination` (C-STORE to
``ae_title@host:port``, optionally over TLS; the type when ``type`` is left out) or a
:class:`DicomwebDestination` (STOW-RS to a DICOMweb base URL). Each class holds only its own
keys; a key of the other type is refused with a hint (``url`` on a dimse destination: "add
type: dicomweb, or remove url"). Both have ``name``, ``type``, ``address``, ``outputs``,
``connect_timeout_s`` and ``timeout_s``, all that delivery needs besides the sender.

A mapping from the config goes straight to the class its ``type`` names
(:func:`_by_type`), so that an error's place is ``destinations.<name>.<key>``; pydantic's
discriminated union would put the tag in it too (``destinations.<name>.dimse.port``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from dicom_node.common.output_kinds import DEFAULT_OUTPUTS, OutputKind
from dicom_node.config import checks as check
from dicom_node.config.checks import problem
from dicom_node.config.sections import (
    AETitle,
    File,
    HttpAuth,
    Port,
    PositiveSeconds,
    StrictBool,
    TLSSettings,
    field_names,
)


class DestinationType(enum.StrEnum):
    """``destinations.<name>.type``: how results reach a destination."""

    DIMSE = "dimse"  # C-STORE to ae_title@host:port (the default)
    DICOMWEB = "dicomweb"  # STOW-RS to url (POST <url>/studies)


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


Outputs = Annotated[tuple[OutputKind, ...], BeforeValidator(_outputs)]
Host = Annotated[str, BeforeValidator(check.text("a host name or address"))]
Url = Annotated[str, BeforeValidator(check.http_url)]


def _given(data: Any, cls: type) -> set[str]:
    """The keys present in ``data``: a mapping's, or the arguments of a call in Python (the
    keywords and the fields the positional ones fill)."""
    if isinstance(data, ArgsKwargs):
        return set(field_names(cls)[: len(data.args)]) | set(data.kwargs or {})
    return set(data) if isinstance(data, Mapping) else set()


@dataclass(frozen=True)
class DimseDestination:
    """A peer that receives results by C-STORE: ``ae_title``, ``host``, ``port`` (and ``tls``).

    With ``tls`` the association runs over TLS 1.2+; ``tls.ca_file`` (required) signed the
    destination's certificate, ``tls.cert_file`` + ``tls.key_file`` are the node's client
    certificate. ``connect_timeout_s`` bounds the connection and the association negotiation,
    ``timeout_s`` each response.

    ``outputs`` are the kinds of result it receives (``seg``, ``sr``, ``overlay``): a PACS
    that cannot show DICOM SEG asks for ``overlay``, a Secondary Capture with the outlines
    burned in.
    """

    name: str
    ae_title: AETitle
    host: Host
    port: Port
    tls: TLSSettings | None = None
    outputs: Outputs = DEFAULT_OUTPUTS
    type: Literal[DestinationType.DIMSE] = DestinationType.DIMSE
    connect_timeout_s: PositiveSeconds = 10.0
    timeout_s: PositiveSeconds = 30.0

    @property
    def address(self) -> str:
        """Where it is reached, for status and logs: ``AE@host:port``."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        for key in _DICOMWEB_ONLY:
            if key in _given(data, cls):
                raise problem(
                    "applies to dicomweb destinations only (this one is type: dimse); "
                    f"add type: dicomweb, or remove {key}",
                    at=(key,),
                )
        data = check.section(data, field_names(cls))
        given = _given(data, cls)
        for key in ("ae_title", "host", "port"):
            if key not in given:
                raise problem(
                    "missing; a dimse destination needs ae_title, host and port", at=(key,)
                )
        return data

    @model_validator(mode="after")
    def _ca(self) -> DimseDestination:
        if self.tls is not None and self.tls.ca_file is None:
            raise problem(
                "missing; the CA that signed the destination's certificate (a PEM file)",
                at=("tls", "ca_file"),
            )
        return self


@dataclass(frozen=True)
class DicomwebDestination:
    """A peer that receives results by STOW-RS: ``url``, ``auth``, ``verify_tls``, ``ca_file``.

    ``url`` is the DICOMweb base URL (STOW-RS posts to ``<url>/studies``). The server's
    certificate is verified against the system's CAs, or ``ca_file`` alone when given;
    ``verify_tls: false`` turns that off. ``connect_timeout_s`` bounds the connection,
    ``timeout_s`` each read of a response. ``outputs`` as for :class:`DimseDestination`.
    """

    name: str
    url: Url
    outputs: Outputs = DEFAULT_OUTPUTS
    type: Literal[DestinationType.DICOMWEB] = DestinationType.DICOMWEB
    auth: HttpAuth | None = None
    verify_tls: StrictBool = True
    ca_file: File | None = None
    connect_timeout_s: PositiveSeconds = 10.0
    timeout_s: PositiveSeconds = 30.0

    @property
    def address(self) -> str:
        """Where it is reached, for status and logs: the URL."""
        return self.url

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any) -> Any:
        for key in _DIMSE_ONLY:
            if key in _given(data, cls):
                how = (
                    "verifies its server with verify_tls and ca_file"
                    if key == "tls"
                    else "is reached at its url"
                )
                raise problem(
                    f"applies to dimse destinations only; a dicomweb destination {how}",
                    at=(key,),
                )
        if isinstance(data, Mapping) and data.get("url") is None:
            data = {k: v for k, v in data.items() if k != "url"}
        data = check.section(data, field_names(cls))
        if "url" not in _given(data, cls):
            raise problem(
                "missing; a dicomweb destination needs the base URL of its DICOMweb "
                "service (e.g. https://pacs.example/dicom-web)",
                at=("url",),
            )
        return data

    @model_validator(mode="after")
    def _verify(self) -> DicomwebDestination:
        if not self.verify_tls and self.ca_file is not None:
            raise problem("is not used with verify_tls: false; keep one of them", at=("ca_file",))
        return self


_DIMSE_ONLY = ("ae_title", "host", "port", "tls")
_DICOMWEB_ONLY = ("url", "auth", "verify_tls", "ca_file")

#: Every key a destination may have, of either type (an unknown key's message lists them).
_KEYS = sorted(set(field_names(DimseDestination)) | set(field_names(DicomwebDestination)))

_ADAPTERS: dict[DestinationType, TypeAdapter[Any]] = {
    DestinationType.DIMSE: TypeAdapter(DimseDestination),
    DestinationType.DICOMWEB: TypeAdapter(DicomwebDestination),
}

_TYPE = check.choice(DestinationType)


def _by_type(data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    """Validate a mapping as the class its ``type`` names (``dimse`` when left out)."""
    if isinstance(data, DimseDestination | DicomwebDestination):
        return handler(data)
    data = check.section(data, _KEYS)
    try:
        kind = _TYPE(data.get("type", DestinationType.DIMSE))
    except PydanticCustomError as exc:
        raise problem(str(exc), at=("type",)) from None
    return _ADAPTERS[kind].validate_python({**data, "type": kind}, context=info.context)


#: A destination of either type, told apart by ``type``.
Destination = Annotated[
    DimseDestination | DicomwebDestination,
    Field(discriminator="type"),
    WrapValidator(_by_type),
]
