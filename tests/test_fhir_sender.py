"""The FHIR sender against a real FHIR R4 server (@medplum/fhir-router on node) and a real
SMART token endpoint: what reaches the server is checked with FHIR searches on it."""

from __future__ import annotations

import email.utils
import logging
import pickle
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fhir_peer import FhirServerPeer, TokenEndpoint
from worker.senders.dicom import DeliveryError
from worker.senders.fhir import FhirClient, FhirDeliveryError
from worker.senders.smart import (
    AuthorizationError,
    SmartBackendAuth,
    StaticBearer,
    clear_token_cache,
)

# Codes of the test resources (one place).
LOINC = "http://loinc.org"
LOINC_IMAGING_STUDY = "18748-4"  # Diagnostic imaging study
LOINC_FINDING = "59776-5"  # Procedure findings Narrative
UCUM = "http://unitsofmeasure.org"
RESULT_ID_SYSTEM = "urn:carebridge:test:result"

STATIC_TOKEN = "static-test-token-0123456789"
SCOPE = "system/*.write system/*.read"


def result_bundle(key: str, *, report_status: str | None = "final") -> dict[str, Any]:
    """A transaction: an Observation and the DiagnosticReport citing it, each created only
    if its business identifier is not on the server yet (the shape carebridge pushes)."""
    observation_url = f"urn:uuid:{uuid.uuid4()}"
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": RESULT_ID_SYSTEM, "value": f"{key}-obs"}],
        "code": {"coding": [{"system": LOINC, "code": LOINC_FINDING}]},
        "valueQuantity": {"value": 0.87, "system": UCUM, "code": "1", "unit": "1"},
        "status": "final",
    }
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": RESULT_ID_SYSTEM, "value": f"{key}-report"}],
        "code": {"coding": [{"system": LOINC, "code": LOINC_IMAGING_STUDY}]},
        "result": [{"reference": observation_url}],
    }
    if report_status is not None:
        report["status"] = report_status
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": observation_url,
                "resource": observation,
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": f"identifier={RESULT_ID_SYSTEM}|{key}-obs",
                },
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": report,
                "request": {
                    "method": "POST",
                    "url": "DiagnosticReport",
                    "ifNoneExist": f"identifier={RESULT_ID_SYSTEM}|{key}-report",
                },
            },
        ],
    }


def observations(ehr: FhirServerPeer, key: str) -> list[dict[str, Any]]:
    return ehr.search("Observation", identifier=f"{RESULT_ID_SYSTEM}|{key}-obs")


def reports(ehr: FhirServerPeer, key: str) -> list[dict[str, Any]]:
    return ehr.search("DiagnosticReport", identifier=f"{RESULT_ID_SYSTEM}|{key}-report")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def token_endpoint() -> Iterator[TokenEndpoint]:
    with TokenEndpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ehr(
    tmp_path_factory: pytest.TempPathFactory, token_endpoint: TokenEndpoint
) -> Iterator[FhirServerPeer]:
    """One FHIR server for the module (startup ~1 s); it requires a bearer token."""
    with FhirServerPeer(
        tmp_path_factory.mktemp("fhir"),
        require_auth=True,
        static_tokens=[STATIC_TOKEN],
        token_secret=token_endpoint.secret,
        token_url=token_endpoint.url,
    ) as peer:
        yield peer


@pytest.fixture(autouse=True)
def fresh_server(ehr: FhirServerPeer) -> None:
    ehr.reset()
    clear_token_cache()


@pytest.fixture
def client(ehr: FhirServerPeer) -> Iterator[FhirClient]:
    with FhirClient(ehr.base_url, StaticBearer(STATIC_TOKEN)) as fhir:
        yield fhir


def _keypair(kind: str) -> tuple[bytes, bytes]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "RS384":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture(scope="module")
def rsa_keypair() -> tuple[bytes, bytes]:
    return _keypair("RS384")


@pytest.fixture
def client_id(token_endpoint: TokenEndpoint, rsa_keypair: tuple[bytes, bytes]) -> str:
    """A client registered at the token endpoint with the module's RSA key."""
    name = f"carebridge-{uuid.uuid4().hex[:8]}"
    token_endpoint.register(name, rsa_keypair[1])
    return name


@pytest.fixture
def smart_client(
    ehr: FhirServerPeer, client_id: str, rsa_keypair: tuple[bytes, bytes]
) -> Iterator[FhirClient]:
    """A client authorized with SMART Backend Services (token URL discovered)."""
    auth = SmartBackendAuth(ehr.base_url, client_id, rsa_keypair[0], key_id="key-1")
    with FhirClient(ehr.base_url, auth) as fhir:
        yield fhir


# ---------------------------------------------------------------------- transactions


def test_conditional_create_twice_leaves_one_resource_each(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    bundle = result_bundle("study-1")
    first = client.post_transaction(bundle)
    second = client.post_transaction(bundle)

    assert [entry.created for entry in first.entries] == [True, True]
    assert [entry.created for entry in second.entries] == [False, False]
    assert [entry.location for entry in second.entries] == [e.location for e in first.entries]
    assert first.entries[0].location is not None
    assert first.entries[0].location.startswith("Observation/")

    [observation] = observations(ehr, "study-1")
    [report] = reports(ehr, "study-1")
    assert report["result"] == [{"reference": f"Observation/{observation['id']}"}]


def test_503_is_transient_and_the_next_attempt_succeeds(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    ehr.fail_next(503)
    with pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(result_bundle("study-2"))
    assert failed.value.transient is True
    assert failed.value.status_code == 503
    assert observations(ehr, "study-2") == []

    client.post_transaction(result_bundle("study-2"))
    assert len(observations(ehr, "study-2")) == 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_is_transient_with_retry_after(
    client: FhirClient, ehr: FhirServerPeer, form: str
) -> None:
    if form == "seconds":
        header, low, high = "7", 7.0, 7.0
    else:
        header = email.utils.formatdate(time.time() + 120, usegmt=True)
        low, high = 100.0, 120.0
    ehr.fail_next(429, retry_after=header)
    with pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(result_bundle("study-3"))
    assert failed.value.transient is True
    assert failed.value.status_code == 429
    assert failed.value.retry_after is not None
    assert low <= failed.value.retry_after <= high


def test_invalid_resource_is_permanent_and_keeps_the_operation_outcome(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    with pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(result_bundle("study-4", report_status=None))
    error = failed.value
    assert error.transient is False
    assert error.status_code == 400
    assert "DiagnosticReport.status" in str(error)
    assert error.operation_outcome is not None
    assert error.operation_outcome["resourceType"] == "OperationOutcome"
    assert error.operation_outcome["issue"][0]["expression"] == ["DiagnosticReport.status"]
    # All or nothing: the valid Observation before it in the transaction was not kept.
    assert observations(ehr, "study-4") == []


def test_a_transaction_response_with_a_failed_entry_is_an_error(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    ehr.atomic_transactions(False)
    with pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(result_bundle("study-4b", report_status=None))
    error = failed.value
    assert error.transient is False
    assert error.status_code == 400
    assert "entry 2" in str(error)
    assert "DiagnosticReport.status" in str(error)
    assert error.operation_outcome is not None
    assert error.operation_outcome["issue"][0]["expression"] == ["DiagnosticReport.status"]


def test_ambiguous_conditional_create_is_permanent(client: FhirClient, ehr: FhirServerPeer) -> None:
    bundle = result_bundle("study-5")
    duplicate = bundle["entry"][0]["resource"]
    ehr.create(duplicate)
    ehr.create(duplicate)
    with pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(bundle)
    assert failed.value.transient is False
    assert failed.value.status_code == 412
    assert "Multiple" in str(failed.value)
    assert reports(ehr, "study-5") == []


def test_server_down_is_transient_then_delivery_succeeds_when_it_is_back(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    ehr.stop()
    try:
        with pytest.raises(FhirDeliveryError) as failed:
            client.post_transaction(result_bundle("study-6"))
        assert failed.value.transient is True
        assert failed.value.status_code is None
    finally:
        ehr.start()  # same port, empty store
    client.post_transaction(result_bundle("study-6"))
    assert len(observations(ehr, "study-6")) == 1


def test_delivery_errors_survive_pickling_with_their_details(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    ehr.fail_next(429, retry_after="3")
    with pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(result_bundle("study-7"))
    copy = pickle.loads(pickle.dumps(failed.value))
    assert isinstance(copy, FhirDeliveryError)
    assert isinstance(copy, DeliveryError)  # what the outbox catches
    assert (copy.transient, copy.status_code, copy.retry_after) == (True, 429, 3.0)
    assert copy.operation_outcome == failed.value.operation_outcome
    assert str(copy) == str(failed.value)


def test_a_bundle_that_is_not_a_transaction_is_refused(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    with pytest.raises(ValueError, match="transaction"):
        client.post_transaction({**result_bundle("study-8"), "type": "batch"})
    assert ehr.requests() == []


# ------------------------------------------------------------------- read and search


def test_read_returns_the_resource_a_notification_names(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    result = client.post_transaction(result_bundle("study-9"))
    location = result.entries[0].location
    assert location is not None
    resource_type, resource_id = location.split("/")[:2]

    observation = client.read(resource_type, resource_id)
    assert observation["id"] == resource_id
    assert observation["identifier"][0]["value"] == "study-9-obs"

    with pytest.raises(FhirDeliveryError) as failed:
        client.read("Observation", "no-such-observation")
    assert failed.value.transient is False
    assert failed.value.status_code == 404
    assert failed.value.operation_outcome is not None


def test_search_follows_next_links_for_what_was_missed(
    client: FhirClient, ehr: FhirServerPeer
) -> None:
    for index in range(25):
        client.post_transaction(result_bundle(f"gap-{index}"))
    before = len(ehr.requests())

    found = client.search("Observation", {"code": f"{LOINC}|{LOINC_FINDING}", "_count": "10"})

    values = sorted(resource["identifier"][0]["value"] for resource in found)
    assert values == sorted(f"gap-{index}-obs" for index in range(25))
    pages = [r for r in ehr.requests()[before:] if r["path"].endswith("/Observation")]
    assert len(pages) == 3


def test_search_stops_at_max_pages(ehr: FhirServerPeer) -> None:
    with FhirClient(ehr.base_url, StaticBearer(STATIC_TOKEN), max_pages=2) as client:
        for index in range(5):
            client.post_transaction(result_bundle(f"page-{index}"))
        with pytest.raises(FhirDeliveryError, match="more than 2 pages") as failed:
            client.search("Observation", {"_count": "2"})
    assert failed.value.transient is False


@pytest.mark.parametrize(
    "resource_id",
    ["../Patient/1", "..", ".", "a/b", "x" * 65, "", "abc\n", "id?x=1", "%2e%2e", "a b"],
)
def test_an_untrusted_id_is_refused_before_any_request(
    client: FhirClient, ehr: FhirServerPeer, resource_id: str
) -> None:
    with pytest.raises(ValueError, match="FHIR resource id"):
        client.read("Observation", resource_id)
    assert ehr.requests() == []


@pytest.mark.parametrize("resource_type", ["observation", "../Observation", "Observation/1", ""])
def test_an_untrusted_resource_type_is_refused_before_any_request(
    client: FhirClient, ehr: FhirServerPeer, resource_type: str
) -> None:
    with pytest.raises(ValueError, match="FHIR resource type"):
        client.read(resource_type, "1")
    with pytest.raises(ValueError, match="FHIR resource type"):
        client.search(resource_type, {})
    assert ehr.requests() == []


# ---------------------------------------------------------------------------- auth


def test_a_wrong_static_token_is_permanent_without_retry(ehr: FhirServerPeer) -> None:
    client = FhirClient(ehr.base_url, StaticBearer("not-the-token"))
    with client, pytest.raises(FhirDeliveryError) as failed:
        client.post_transaction(result_bundle("study-10"))
    assert failed.value.transient is False
    assert failed.value.status_code == 401
    assert [r["status"] for r in ehr.requests()] == [401]


def test_no_token_at_all_gets_401(ehr: FhirServerPeer) -> None:
    with FhirClient(ehr.base_url, None) as client, pytest.raises(FhirDeliveryError) as failed:
        client.search("Observation", {})
    assert failed.value.status_code == 401
    assert failed.value.operation_outcome is not None


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_token_request_is_a_backend_services_assertion(
    ehr: FhirServerPeer, token_endpoint: TokenEndpoint, algorithm: str
) -> None:
    private, public = _keypair(algorithm)
    client_id = f"carebridge-{algorithm.lower()}-{uuid.uuid4().hex[:6]}"
    token_endpoint.register(client_id, public)
    auth = SmartBackendAuth(ehr.base_url, client_id, private, key_id="key-7")
    with FhirClient(ehr.base_url, auth) as client:
        client.post_transaction(result_bundle("study-11"))
    assert len(observations(ehr, "study-11")) == 1

    [request] = token_endpoint.requests_of(client_id)
    assert request.status == 200, request.error
    assert request.form["grant_type"] == "client_credentials"
    assert request.form["scope"] == SCOPE
    assert request.header["alg"] == algorithm
    assert request.header["kid"] == "key-7"
    claims = request.claims
    assert claims["iss"] == claims["sub"] == client_id
    assert claims["aud"] == token_endpoint.url
    assert 0 < claims["exp"] - time.time() <= 300
    assert claims["exp"] - claims["iat"] <= 300
    assert len(claims["jti"]) >= 16
    # The token URL was discovered from the FHIR server.
    assert ehr.requests()[0]["path"].endswith("/.well-known/smart-configuration")


def test_smart_token_is_reused_for_the_next_requests(
    smart_client: FhirClient, ehr: FhirServerPeer, token_endpoint: TokenEndpoint, client_id: str
) -> None:
    smart_client.post_transaction(result_bundle("study-12"))
    assert (
        len(smart_client.search("Observation", {"identifier": f"{RESULT_ID_SYSTEM}|study-12-obs"}))
        == 1
    )
    assert len(token_endpoint.requests_of(client_id)) == 1
    fhir_calls = [r for r in ehr.requests() if "well-known" not in r["path"]]
    assert len(fhir_calls) == 2
    assert fhir_calls[0]["auth"].startswith("jwt:")
    assert fhir_calls[0]["auth"] == fhir_calls[1]["auth"]


def test_a_revoked_token_is_refreshed_once(
    smart_client: FhirClient, ehr: FhirServerPeer, token_endpoint: TokenEndpoint, client_id: str
) -> None:
    smart_client.post_transaction(result_bundle("study-13"))
    assert ehr.revoke_tokens() == 1

    smart_client.post_transaction(result_bundle("study-14"))

    assert len(observations(ehr, "study-14")) == 1
    token_requests = token_endpoint.requests_of(client_id)
    assert [r.status for r in token_requests] == [200, 200]
    assert token_requests[0].claims["jti"] != token_requests[1].claims["jti"]
    fhir_calls = [r for r in ehr.requests() if "well-known" not in r["path"]]
    assert [r["status"] for r in fhir_calls] == [200, 401, 200]
    assert fhir_calls[1]["auth"] == "refused"
    assert fhir_calls[2]["auth"] != fhir_calls[0]["auth"]


def test_a_401_that_persists_after_one_refresh_is_permanent(
    smart_client: FhirClient, ehr: FhirServerPeer, token_endpoint: TokenEndpoint, client_id: str
) -> None:
    ehr.fail_next(401, count=5)
    with pytest.raises(FhirDeliveryError) as failed:
        smart_client.post_transaction(result_bundle("study-15"))
    assert failed.value.transient is False
    assert failed.value.status_code == 401
    assert len(token_endpoint.requests_of(client_id)) == 2
    fhir_calls = [r for r in ehr.requests() if "well-known" not in r["path"]]
    assert [r["status"] for r in fhir_calls] == [401, 401]


def test_token_endpoint_unavailable_is_transient(
    smart_client: FhirClient, token_endpoint: TokenEndpoint, ehr: FhirServerPeer
) -> None:
    token_endpoint.fail_next(503, retry_after="4")
    with pytest.raises(AuthorizationError) as failed:
        smart_client.post_transaction(result_bundle("study-16"))
    assert failed.value.transient is True
    assert failed.value.retry_after == 4.0
    assert observations(ehr, "study-16") == []


def test_unknown_client_is_permanent(ehr: FhirServerPeer, rsa_keypair: tuple[bytes, bytes]) -> None:
    auth = SmartBackendAuth(ehr.base_url, "not-registered", rsa_keypair[0])
    with FhirClient(ehr.base_url, auth) as client, pytest.raises(AuthorizationError) as failed:
        client.search("Observation", {})
    assert failed.value.transient is False
    assert "invalid_client" in str(failed.value)
    assert [r["path"] for r in ehr.requests()] == ["/fhir/R4/.well-known/smart-configuration"]


def test_configured_token_url_skips_discovery(
    ehr: FhirServerPeer,
    token_endpoint: TokenEndpoint,
    client_id: str,
    rsa_keypair: tuple[bytes, bytes],
) -> None:
    auth = SmartBackendAuth(
        ehr.base_url,
        client_id,
        rsa_keypair[0],
        token_url=token_endpoint.url,
        scope="system/Observation.rs",
    )
    with FhirClient(ehr.base_url, auth) as client:
        assert client.search("Observation", {}) == []
    [request] = token_endpoint.requests_of(client_id)
    assert request.form["scope"] == "system/Observation.rs"
    assert all("well-known" not in r["path"] for r in ehr.requests())


def test_no_token_assertion_or_key_in_logs(
    smart_client: FhirClient,
    ehr: FhirServerPeer,
    token_endpoint: TokenEndpoint,
    client_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    smart_client.post_transaction(result_bundle("study-17"))
    ehr.revoke_tokens()
    smart_client.search("Observation", {})
    secrets_seen = [
        value
        for request in token_endpoint.requests_of(client_id)
        for value in (request.access_token, request.form["client_assertion"])
        if value
    ]
    assert len(secrets_seen) == 4
    for value in secrets_seen:
        assert value not in caplog.text
    assert "SMART access token obtained" in caplog.text
    assert repr(smart_client).count("hidden") == 1


def test_invalid_configuration_is_refused_at_construction(rsa_keypair: tuple[bytes, bytes]) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="2048"):
        SmartBackendAuth("https://ehr.example/fhir", "client", weak)
    with pytest.raises(ValueError, match="PEM"):
        SmartBackendAuth("https://ehr.example/fhir", "client", b"not a key")
    with pytest.raises(ValueError, match="https"):
        SmartBackendAuth(
            "https://ehr.example/fhir",
            "client",
            rsa_keypair[0],
            token_url="http://ehr.example/token",
        )
    with pytest.raises(ValueError, match="bearer token"):
        StaticBearer("two words")
    with pytest.raises(ValueError, match="http"):
        FhirClient("ftp://ehr.example/fhir", None)
