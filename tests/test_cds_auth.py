"""CDS Hooks client authentication: signed JWTs from the EHR (CDS Hooks 2.0 security)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.cds_tokens import token_key
from db.engine import Database
from db.schema import CdsHooksToken
from listeners.cds_auth import CdsClientVerifier, load_jwks
from listeners.fhir import create_app
from listeners.fhir_auth import CredentialsRefused
from worker.settings import Settings, SettingsError, load_settings

ISSUER = "https://ehr.example.org"
SERVICE = "https://carebridge.example.org/cds-services/carebridge-treatment"
TESTSERVER_SERVICE = "http://testserver/cds-services/carebridge-treatment"
CALL = {"hook": "patient-view", "hookInstance": "h-1", "context": {"patientId": "p-1"}}


class Keys:
    """An EC P-384 and an RSA key of one CDS Client, and its public JWK Set."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        self.jwks = {
            "keys": [
                {**ec_jwk, "kid": "ec-1", "alg": "ES384", "use": "sig"},
                {**rsa_jwk, "kid": "rsa-1", "alg": "RS384", "use": "sig"},
            ]
        }

    def token(
        self,
        *,
        alg: str = "ES384",
        kid: str | None = "ec-1",
        drop: tuple[str, ...] = (),
        key: Any = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "sub": "ehr-client",
            "aud": SERVICE,
            "iat": now,
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
            **claims,
        }
        for name in drop:
            body.pop(name, None)
        signing_key = key or (self.ec if alg.startswith("ES") else self.rsa)
        headers = {"kid": kid} if kid else {}
        return jwt.encode(body, signing_key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forged(keys: Keys, alg: str) -> str:
    """A token with the right claims whose "signature" is an HMAC keyed with the client's
    public key (algorithm confusion), or none at all."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": SERVICE, "iat": now, "exp": now + 60, "jti": "forged"}
    signing_input = ".".join(
        _b64(json.dumps(part).encode()) for part in ({"alg": alg, "kid": "ec-1"}, claims)
    )
    if alg == "none":
        return signing_input + "."
    public = json.dumps(keys.jwks["keys"][0]).encode()
    digest = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(digest)}"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def in_memory() -> Any:
    """A ``remember`` for the verifier alone: the tokens seen, in a set."""
    seen: set[tuple[str, str]] = set()

    def remember(issuer: str, jti: str, expires: float) -> bool:
        fresh = (issuer, jti) not in seen
        seen.add((issuer, jti))
        return fresh

    return remember


def verifier(keys: Keys, **options: Any) -> CdsClientVerifier:
    return CdsClientVerifier(keys.jwks, [ISSUER], remember=in_memory(), **options)


def refused(check: CdsClientVerifier, token: str | None, audience: str = SERVICE) -> str:
    with pytest.raises(CredentialsRefused) as caught:
        check.verify(None if token is None else f"Bearer {token}", audience)
    return f"{caught.value.status} {caught.value.reason}"


def test_a_signed_token_of_a_trusted_client_is_accepted_once(keys: Keys) -> None:
    check = verifier(keys)
    token = keys.token()
    assert check.verify(f"Bearer {token}", SERVICE)["iss"] == ISSUER
    assert refused(check, token) == "403 replay"
    rsa_token = keys.token(alg="RS384", kid="rsa-1")
    assert check.verify(f"Bearer {rsa_token}", SERVICE)["sub"] == "ehr-client"


@pytest.mark.parametrize(
    ("make", "outcome"),
    [
        (lambda k: None, "401 missing"),
        (lambda k: "not-a-jwt", "403 malformed"),
        (lambda k: k.token(exp=int(time.time()) - 120), "403 expired"),
        (lambda k: k.token(exp=int(time.time()) + 3600), "403 lifetime"),
        (lambda k: k.token(aud="https://elsewhere.example.org/cds-services/x"), "403 audience"),
        (lambda k: k.token(iss="https://rogue.example.org"), "403 issuer"),
        (lambda k: k.token(drop=("jti",)), "403 claims"),
        (lambda k: k.token(kid="unknown"), "403 key"),
        # Signed by a key the hospital never configured, under a configured kid.
        (lambda k: k.token(key=ec.generate_private_key(ec.SECP384R1())), "403 signature"),
        (
            lambda k: k.token(alg="ES256", key=ec.generate_private_key(ec.SECP256R1())),
            "403 algorithm",
        ),
        # Algorithm confusion: an HMAC "signed" with the public key is not accepted.
        (lambda k: forged(k, "HS256"), "403 algorithm"),
        (lambda k: forged(k, "none"), "403 algorithm"),
    ],
)
def test_bad_tokens_are_refused(keys: Keys, make: Any, outcome: str) -> None:
    assert refused(verifier(keys), make(keys)) == outcome


def test_without_a_kid_only_an_unambiguous_key_is_used(keys: Keys) -> None:
    check = verifier(keys)
    assert check.verify(f"Bearer {keys.token(kid=None)}", SERVICE)  # the only EC key
    two_ec = {"keys": [keys.jwks["keys"][0], {**keys.jwks["keys"][0], "kid": "ec-2"}]}
    assert (
        refused(CdsClientVerifier(two_ec, [ISSUER], remember=in_memory()), keys.token(kid=None))
        == "403 key"
    )


def test_key_sets_are_checked_when_loaded(tmp_path: Path, keys: Keys) -> None:
    good = tmp_path / "jwks.json"
    good.write_text(json.dumps(keys.jwks))
    assert load_jwks(good)["keys"][0]["kid"] == "ec-1"
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1())))
    cases = {
        "not JSON": "{",
        "must be a JWK Set": json.dumps({"kty": "EC"}),
        "not a public JWK": json.dumps({"keys": [private]}),
        "kty must be EC or RSA": json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
    }
    for message, text in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_jwks(bad)
    with pytest.raises(ValueError, match="cannot be read"):
        load_jwks(tmp_path / "missing.json")


def test_settings_refuse_half_configured_jwt_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAREBRIDGE_CDS_HOOKS_JWKS", str(tmp_path / "jwks.json"))
    with pytest.raises(SettingsError, match="CAREBRIDGE_CDS_HOOKS_ISSUERS is empty"):
        load_settings()
    monkeypatch.delenv("CAREBRIDGE_CDS_HOOKS_JWKS")
    monkeypatch.setenv("CAREBRIDGE_CDS_HOOKS_ISSUERS", f"{ISSUER}, https://other.example.org")
    with pytest.raises(SettingsError, match="set CAREBRIDGE_CDS_HOOKS_JWKS"):
        load_settings()
    monkeypatch.setenv("CAREBRIDGE_CDS_HOOKS_JWKS", str(tmp_path / "jwks.json"))
    settings = load_settings()
    assert settings.cds_hooks_issuers == [ISSUER, "https://other.example.org"]


# The service on the webhook's app ------------------------------------------------------


class NoBroker:
    def publish_fhir_event(self, event_id: int) -> str | None:  # pragma: no cover
        return None


def service(database: Database, tmp_path: Path, **settings: Any) -> TestClient:
    app = create_app(
        Settings(database_url=database.url, archive_dir=tmp_path / "archive", **settings),
        database,
        NoBroker(),  # type: ignore[arg-type]
    )
    return TestClient(app)


def test_the_cds_service_takes_the_ehrs_jwt(database: Database, tmp_path: Path, keys: Keys) -> None:
    """With a JWK Set configured the service answers a signed call, and refuses a call
    without one, with the webhook's shared token, or with one made for another URL."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks))
    with service(
        database,
        tmp_path,
        webhook_token="webhook-token",
        cds_hooks_jwks=jwks,
        cds_hooks_issuers=[ISSUER],
    ) as client:
        url = "/cds-services/carebridge-treatment"
        signed = {"Authorization": f"Bearer {keys.token(aud=TESTSERVER_SERVICE)}"}
        answer = client.post(url, json=CALL, headers=signed)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"cards": []}  # no suggestion stored for this patient
        assert client.post(url, json=CALL, headers=signed).status_code == 403  # replayed
        assert client.post(url, json=CALL).status_code == 401
        shared = {"Authorization": "Bearer webhook-token"}
        assert client.post(url, json=CALL, headers=shared).status_code == 403
        other = {"Authorization": f"Bearer {keys.token()}"}  # aud: the public URL
        refusal = client.post(url, json=CALL, headers=other)
        assert refusal.status_code == 403
        assert refusal.json()["resourceType"] == "OperationOutcome"
        assert "webhook-token" not in refusal.text
        assert client.get("/cds-services").status_code == 200  # discovery stays open
        # Another webhook process (an app of its own on the same database) refuses the
        # token the first one accepted: the record is in the database, as a digest.
        jti = jwt.decode(signed["Authorization"][7:], options={"verify_signature": False})["jti"]
        with service(
            database,
            tmp_path,
            cds_hooks_jwks=jwks,
            cds_hooks_issuers=[ISSUER],
        ) as other_process:
            replay = other_process.post(url, json=CALL, headers=signed)
            assert replay.status_code == 403 and "already used" in replay.text
        with database.session() as session:
            keys_on_file = list(session.execute(select(CdsHooksToken.token_key)).scalars())
        assert token_key(ISSUER, jti) in keys_on_file
        assert not any(jti in key for key in keys_on_file)
    # Behind a proxy: the public URL the EHR signs for is configured.
    with service(
        database,
        tmp_path,
        cds_hooks_jwks=jwks,
        cds_hooks_issuers=[ISSUER],
        cds_hooks_audience="https://carebridge.example.org/",
    ) as client:
        answer = client.post(url, json=CALL, headers={"Authorization": f"Bearer {keys.token()}"})
        assert answer.status_code == 200, answer.text


def test_the_cds_service_is_closed_off_loopback_without_credentials(
    database: Database, tmp_path: Path
) -> None:
    """Bound beyond loopback with only the HMAC webhook secret, nobody is let in; on
    loopback without any credential the service is open, as the webhook is."""
    url = "/cds-services/carebridge-treatment"
    with service(
        database, tmp_path, fhir_host="0.0.0.0", webhook_secret="whsec_" + "A" * 44
    ) as client:
        refusal = client.post(url, json=CALL)
        assert refusal.status_code == 401
        assert "CAREBRIDGE_CDS_HOOKS_JWKS" in refusal.text
    with service(database, tmp_path) as client:
        assert client.post(url, json=CALL).status_code == 200
