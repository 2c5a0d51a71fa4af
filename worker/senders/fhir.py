"""FHIR R4 REST client for the EHR: transactions out, reads and searches in.

:class:`FhirClient` posts transaction Bundles (results, with conditional creates so a
retry never duplicates), reads a resource named by an id-only notification, and searches
(following ``next`` links) for what a notification gap missed. Every failure raises
:class:`FhirDeliveryError`, a :class:`DeliveryError` whose ``transient`` flag drives the
outbox:

* transient: the server cannot be reached (connect, TLS, timeout, broken connection),
  HTTP 408, 429 and every 5xx (``retry_after`` holds Retry-After in seconds), a token
  endpoint that is unavailable, and a 2xx answer whose body is not JSON;
* permanent: every other 4xx (``operation_outcome`` keeps the server's OperationOutcome,
  its issues are in the message), a redirect (a bearer token is never sent to another
  location), a 401 that persists after one token refresh, and an answer that breaks the
  FHIR protocol (a transaction-response that does not match the request).

A transaction-response in which any entry failed is an error too, classified by that
entry's status. Resource types and ids are untrusted input: they are checked against the
FHIR syntax before any request is made. Logs and messages carry resource types, counts
and HTTP statuses, never identifiers, resources or tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from worker.senders.dicom import DeliveryError
from worker.senders.smart import Auth, is_transient_http_status, retry_after_seconds

__all__ = [
    "FHIR_JSON",
    "FhirClient",
    "FhirDeliveryError",
    "TransactionEntry",
    "TransactionResult",
    "check_resource_id",
    "check_resource_type",
    "outcome_diagnostics",
]

LOG = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
USER_AGENT = "carebridge"
DEFAULT_MAX_PAGES = 100
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_RESOURCE_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 "id" datatype
_MAX_DIAGNOSTICS = 1000
_ERROR_SEVERITIES = ("fatal", "error")

SearchParams = Mapping[str, str | int | Sequence[str]]


class FhirDeliveryError(DeliveryError):
    """A FHIR request failed.

    ``status_code``: the HTTP status (or the failing transaction entry's), None when no
    answer came. ``retry_after``: the server's Retry-After in seconds, if sent.
    ``operation_outcome``: the OperationOutcome the server returned, kept for the outbox.
    """

    def __init__(
        self,
        message: str,
        transient: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
        operation_outcome: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, transient)
        self.status_code = status_code
        self.retry_after = retry_after
        self.operation_outcome = operation_outcome

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep every attribute through pickling (Celery sends exceptions between processes).
        return (
            type(self),
            (
                self.message,
                self.transient,
                self.status_code,
                self.retry_after,
                self.operation_outcome,
            ),
        )


def check_resource_type(resource_type: str) -> str:
    """Return ``resource_type`` if it has the syntax of a FHIR resource type, else ValueError."""
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type):
        raise ValueError("not a FHIR resource type (expected e.g. 'Observation')")
    return resource_type


def check_resource_id(resource_id: str) -> str:
    """Return ``resource_id`` if it is a FHIR id ([A-Za-z0-9-.]{1,64}), else ValueError.

    Ids made only of dots are refused as well: ``.`` and ``..`` are valid FHIR ids but
    are path segments an HTTP client resolves against the URL (``Patient/..`` is the base).
    """
    if (
        not isinstance(resource_id, str)
        or not _RESOURCE_ID.fullmatch(resource_id)
        or not resource_id.strip(".")
    ):
        raise ValueError("not a FHIR resource id ([A-Za-z0-9-.]{1,64}, not only dots)")
    return resource_id


def outcome_diagnostics(outcome: Any) -> str:
    """The issues of an OperationOutcome as one line: ``expression: text; ...``.

    Errors and fatal issues are listed when there are any, otherwise every issue; the
    text is ``diagnostics``, else ``details.text``, else the issue ``code``.
    """
    if not isinstance(outcome, Mapping) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    issues = [issue for issue in outcome.get("issue") or [] if isinstance(issue, Mapping)]
    errors = [issue for issue in issues if issue.get("severity") in _ERROR_SEVERITIES]
    parts: list[str] = []
    for issue in errors or issues:
        details = issue.get("details")
        text = (
            issue.get("diagnostics")
            or (details.get("text") if isinstance(details, Mapping) else None)
            or issue.get("code")
            or "unspecified"
        )
        where = issue.get("expression") or issue.get("location") or []
        where_text = ", ".join(str(item) for item in where) if isinstance(where, list) else ""
        parts.append(f"{where_text}: {text}" if where_text else str(text))
    return "; ".join(parts)[:_MAX_DIAGNOSTICS]


def _parse_status(status: Any) -> int | None:
    """The code of a Bundle entry's ``response.status`` ("201 Created" -> 201)."""
    if not isinstance(status, str):
        return None
    head = status.strip().split(" ", 1)[0]
    return int(head) if head.isdigit() and len(head) == 3 else None


@dataclass(frozen=True)
class TransactionEntry:
    """The outcome of one entry of a transaction, in the order of the request.

    ``status`` as the server wrote it (e.g. ``"201 Created"``); ``location`` where the
    resource is (``Observation/123/_history/1``; for a conditional create that matched,
    the existing resource); ``outcome`` the entry's OperationOutcome, if any.
    """

    status: str
    status_code: int
    location: str | None = None
    etag: str | None = None
    outcome: dict[str, Any] | None = None

    @property
    def created(self) -> bool:
        """True when this entry created a resource (201); False when it already existed."""
        return self.status_code == 201


@dataclass(frozen=True)
class TransactionResult:
    """A successful transaction: one :class:`TransactionEntry` per request entry."""

    entries: tuple[TransactionEntry, ...]
    response: dict[str, Any] = field(repr=False, compare=False)

    @property
    def created_count(self) -> int:
        """How many entries created a resource."""
        return sum(1 for entry in self.entries if entry.created)


class FhirClient:
    """A FHIR R4 server (the EHR) at ``base_url``, optionally behind SMART or a bearer.

    Holds an HTTP connection pool: use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        auth: Auth | None = None,
        timeout: float = 30.0,
        *,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> None:
        """``timeout`` (s) bounds connect, each read and each write; ``max_pages`` the
        number of pages one :meth:`search` follows. Raises ``ValueError`` for a base URL
        that is not an absolute http(s) URL without query or fragment."""
        try:
            parsed = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError("the FHIR base URL is not a valid URL") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("the FHIR base URL must be an absolute http(s) URL")
        if parsed.query or parsed.fragment:
            raise ValueError("the FHIR base URL must not have a query or fragment")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self.base_url = str(parsed).rstrip("/")
        self._base = httpx.URL(self.base_url)
        self.auth = auth
        self.max_pages = max_pages
        self._http = httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            headers={"Accept": FHIR_JSON, "User-Agent": USER_AGENT},
        )

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ interactions

    def post_transaction(self, bundle: Mapping[str, Any]) -> TransactionResult:
        """POST a transaction Bundle to the base; return each entry's outcome.

        Raises ``ValueError`` when ``bundle`` is not a transaction Bundle, and
        :class:`FhirDeliveryError` when the transaction failed, as a whole or in any entry.
        """
        if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
            raise ValueError("a transaction must be a FHIR Bundle")
        if bundle.get("type") != "transaction":
            raise ValueError("the Bundle's type must be 'transaction'")
        requested = bundle.get("entry") or []
        if not isinstance(requested, list):
            raise ValueError("the Bundle's entry must be a list")
        body = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        response = self._send("POST", self._base, content=body)
        self._raise_for_status(response, "transaction")
        answer = self._json(response, "transaction")
        if answer.get("resourceType") != "Bundle" or answer.get("type") != "transaction-response":
            raise FhirDeliveryError(
                "the FHIR server answered the transaction without a transaction-response",
                transient=False,
                status_code=response.status_code,
            )
        answered = answer.get("entry") or []
        if not isinstance(answered, list) or len(answered) != len(requested):
            raise FhirDeliveryError(
                f"the transaction-response has {len(answered) if isinstance(answered, list) else 0}"
                f" entries for {len(requested)} requested",
                transient=False,
                status_code=response.status_code,
            )
        entries = tuple(
            self._transaction_entry(index, entry) for index, entry in enumerate(answered)
        )
        result = TransactionResult(entries=entries, response=answer)
        LOG.info(
            "FHIR transaction of %d entries: %d created, %d already present or updated",
            len(entries),
            result.created_count,
            len(entries) - result.created_count,
        )
        return result

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET ``{base}/{resource_type}/{resource_id}``; the resource.

        Both arguments are checked first (``ValueError``; nothing is sent): ids come from
        notifications, i.e. from outside.
        """
        check_resource_type(resource_type)
        check_resource_id(resource_id)
        response = self._send(
            "GET", self._base.copy_with(path=self._path(resource_type, resource_id))
        )
        self._raise_for_status(response, f"read of a {resource_type}")
        resource = self._json(response, f"read of a {resource_type}")
        if resource.get("resourceType") != resource_type or resource.get("id") != resource_id:
            raise FhirDeliveryError(
                f"the FHIR server answered the read of a {resource_type} with another resource",
                transient=False,
                status_code=response.status_code,
            )
        return resource

    def subscription_events(self, subscription_id: str, since: int, until: int) -> dict[str, Any]:
        """The Subscriptions backport ``$events`` operation: notifications ``since``..``until``
        (event numbers, inclusive) as a notification Bundle with full resources.

        A server without the operation answers 400/404/501: a permanent
        :class:`FhirDeliveryError`, and the caller falls back to a search.
        """
        check_resource_id(subscription_id)
        url = self._base.copy_with(path=self._path("Subscription", subscription_id, "$events"))
        response = self._send(
            "GET",
            url,
            params={
                "eventsSinceNumber": str(since),
                "eventsUntilNumber": str(until),
                "content": "full-resource",
            },
        )
        self._raise_for_status(response, "$events of a Subscription")
        return self._json(response, "$events of a Subscription")

    def search(
        self, resource_type: str, params: SearchParams | None = None
    ) -> list[dict[str, Any]]:
        """Search ``resource_type`` with ``params``; every matching resource of every page.

        ``next`` links are followed up to ``max_pages`` pages (more raises a permanent
        :class:`FhirDeliveryError`) and only while they stay under the base URL, so the
        credentials never go to another server. Entries included with ``_include`` or
        ``_revinclude`` (search mode "include") and OperationOutcomes are left out.
        """
        check_resource_type(resource_type)
        url: httpx.URL | None = self._base.copy_with(path=self._path(resource_type))
        query: SearchParams | None = params or {}
        found: list[dict[str, Any]] = []
        seen: set[str] = set()
        pages = 0
        while url is not None:
            pages += 1
            if pages > self.max_pages:
                raise FhirDeliveryError(
                    f"the {resource_type} search has more than {self.max_pages} pages",
                    transient=False,
                )
            response = self._send("GET", url, params=query)
            self._raise_for_status(response, f"search of {resource_type}")
            page = self._json(response, f"search of {resource_type}")
            if page.get("resourceType") != "Bundle" or page.get("type") != "searchset":
                raise FhirDeliveryError(
                    f"the FHIR server answered the search of {resource_type} without a searchset",
                    transient=False,
                    status_code=response.status_code,
                )
            for entry in page.get("entry") or []:
                if not isinstance(entry, Mapping):
                    continue
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode", "match")
                if isinstance(resource, dict) and mode == "match":
                    found.append(resource)
            seen.add(str(response.request.url))
            url = self._next_link(page, seen)
            query = None  # a next link carries the whole query
        LOG.debug("FHIR search of %s: %d resources in %d pages", resource_type, len(found), pages)
        return found

    # ------------------------------------------------------------------ HTTP

    def _path(self, *segments: str) -> str:
        return "/".join([self._base.path.rstrip("/"), *segments])

    def _send(
        self,
        method: str,
        url: httpx.URL,
        *,
        content: bytes | None = None,
        params: SearchParams | None = None,
    ) -> httpx.Response:
        """Send one request; on a 401, renew the credential once and send it again."""
        headers = {"Content-Type": FHIR_JSON} if content is not None else {}
        for attempt in (1, 2):
            authorization = self.auth.authorization() if self.auth is not None else None
            if authorization is not None:
                headers["Authorization"] = authorization
            try:
                response = self._http.request(
                    method, url, content=content, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                raise FhirDeliveryError(
                    f"cannot reach the FHIR server {self._base.host}: {type(exc).__name__}",
                    transient=True,
                ) from exc
            if (
                response.status_code == 401
                and authorization is not None
                and attempt == 1
                and self.auth is not None
                and self.auth.invalidate(authorization)
            ):
                LOG.info("the FHIR server refused the access token (401); renewing it once")
                continue
            return response
        return response  # unreachable: the second attempt always returns

    def _raise_for_status(self, response: httpx.Response, what: str) -> None:
        code = response.status_code
        if 200 <= code <= 299:
            return
        if 300 <= code <= 399:
            raise FhirDeliveryError(
                f"the FHIR server redirected the {what} (HTTP {code}); redirects are not "
                "followed, check the EHR base URL",
                transient=False,
                status_code=code,
            )
        outcome = self._outcome(response)
        diagnostics = outcome_diagnostics(outcome)
        reason = "refused the credentials" if code == 401 else "failed"
        raise FhirDeliveryError(
            f"the {what} {reason} with HTTP {code}" + (f": {diagnostics}" if diagnostics else ""),
            transient=is_transient_http_status(code),
            status_code=code,
            retry_after=retry_after_seconds(response),
            operation_outcome=outcome,
        )

    @staticmethod
    def _outcome(response: httpx.Response) -> dict[str, Any] | None:
        try:
            body = response.json()
        except ValueError:
            return None
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            return body
        return None

    @staticmethod
    def _json(response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # e.g. a proxy's HTML page or a truncated body: worth another attempt.
            raise FhirDeliveryError(
                f"the FHIR server's answer to the {what} is not a JSON object",
                transient=True,
                status_code=response.status_code,
            )
        return body

    def _transaction_entry(self, index: int, entry: Any) -> TransactionEntry:
        answer = entry.get("response") if isinstance(entry, Mapping) else None
        status = answer.get("status") if isinstance(answer, Mapping) else None
        code = _parse_status(status)
        if not isinstance(answer, Mapping) or not isinstance(status, str) or code is None:
            raise FhirDeliveryError(
                f"transaction-response entry {index + 1} has no valid response.status",
                transient=False,
            )
        outcome = answer.get("outcome")
        outcome = outcome if isinstance(outcome, dict) else None
        if not 200 <= code <= 299:
            diagnostics = outcome_diagnostics(outcome)
            raise FhirDeliveryError(
                f"transaction entry {index + 1} failed with {status}"
                + (f": {diagnostics}" if diagnostics else ""),
                transient=is_transient_http_status(code),
                status_code=code,
                operation_outcome=outcome,
            )
        location = answer.get("location")
        etag = answer.get("etag")
        return TransactionEntry(
            status=status,
            status_code=code,
            location=location if isinstance(location, str) else None,
            etag=etag if isinstance(etag, str) else None,
            outcome=outcome,
        )

    def _next_link(self, page: Mapping[str, Any], seen: set[str]) -> httpx.URL | None:
        """The page's ``next`` link if it stays under the base URL, else an error."""
        for link in page.get("link") or []:
            if not isinstance(link, Mapping) or link.get("relation") != "next":
                continue
            target = link.get("url")
            if not isinstance(target, str) or not target:
                return None
            try:
                # Relative links (not FHIR-conformant, but seen) resolve against the base.
                url: httpx.URL | None = httpx.URL(f"{self.base_url}/").join(target)
            except httpx.InvalidURL:
                url = None
            base_path = self._base.path.rstrip("/")
            if (
                url is None
                or (url.scheme, url.host, url.port)
                != (self._base.scheme, self._base.host, self._base.port)
                or not (url.path == base_path or url.path.startswith(f"{base_path}/"))
            ):
                raise FhirDeliveryError(
                    "a search page's next link leaves the FHIR base URL; not followed",
                    transient=False,
                )
            if str(url) in seen:
                raise FhirDeliveryError(
                    "a search page's next link repeats an earlier page", transient=False
                )
            return url
        return None
