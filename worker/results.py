"""Recording what a pipeline produced: results, output objects, deliveries, job success.

Every write is idempotent on its natural key, so a task that runs twice (a redelivered
message, a worker killed after its commit) converges on one result, one object and one
delivery per destination.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from db import audit
from db.schema import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    OutputObject,
    Result,
    utcnow,
)
from models.provenance import CodedLabel, ModelProvenance
from worker.jobs import ClaimedJob
from worker.outputs.dicom_common import SRReference
from worker.runtime import Runtime
from worker.settings import Settings


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inputs(session: Session, job: ClaimedJob) -> list[Instance]:
    """The job's input instances, in id order."""
    return list(
        session.execute(
            select(Instance).where(Instance.id.in_(job.inputs)).order_by(Instance.id)
        ).scalars()
    )


def _same_scope(job: ClaimedJob) -> ColumnElement[bool]:
    """Results of the job's study (imaging) or patient (clinical)."""
    if job.study_id is not None:
        return Result.study_id == job.study_id
    return Result.patient_id == job.patient_id


def get_or_create_result(
    session: Session,
    job: ClaimedJob,
    provenance: ModelProvenance,
    finding: CodedLabel,
    probability: float | None,
    details: dict[str, Any],
) -> tuple[Result, bool]:
    """The result for (study or patient, pipeline, model version, input hash); True when new."""
    existing = session.execute(
        select(Result).where(
            _same_scope(job),
            Result.pipeline == job.pipeline,
            Result.model_version == provenance.version,
            Result.input_hash == job.input_hash,
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing, False
    result = Result(
        job_id=job.id,
        study_id=job.study_id,
        patient_id=job.patient_id,
        pipeline=job.pipeline,
        input_hash=job.input_hash,
        model_name=provenance.name,
        model_version=provenance.version,
        device_uid=provenance.device_uid,
        weights_sha256=provenance.weights_sha256,
        demo_weights=provenance.demo,
        finding_code=finding.code_value,
        finding_scheme=finding.coding_scheme,
        finding_meaning=finding.code_meaning,
        probability=probability,
        details=details,
        created_at=utcnow(),
    )
    session.add(result)
    session.flush()
    return result, True


def get_or_create_output(
    session: Session,
    result: Result,
    kind: str,
    sop_class_uid: str,
    new_uids: Callable[[], tuple[str, str]],
) -> OutputObject:
    """The output object of ``kind`` for ``result``; UIDs are drawn once and kept."""
    existing = session.execute(
        select(OutputObject).where(OutputObject.result_id == result.id, OutputObject.kind == kind)
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    series_uid, sop_uid = new_uids()
    output = OutputObject(
        result_id=result.id,
        kind=kind,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        path="",
        sha256="",
        created_at=utcnow(),
    )
    session.add(output)
    session.flush()
    return output


def previous_output(
    session: Session, job: ClaimedJob, kind: str, exclude_result_id: int
) -> OutputObject | None:
    """The newest earlier output of this study and pipeline (the one a new run supersedes)."""
    return session.execute(
        select(OutputObject)
        .join(Result, Result.id == OutputObject.result_id)
        .where(
            _same_scope(job),
            Result.pipeline == job.pipeline,
            Result.id != exclude_result_id,
            OutputObject.kind == kind,
            OutputObject.sha256 != "",
        )
        .order_by(Result.id.desc())
        .limit(1)
    ).scalar_one_or_none()


FHIR_BUNDLE = "fhir-bundle"  # output kind of a transaction Bundle for the EHR


def destinations_for(settings: Settings, kind: str) -> list[str]:
    """Where an output of ``kind`` goes: DICOM objects to the PACS, FHIR to the EHR."""
    if kind == FHIR_BUNDLE:
        return [settings.ehr_base_url] if settings.ehr_base_url else []
    return [str(destination) for destination in settings.destinations]


def superseded_sr(session: Session, job: ClaimedJob, result_id: int) -> SRReference | None:
    """The newest earlier SR of this study and pipeline, for the new SR's Predecessor
    Documents Sequence; None on a study's first run."""
    before = previous_output(session, job, "dicom-sr", result_id)
    if before is None or job.study_instance_uid is None:
        return None
    return SRReference(
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=str(before.series_instance_uid),
        sop_class_uid=str(before.sop_class_uid),
        sop_instance_uid=str(before.sop_instance_uid),
    )


@dataclass(frozen=True)
class WrittenOutput:
    output_id: int
    path: str  # relative to the archive
    sha256: str


def complete_job(
    runtime: Runtime,
    job: ClaimedJob,
    result_id: int,
    outputs: list[WrittenOutput],
    timings: dict[str, float],
) -> list[int]:
    """Commit the outputs, their deliveries and the job's success; return deliveries to send."""
    now = utcnow()
    with runtime.database.session() as session:
        delivery_ids: list[int] = []
        for written in outputs:
            output = session.get(OutputObject, written.output_id)
            assert output is not None
            output.path = written.path
            output.sha256 = written.sha256
            for destination in destinations_for(runtime.settings, output.kind):
                delivery = session.execute(
                    select(Delivery).where(
                        Delivery.output_id == output.id, Delivery.destination == destination
                    )
                ).scalar_one_or_none()
                if delivery is None:
                    delivery = Delivery(
                        output_id=output.id,
                        destination=destination,
                        status=DeliveryStatus.PENDING,
                        attempts=0,
                        max_attempts=runtime.settings.delivery_max_attempts,
                        next_attempt_at=now,
                        enqueued_at=now,
                        created_at=now,
                    )
                    session.add(delivery)
                    session.flush()
                if delivery.status == DeliveryStatus.PENDING:
                    delivery_ids.append(delivery.id)
        row = session.get(Job, job.id)
        assert row is not None
        row.status = JobStatus.SUCCEEDED
        row.finished_at = now
        row.lease_owner = None
        row.lease_expires_at = None
        row.timings = {name: round(value, 1) for name, value in timings.items()}
        row.error = None
        result = session.get(Result, result_id)
        assert result is not None
        audit.append(
            session,
            "job.succeeded",
            actor=runtime.owner,
            study_instance_uid=job.study_instance_uid,
            subject=job.subject,
            job=job.id,
            attempt=job.attempt,
            result=result.id,
            finding=f"{result.finding_scheme}:{result.finding_code} {result.finding_meaning}",
            probability=result.probability,
            model=f"{result.model_name} {result.model_version}",
            weights_sha256=result.weights_sha256,
            demo_weights=result.demo_weights,
            outputs=[written.output_id for written in outputs],
            deliveries=delivery_ids,
            timings_ms=row.timings,
        )
    return delivery_ids
