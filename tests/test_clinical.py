"""The clinical path in one process: FHIR events filed under their patient, a quiet patient
routed to the clinical pipelines, each pipeline's result and its FHIR Bundle, and the CDS
Hooks cards answered from the stored suggestions."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.engine import Database
from db.fhir_events import record_event
from db.migrate import upgrade
from db.schema import (
    AuditEvent,
    ClinicalResource,
    FhirEvent,
    FhirEventSource,
    FhirEventStatus,
    Job,
    JobStatus,
    OutputObject,
    Result,
    utcnow,
)
from listeners.fhir import create_app
from worker.clinical import process_event
from worker.clinical_rules import ClinicalRules, RulesError
from worker.jobs import execute_job
from worker.outputs.fhir import validate_r4
from worker.routing import RoutingRules
from worker.runtime import Runtime
from worker.settings import Settings
from worker.sweeper import Sweeper

PATIENT = "Patient/p-1"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


class Dispatcher:
    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.deliveries: list[int] = []
        self.events: list[int] = []

    def publish_job(self, job_id: int, queue: str) -> bool:
        self.jobs.append(job_id)
        return True

    def publish_delivery(self, delivery_id: int) -> bool:
        self.deliveries.append(delivery_id)
        return True

    def publish_fhir_event(self, event_id: int) -> str | None:
        self.events.append(event_id)
        return f"task-{event_id}"


def quantity(ident: str, code: str, value: float, unit: str, ucum: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": ident,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": PATIENT},
        "effectiveDateTime": "2026-11-20T09:00:00Z",
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }


def component(code: str, value: Any) -> dict[str, Any]:
    return {"code": {"coding": [{"system": LOINC, "code": code}]}, **value}


VITALS_AND_LABS = [
    {
        "resourceType": "Patient",
        "id": "p-1",
        "gender": "male",
        "birthDate": "1964-03-02",
    },
    quantity("sbp", "8480-6", 152, "mmHg", "mm[Hg]"),
    quantity("dbp", "8462-4", 94, "mmHg", "mm[Hg]"),
    quantity("chol", "2093-3", 232, "mg/dL", "mg/dL"),
    quantity("hdl", "2085-9", 38, "mg/dL", "mg/dL"),
    quantity("bmi", "39156-5", 31.2, "kg/m2", "kg/m2"),
    quantity("a1c", "4548-4", 6.1, "%", "%"),
]
NSCLC = {
    "resourceType": "Condition",
    "id": "nsclc",
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active",
            }
        ]
    },
    "code": {
        "coding": [
            {
                "system": "http://hl7.org/fhir/sid/icd-10-cm",
                "code": "C34.90",
                "display": "Malignant neoplasm of unspecified part of unspecified lung",
            },
            {
                "system": "http://snomed.info/sct",
                "code": "254637007",
                "display": "Non-small cell lung cancer",
            },
        ]
    },
    "subject": {"reference": PATIENT},
}
EGFR_L858R = {
    "resourceType": "Observation",
    "id": "egfr",
    "status": "final",
    "code": {
        "coding": [{"system": LOINC, "code": "69548-6", "display": "Genetic variant assessment"}]
    },
    "subject": {"reference": PATIENT},
    "valueCodeableConcept": {
        "coding": [{"system": LOINC, "code": "LA9633-4", "display": "Present"}]
    },
    "component": [
        component(
            "48018-6",
            {
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://www.genenames.org/geneId",
                            "code": "HGNC:3236",
                            "display": "EGFR",
                        }
                    ]
                }
            },
        ),
        component(
            "48005-3",
            {
                "valueCodeableConcept": {
                    "coding": [{"system": "http://varnomen.hgvs.org", "code": "p.Leu858Arg"}]
                }
            },
        ),
    ],
}


@pytest.fixture
def deployment(tmp_path: Path, models_dir: Path) -> Iterator[tuple[Runtime, Dispatcher]]:
    url = f"sqlite:///{tmp_path / 'carebridge.db'}"
    upgrade(url)
    database = Database(url)
    settings = Settings(
        database_url=url,
        archive_dir=tmp_path / "archive",
        models_dir=models_dir,
        patient_stable_seconds=2,
    )
    dispatcher = Dispatcher()
    runtime = Runtime(settings, database, dispatcher, RoutingRules.load(None))  # type: ignore[arg-type]
    yield runtime, dispatcher
    database.dispose()


def receive(runtime: Runtime, resources: list[dict[str, Any]]) -> list[int]:
    """Record each resource as the webhook would, then process it as the worker would."""
    ids = []
    with runtime.database.session() as session:
        for resource in resources:
            event = record_event(
                session,
                source=FhirEventSource.DIRECT,
                fhir_version="R4",
                resource_type=resource["resourceType"],
                resource_id=resource.get("id"),
                body=resource,
                body_sha256="0" * 64,
            )
            ids.append(event.id)
    for event_id in ids:
        process_event(runtime, event_id)
    return ids


def route(runtime: Runtime, dispatcher: Dispatcher) -> list[int]:
    """Route the quiet patients and run every job created."""
    sweeper = Sweeper(runtime.settings, runtime.database, dispatcher, runtime.rules)  # type: ignore[arg-type]
    before = len(dispatcher.jobs)
    sweeper.sweep_once(utcnow() + timedelta(seconds=10))
    created = dispatcher.jobs[before:]
    for job_id in created:
        execute_job(runtime, job_id)
    return created


def test_vitals_labs_and_biomarkers_give_one_risk_assessment_and_one_careplan(
    deployment: tuple[Runtime, Dispatcher],
) -> None:
    runtime, dispatcher = deployment
    event_ids = receive(runtime, [*VITALS_AND_LABS, NSCLC, EGFR_L858R])
    with runtime.database.session() as session:
        statuses = session.execute(select(FhirEvent.status)).scalars().all()
        assert set(statuses) == {FhirEventStatus.PROCESSED} and len(statuses) == len(event_ids)
        assert len(session.execute(select(ClinicalResource)).all()) == len(event_ids)

    jobs = route(runtime, dispatcher)
    assert len(jobs) == 2  # one risk scoring, one treatment suggestion: not one per event
    with runtime.database.session() as session:
        rows = {j.pipeline: j for j in session.execute(select(Job)).scalars()}
        assert {p: j.status for p, j in rows.items()} == {
            "risk-scoring": JobStatus.SUCCEEDED,
            "treatment-suggestion": JobStatus.SUCCEEDED,
        }, {p: j.error for p, j in rows.items()}
        results = {r.pipeline: r for r in session.execute(select(Result)).scalars()}
        risk = results["risk-scoring"]
        assert risk.model_name == "risk-mlp" and risk.demo_weights is True
        predictions = risk.details["predictions"]
        assert {p["outcome"]["code"] for p in predictions} == {"49601007", "73211009"}
        assert all(0 < p["probability"] < 1 for p in predictions)
        treatment = results["treatment-suggestion"]
        assert "osimertinib" in treatment.details["suggestions"][0]["therapy"]["display"].lower()
        outputs = session.execute(select(OutputObject)).scalars().all()
        paths = [runtime.settings.archive_dir / o.path for o in outputs]
        kinds = {o.kind for o in outputs}
        subjects = {e.subject for e in session.execute(select(AuditEvent)).scalars()}
    assert kinds == {"fhir-bundle"}
    for path in paths:
        bundle = json.loads(path.read_text())
        validate_r4(bundle)
        types = {entry["resource"]["resourceType"] for entry in bundle["entry"]}
        assert {"Device", "Provenance"} <= types
        assert types & {"RiskAssessment", "CarePlan"}
        for entry in bundle["entry"]:
            assert entry["request"]["method"] == "POST" and entry["request"]["ifNoneExist"]
    assert PATIENT in subjects  # the audit trail can be read per patient

    # Nothing changed: routing the patient again runs nothing.
    receive(runtime, [VITALS_AND_LABS[1]])
    assert route(runtime, dispatcher) == []
    # A new blood pressure: a new risk assessment, the treatment suggestion stays.
    receive(runtime, [quantity("sbp", "8480-6", 118, "mmHg", "mm[Hg]")])
    (job_id,) = route(runtime, dispatcher)
    with runtime.database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.pipeline == "risk-scoring"
        assert job.status is JobStatus.SUCCEEDED


def test_a_note_gives_a_provisional_diagnostic_report_without_denied_findings(
    deployment: tuple[Runtime, Dispatcher],
) -> None:
    runtime, dispatcher = deployment
    text = (
        "62 year old with fever and productive cough for four days, shortness of breath on "
        "exertion. Crackles at the right lung base. Denies chest pain. No hemoptysis."
    )
    note = {
        "resourceType": "DocumentReference",
        "id": "note-1",
        "status": "current",
        "subject": {"reference": PATIENT},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "data": base64.b64encode(text.encode()).decode(),
                }
            }
        ],
    }
    receive(runtime, [note])
    (job_id,) = route(runtime, dispatcher)
    with runtime.database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED, job and job.error
        (result,) = session.execute(select(Result)).scalars()
        assert result.model_name == "symptoms-minilm" and result.pipeline == "symptom-analysis"
        conditions = result.details["conditions"]
        (output,) = session.execute(select(OutputObject)).scalars()
        path = runtime.settings.archive_dir / output.path
    assert 1 <= len(conditions) <= 5
    assert conditions[0]["id"] == "pneumonia" or "pneumonia" in [c["id"] for c in conditions[:3]]
    evidence = {e["finding"].lower() for c in conditions for e in c["evidence"]}
    assert "chest pain" not in evidence and "hemoptysis" not in evidence
    assert text not in json.dumps(result.details)  # the note's words stay in the EHR
    bundle = json.loads(path.read_text())
    validate_r4(bundle)
    report = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert report["status"] == "preliminary"
    observations = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    assert len(observations) == len(conditions)
    systems = {c["system"] for o in observations for c in o["code"]["coding"]}
    assert {"http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"} <= systems


def test_cds_hooks_cards_come_from_the_stored_suggestion(
    deployment: tuple[Runtime, Dispatcher],
) -> None:
    runtime, dispatcher = deployment
    receive(runtime, [NSCLC, EGFR_L858R])
    route(runtime, dispatcher)
    app = create_app(runtime.settings, runtime.database, dispatcher)  # type: ignore[arg-type]
    with TestClient(app) as client:
        services = client.get("/cds-services").json()["services"]
        assert services[0]["hook"] == "patient-view"
        service = services[0]["id"]
        answer = client.post(
            f"/cds-services/{service}",
            json={"hook": "patient-view", "hookInstance": "h-1", "context": {"patientId": "p-1"}},
        )
        assert answer.status_code == 200, answer.text
        cards = answer.json()["cards"]
        assert cards and len(cards[0]["summary"]) <= 140
        assert "osimertinib" in cards[0]["summary"].lower()
        assert cards[0]["indicator"] == "info" and cards[0]["source"]["label"]
        (action,) = cards[0]["suggestions"][0]["actions"]
        assert action["type"] == "create"
        careplan = action["resource"]
        assert careplan["resourceType"] == "CarePlan"
        assert (careplan["status"], careplan["intent"]) == ("draft", "proposal")
        assert careplan["subject"] == {"reference": PATIENT}
        assert "urn:uuid:" not in json.dumps(careplan)  # nothing that only a Bundle resolves
        validate_r4(careplan)
        nobody = client.post(
            f"/cds-services/{service}",
            json={"hook": "patient-view", "hookInstance": "h-2", "context": {"patientId": "zz"}},
        )
        assert nobody.json() == {"cards": []}
        bad = client.post(f"/cds-services/{service}", json={"hook": "order-select"})
        assert bad.status_code == 400


def test_biomarker_without_evidence_is_skipped_with_a_reason(
    deployment: tuple[Runtime, Dispatcher],
) -> None:
    runtime, dispatcher = deployment
    receive(runtime, [EGFR_L858R])  # no cancer Condition on file
    (job_id,) = route(runtime, dispatcher)
    with runtime.database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.SKIPPED
        assert "no cancer Condition" in (job.error or "")
        assert session.execute(select(Result)).first() is None


def test_a_resource_without_a_patient_fails_its_event(
    deployment: tuple[Runtime, Dispatcher],
) -> None:
    runtime, _ = deployment
    orphan = {**VITALS_AND_LABS[1], "id": "orphan"}
    del orphan["subject"]
    (event_id,) = receive(runtime, [orphan])
    with runtime.database.session() as session:
        event = session.get(FhirEvent, event_id)
        assert event is not None and event.status is FhirEventStatus.FAILED
        assert "subject" in (event.error or "")


def test_clinical_rules_cover_the_models_codes() -> None:
    from models.risk import features
    from models.treatment import biomarkers

    rules = {p.name: p for p in ClinicalRules.load().pipelines}
    risk_codes = set().union(*(s.codes for s in rules["risk-scoring"].triggers))
    for name in ("LOINC_SBP", "LOINC_DBP", "LOINC_BMI"):
        assert getattr(features, name) in risk_codes
    for name in ("LOINC_TOTAL_CHOLESTEROL", "LOINC_HDL_CHOLESTEROL", "LOINC_HBA1C"):
        assert getattr(features, name) <= risk_codes
    treatment_codes = set().union(*(s.codes for s in rules["treatment-suggestion"].triggers))
    for name in ("LOINC_VARIANT", "LOINC_MSI", "LOINC_PDL1_TPS"):
        assert getattr(biomarkers, name) in treatment_codes
    assert treatment_codes >= biomarkers.LOINC_HER2_IHC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipelines: {x: {queue: gpu, model: m, triggers: [], bogus: 1}}", "unknown keys"),
        ("pipelines: {x: {queue: fast, model: m, triggers: []}}", "queue"),
        (
            "pipelines: {x: {queue: cpu, model: m, triggers: [{resourceType: Observation, "
            "codes: ['abc']}]}}",
            "LOINC",
        ),
        ("pipelines: {x: {queue: cpu, model: m, triggers: []}}", "at least one trigger"),
    ],
)
def test_bad_clinical_rules_are_refused(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        ClinicalRules.parse(text)


def _imaging_result(
    runtime: Runtime, study_uid: str, patient_key: str, meaning: str, probability: float
) -> int:
    """A chest X-ray result as the imaging pipeline stores it, on a study of ``patient_key``."""
    from db.schema import Study, StudyState

    with runtime.database.session() as session:
        study = Study(
            study_instance_uid=study_uid,
            patient_key=patient_key,
            state=StudyState.ROUTED,
            run_number=1,
            instance_count=1,
        )
        session.add(study)
        session.flush()
        job = Job(
            study_id=study.id,
            run_number=1,
            pipeline="cxr-classification",
            queue="gpu",
            model="cxr-resnet18",
            input_hash=study_uid.replace(".", "").ljust(64, "0"),
            inputs=[],
            status=JobStatus.SUCCEEDED,
            attempts=1,
            max_attempts=3,
        )
        session.add(job)
        session.flush()
        result = Result(
            job_id=job.id,
            study_id=study.id,
            pipeline="cxr-classification",
            input_hash=job.input_hash,
            model_name="cxr-resnet18",
            model_version="1.0.0",
            device_uid="2.25.1",
            weights_sha256="0" * 64,
            demo_weights=True,
            finding_code="363358000",
            finding_scheme="SCT",
            finding_meaning=meaning,
            probability=probability,
        )
        session.add(result)
        session.flush()
        return result.id


def test_the_patients_imaging_results_join_the_treatment_context(
    deployment: tuple[Runtime, Dispatcher],
) -> None:
    """A chest X-ray of the same patient (DICOM Patient ID = the Patient's identifier in
    PATIENT_ID_SYSTEM) is in the treatment job's context and shown on the CarePlan; a
    study of another patient is not."""
    runtime, dispatcher = deployment
    system = runtime.settings.patient_id_system
    _imaging_result(runtime, "1.2.826.0.1.3680043.8.498.7", "OTHER-1", "Pneumonia", 0.91)
    older = _imaging_result(runtime, "1.2.826.0.1.3680043.8.498.8", "MRN-77", "Normal", 0.6)
    mine = _imaging_result(runtime, "1.2.826.0.1.3680043.8.498.9", "MRN-77", "Lung cancer", 0.87)
    patient = {**VITALS_AND_LABS[0], "identifier": [{"system": system, "value": "MRN-77"}]}
    receive(runtime, [patient, NSCLC, EGFR_L858R])
    route(runtime, dispatcher)
    with runtime.database.session() as session:
        job = session.execute(
            select(Job).where(Job.pipeline == "treatment-suggestion")
        ).scalar_one()
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.imaging_inputs == [mine]
        assert older not in job.imaging_inputs
        result = session.execute(select(Result).where(Result.job_id == job.id)).scalar_one()
        output = session.execute(
            select(OutputObject).where(OutputObject.result_id == result.id)
        ).scalar_one()
    (imaging,) = result.details["imaging"]
    assert imaging["study_instance_uid"] == "1.2.826.0.1.3680043.8.498.9"
    assert imaging["demo_weights"] is True
    bundle = json.loads((runtime.settings.archive_dir / output.path).read_text())
    validate_r4(bundle)
    (careplan,) = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CarePlan"
    ]
    notes = [note["text"] for note in careplan["note"]]
    assert any(
        "Imaging on file: Lung cancer (probability 0.87)" in text and "demo weights" in text
        for text in notes
    ), notes
    assert not any("Pneumonia" in text for text in notes)
    # The chest X-ray's own DiagnosticReport, by the business identifier it reaches the
    # EHR with (conditionally created there by the imaging result's Bundle).
    from worker.pipelines.fhir_output import RESULT_IDENTIFIER_SYSTEM, result_business_id

    with runtime.database.session() as session:
        cxr = session.get(Result, mine)
        assert cxr is not None
        report_id = f"{result_business_id(cxr.id, cxr.input_hash)}-report"
    imaging_refs = [ref for ref in careplan["supportingInfo"] if "identifier" in ref]
    assert imaging_refs == [
        {
            "type": "DiagnosticReport",
            "identifier": {"system": RESULT_IDENTIFIER_SYSTEM, "value": report_id},
            "display": imaging["summary"],
        }
    ]
    assert all("reference" in ref for ref in careplan["supportingInfo"] if ref not in imaging_refs)
