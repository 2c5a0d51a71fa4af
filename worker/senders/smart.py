"""Authorization for the EHR's FHIR API: SMART Backend Services or a static bearer token.

SMART Backend Services (HL7 SMART App Launch 2.x, "Backend Services"): the client reads
``{base}/.well-known/smart-configuration`` for the ``token_endpoint`` (unless the token URL
is configured), signs a client assertion with its private key (RS384 for RSA, ES384 for an
EC P-384 key; ``iss`` = ``sub`` = client id, ``aud`` = token URL, a fresh ``jti``, ``exp``
four minutes ahead, inside the five minutes SMART allows) and exchanges it with the
``client_credentials`` grant for an access token.

Access tokens are cached per process, keyed by token URL, client id, scope and key, until
shortly before they expire, so several :class:`SmartBackendAuth` objects built from the
same settings share one token. When the FHIR server answers 401 the client calls
:meth:`Auth.invalidate` and retries once with a new token.

Token endpoint failures raise :class:`AuthorizationError` (a :class:`DeliveryError`):
unreachable, 408, 429 and 5xx are transient (``retry_after`` from Retry-After); a refused
client or grant (400/401/403) is permanent. Tokens, assertions and keys never appear in
logs, messages or reprs.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from worker.senders.dicom import DeliveryError

__all__ = [
    "ASSERTION_LIFETIME_SECONDS",
    "DEFAULT_SCOPE",
    "Auth",
    "AuthorizationError",
    "SmartBackendAuth",
    "StaticBearer",
    "clear_token_cache",
    "is_transient_http_status",
    "retry_after_seconds",
]

LOG = logging.getLogger(__name__)

DEFAULT_SCOPE = "system/*.write system/*.read"
SMART_CONFIGURATION = ".well-known/smart-configuration"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART: the assertion's exp "SHALL be no more than five minutes in the future"; one minute
# less leaves room for the token server's clock being behind ours.
ASSERTION_LIFETIME_SECONDS = 240
# An access token is renewed this long before it expires (at most a fifth of its lifetime).
REFRESH_MARGIN_SECONDS = 60.0
# expires_in is required by SMART; a server that omits it gets this lifetime.
DEFAULT_TOKEN_LIFETIME_SECONDS = 300
MAX_RETRY_AFTER_SECONDS = 86400.0
_RSA_MIN_BITS = 2048
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: nothing that could split a header
_TRANSIENT_HTTP = frozenset({408, 429})


def is_transient_http_status(status_code: int) -> bool:
    """True for HTTP statuses a later retry can cure: 408, 429 and every 5xx."""
    return status_code in _TRANSIENT_HTTP or 500 <= status_code <= 599


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The response's Retry-After (delta-seconds or HTTP-date) in seconds, or None."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delay = (when - datetime.now(UTC)).total_seconds()
    return min(max(0.0, delay), MAX_RETRY_AFTER_SECONDS)


class AuthorizationError(DeliveryError):
    """Discovering the token endpoint or getting an access token failed.

    ``status_code`` is the HTTP status when there was one; ``retry_after`` the server's
    Retry-After in seconds, when it sent one.
    """

    def __init__(
        self,
        message: str,
        transient: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, transient)
        self.status_code = status_code
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep every attribute through pickling (Celery sends exceptions between processes).
        return (
            type(self),
            (self.message, self.transient, self.status_code, self.retry_after),
        )


def _check_token_text(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN_CHARS.fullmatch(value):
        raise ValueError(f"{what} must be non-empty visible ASCII without spaces")
    return value


class Auth(ABC):
    """How the FHIR client authorizes its requests."""

    @abstractmethod
    def authorization(self) -> str:
        """The value of the Authorization header for the next request.

        Raises :class:`AuthorizationError` when no credential can be obtained.
        """

    @abstractmethod
    def invalidate(self, authorization: str) -> bool:
        """The FHIR server refused ``authorization`` (HTTP 401): forget it.

        Returns True when a different credential can be obtained, so that one retry is
        worth it; False when the same one would be sent again.
        """


class StaticBearer(Auth):
    """A fixed bearer token (an EHR that issues long-lived API tokens)."""

    def __init__(self, token: str) -> None:
        """``token`` must be visible ASCII without spaces (it goes into a header)."""
        self._token = _check_token_text(token, "bearer token")

    def authorization(self) -> str:
        """``Bearer <token>``."""
        return f"Bearer {self._token}"

    def invalidate(self, authorization: str) -> bool:
        """A static token cannot be renewed: no retry."""
        return False

    def __repr__(self) -> str:
        return "StaticBearer(token=<hidden>)"


@dataclass(frozen=True)
class _CachedToken:
    access_token: str
    renew_at: float  # time.monotonic() after which a new token is fetched


# Process-wide, so short-lived clients built per delivery still reuse one token.
_TOKEN_CACHE: dict[tuple[str, str, str, str], _CachedToken] = {}
_DISCOVERED_TOKEN_URLS: dict[str, str] = {}
_CACHE_LOCK = threading.Lock()


def clear_token_cache() -> None:
    """Forget every cached access token and discovered token endpoint."""
    with _CACHE_LOCK:
        _TOKEN_CACHE.clear()
        _DISCOVERED_TOKEN_URLS.clear()


def _load_signing_key(
    private_key_pem: bytes,
) -> tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, str, str]:
    """Return (key, JWS algorithm, sha256 of the public key) or raise ValueError."""
    if not isinstance(private_key_pem, bytes) or not private_key_pem.strip():
        raise ValueError("the SMART private key must be PEM bytes")
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (TypeError, ValueError) as exc:
        # The message of cryptography's error does not contain key material.
        raise ValueError(
            f"the SMART private key is not an unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _RSA_MIN_BITS:
            raise ValueError(f"the SMART RSA key must have at least {_RSA_MIN_BITS} bits")
        signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = key
        algorithm = "RS384"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise ValueError("the SMART EC key must be on curve P-384 (ES384)")
        signing_key = key
        algorithm = "ES384"
    else:
        raise ValueError("the SMART private key must be an RSA (RS384) or EC P-384 (ES384) key")
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return signing_key, algorithm, hashlib.sha256(public).hexdigest()


def _check_http_url(url: str, what: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"{what} is not a valid URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{what} must not have a query or fragment")
    return parsed


def _oauth_error(response: httpx.Response) -> str:
    """``error: error_description`` of an OAuth error response, shortened; or ''."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    parts = [str(body.get(key, ""))[:300] for key in ("error", "error_description")]
    return ": ".join(part for part in parts if part)


class SmartBackendAuth(Auth):
    """SMART Backend Services: client_credentials with a private_key_jwt assertion."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        private_key_pem: bytes,
        token_url: str | None = None,
        scope: str = DEFAULT_SCOPE,
        key_id: str | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        """Validate the configuration; nothing is sent until the first request.

        ``token_url`` None: discovered from ``{base_url}/.well-known/smart-configuration``.
        ``key_id`` is sent as the assertion's ``kid`` (the key's id in the client's JWKS).
        Raises ``ValueError`` for an unusable key (not PEM, encrypted, RSA under 2048 bits,
        EC not on P-384), URL, client id or scope.
        """
        self.base_url = str(_check_http_url(base_url, "the FHIR base URL")).rstrip("/")
        self.client_id = _check_token_text(client_id, "the SMART client id")
        if not isinstance(scope, str) or not scope.strip() or not scope.isprintable():
            raise ValueError("the SMART scope must be a non-empty printable string")
        self.scope = " ".join(scope.split())
        self.key_id = _check_token_text(key_id, "the SMART key id") if key_id else None
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self._key, self.algorithm, self._key_fingerprint = _load_signing_key(private_key_pem)
        self._token_url: str | None = None
        if token_url is not None:
            self._token_url = self._checked_token_url(token_url)

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(base_url={self.base_url!r}, client_id={self.client_id!r}, "
            f"algorithm={self.algorithm!r}, key=<hidden>)"
        )

    # ------------------------------------------------------------------ Auth interface

    def authorization(self) -> str:
        """``Bearer <access token>``, from the cache or a new token request."""
        token_url = self.token_url()
        key = self._cache_key(token_url)
        with _CACHE_LOCK:
            cached = _TOKEN_CACHE.get(key)
            if cached is not None and time.monotonic() < cached.renew_at:
                return f"Bearer {cached.access_token}"
            # The lock is held while fetching so that concurrent callers share one token.
            cached = self._request_token(token_url)
            _TOKEN_CACHE[key] = cached
            return f"Bearer {cached.access_token}"

    def invalidate(self, authorization: str) -> bool:
        """Drop the cached token if it is the refused one; a new one will be requested."""
        token_url = self.token_url()
        key = self._cache_key(token_url)
        with _CACHE_LOCK:
            cached = _TOKEN_CACHE.get(key)
            if cached is not None and f"Bearer {cached.access_token}" == authorization:
                del _TOKEN_CACHE[key]
        return True

    # ------------------------------------------------------------------ token endpoint

    def token_url(self) -> str:
        """The token endpoint: configured, or read once from the SMART configuration."""
        if self._token_url is None:
            with _CACHE_LOCK:
                discovered = _DISCOVERED_TOKEN_URLS.get(self.base_url)
            if discovered is None:
                discovered = self._discover()
                with _CACHE_LOCK:
                    _DISCOVERED_TOKEN_URLS[self.base_url] = discovered
            self._token_url = discovered
        return self._token_url

    def _checked_token_url(self, token_url: str) -> str:
        parsed = _check_http_url(token_url, "the SMART token URL")
        if parsed.scheme == "http" and self.base_url.startswith("https:"):
            # The FHIR API is on TLS: the token must not travel in clear text.
            raise ValueError("the SMART token URL must use https when the FHIR base does")
        return str(parsed)

    def _cache_key(self, token_url: str) -> tuple[str, str, str, str]:
        return (token_url, self.client_id, self.scope, self._key_fingerprint)

    def _discover(self) -> str:
        url = f"{self.base_url}/{SMART_CONFIGURATION}"
        try:
            response = httpx.get(url, headers={"Accept": "application/json"}, timeout=self.timeout)
        except httpx.TransportError as exc:
            raise AuthorizationError(
                f"cannot read the SMART configuration of the FHIR server: {type(exc).__name__}",
                transient=True,
            ) from exc
        if response.status_code != 200:
            transient = is_transient_http_status(response.status_code)
            raise AuthorizationError(
                f"the FHIR server answered HTTP {response.status_code} for "
                f"{SMART_CONFIGURATION}"
                + ("" if transient else "; set the token URL (CAREBRIDGE_EHR_TOKEN_URL)"),
                transient=transient,
                status_code=response.status_code,
                retry_after=retry_after_seconds(response),
            )
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("token_endpoint"), str):
            raise AuthorizationError(
                f"the FHIR server's {SMART_CONFIGURATION} has no token_endpoint",
                transient=False,
            )
        methods = document.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            raise AuthorizationError(
                "the EHR's token endpoint does not support private_key_jwt client "
                "authentication (SMART Backend Services)",
                transient=False,
            )
        algorithms = document.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algorithms, list) and self.algorithm not in algorithms:
            raise AuthorizationError(
                f"the EHR's token endpoint does not accept {self.algorithm} client assertions",
                transient=False,
            )
        try:
            return self._checked_token_url(document["token_endpoint"])
        except ValueError as exc:
            raise AuthorizationError(
                f"the SMART configuration's token_endpoint is unusable: {exc}", transient=False
            ) from None

    def client_assertion(self, token_url: str) -> str:
        """A freshly signed client assertion JWT for ``token_url`` (new ``jti`` each call)."""
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        headers: dict[str, str] = {"typ": "JWT"}
        if self.key_id:
            headers["kid"] = self.key_id
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def _request_token(self, token_url: str) -> _CachedToken:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(token_url),
        }
        started = time.monotonic()
        try:
            response = httpx.post(
                token_url, data=form, headers={"Accept": "application/json"}, timeout=self.timeout
            )
        except httpx.TransportError as exc:
            raise AuthorizationError(
                f"cannot reach the SMART token endpoint: {type(exc).__name__}", transient=True
            ) from exc
        if response.status_code != 200:
            transient = is_transient_http_status(response.status_code)
            detail = _oauth_error(response)
            raise AuthorizationError(
                f"the SMART token endpoint answered HTTP {response.status_code}"
                + (f" ({detail})" if detail else ""),
                transient=transient,
                status_code=response.status_code,
                retry_after=retry_after_seconds(response),
            )
        return self._parse_token(response, started)

    def _parse_token(self, response: httpx.Response, started: float) -> _CachedToken:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise AuthorizationError(
                "the SMART token endpoint's answer is not a JSON object", transient=True
            )
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not _TOKEN_CHARS.fullmatch(access_token):
            raise AuthorizationError(
                "the SMART token endpoint's answer has no usable access_token", transient=False
            )
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise AuthorizationError(
                "the SMART token endpoint issued a token that is not a bearer token",
                transient=False,
            )
        expires_in = body.get("expires_in", DEFAULT_TOKEN_LIFETIME_SECONDS)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            expires_in = DEFAULT_TOKEN_LIFETIME_SECONDS
        lifetime = max(0.0, float(expires_in))
        margin = min(REFRESH_MARGIN_SECONDS, lifetime / 5)
        # Measured from when the request was sent: the token may be older than its answer.
        LOG.info("SMART access token obtained (expires in %d s)", int(lifetime))
        return _CachedToken(access_token=access_token, renew_at=started + lifetime - margin)
