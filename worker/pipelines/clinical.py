"""What the clinical pipelines share: the patient's inputs, model loading, the result.

A clinical job names a patient and the ids of the clinical resources it runs on (the
patient context the sweeper assembled). The pipeline reads those resources, runs its
model, stores one result (unique per patient, pipeline, model version and input hash) and
hands its FHIR resources to :mod:`worker.pipelines.fhir_output`. A rerun of the same job
finds the stored result and rebuilds the same Bundle from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import ClinicalResource, Result, Study
from models.card import ModelLoadError
from models.provenance import CodedLabel, ModelProvenance
from worker.clinical import load_clinical_inputs
from worker.jobs import ClaimedJob, PermanentJobError
from worker.outputs.fhir import (
    IMAGING_REPORT_PART,
    LIVER_VOLUME_PART,
    LogicalRef,
    ResultContext,
    SubjectRef,
)
from worker.pipelines.fhir_output import (
    RESULT_IDENTIFIER_SYSTEM,
    result_business_id,
    result_context,
)
from worker.results import get_or_create_result
from worker.runtime import Runtime

ModelT = TypeVar("ModelT")


#: The resource each imaging pipeline's finding reaches the EHR as, and its output part.
IMAGING_FHIR_OUTPUTS = {
    "cxr-classification": ("DiagnosticReport", IMAGING_REPORT_PART),
    "liver-segmentation": ("Observation", LIVER_VOLUME_PART),
}


@dataclass(frozen=True)
class ImagingFinding:
    """One imaging result joined to a clinical job's patient context."""

    result_id: int
    input_hash: str
    pipeline: str
    study_instance_uid: str
    finding: str
    probability: float | None
    volume_ml: float | None
    model: str  # name and version
    demo_weights: bool
    created_at: datetime

    def summary(self) -> str:
        """One line for a clinician: what, how sure, by which model, on which study."""
        what = self.finding
        if self.volume_ml is not None:
            what += f" volume {self.volume_ml:.0f} mL"
        if self.probability is not None:
            what += f" (probability {self.probability:.2f})"
        weights = ", demo weights" if self.demo_weights else ""
        return (
            f"Imaging on file: {what}, AI {self.pipeline} by {self.model}{weights}, "
            f"unverified; study {self.study_instance_uid}, {self.created_at:%Y-%m-%d}."
        )

    def fhir_reference(self) -> LogicalRef | None:
        """The result's FHIR output in the EHR, by its business identifier (None for a
        pipeline whose results have none)."""
        output = IMAGING_FHIR_OUTPUTS.get(self.pipeline)
        if output is None:
            return None
        resource_type, part = output
        return LogicalRef(
            resource_type,
            RESULT_IDENTIFIER_SYSTEM,
            f"{result_business_id(self.result_id, self.input_hash)}-{part}",
            display=self.summary(),
        )

    def as_json(self) -> dict[str, Any]:
        reference = self.fhir_reference()
        return {
            "result_id": self.result_id,
            "pipeline": self.pipeline,
            "study_instance_uid": self.study_instance_uid,
            "finding": self.finding,
            "probability": self.probability,
            "volume_ml": self.volume_ml,
            "model": self.model,
            "demo_weights": self.demo_weights,
            "summary": self.summary(),
            "fhir_reference": None if reference is None else reference.as_fhir(),
        }


@dataclass(frozen=True)
class PatientInputs:
    """A clinical job's resources, as the EHR sent them, by type, and the patient's latest
    imaging results (when the clinical rules join them)."""

    subject: str  # Patient/<id>
    resources: tuple[dict[str, Any], ...]
    imaging: tuple[ImagingFinding, ...] = ()

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
        imaging = tuple(_imaging_findings(session, job.imaging_inputs))
    if not resources:
        raise PermanentJobError("the job's input resources are gone")
    return PatientInputs(job.subject, resources, imaging)


def _imaging_findings(session: Session, ids: Sequence[int]) -> list[ImagingFinding]:
    if not ids:
        return []
    rows = session.execute(
        select(Result, Study.study_instance_uid)
        .join(Study, Result.study_id == Study.id)
        .where(Result.id.in_(list(ids)))
        .order_by(Result.id)
    ).all()
    return [
        ImagingFinding(
            result_id=result.id,
            input_hash=result.input_hash,
            pipeline=result.pipeline,
            study_instance_uid=study_uid,
            finding=result.finding_meaning,
            probability=result.probability,
            volume_ml=result.details.get("volume_ml"),
            model=f"{result.model_name} {result.model_version}",
            demo_weights=result.demo_weights,
            created_at=result.created_at,
        )
        for result, study_uid in rows
    ]


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
