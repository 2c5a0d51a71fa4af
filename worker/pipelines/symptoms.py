"""Symptom analysis: a clinical note -> MiniLM + knowledge base + ConText -> ranked
candidate conditions -> DiagnosticReport with provisional, coded Observations."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any

from models.symptoms.analyzer import SymptomAnalyzer
from worker.jobs import ClaimedJob, NothingToReport, PermanentJobError
from worker.outputs.fhir import (
    ICD10CM,
    SNOMED,
    CandidateCondition,
    Coding,
    Concept,
    ResourceRef,
    symptom_report,
)
from worker.pipelines.clinical import load_model, load_patient_inputs, store_result
from worker.pipelines.fhir_output import write_fhir_output
from worker.results import complete_job
from worker.runtime import Runtime

# A test server refuses more than 8 conditional creates per transaction; 5 candidates +
# the report + Device + Provenance fit, and a clinician reads no further anyway.
MAX_CANDIDATES = 5
TEXT_TYPES = ("text/plain", "text/markdown")


def note_text(document: Mapping[str, Any]) -> str:
    """The plain text of a DocumentReference's inline attachments."""
    parts = []
    for content in document.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, Mapping) else None
        if not isinstance(attachment, Mapping):
            continue
        media = str(attachment.get("contentType", "text/plain")).split(";")[0].strip().lower()
        data = attachment.get("data")
        if media not in TEXT_TYPES or not isinstance(data, str):
            continue
        try:
            parts.append(base64.b64decode(data, validate=True).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise PermanentJobError("the note's attachment is not base64 UTF-8 text") from exc
    return "\n".join(part for part in parts if part.strip())


def run_symptom_analysis(runtime: Runtime, job: ClaimedJob) -> list[int]:
    """Rank candidate conditions for one note; provisional, never a diagnosis."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = load_patient_inputs(runtime, job)
    (document,) = inputs.of_type("DocumentReference")
    text = note_text(document)
    if not text:
        raise NothingToReport("the note has no inline plain-text attachment to read")
    analyzer = load_model(
        runtime,
        "symptoms",
        job.model,
        lambda path: SymptomAnalyzer.load(path, device=runtime.settings.device),
    )
    timings["load_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    analysis = analyzer.analyze(text, top_k=MAX_CANDIDATES)
    timings["inference_ms"] = (time.perf_counter() - clock) * 1000
    if not analysis.has_evidence:
        raise NothingToReport("the note names no finding of the knowledge base")

    clock = time.perf_counter()
    reference = f"DocumentReference/{document['id']}"
    details = {
        "note": reference,
        "conditions": [
            {
                "rank": c.rank,
                "id": c.condition_id,
                "display": c.display,
                "icd10cm": {"code": c.icd10cm.code, "display": c.icd10cm.display},
                "snomed": {"code": c.snomed.code, "display": c.snomed.display},
                "confidence": c.confidence,
                # Where in the note, not what: the note's words stay in the EHR.
                "evidence": [
                    {"finding": m.display, "start": m.start, "end": m.end} for m in c.evidence
                ],
            }
            for c in analysis.conditions[:MAX_CANDIDATES]
        ],
        "temperature": analysis.temperature,
        "encoder_sha256": analysis.encoder_sha256,
        "knowledge_base_sha256": analysis.knowledge_base_sha256,
    }
    top = analysis.conditions[0]
    stored = store_result(
        runtime, job, analyzer.provenance, top.coded_label, top.confidence, details
    )
    candidates = [
        CandidateCondition(
            condition=Concept.of(
                Coding(SNOMED, c["snomed"]["code"], c["snomed"]["display"]),
                Coding(ICD10CM, c["icd10cm"]["code"], c["icd10cm"]["display"]),
                text=c["display"],
            ),
            probability=c["confidence"],
        )
        for c in stored.details["conditions"]
    ]
    report = symptom_report(stored.context, candidates, inputs=[ResourceRef(reference)])
    written = write_fhir_output(runtime, stored.id, [report])
    timings["fhir_ms"] = (time.perf_counter() - clock) * 1000
    timings["total_ms"] = sum(timings.values())
    return complete_job(runtime, job, stored.id, [written], timings)
