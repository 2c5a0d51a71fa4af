"""Tests of worker.outputs.fhir: valid R4, labelled AI, conditional creates, retry-safe."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.provenance import CodedLabel, ModelProvenance, device_uid_for
from tests.fhir_peer import FhirServerPeer
from worker.outputs.dicom_sr import COMPREHENSIVE_3D_SR_STORAGE, SRReference
from worker.outputs.fhir import (
    AI_ASSERTED,
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    UNVERIFIED_TAG,
    CandidateCondition,
    Coding,
    Concept,
    FhirOutput,
    FhirValidationError,
    ImagingFinding,
    OrganVolume,
    ResourceRef,
    ResultContext,
    RiskOutcome,
    SubjectRef,
    TreatmentProposal,
    bundle_bytes,
    device_resource,
    imaging_report,
    liver_volume_observation,
    risk_assessment,
    symptom_report,
    transaction_bundle,
    treatment_careplan,
    validate_r4,
    write_bundle,
)
from worker.outputs.fhir_schema import SCHEMA_FILE

SHA = "0123456789abcdef" * 4
WHEN = datetime(2024, 1, 2, 10, 30, tzinfo=UTC)
PATIENT = SubjectRef.literal("Patient/p-1")
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SR = SRReference(
    study_instance_uid=STUDY_UID,
    series_instance_uid="1.2.826.0.1.3680043.8.498.2",
    sop_class_uid=COMPREHENSIVE_3D_SR_STORAGE,
    sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
)
SEG = SRReference(
    STUDY_UID,
    "1.2.826.0.1.3680043.8.498.4",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.826.0.1.3680043.8.498.5",
)
PNEUMONIA = Concept.of(
    Coding(SNOMED, "233604007", "Pneumonia"),
    Coding(ICD10CM, "J18.9", "Pneumonia, unspecified organism"),
    text="Pneumonia",
)
ASTHMA = Concept.of(Coding(SNOMED, "195967001", "Asthma"), Coding(ICD10CM, "J45.909"))
BRONCHITIS = Concept.of(Coding(SNOMED, "32398004", "Bronchitis"))
MI = Concept.of(Coding(SNOMED, "22298006", "Myocardial infarction"))
OSIMERTINIB = Concept.of(Coding(RXNORM, "1721560", "osimertinib"), text="Osimertinib")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
REFERENCE_RE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9.\-]{1,64}")


def _provenance(demo: bool = True, name: str = "symptom-minilm") -> ModelProvenance:
    return ModelProvenance(
        name=name,
        version="0.1.0",
        device_uid=device_uid_for(name, "0.1.0"),
        weights_sha256=SHA,
        demo=demo,
    )


def _context(result_id: str, demo: bool = True, name: str = "symptom-minilm") -> ResultContext:
    return ResultContext(result_id, PATIENT, _provenance(demo, name), WHEN)


def _symptom(demo: bool = True) -> FhirOutput:
    return symptom_report(
        _context("r-1", demo),
        [
            CandidateCondition(ASTHMA, 0.2),
            CandidateCondition(PNEUMONIA, 0.7),
            CandidateCondition(BRONCHITIS, 0.1),
        ],
        inputs=[ResourceRef("DocumentReference/note-1"), ResourceRef("Encounter/e-1")],
        conclusion_count=2,
    )


def _risk(demo: bool = True) -> FhirOutput:
    return risk_assessment(
        _context("r-2", demo, "risk-mlp"),
        [RiskOutcome(MI, 0.125, (0, 10), "LDL and blood pressure above range")],
        basis=[ResourceRef("Observation/ldl-1"), ResourceRef("Observation/bp-1")],
    )


def _treatment(demo: bool = True) -> FhirOutput:
    return treatment_careplan(
        _context("r-3", demo, "treatment-biomarker"),
        [
            TreatmentProposal(
                OSIMERTINIB,
                evidence_level="1",
                evidence_source="OncoKB (EGFR L858R)",
                reason=Concept.of(Coding(SNOMED, "254637007", "Non-small cell lung cancer")),
            )
        ],
        supporting_info=[ResourceRef("Observation/egfr-1")],
    )


def _imaging(demo: bool = True, png: bytes | None = PNG) -> FhirOutput:
    finding = ImagingFinding(
        Concept.of(
            Coding.from_coded_label(CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia"))
        ),
        0.83,
        {"normal": 0.1, "pneumonia": 0.83, "lung cancer": 0.07},
    )
    return imaging_report(_context("r-4", demo, "cxr-resnet18"), finding, sr=SR, rendering_png=png)


def _liver(demo: bool = True) -> FhirOutput:
    return liver_volume_observation(
        _context("r-5", demo, "liver-unet"),
        OrganVolume(1532.25),
        study_instance_uid=STUDY_UID,
        dicom_outputs=[SEG, SR],
    )


BUILDERS: dict[str, Callable[..., FhirOutput]] = {
    "symptom": _symptom,
    "risk": _risk,
    "treatment": _treatment,
    "imaging": _imaging,
    "liver": _liver,
}
OUTPUT_TYPES = {"DiagnosticReport", "Observation", "RiskAssessment", "CarePlan"}


def _of_type(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type
    ]


def _references(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


# ------------------------------------------------------------------------------ validity
@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("demo", [True, False])
def test_every_resource_and_bundle_is_valid_r4(kind: str, demo: bool) -> None:
    output = BUILDERS[kind](demo)
    for resource in output.resources():
        validate_r4(resource)
    validate_r4(transaction_bundle([output]))


def test_all_results_in_one_bundle_are_valid() -> None:
    bundle = transaction_bundle([build() for build in BUILDERS.values()])
    validate_r4(bundle)
    # One Device per model, one ImagingStudy for the study shared by imaging and liver.
    assert len(_of_type(bundle, "Device")) == 5
    assert len(_of_type(bundle, "ImagingStudy")) == 1
    assert len(_of_type(bundle, "Provenance")) == 5


def test_packaged_schema_is_hl7_r4_401_without_vendor_additions() -> None:
    import worker.outputs

    path = Path(worker.outputs.__file__).parent / SCHEMA_FILE
    schema = json.loads(gzip.decompress(path.read_bytes()))
    assert schema["$schema"] == "http://json-schema.org/draft-06/schema#"
    definitions = schema["definitions"]
    assert "4.0.1" in definitions["StructureDefinition"]["properties"]["fhirVersion"]["enum"]
    assert "Project" not in definitions and "project" not in definitions["Meta"]["properties"]
    assert len(schema["discriminator"]["mapping"]) == 146


# -------------------------------------------------------------------- invalid is refused
def _risk_resource() -> dict[str, Any]:
    return copy.deepcopy(dict(_risk().resources("RiskAssessment")[0]))


def _refusal(resource: dict[str, Any]) -> FhirValidationError:
    with pytest.raises(FhirValidationError) as caught:
        validate_r4(resource)
    return caught.value


def test_probability_of_wrong_type_is_refused_with_its_path() -> None:
    resource = _risk_resource()
    resource["prediction"][0]["probabilityDecimal"] = "0.125"
    error = _refusal(resource)
    assert error.problems == (
        "RiskAssessment.prediction[0].probabilityDecimal: must be of JSON type number",
    )


def test_missing_status_is_refused() -> None:
    resource = _risk_resource()
    del resource["status"]
    assert "RiskAssessment.status" in str(_refusal(resource))


def test_unknown_status_code_is_refused() -> None:
    resource = copy.deepcopy(dict(_symptom().resources("Observation")[0]))
    resource["status"] = "probable"
    error = _refusal(resource)
    assert error.problems[0].startswith("Observation.status: must be one of registered,")


def test_two_values_of_one_choice_element_are_refused() -> None:
    resource = _risk_resource()
    resource["prediction"][0]["probabilityRange"] = {"low": {"value": 0.1}}
    assert "RiskAssessment.prediction[0]" in str(_refusal(resource))


def test_unknown_element_and_bad_primitive_are_both_named() -> None:
    resource = _risk_resource()
    resource["confidence"] = 0.9
    resource["occurrenceDateTime"] = "2 Jan 2024"
    message = str(_refusal(resource))
    assert "'confidence' was unexpected" in message
    assert "RiskAssessment.occurrenceDateTime: is not a valid FHIR dateTime" in message
    assert "2 Jan 2024" not in message  # values are never echoed


def test_problems_inside_a_bundle_name_the_entry() -> None:
    bundle = transaction_bundle([_risk()])
    bundle["entry"][0]["request"]["method"] = "CREATE"
    index = next(
        i for i, e in enumerate(bundle["entry"]) if e["request"]["url"] == "RiskAssessment"
    )
    del bundle["entry"][index]["resource"]["status"]
    problems = _refusal(bundle).problems
    assert problems[0].startswith("Bundle.entry[0].request.method: must be one of")
    assert problems[1].startswith(f"Bundle.entry[{index}].resource.ofType(RiskAssessment).status:")


def test_not_a_resource_is_refused() -> None:
    assert "not an R4 resource type" in str(_refusal({"resourceType": "Finding"}))


def test_transaction_bundle_refuses_an_invalid_resource() -> None:
    output = _risk()
    resource = next(e.resource for e in output.entries if e.resource["resourceType"] == "Device")
    resource["status"] = "on"  # type: ignore[index]
    with pytest.raises(
        FhirValidationError, match=r"resource\.ofType\(Device\)\.status: must be one of active"
    ):
        transaction_bundle([output])


@pytest.mark.parametrize(
    "make",
    [
        lambda: RiskOutcome(MI, 1.5),
        lambda: RiskOutcome(MI, 0.5, (5, 1)),
        lambda: CandidateCondition(Concept.of(Coding(LOINC, "1234-5")), 0.5),
        lambda: CandidateCondition(PNEUMONIA, float("nan")),
        lambda: TreatmentProposal(MI, "1", "source"),
        lambda: TreatmentProposal(OSIMERTINIB, " ", "source"),
        lambda: OrganVolume(-1.0),
        lambda: ImagingFinding(PNEUMONIA, 0.5, {"normal": 2.0}),
        lambda: Coding("snomed", "1"),
        lambda: Coding(SNOMED, " 1"),
        lambda: Concept(),
        lambda: SubjectRef.literal("Observation/1"),
        lambda: SubjectRef.literal("Patient/../x"),
        lambda: ResourceRef("http://ehr.example/Observation/1"),
        lambda: ResultContext("r|1", PATIENT, _provenance(), WHEN),
        lambda: ResultContext("r-1", PATIENT, _provenance(), datetime(2024, 1, 2)),
        lambda: Coding.from_coded_label(CodedLabel("x", "1", "99OTHER", "X")),
    ],
)
def test_typed_inputs_refuse_bad_values(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


# -------------------------------------------------------------- AI label and provenance
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_outputs_are_labelled_ai_generated_unverified_and_demo(kind: str) -> None:
    output = BUILDERS[kind](True)
    outputs = [r for r in output.resources() if r["resourceType"] in OUTPUT_TYPES]
    assert outputs
    for resource in outputs:
        assert AI_ASSERTED.as_fhir() in resource["meta"]["security"]
        tags = {tag["code"] for tag in resource["meta"]["tag"]}
        assert tags == {UNVERIFIED_TAG.code, "demo-weights"}
        assert resource["status"] in ("preliminary", "draft")
        assert "DEMO WEIGHTS - not for clinical use" in json.dumps(resource)
        assert resource["identifier"][0]["system"] == "urn:carebridge:result"
    for resource in BUILDERS[kind](False).resources():
        assert "DEMO WEIGHTS" not in json.dumps(resource)


def test_device_names_model_version_uid_and_weights() -> None:
    provenance = _provenance(demo=True, name="cxr-resnet18")
    device = device_resource(provenance)
    assert device["identifier"][0]["system"] == "urn:dicom:uid"
    assert device["identifier"][0]["value"] == f"urn:oid:{provenance.device_uid}"
    assert device["deviceName"] == [{"name": "cxr-resnet18", "type": "model-name"}]
    assert device["version"] == [{"value": "0.1.0"}]
    assert device["property"][0]["valueCode"][0]["text"] == SHA
    assert {"text": "DEMO WEIGHTS - not for clinical use"} in device["note"]
    assert "DEMO" not in json.dumps(device_resource(_provenance(demo=False)))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_provenance_targets_outputs_with_device_as_author_and_inputs_as_sources(
    kind: str,
) -> None:
    bundle = transaction_bundle([BUILDERS[kind]()])
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    (provenance,) = _of_type(bundle, "Provenance")
    targets = {ref["reference"] for ref in provenance["target"]}
    assert targets == {url for url, r in by_url.items() if r["resourceType"] in OUTPUT_TYPES}
    (agent,) = provenance["agent"]
    assert agent["type"]["coding"][0]["code"] == "author"
    assert by_url[agent["who"]["reference"]]["resourceType"] == "Device"
    assert provenance["recorded"] == "2024-01-02T10:30:00+00:00"
    sources = {entity["what"]["reference"] for entity in provenance["entity"]}
    assert all(entity["role"] == "source" for entity in provenance["entity"])
    expected = {
        "symptom": {"DocumentReference/note-1", "Encounter/e-1"},
        "risk": {"Observation/ldl-1", "Observation/bp-1"},
        "treatment": {"Observation/egfr-1"},
    }.get(kind)
    if expected is None:  # imaging: the ImagingStudy is the source
        expected = {url for url, r in by_url.items() if r["resourceType"] == "ImagingStudy"}
    assert sources == expected


# --------------------------------------------------------------------- the five results
def test_symptom_report_ranks_candidates_and_concludes_with_the_top_ones() -> None:
    bundle = transaction_bundle([_symptom()])
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    (report,) = _of_type(bundle, "DiagnosticReport")
    assert report["code"]["coding"][0] == {
        "system": LOINC,
        "code": "51848-0",
        "display": "Evaluation note",
    }
    results = [by_url[ref["reference"]] for ref in report["result"]]
    assert [r["valueQuantity"]["value"] for r in results] == [0.7, 0.2, 0.1]
    assert results[0]["code"] == PNEUMONIA.as_fhir()
    assert {c["system"] for c in results[0]["code"]["coding"]} == {SNOMED, ICD10CM}
    assert results[0]["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert report["conclusionCode"] == [PNEUMONIA.as_fhir(), ASTHMA.as_fhir()]
    assert report["conclusion"].startswith("Candidate conditions: Pneumonia (70%), Asthma")
    # Encounter is not a type Observation.derivedFrom may point to in R4.
    assert results[0]["derivedFrom"] == [{"reference": "DocumentReference/note-1"}]


def test_risk_assessment_is_performed_by_the_device_on_its_basis() -> None:
    bundle = transaction_bundle([_risk()])
    (device,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
    (risk,) = _of_type(bundle, "RiskAssessment")
    assert risk["performer"] == {"reference": device["fullUrl"]}
    assert risk["basis"] == [{"reference": "Observation/ldl-1"}, {"reference": "Observation/bp-1"}]
    (prediction,) = risk["prediction"]
    assert prediction["outcome"] == MI.as_fhir()
    assert prediction["probabilityDecimal"] == 0.125
    assert prediction["whenRange"]["high"] == {
        "value": 10.0,
        "unit": "years",
        "system": "http://unitsofmeasure.org",
        "code": "a",
    }
    assert prediction["rationale"] == "LDL and blood pressure above range"
    assert "risk-mlp 0.1.0" in risk["method"]["text"]


def test_careplan_is_a_draft_proposal_citing_its_evidence() -> None:
    bundle = transaction_bundle([_treatment()])
    (plan,) = _of_type(bundle, "CarePlan")
    assert (plan["status"], plan["intent"]) == ("draft", "proposal")
    assert plan["supportingInfo"] == [{"reference": "Observation/egfr-1"}]
    (activity,) = plan["activity"]
    detail = activity["detail"]
    assert detail["kind"] == "MedicationRequest"
    assert detail["status"] == "not-started"
    assert detail["productCodeableConcept"]["coding"][0]["system"] == RXNORM
    assert "Evidence level 1" in detail["description"]
    assert "OncoKB (EGFR L858R)" in detail["description"]
    assert plan["author"]["reference"].startswith("urn:uuid:")


def test_imaging_report_carries_the_sr_uids_study_and_rendering() -> None:
    bundle = transaction_bundle([_imaging()])
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    (report,) = _of_type(bundle, "DiagnosticReport")
    identifiers = {(i["system"], i["value"]) for i in report["identifier"]}
    assert ("urn:dicom:uid", f"urn:oid:{SR.sop_instance_uid}") in identifiers
    assert ("urn:dicom:uid", f"urn:oid:{SR.series_instance_uid}") in identifiers
    assert report["code"]["coding"][0]["code"] == "30745-4"
    study = by_url[report["imagingStudy"][0]["reference"]]
    assert study["identifier"][0]["value"] == f"urn:oid:{STUDY_UID}"
    (finding,) = [by_url[ref["reference"]] for ref in report["result"]]
    assert finding["code"]["coding"][0] == {
        "system": SNOMED,
        "code": "233604007",
        "display": "Pneumonia",
    }
    assert finding["valueQuantity"]["value"] == 0.83
    assert [c["code"]["text"] for c in finding["component"]] == [
        "lung cancer",
        "normal",
        "pneumonia",
    ]
    assert report["conclusionCode"] == [finding["code"]]
    (form,) = report["presentedForm"]
    assert form["contentType"] == "image/png"
    assert base64.b64decode(form["data"]) == PNG
    assert "presentedForm" not in _imaging(png=None).resources("DiagnosticReport")[0]


def test_liver_volume_is_in_millilitres_at_the_liver() -> None:
    bundle = transaction_bundle([_liver()])
    (observation,) = _of_type(bundle, "Observation")
    assert observation["code"]["coding"][0]["code"] == "118565006"
    assert observation["bodySite"]["coding"][0]["code"] == "10200004"
    assert observation["valueQuantity"] == {
        "value": 1532.25,
        "unit": "mL",
        "system": "http://unitsofmeasure.org",
        "code": "mL",
    }
    (study,) = _of_type(bundle, "ImagingStudy")
    assert observation["derivedFrom"][0]["reference"] in {
        e["fullUrl"] for e in bundle["entry"] if e["resource"] is study
    }
    values = {i["value"] for i in observation["identifier"]}
    assert {f"urn:oid:{SEG.sop_instance_uid}", f"urn:oid:{SR.sop_instance_uid}"} <= values


# -------------------------------------------------------------------------- the bundle
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_every_entry_is_a_conditional_create_on_its_business_identifier(kind: str) -> None:
    bundle = transaction_bundle([BUILDERS[kind]()])
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        resource, request = entry["resource"], entry["request"]
        assert re.fullmatch(r"urn:uuid:[0-9a-f\-]{36}", entry["fullUrl"])
        assert request["method"] == "POST"
        assert request["url"] == resource["resourceType"]
        param, _, token = request["ifNoneExist"].partition("=")
        system, _, value = token.partition("|")
        if resource["resourceType"] == "Provenance":
            assert param == "_tag"
            assert {"system": system, "code": value} in resource["meta"]["tag"]
        else:
            assert param == "identifier"
            assert {"system": system, "value": value} in [
                {"system": i["system"], "value": i["value"]} for i in resource["identifier"]
            ]


def test_references_resolve_inside_the_bundle_or_are_literal() -> None:
    bundle = transaction_bundle([build() for build in BUILDERS.values()])
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
    references = list(_references(bundle))
    internal = [ref for ref in references if ref.startswith("urn:uuid:")]
    assert internal and set(internal) <= full_urls
    for ref in references:
        assert ref in full_urls or REFERENCE_RE.fullmatch(ref), ref


def test_a_retry_builds_the_same_bytes() -> None:
    first = bundle_bytes(transaction_bundle([build() for build in BUILDERS.values()]))
    again = bundle_bytes(transaction_bundle([build() for build in BUILDERS.values()]))
    assert first == again


def test_another_result_gets_other_identifiers_but_the_same_device() -> None:
    candidates = [CandidateCondition(PNEUMONIA, 0.7)]
    one = transaction_bundle([symptom_report(_context("r-7"), candidates)])
    two = transaction_bundle([symptom_report(_context("r-8"), candidates)])
    urls_one = {e["fullUrl"]: e["resource"]["resourceType"] for e in one["entry"]}
    urls_two = {e["fullUrl"]: e["resource"]["resourceType"] for e in two["entry"]}
    assert {urls_one[url] for url in urls_one.keys() & urls_two.keys()} == {"Device"}


def test_two_different_resources_with_one_identifier_are_refused() -> None:
    demo, real = _symptom(demo=True), _symptom(demo=False)
    with pytest.raises(ValueError, match="share the business identifier"):
        transaction_bundle([demo, real])


def test_subject_by_identifier_is_a_logical_reference() -> None:
    context = ResultContext(
        "r-6",
        SubjectRef.by_identifier("urn:oid:1.2.36.146.595.217.0.1", "MRN-12"),
        _provenance(),
        WHEN,
    )
    bundle = transaction_bundle([risk_assessment(context, [RiskOutcome(MI, 0.3)])])
    (risk,) = _of_type(bundle, "RiskAssessment")
    assert risk["subject"] == {
        "type": "Patient",
        "identifier": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-12"},
    }


def test_write_bundle_is_atomic_and_reads_back(tmp_path: Path) -> None:
    bundle = transaction_bundle([_imaging()])
    path = tmp_path / "out" / "bundle.json"
    assert write_bundle(bundle, path) == bundle
    assert path.read_bytes() == bundle_bytes(bundle)
    smaller = transaction_bundle([_risk()])
    assert write_bundle(smaller, path) == smaller  # replaces the file
    assert [p.name for p in path.parent.iterdir()] == ["bundle.json"]


# ------------------------------------------------------------------ against a FHIR server
@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServerPeer]:
    with FhirServerPeer(tmp_path_factory.mktemp("ehr")) as server:
        yield server


def _post(ehr: FhirServerPeer, bundle: dict[str, Any]) -> list[str]:
    response = httpx.post(
        f"{ehr.base_url}/",
        content=bundle_bytes(bundle),
        headers={"Content-Type": "application/fhir+json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    return [entry["response"]["status"][:3] for entry in response.json()["entry"]]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_fhir_server_accepts_each_bundle_and_a_retry_creates_nothing(
    ehr: FhirServerPeer, kind: str
) -> None:
    bundle = transaction_bundle([BUILDERS[kind]()])
    first = _post(ehr, bundle)
    for entry, status in zip(bundle["entry"], first, strict=True):
        if entry["resource"]["resourceType"] in {"Provenance", *OUTPUT_TYPES}:
            assert status == "201"
    assert set(_post(ehr, bundle)) == {"200"}  # every entry found, none created
    for resource_type in ("Provenance", *OUTPUT_TYPES):
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] != resource_type:
                continue
            param, _, token = entry["request"]["ifNoneExist"].partition("=")
            assert len(ehr.search(resource_type, **{param: token})) == 1
