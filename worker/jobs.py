"""Running a job: claim it in the database, run its pipeline, record the outcome.

A job is claimed with a conditional UPDATE (queued -> running, attempts + 1, a lease), so a
redelivered or duplicated task finds nothing to do. Attempts are counted in the database;
after ``max_attempts`` the job is FAILED. A pipeline commits its result, output objects,
deliveries and the job's success in one transaction, then the deliveries are published.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import audit
from db.schema import Job, JobStatus, Patient, Study, utcnow
from worker.runtime import Runtime

log = logging.getLogger("carebridge.jobs")


class PermanentJobError(Exception):
    """The job can never succeed as configured (no model, unreadable input...)."""


class NothingToReport(Exception):
    """The inputs hold nothing the model can speak to (e.g. no biomarker with evidence);
    the job ends SKIPPED with this reason and produces no output."""


@dataclass(frozen=True)
class ClaimedJob:
    """A snapshot of a claimed job, usable outside the claiming transaction."""

    id: int
    study_id: int | None  # imaging jobs
    study_instance_uid: str | None
    patient_id: int | None  # clinical jobs
    subject: str | None  # the patient's reference, e.g. Patient/123
    run_number: int
    pipeline: str
    model: str
    input_hash: str
    inputs: tuple[int, ...]
    attempt: int
    max_attempts: int
    queue: str
    imaging_inputs: tuple[int, ...] = ()  # clinical jobs: the imaging results joined


def job_scope(session: Session, job: Job) -> tuple[str | None, str | None]:
    """(StudyInstanceUID, patient reference) of a job: one of them is None."""
    study_uid = subject = None
    if job.study_id is not None:
        study_uid = session.execute(
            select(Study.study_instance_uid).where(Study.id == job.study_id)
        ).scalar_one()
    if job.patient_id is not None:
        subject = session.execute(
            select(Patient.reference).where(Patient.id == job.patient_id)
        ).scalar_one()
    return study_uid, subject


def claim_job(runtime: Runtime, job_id: int) -> ClaimedJob | None:
    """Take the job if it is queued; None when another worker has it or it is finished."""
    now = utcnow()
    lease = now + timedelta(seconds=runtime.settings.job_lease_seconds)
    with runtime.database.session() as session:
        claimed: Any = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                lease_owner=runtime.owner,
                lease_expires_at=lease,
                started_at=now,
                error=None,
            )
        )
        if claimed.rowcount != 1:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        study_uid, subject = job_scope(session, job)
        audit.append(
            session,
            "job.started",
            actor=runtime.owner,
            study_instance_uid=study_uid,
            subject=subject,
            job=job.id,
            pipeline=job.pipeline,
            attempt=job.attempts,
            max_attempts=job.max_attempts,
        )
        return ClaimedJob(
            id=job.id,
            study_id=job.study_id,
            study_instance_uid=study_uid,
            patient_id=job.patient_id,
            subject=subject,
            run_number=job.run_number,
            pipeline=job.pipeline,
            model=job.model,
            input_hash=job.input_hash,
            inputs=tuple(job.inputs),
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            queue=job.queue,
            imaging_inputs=tuple(job.imaging_inputs or ()),
        )


def _finish_failed(runtime: Runtime, job: ClaimedJob, error: str, *, retry: bool) -> bool:
    """Record a failed attempt; returns True when the job was re-queued."""
    now = utcnow()
    requeue = retry and job.attempt < job.max_attempts
    with runtime.database.session() as session:
        row = session.get(Job, job.id)
        if row is None or row.status != JobStatus.RUNNING or row.lease_owner != runtime.owner:
            return False  # the lease was taken over meanwhile
        row.error = error
        row.lease_owner = None
        row.lease_expires_at = None
        if requeue:
            row.status = JobStatus.QUEUED
            row.queued_at = now
        else:
            row.status = JobStatus.FAILED
            row.finished_at = now
        audit.append(
            session,
            "job.retry" if requeue else "job.failed",
            actor=runtime.owner,
            study_instance_uid=job.study_instance_uid,
            subject=job.subject,
            job=job.id,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            error=error,
        )
    return requeue


def _finish_skipped(runtime: Runtime, job: ClaimedJob, reason: str) -> None:
    with runtime.database.session() as session:
        row = session.get(Job, job.id)
        if row is None or row.status != JobStatus.RUNNING or row.lease_owner != runtime.owner:
            return
        row.status = JobStatus.SKIPPED
        row.error = reason[:2000]
        row.finished_at = utcnow()
        row.lease_owner = None
        row.lease_expires_at = None
        audit.append(
            session,
            "job.skipped",
            actor=runtime.owner,
            study_instance_uid=job.study_instance_uid,
            subject=job.subject,
            job=job.id,
            reason=reason,
        )


def execute_job(runtime: Runtime, job_id: int) -> None:
    """Task body of ``carebridge.run_job``."""
    from worker.pipelines import get_pipeline  # imports model code only in workers

    job = claim_job(runtime, job_id)
    if job is None:
        log.info("job %d: nothing to do (finished, or held by another worker)", job_id)
        return
    started = time.perf_counter()
    log.info("job %d (%s) attempt %d/%d", job.id, job.pipeline, job.attempt, job.max_attempts)
    try:
        pipeline = get_pipeline(job.pipeline)
        delivery_ids = pipeline(runtime, job)
    except PermanentJobError as exc:
        log.error("job %d failed permanently: %s", job.id, exc)
        _finish_failed(runtime, job, str(exc), retry=False)
        return
    except NothingToReport as exc:
        log.info("job %d skipped: %s", job.id, exc)
        _finish_skipped(runtime, job, str(exc))
        return
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.exception("job %d attempt %d failed", job.id, job.attempt)
        if _finish_failed(runtime, job, error, retry=True):
            runtime.dispatcher.publish_job(job.id, job.queue)
        return
    for delivery_id in delivery_ids:
        runtime.dispatcher.publish_delivery(delivery_id)
    log.info("job %d succeeded in %.0f ms", job.id, (time.perf_counter() - started) * 1000)
