"""DICOMweb destinations: STOW-RS (PS3.18 10.5) with dicomweb-client, HTTP basic or bearer auth.

``send`` POSTs the files to ``<url>/studies`` as ``multipart/related; type="application/dicom"``
(several requests when they are large, see :data:`MAX_REQUEST_BYTES`) and reads the Store
Instances Response per instance:

* an instance in the ``FailedSOPSequence`` failed (and is retried with backoff) while the
  others are done; failure reasons that retrying cannot cure (0x0122 SOP Class not supported,
  0xA9xx data set does not match, 0xCxxx cannot understand) are permanent;
* an instance in the ``ReferencedSOPSequence`` with a ``WarningReason`` is stored, with the
  warning in its detail;
* HTTP 408 and 429, every 5xx, a timeout or no connection: every file is retried with backoff;
  any other 4xx (401 wrong credentials, 403, 404 wrong URL, 413 too large, ...) is permanent:
  dead-lettered at once with the server's status and reason phrase. A 409's response body
  still says which instances failed why.

Nothing from a response body reaches the logs or the stored reason beyond status codes: a
server may echo patient data in it.

``echo`` is a QIDO-RS search for one study by a UID that no study has (``limit=1``): it needs
the same base URL, TLS and credentials as a send, transfers no patient data, and is true on a
2xx answer. Its timeouts are capped at :data:`ECHO_TIMEOUT_S`.

Timeouts: ``connect_timeout_s`` for the TCP (and TLS) connection, ``timeout_s`` for each read
of the response. dicomweb-client's own retrying is turned off: delivery's persisted backoff
is the one retry policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.errors import InvalidDicomError

from dicom_node.config.destinations import DicomwebDestination
from dicom_node.send.senders.interface import SendOutcome, StoreResult

#: Upper bound of one STOW-RS request's payload (the files are held in memory while it runs).
MAX_REQUEST_BYTES = 64 * 1024**2

#: Upper bound of the echo's connect and read timeouts, in seconds.
ECHO_TIMEOUT_S = 5.0

#: A UID no study has (UUID-derived root 2.25 with value 0): the target of the echo search.
PROBE_STUDY_UID = "2.25.0"

#: Failure reasons (PS3.18 Table I.2-1 / PS3.4 C-STORE statuses) that retrying cannot cure.
_PERMANENT_REASONS = (range(0x0122, 0x0123), range(0xA900, 0xAA00), range(0xC000, 0xD000))

#: HTTP 4xx statuses that are worth retrying.
_RETRIED_4XX = (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS)

_HINTS = {
    401: "check auth (username and password_file, or token_file)",
    403: "the credentials may not store here",
    404: "check the destination's url (the STOW-RS base, without /studies)",
    413: "the server refuses a request this large",
    415: "the server does not take application/dicom",
}


def permanent_reason(code: int) -> bool:
    """True for a STOW-RS FailureReason that retrying cannot cure."""
    return any(code in r for r in _PERMANENT_REASONS)


class DicomwebSender:
    """STOW-RS to a DICOMweb destination; a QIDO-RS search as its reachability check."""

    def __init__(self, destination: DicomwebDestination) -> None:
        self.destination = destination

    def _client(
        self,
        session: _Session,
        callback: Callable[..., Any] | None = None,
        *,
        most_s: float | None = None,
    ) -> DICOMwebClient:
        """A client over ``session``; the credentials are read from their files now.

        ``callback`` is a requests response hook (it sees each response's status); ``most_s``
        caps both timeouts.
        """
        dest = self.destination
        if dest.ca_file is not None or not dest.verify_tls:
            session.pinned_verify = str(dest.ca_file) if dest.ca_file is not None else False
        headers = {}
        if dest.auth is not None:
            if dest.auth.token_file is not None:
                token = _secret(dest.auth.token_file)
                headers["Authorization"] = f"Bearer {token}"
            elif dest.auth.username is not None and dest.auth.password_file is not None:
                session.auth = (dest.auth.username, _secret(dest.auth.password_file))
        client = DICOMwebClient(
            str(dest.url),
            session=session,
            headers=headers or None,
            timeout=(
                min(dest.connect_timeout_s, most_s or dest.connect_timeout_s),
                min(dest.timeout_s, most_s or dest.timeout_s),
            ),
            callback=callback,
        )
        client.set_http_retry_params(retry=False)
        return client

    def send(self, files: Sequence[Path]) -> SendOutcome:
        results: dict[Path, StoreResult] = {}
        readable: list[tuple[Path, pydicom.Dataset]] = []
        for path in files:
            try:
                readable.append((path, pydicom.dcmread(path)))
            except OSError as exc:
                results[path] = StoreResult(path, False, f"cannot read output file: {exc.strerror}")
            except InvalidDicomError:
                results[path] = StoreResult(path, False, "not a DICOM file", permanent=True)
        answered = False
        if readable:
            for batch in _batches(readable):
                outcome = self._store(batch)
                answered = answered or outcome.answered
                results.update((r.path, r) for r in outcome.results)
                if not outcome.answered:  # no connection: the next batch would fare no better
                    rest = [p for p, _ in readable if p not in results]
                    detail = outcome.results[0].detail
                    results.update(
                        (r.path, r) for r in SendOutcome.all_failed(rest, detail).results
                    )
                    break
        return SendOutcome(tuple(results[p] for p in files), answered)

    def _store(self, batch: list[tuple[Path, pydicom.Dataset]]) -> SendOutcome:
        paths = [p for p, _ in batch]
        statuses: list[int] = []

        def status_hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            statuses.append(response.status_code)

        try:
            with _Session() as session:
                client = self._client(session, status_hook)
                reply = client.store_instances([ds for _, ds in batch])
        except requests.HTTPError as exc:
            return _http_error(batch, exc.response)
        except requests.ConnectTimeout:
            connect_s = self.destination.connect_timeout_s
            return SendOutcome.all_failed(
                paths,
                f"no connection within connect_timeout_s ({connect_s:g} s)",
            )
        except requests.Timeout:
            return SendOutcome.all_failed(
                paths, f"no response within timeout_s ({self.destination.timeout_s:g} s)"
            )
        except requests.exceptions.SSLError:
            return SendOutcome.all_failed(
                paths, "TLS failed (certificate not verified? see verify_tls / ca_file)"
            )
        except requests.ConnectionError:
            return SendOutcome.all_failed(paths, "no connection (peer down?)")
        except (requests.RequestException, ValueError) as exc:
            # ValueError: a response dicomweb-client cannot read; the status says it arrived.
            return SendOutcome.all_failed(
                paths, f"unreadable response ({type(exc).__name__})", answered=bool(statuses)
            )
        except OSError as exc:  # after requests' own (OSErrors too): the credentials file
            return SendOutcome.all_failed(
                paths, f"cannot read the credentials file: {exc.strerror}"
            )
        status = statuses[-1] if statuses else 200
        return _per_instance(batch, reply, f"HTTP {status}")

    def echo(self) -> bool:
        """True when a QIDO-RS search answers 2xx (see the module docstring)."""
        try:
            with _Session() as session:
                self._client(session, most_s=ECHO_TIMEOUT_S).search_for_studies(
                    search_filters={"StudyInstanceUID": PROBE_STUDY_UID}, limit=1
                )
        except (requests.RequestException, ValueError, OSError):
            return False
        return True


class _Session(requests.Session):
    """A session whose ``pinned_verify`` (a CA file, or False) wins over the environment.

    requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` override ``Session.verify``; a
    destination's own ``ca_file`` or ``verify_tls: false`` must not be overridden. Without
    either, the environment's bundle (or certifi's) applies as usual.
    """

    pinned_verify: str | bool | None = None

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        if self.pinned_verify is not None:
            settings["verify"] = self.pinned_verify
        return settings


def _secret(path: Path) -> str:
    return path.read_text().rstrip("\r\n")


def _batches(
    items: list[tuple[Path, pydicom.Dataset]],
) -> Iterator[list[tuple[Path, pydicom.Dataset]]]:
    """Split into requests of at most :data:`MAX_REQUEST_BYTES` (one file per request at least)."""
    batch: list[tuple[Path, pydicom.Dataset]] = []
    size = 0
    for path, ds in items:
        n = path.stat().st_size
        if batch and size + n > MAX_REQUEST_BYTES:
            yield batch
            batch, size = [], 0
        batch.append((path, ds))
        size += n
    if batch:
        yield batch


def _http_error(
    batch: list[tuple[Path, pydicom.Dataset]], response: requests.Response | None
) -> SendOutcome:
    """A 4xx/5xx answer: retried for 408, 429 and 5xx, permanent otherwise."""
    paths = [p for p, _ in batch]
    if response is None:
        return SendOutcome.all_failed(paths, "HTTP error without a response")
    code = response.status_code
    detail = f"HTTP {code} {(response.reason or '')[:80]}".rstrip()  # the status line only
    if code in _HINTS:
        detail += f": {_HINTS[code]}"
    permanent = 400 <= code < 500 and code not in _RETRIED_4XX
    if code == HTTPStatus.CONFLICT:  # every instance failed; the body says why, per instance
        reply = _response_dataset(response)
        if reply is not None and "FailedSOPSequence" in reply:
            return _per_instance(batch, reply, detail, failed_default=True)
    return SendOutcome.all_failed(paths, detail, answered=True, permanent=permanent)


def _response_dataset(response: requests.Response) -> pydicom.Dataset | None:
    """The Store Instances Response in a DICOM JSON body, or None when there is none."""
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _per_instance(
    batch: list[tuple[Path, pydicom.Dataset]],
    reply: pydicom.Dataset,
    status: str,
    *,
    failed_default: bool = False,
) -> SendOutcome:
    """Each file's result from the Store Instances Response (PS3.18 10.5.3)."""
    failed: dict[str, int] = {}
    for item in reply.get("FailedSOPSequence", []):
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = int(item.get("FailureReason", 0))
    warned: dict[str, int] = {}
    for item in reply.get("ReferencedSOPSequence", []):
        if "WarningReason" in item:
            warned[str(item.get("ReferencedSOPInstanceUID", ""))] = int(item.WarningReason)
    results = []
    for path, ds in batch:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in failed:
            code = failed[uid]
            results.append(
                StoreResult(
                    path, False, f"{status}: failure reason 0x{code:04X}", permanent_reason(code)
                )
            )
        elif failed_default:
            results.append(StoreResult(path, False, status, permanent=True))
        elif uid in warned:
            results.append(StoreResult(path, True, f"{status}: warning 0x{warned[uid]:04X}"))
        else:
            results.append(StoreResult(path, True, status))
    return SendOutcome(tuple(results), answered=True)
