"""The EHR side end to end, against a real FHIR R4 server (medplum's router on node) that
requires SMART Backend Services tokens: events POSTed to carebridge's webhook come back to
the EHR as RiskAssessment and CarePlan, found with FHIR searches; the EHR's CDS Hooks call
gets a card; the audit trail tells what came in and what the EHR accepted."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fhir_peer import FhirServerPeer, TokenEndpoint
from tests.harness import Carebridge, wait_until

pytestmark = pytest.mark.slow

WEBHOOK_TOKEN = "e2e-webhook-token"
CLIENT_ID = "carebridge-e2e"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
PHI_NAME = "Quillon^Zaphod"  # must never reach a log


@pytest.fixture(scope="module")
def smart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenEndpoint, Path]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path_factory.mktemp("smart") / "client-key.pem"
    path.write_bytes(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with TokenEndpoint() as endpoint:
        endpoint.register(CLIENT_ID, public)
        yield endpoint, path


@pytest.fixture(scope="module")
def ehr(
    tmp_path_factory: pytest.TempPathFactory, smart: tuple[TokenEndpoint, Path]
) -> Iterator[FhirServerPeer]:
    endpoint, _ = smart
    with FhirServerPeer(
        tmp_path_factory.mktemp("ehr"),
        require_auth=True,
        token_secret=endpoint.secret,
        token_url=endpoint.url,
    ) as server:
        yield server


def deployment(
    root: Path, models_dir: Path, ehr: FhirServerPeer, key: Path, **settings: Any
) -> Carebridge:
    return Carebridge(
        root,
        models_dir,
        ehr_base_url=ehr.base_url,
        ehr_client_id=CLIENT_ID,
        ehr_private_key=key,
        webhook_token=WEBHOOK_TOKEN,
        patient_stable_seconds=1,
        delivery_backoff_seconds=0.5,
        requeue_after_seconds=2,
        **settings,
    )


def quantity(patient: str, code: str, value: float, unit: str, ucum: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": "2026-11-20T09:00:00Z",
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }


def egfr_l858r(patient: str) -> dict[str, Any]:
    def component(code: str, coding: dict[str, str]) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueCodeableConcept": {"coding": [coding]},
        }

    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "69548-6"}]},
        "subject": {"reference": patient},
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA9633-4"}]},
        "component": [
            component(
                "48018-6",
                {
                    "system": "http://www.genenames.org/geneId",
                    "code": "HGNC:3236",
                    "display": "EGFR",
                },
            ),
            component("48005-3", {"system": "http://varnomen.hgvs.org", "code": "p.Leu858Arg"}),
        ],
    }


def note(patient: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": patient},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "data": base64.b64encode(text.encode()).decode(),
                }
            }
        ],
    }


def nsclc(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "code": {
            "coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C34.90"},
                {"system": "http://snomed.info/sct", "code": "254637007"},
            ]
        },
        "subject": {"reference": patient},
    }


def post_to_carebridge(carebridge: Carebridge, resources: list[dict[str, Any]]) -> list[str]:
    """POST a collection Bundle to the webhook; the event ids of the 202."""
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": resource} for resource in resources],
    }
    response = httpx.post(
        f"{carebridge.fhir_url}/fhir",
        content=json.dumps(bundle),
        headers={
            "Content-Type": "application/fhir+json",
            "Authorization": f"Bearer {WEBHOOK_TOKEN}",
        },
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return [issue["details"]["coding"][0]["code"] for issue in response.json()["issue"]]


def notify(
    carebridge: Carebridge, focus: str, subscription: str = "Subscription/vitals", number: int = 1
) -> None:
    """An R4 backport id-only event-notification naming ``focus`` as event ``number``."""
    parameters = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/vitals"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": str(number)},
        {
            "name": "notification-event",
            "part": [
                {"name": "event-number", "valueString": str(number)},
                {"name": "focus", "valueReference": {"reference": focus}},
            ],
        },
    ]
    profile = (
        "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
        "backport-subscription-status-r4"
    )
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "fullUrl": "urn:uuid:3f1c2f8e-6a4b-4c1e-9a0d-5b7e2c9d1a42",
                "resource": {
                    "resourceType": "Parameters",
                    "meta": {"profile": [profile]},
                    "parameter": parameters,
                },
            }
        ],
    }
    response = httpx.post(
        f"{carebridge.fhir_url}/fhir/notify",
        content=json.dumps(bundle),
        headers={
            "Content-Type": "application/fhir+json",
            "Authorization": f"Bearer {WEBHOOK_TOKEN}",
        },
        timeout=30,
    )
    assert response.status_code == 202, response.text


def all_events(carebridge: Carebridge) -> list[dict[str, Any]]:
    """Audit events without a subject (e.g. a catch-up), from the database."""
    import sqlalchemy

    with carebridge.database.engine.connect() as connection:
        rows = connection.execute(
            sqlalchemy.text("select event_type, detail from audit_events where subject is null")
        ).all()
    return [{"type": t, "detail": d if isinstance(d, dict) else json.loads(d)} for t, d in rows]


def the_ehr_has(ehr: FhirServerPeer, resource_type: str, patient: str) -> list[dict[str, Any]]:
    return ehr.search(resource_type, subject=patient)


def test_clinical_events_come_back_to_the_ehr_as_fhir_results(
    tmp_path: Path,
    models_dir: Path,
    ehr: FhirServerPeer,
    smart: tuple[TokenEndpoint, Path],
) -> None:
    endpoint, key = smart
    # The EHR holds the patient and their data; it sends carebridge what it has.
    patient = ehr.create(
        {
            "resourceType": "Patient",
            "name": [{"family": PHI_NAME.split("^")[0], "given": [PHI_NAME.split("^")[1]]}],
            "gender": "female",
            "birthDate": "1961-05-14",
        }
    )
    reference = f"Patient/{patient['id']}"
    sent = [
        patient,
        *(
            ehr.create(resource)
            for resource in (
                quantity(reference, "8480-6", 148, "mmHg", "mm[Hg]"),
                quantity(reference, "8462-4", 91, "mmHg", "mm[Hg]"),
                quantity(reference, "2093-3", 241, "mg/dL", "mg/dL"),
                quantity(reference, "2085-9", 44, "mg/dL", "mg/dL"),
                quantity(reference, "39156-5", 29.4, "kg/m2", "kg/m2"),
                nsclc(reference),
                egfr_l858r(reference),
                note(reference, "Three days of fever and productive cough. Denies chest pain."),
            )
        ),
    ]
    with deployment(tmp_path / "cb", models_dir, ehr, key) as carebridge:
        carebridge.start()
        carebridge.start_fhir()
        events = post_to_carebridge(carebridge, sent)
        assert len(events) == len(sent)

        wait_until(
            lambda: (
                the_ehr_has(ehr, "RiskAssessment", reference)
                and the_ehr_has(ehr, "CarePlan", reference)
            ),
            timeout=120,
            what="a RiskAssessment and a CarePlan in the EHR",
        )
        (assessment,) = the_ehr_has(ehr, "RiskAssessment", reference)
        assert assessment["status"] == "preliminary"
        outcomes = {p["outcome"]["coding"][0]["code"]: p for p in assessment["prediction"]}
        assert set(outcomes) == {"49601007", "73211009"}
        assert all(0 < p["probabilityDecimal"] < 1 for p in outcomes.values())
        basis = {b["reference"] for b in assessment["basis"]}
        assert {f"Observation/{r['id']}" for r in sent[1:6]} <= basis
        device = ehr.read(*assessment["performer"]["reference"].split("/"))
        assert device["resourceType"] == "Device" and device["version"]
        (careplan,) = the_ehr_has(ehr, "CarePlan", reference)
        assert (careplan["status"], careplan["intent"]) == ("draft", "proposal")
        products = json.dumps([a["detail"]["productCodeableConcept"] for a in careplan["activity"]])
        assert "osimertinib" in products.lower()
        provenances = ehr.search("Provenance", target=f"RiskAssessment/{assessment['id']}")
        assert len(provenances) == 1

        # The EHR's CDS Hooks call gets a card for the same suggestion.
        cards = httpx.post(
            f"{carebridge.fhir_url}/cds-services/carebridge-treatment",
            json={
                "hook": "patient-view",
                "hookInstance": "e2e",
                "context": {"patientId": patient["id"], "userId": "Practitioner/1"},
            },
            headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"},
            timeout=30,
        ).json()["cards"]
        assert "osimertinib" in cards[0]["summary"].lower()

        # The audit trail: what came in, what was made, whether the EHR took it.
        audit = carebridge.audit_show(reference)
        assert len(audit["resources"]) == len(sent)
        assert {r["pipeline"] for r in audit["results"]} == {
            "risk-scoring",
            "treatment-suggestion",
            "symptom-analysis",
        }
        assert all(d["status"] == "sent" for d in audit["deliveries"])
        assert all(
            entry["status"].startswith("201")
            for d in audit["deliveries"]
            for entry in d["response"]["entries"]
        )
        types = [e["type"] for e in audit["events"]]
        assert "fhir.event_processed" in types and "delivery.sent" in types
        assert carebridge.cli("audit", "verify").returncode == 0
        assert endpoint.requests_of(CLIENT_ID)  # SMART Backend Services tokens were used

        # An id-only Subscription notification: carebridge reads the resource from the EHR,
        # and the new blood pressure gives a second assessment based on it.
        newer = ehr.create(quantity(reference, "8480-6", 122, "mmHg", "mm[Hg]"))
        notify(carebridge, f"{ehr.base_url}/Observation/{newer['id']}")
        wait_until(
            lambda: len(the_ehr_has(ehr, "RiskAssessment", reference)) == 2,
            timeout=120,
            what="a second RiskAssessment from the id-only notification",
        )
        bases = [
            {b["reference"] for b in a["basis"]}
            for a in the_ehr_has(ehr, "RiskAssessment", reference)
        ]
        assert any(f"Observation/{newer['id']}" in basis for basis in bases)
        processed = [
            e["detail"]
            for e in carebridge.audit_show(reference)["events"]
            if e["type"] == "fhir.event_processed"
        ]
        assert any(
            d["fetched"] and d["resource"] == f"Observation/{newer['id']}" for d in processed
        )
        carebridge.stop()
        logs = carebridge.logs()
    assert PHI_NAME.split("^")[0] not in logs and "1961-05-14" not in logs


def test_ehr_down_then_back_each_result_lands_once(
    tmp_path: Path,
    models_dir: Path,
    ehr: FhirServerPeer,
    smart: tuple[TokenEndpoint, Path],
) -> None:
    _, key = smart
    reference = "Patient/down-then-back"
    resources = [
        {
            "resourceType": "Patient",
            "id": "down-then-back",
            "gender": "male",
            "birthDate": "1958-01-01",
        },
        {**quantity(reference, "8480-6", 162, "mmHg", "mm[Hg]"), "id": "sbp-1"},
        {**quantity(reference, "2093-3", 250, "mg/dL", "mg/dL"), "id": "chol-1"},
    ]
    with deployment(tmp_path / "cb", models_dir, ehr, key) as carebridge:
        carebridge.start()
        carebridge.start_fhir()
        ehr.stop()
        try:
            post_to_carebridge(carebridge, resources)
            wait_until(
                lambda: (
                    carebridge.scalar(
                        "select count(*) from deliveries where attempts >= 2 and status = 'pending'"
                    )
                    == 1
                ),
                timeout=120,
                what="a delivery retried while the EHR is down",
            )
        finally:
            ehr.start()
        wait_until(
            lambda: carebridge.scalar("select status from deliveries") == "sent",
            timeout=120,
            what="the delivery to be sent once the EHR is back",
        )
        (assessment,) = ehr.search("RiskAssessment", subject=reference)
        identifier = assessment["identifier"][0]
        assert (
            len(
                ehr.search(
                    "RiskAssessment", identifier=f"{identifier['system']}|{identifier['value']}"
                )
            )
            == 1
        )
        report = carebridge.audit_show(reference)
        (delivery,) = report["deliveries"]
        assert delivery["attempts"] >= 2
        assert "delivery.retry" in [e["type"] for e in report["events"]]


def test_webhook_killed_right_after_its_202_the_event_is_still_processed(
    tmp_path: Path,
    models_dir: Path,
    ehr: FhirServerPeer,
    smart: tuple[TokenEndpoint, Path],
) -> None:
    _, key = smart
    reference = "Patient/killed-after-202"
    resources = [
        {
            "resourceType": "Patient",
            "id": "killed-after-202",
            "gender": "female",
            "birthDate": "1970-07-07",
        },
        {**quantity(reference, "8480-6", 139, "mmHg", "mm[Hg]"), "id": "sbp-k"},
    ]
    with deployment(tmp_path / "cb", models_dir, ehr, key) as carebridge:
        carebridge.start()
        carebridge.start_fhir()
        post_to_carebridge(carebridge, resources)
        carebridge.kill("fhir", signal.SIGKILL)
        wait_until(
            lambda: ehr.search("RiskAssessment", subject=reference),
            timeout=120,
            what="the RiskAssessment of events taken before the kill",
        )
        assert carebridge.scalar("select count(*) from fhir_events where status = 'processed'") == 2

        # A notification numbered 3 when 1 was the last: event 2 of this Subscription was
        # missed. The EHR has no $events, so carebridge searches the Subscription's
        # criteria and files the missed Observation.
        subscription = ehr.create(
            {
                "resourceType": "Subscription",
                "status": "active",
                "reason": "carebridge",
                "criteria": f"Observation?subject={reference}",
                "channel": {"type": "rest-hook", "endpoint": f"{carebridge.fhir_url}/fhir/notify"},
            }
        )
        missed = ehr.create(quantity(reference, "8462-4", 88, "mmHg", "mm[Hg]"))
        latest = ehr.create(quantity(reference, "2093-3", 212, "mg/dL", "mg/dL"))
        carebridge.start_fhir()
        notify(carebridge, f"Observation/{latest['id']}", f"Subscription/{subscription['id']}", 1)
        notify(carebridge, f"Observation/{latest['id']}", f"Subscription/{subscription['id']}", 3)
        catch_up = wait_until(
            lambda: [e for e in all_events(carebridge) if e["type"] == "fhir.catch_up"],
            timeout=120,
            what="the catch-up of the missed events",
        )
        assert catch_up[0]["detail"]["method"] == "search"
        assert f"Observation/{missed['id']}" in catch_up[0]["detail"]["resources"]
