"""Treatment suggestion: biomarker Observations + cancer Conditions -> evidence table ->
a draft CarePlan (intent proposal) for the EHR and cards for the CDS Hooks service."""

from __future__ import annotations

import time
from typing import Any

from db.schema import Result
from models.provenance import CodedLabel
from models.treatment import TreatmentModel, parse_biomarkers, parse_cancer_types
from worker.jobs import ClaimedJob, NothingToReport
from worker.outputs.fhir import (
    RXNORM,
    Coding,
    Concept,
    LogicalRef,
    ResourceRef,
    TreatmentProposal,
    treatment_careplan,
)
from worker.pipelines.clinical import load_model, load_patient_inputs, store_result
from worker.pipelines.fhir_output import write_fhir_output
from worker.results import complete_job
from worker.runtime import Runtime

MAX_PROPOSALS = 3


def _careplan_for_card(careplan: dict[str, Any], subject: str) -> dict[str, Any]:
    """The CarePlan as a CDS Hooks action may create it: without the author, which is the
    Device's bundle-internal ``urn:uuid`` reference, and with the literal subject."""
    card = {key: value for key, value in careplan.items() if key != "author"}
    return card | {"subject": {"reference": subject}}


def _imaging_references(items: list[dict[str, Any]]) -> list[LogicalRef]:
    """The imaging results shown with the CarePlan, by the business identifiers of their
    own FHIR outputs (a result kept before these were recorded has none)."""
    references = []
    for item in items:
        reference = item.get("fhir_reference")
        if reference:
            identifier = reference["identifier"]
            references.append(
                LogicalRef(
                    reference["type"],
                    identifier["system"],
                    identifier["value"],
                    reference.get("display"),
                )
            )
    return references


def run_treatment_suggestion(runtime: Runtime, job: ClaimedJob) -> list[int]:
    """Rank therapies for the patient's biomarkers; never an order."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = load_patient_inputs(runtime, job)
    model = load_model(runtime, "treatment", job.model, TreatmentModel.load)
    timings["load_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    findings = parse_biomarkers(inputs.of_type("Observation"))
    cancers = parse_cancer_types(inputs.of_type("Condition"))
    assessment = model.assess(findings.biomarkers, cancers.cancer_types)
    if not assessment.suggestions:
        reason = "no evidence row matches the patient's biomarkers and cancer types"
        if not cancers.cancer_types:
            reason += " (no cancer Condition on file)"
        raise NothingToReport(reason)
    timings["inference_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    top = assessment.suggestions[:MAX_PROPOSALS]
    details: dict[str, Any] = {
        "suggestions": [
            {
                "rank": s.rank,
                "therapy": {
                    "display": s.therapy,
                    "system": RXNORM,
                    "codes": [{"code": d.rxnorm, "display": d.name} for d in s.drugs],
                },
                "score": s.score,
                "evidence_level": s.evidence[0].level,
                "source": s.evidence[0].citation,
                "biomarker": ", ".join(s.evidence[0].matched_findings),
                "rationale": s.rationale,
                "basis": list(s.basis),
            }
            for s in top
        ],
        "resistance": [e.citation for e in assessment.resistance],
        "findings_without_evidence": list(assessment.findings_without_evidence),
        "notes": list(assessment.notes),
        # Context only: imaging findings are shown to the clinician, never scored.
        "imaging": [finding.as_json() for finding in inputs.imaging],
    }
    first = top[0]
    finding = CodedLabel(first.therapy, first.drugs[0].rxnorm, "RXNORM", first.therapy[:64])
    stored = store_result(runtime, job, model.provenance, finding, None, details)
    proposals = [
        TreatmentProposal(
            therapy=Concept.of(
                *(Coding(RXNORM, code["code"], code["display"]) for code in s["therapy"]["codes"]),
                text=s["therapy"]["display"],
            ),
            evidence_level=s["evidence_level"],
            evidence_source=s["source"],
        )
        for s in stored.details["suggestions"]
    ]
    basis = sorted({ref for s in stored.details["suggestions"] for ref in s["basis"]})
    output = treatment_careplan(
        stored.context,
        proposals,
        supporting_info=[
            *(ResourceRef(ref) for ref in basis),
            *_imaging_references(stored.details.get("imaging", [])),
        ],
        context_notes=[item["summary"] for item in stored.details.get("imaging", [])],
    )
    written = write_fhir_output(runtime, stored.id, [output])
    if "careplan" not in stored.details:  # the CDS Hooks card's action, stored once
        careplan = dict(output.resources("CarePlan")[0])
        with runtime.database.session() as session:
            row = session.get(Result, stored.id)
            assert row is not None
            row.details = {**row.details, "careplan": _careplan_for_card(careplan, inputs.subject)}
    timings["fhir_ms"] = (time.perf_counter() - clock) * 1000
    timings["total_ms"] = sum(timings.values())
    return complete_job(runtime, job, stored.id, [written], timings)
