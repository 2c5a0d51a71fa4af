"""CDS Hooks client authentication: the EHR's signed JWT (CDS Hooks 2.0, "Trusting CDS
Clients").

A CDS Client calls a service with ``Authorization: Bearer <JWT>``, signed with its own
private key (ES384 or RS384). carebridge verifies it against a JWK Set the hospital
configures (``CAREBRIDGE_CDS_HOOKS_JWKS``, a JSON file: no key is ever fetched from a URL
named in the token), and checks the claims the specification requires:

- ``iss``: one of ``CAREBRIDGE_CDS_HOOKS_ISSUERS``;
- ``aud``: the service's own URL (``<base>/cds-services/<id>``, where ``<base>`` is
  ``CAREBRIDGE_CDS_HOOKS_AUDIENCE`` or else the URL the request was sent to);
- ``exp`` at most five minutes ahead, ``iat``, and a ``jti`` never seen before (the
  caller's ``remember`` records it until the token expires; the webhook keeps it in the
  database, which every process of a group shares).

Missing credentials are a 401, wrong ones a 403, as for the webhook. The token and the
keys are never logged or echoed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt

from listeners.fhir_auth import CredentialsRefused

#: Signature algorithms CDS Hooks 2.0 names for CDS Clients.
ALGORITHMS = ("ES384", "RS384")
#: Clock skew tolerated on ``exp`` and ``iat`` (seconds).
LEEWAY_S = 30
#: ``exp`` may be at most this far ahead of now (the specification's five minutes).
MAX_LIFETIME_S = 300


def load_jwks(path: Path) -> dict[str, Any]:
    """The JWK Set in ``path``, checked to hold public keys PyJWT can use.

    Raises :class:`ValueError` with what is wrong (never the key material).
    """
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"CAREBRIDGE_CDS_HOOKS_JWKS cannot be read: {exc.strerror}") from None
    except ValueError:
        raise ValueError("CAREBRIDGE_CDS_HOOKS_JWKS is not JSON (a JWK Set is expected)") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError('CAREBRIDGE_CDS_HOOKS_JWKS must be a JWK Set: {"keys": [...]}')
    for index, key in enumerate(keys):
        if not isinstance(key, dict) or any(part in key for part in ("d", "p", "q")):
            raise ValueError(
                f"CAREBRIDGE_CDS_HOOKS_JWKS key {index} is not a public JWK "
                "(private keys do not belong in this file)"
            )
        if key.get("kty") not in ("EC", "RSA"):
            raise ValueError(f"CAREBRIDGE_CDS_HOOKS_JWKS key {index}: kty must be EC or RSA")
    try:
        jwt.PyJWKSet.from_dict(document)
    except jwt.PyJWTError as exc:
        raise ValueError(f"CAREBRIDGE_CDS_HOOKS_JWKS has an unusable key ({exc})") from None
    return document


class CdsClientVerifier:
    """Verifies CDS Clients' JWTs against the configured keys and issuers."""

    def __init__(
        self,
        jwks: Mapping[str, Any],
        issuers: Sequence[str],
        audience_base: str | None = None,
        *,
        remember: Callable[[str, str, float], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``remember(issuer, jti, exp)`` records a token and returns False when it was
        already used."""
        if not issuers:
            raise ValueError(
                "CAREBRIDGE_CDS_HOOKS_JWKS is set but CAREBRIDGE_CDS_HOOKS_ISSUERS is empty: "
                "name the CDS Clients (their JWT 'iss') allowed to call"
            )
        self._keys = [
            (key, dict(raw))
            for key, raw in zip(jwt.PyJWKSet.from_dict(dict(jwks)).keys, jwks["keys"], strict=True)
        ]
        self.issuers = list(issuers)
        self.audience_base = audience_base.rstrip("/") if audience_base else None
        self._clock = clock
        self._remember = remember

    def service_url(self, request_base: str, service_id: str) -> str:
        """The ``aud`` a token for ``service_id`` must carry."""
        base = self.audience_base or request_base.rstrip("/")
        return f"{base}/cds-services/{service_id}"

    def verify(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """The token's claims; raises :class:`CredentialsRefused` (401 missing, 403 wrong)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise CredentialsRefused(
                401, "missing", "a CDS Client JWT is required (Authorization: Bearer <JWT>)"
            )
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise CredentialsRefused(403, "malformed", "the bearer token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise CredentialsRefused(
                403, "algorithm", f"the JWT must be signed with one of {', '.join(ALGORITHMS)}"
            )
        key = self._key_for(header.get("kid"), str(algorithm))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                audience=audience,
                issuer=self.issuers,
                leeway=LEEWAY_S,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise CredentialsRefused(403, "expired", "the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise CredentialsRefused(
                403, "audience", f"the JWT's aud must be this service's URL, {audience}"
            ) from None
        except jwt.InvalidIssuerError:
            raise CredentialsRefused(
                403, "issuer", "the JWT's iss is not a trusted CDS Client"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise CredentialsRefused(403, "claims", f"the JWT has no {exc.claim!r} claim") from None
        except jwt.PyJWTError:
            raise CredentialsRefused(
                403, "signature", "the JWT's signature or claims do not verify"
            ) from None
        now = self._clock()
        expires = float(claims["exp"])
        if expires > now + MAX_LIFETIME_S + LEEWAY_S:
            raise CredentialsRefused(403, "lifetime", "the JWT's exp is more than 5 minutes ahead")
        if not self._remember(str(claims["iss"]), str(claims["jti"]), expires):
            raise CredentialsRefused(403, "replay", "this JWT (its jti) was already used")
        return claims

    def _key_for(self, kid: object, algorithm: str) -> Any:
        family = "EC" if algorithm.startswith("ES") else "RSA"
        usable = [
            (key, raw)
            for key, raw in self._keys
            if raw.get("kty") == family and raw.get("alg") in (None, algorithm)
        ]
        if kid is not None:
            usable = [(key, raw) for key, raw in usable if raw.get("kid") == kid]
        elif len(usable) != 1:
            usable = []  # without a kid only an unambiguous key will do
        if not usable:
            raise CredentialsRefused(
                403, "key", "no configured CDS Client key matches the JWT's kid and alg"
            )
        return usable[0][0]
