"""Webhook credentials: a bearer token and Standard Webhooks signatures.

Standard Webhooks (https://www.standardwebhooks.com/): the sender signs
``f"{webhook-id}.{webhook-timestamp}.{body}"`` with HMAC-SHA256 and sends
``webhook-signature: v1,<base64 digest>`` (several space-separated signatures while a
secret is rotated). The shared secret is ``whsec_`` followed by the base64 of the key
bytes; as in the reference libraries the prefix is optional and the rest is always
base64-decoded, so both ends derive the same key from the same string. Timestamps are
accepted within ±5 minutes; replays inside that window are caught by the webhook id,
which the listener stores with the events it records.

Missing credentials are a 401, wrong ones a 403. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

TOLERANCE_SECONDS = 300
MAX_WEBHOOK_ID_LENGTH = 255
SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)


class CredentialsRefused(Exception):
    """The request's credentials are missing (401) or wrong (403).

    ``reason`` is a short machine-readable word for metrics and the audit trail;
    ``diagnostics`` is what the sender is told. Neither holds a credential.
    """

    def __init__(self, status: int, reason: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.reason = reason
        self.diagnostics = diagnostics


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64, prefix optional)."""
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "CAREBRIDGE_WEBHOOK_SECRET is not a Standard Webhooks secret: expected 'whsec_' "
            "followed by base64 (e.g. 'whsec_' + the base64 of 32 random bytes)"
        ) from None
    if len(key) < 16:
        raise ValueError("CAREBRIDGE_WEBHOOK_SECRET is too short: use at least 16 random bytes")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery (used by tests and senders)."""
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode("ascii")


def check_bearer(expected: str, authorization: str | None) -> None:
    """Require ``Authorization: Bearer <expected>``."""
    if not authorization:
        raise CredentialsRefused(401, "missing_token", "an Authorization: Bearer token is required")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise CredentialsRefused(401, "missing_token", "an Authorization: Bearer token is required")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise CredentialsRefused(403, "wrong_token", "the bearer token is not valid")


def require_signature_headers(headers: Mapping[str, str]) -> None:
    """Refuse early (before reading the body) when a signature header is missing."""
    missing = [
        name
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        if not headers.get(name)
    ]
    if missing:
        raise CredentialsRefused(
            401, "missing_signature", f"Standard Webhooks header(s) missing: {', '.join(missing)}"
        )


def verify_signature(key: bytes, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """Check a Standard Webhooks delivery; return its webhook id."""
    require_signature_headers(headers)
    webhook_id = headers["webhook-id"]
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH or not webhook_id.isprintable():
        raise CredentialsRefused(403, "bad_webhook_id", "webhook-id is not a valid message id")
    try:
        timestamp = int(headers["webhook-timestamp"])
    except ValueError:
        raise CredentialsRefused(
            403, "bad_timestamp", "webhook-timestamp is not an integer (seconds since epoch)"
        ) from None
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise CredentialsRefused(
            403,
            "stale_timestamp",
            f"webhook-timestamp is more than {TOLERANCE_SECONDS} s from this server's clock",
        )
    # Signed over the header exactly as sent, not over its parsed value.
    signed = sign(key, webhook_id, headers["webhook-timestamp"], body)
    expected = base64.b64decode(signed.partition(",")[2])
    for candidate in headers["webhook-signature"].split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue  # other schemes (v1a: asymmetric) are not configured here
        try:
            offered = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(offered, expected):
            return webhook_id
    raise CredentialsRefused(403, "bad_signature", "no webhook-signature matches this delivery")
