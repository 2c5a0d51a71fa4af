"""Risk scoring: vitals, labs and history -> deep MLP -> RiskAssessment for the EHR."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from models.provenance import CodedLabel
from models.risk import InsufficientFeaturesError, RiskModel, extract_features
from worker.jobs import ClaimedJob, NothingToReport
from worker.outputs.fhir import Coding, Concept, ResourceRef, RiskOutcome, risk_assessment
from worker.pipelines.clinical import load_model, load_patient_inputs, store_result
from worker.pipelines.fhir_output import write_fhir_output
from worker.results import complete_job
from worker.runtime import Runtime


def _outcome_concept(prediction: dict[str, Any]) -> Concept:
    label = prediction["outcome"]
    coded = CodedLabel(label["name"], label["code"], label["scheme"], label["meaning"])
    return Concept.of(Coding.from_coded_label(coded), text=label["meaning"])


def run_risk_scoring(runtime: Runtime, job: ClaimedJob) -> list[int]:
    """Predict 10-year cardiovascular and diabetes risk from the patient's context."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = load_patient_inputs(runtime, job)
    model = load_model(
        runtime, "risk", job.model, lambda path: RiskModel.load(path, runtime.settings.device)
    )
    timings["load_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    conditions = inputs.of_type("Condition")
    features = extract_features(
        inputs.of_type("Observation"),
        patient=inputs.patient(),
        conditions=conditions or None,  # none sent: diabetes is unknown, not absent
        at=datetime.now(UTC),
    )
    try:
        predictions = model.predict(features)
    except InsufficientFeaturesError as exc:
        raise NothingToReport(f"no risk assessment: {exc}") from exc
    if not predictions:
        raise NothingToReport("no risk assessment: no outcome applies to this patient")
    timings["inference_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    details = {
        "predictions": [
            {
                "outcome": {
                    "scheme": p.outcome.coding_scheme,
                    "code": p.outcome.code_value,
                    "meaning": p.outcome.code_meaning,
                    "name": p.outcome.name,
                },
                "probability": p.probability,
                "horizon_years": p.horizon_years,
                "confidence": p.confidence,
                "interval": list(p.interval),
                "missing_features": list(p.missing_features),
                "rationale": p.rationale,
            }
            for p in predictions
        ],
        "basis": list(features.basis),
        "missing_features": sorted(features.missing),
    }
    first = predictions[0]
    stored = store_result(
        runtime, job, model.card.provenance, first.outcome, first.probability, details
    )
    outcomes = [
        RiskOutcome(
            outcome=_outcome_concept(p),
            probability=p["probability"],
            when_years=(0.0, float(p["horizon_years"])),
            rationale=f"{p['rationale']} (confidence {p['confidence']:.2f})",
        )
        for p in stored.details["predictions"]
    ]
    assessment = risk_assessment(
        stored.context,
        outcomes,
        basis=[ResourceRef(reference) for reference in stored.details["basis"]],
    )
    written = write_fhir_output(runtime, stored.id, [assessment])
    timings["fhir_ms"] = (time.perf_counter() - clock) * 1000
    timings["total_ms"] = sum(timings.values())
    return complete_job(runtime, job, stored.id, [written], timings)
