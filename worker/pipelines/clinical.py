"""What the clinical pipelines share: the patient's inputs, model loading, the result.

A clinical job names a patient and the ids of the clinical resources it runs on (the
patient context the sweeper assembled). The pipeline reads those resources, runs its
model, stores one result (unique per patient, pipeline, model version and input hash) and
hands its FHIR resources to :mod:`worker.pipelines.fhir_output`. A rerun of the same job
finds the stored result and rebuilds the same Bundle from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from db.schema import ClinicalResource
from models.card import ModelLoadError
from models.provenance import CodedLabel, ModelProvenance
from worker.clinical import load_clinical_inputs
from worker.jobs import ClaimedJob, PermanentJobError
from worker.outputs.fhir import ResultContext, SubjectRef
from worker.pipelines.fhir_output import result_context
from worker.results import get_or_create_result
from worker.runtime import Runtime

ModelT = TypeVar("ModelT")


@dataclass(frozen=True)
class PatientInputs:
    """A clinical job's resources, as the EHR sent them, by type."""

    subject: str  # Patient/<id>
    resources: tuple[dict[str, Any], ...]

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r.get("resourceType") == resource_type]

    def patient(self) -> dict[str, Any] | None:
        patients = self.of_type("Patient")
        return patients[0] if patients else None


def _reference(row: ClinicalResource) -> str:
    return f"{row.resource_type}/{row.resource_id}"


def load_patient_inputs(runtime: Runtime, job: ClaimedJob) -> PatientInputs:
    """The job's resources; each carries its stored id (``cb-<event>`` if it had none)."""
    if job.subject is None:
        raise PermanentJobError(f"{job.pipeline} runs on a patient, not on a study")
    with runtime.database.session() as session:
        rows = load_clinical_inputs(session, job.inputs)
        resources = tuple({**row.body, "id": row.resource_id} for row in rows)
    if not resources:
        raise PermanentJobError("the job's input resources are gone")
    return PatientInputs(job.subject, resources)


def load_model(
    runtime: Runtime, kind: str, model_name: str, loader: Callable[[Path], ModelT]
) -> ModelT:
    """The model in MODELS_DIR/``model_name``, loaded once per worker process."""
    model_dir = runtime.settings.models_dir / model_name
    try:
        model: ModelT = runtime.model(f"{kind}:{model_dir.resolve()}", lambda: loader(model_dir))
    except ModelLoadError as exc:
        raise PermanentJobError(f"model {model_name!r}: {exc}") from exc
    except FileNotFoundError as exc:
        raise PermanentJobError(
            f"model {model_name!r} is not installed in {runtime.settings.models_dir} "
            "(run `carebridge models demo`, or install a model directory there)"
        ) from exc
    return model


@dataclass(frozen=True)
class StoredResult:
    """The stored result a pipeline builds its outputs from (fresh or from a rerun)."""

    id: int
    created_at: datetime
    details: dict[str, Any]
    context: ResultContext


def store_result(
    runtime: Runtime,
    job: ClaimedJob,
    provenance: ModelProvenance,
    finding: CodedLabel,
    probability: float | None,
    details: dict[str, Any],
) -> StoredResult:
    """Get or create the job's result; the stored one wins on a rerun."""
    assert job.subject is not None
    with runtime.database.session() as session:
        result, _ = get_or_create_result(session, job, provenance, finding, probability, details)
        result_id, created_at, stored = result.id, result.created_at, dict(result.details)
    context = result_context(
        result_id, job.input_hash, created_at, SubjectRef.literal(job.subject), provenance
    )
    return StoredResult(result_id, created_at, stored, context)
