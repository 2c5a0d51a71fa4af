"""The sweeper: turns quiet studies into jobs and re-sends work the broker lost.

State lives in the database, so several sweepers (one per listener process) cooperate:
every transition is a conditional UPDATE that only one of them can win.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db import audit
from db.engine import Database
from db.fhir_events import mark_queued
from db.schema import (
    Delivery,
    DeliveryStatus,
    FhirEvent,
    FhirEventStatus,
    Instance,
    Job,
    JobStatus,
    Patient,
    Series,
    Study,
    StudyState,
    utcnow,
)
from worker.clinical import plan_patient_jobs
from worker.clinical_rules import ClinicalRules
from worker.jobs import job_scope
from worker.routing import RoutingRules
from worker.runtime import Dispatcher
from worker.settings import Settings

log = logging.getLogger("carebridge.sweeper")


def input_hash(sop_instance_uids: list[str]) -> str:
    """The identity of a job's inputs: the sorted SOP Instance UIDs."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()


@dataclass
class SweepReport:
    studies_routed: int = 0
    patients_routed: int = 0
    jobs_created: list[tuple[int, str]] = field(default_factory=list)  # (id, queue)
    jobs_requeued: list[tuple[int, str]] = field(default_factory=list)
    jobs_failed: int = 0
    deliveries_published: list[int] = field(default_factory=list)
    fhir_events_published: list[int] = field(default_factory=list)


class Sweeper:
    """Finds stable studies and stuck work; publishes tasks after each commit."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        dispatcher: Dispatcher,
        rules: RoutingRules,
        clinical_rules: ClinicalRules | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.dispatcher = dispatcher
        self.rules = rules
        self.clinical_rules = clinical_rules or ClinicalRules.load(settings.clinical_rules_file)

    # Study completion ---------------------------------------------------------------

    def route_stable_studies(self, now: datetime, report: SweepReport) -> None:
        cutoff = now - timedelta(seconds=self.settings.study_stable_seconds)
        with self.database.session() as session:
            candidates = (
                session.execute(
                    select(Study.id)
                    .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
                    .limit(100)
                )
                .scalars()
                .all()
            )
        for study_id in candidates:
            with self.database.session() as session:
                created = self._route_study(session, study_id, now, cutoff)
            if created is not None:
                report.studies_routed += 1
                report.jobs_created.extend(created)

    def _route_study(
        self, session: Session, study_id: int, now: datetime, cutoff: datetime
    ) -> list[tuple[int, str]] | None:
        claimed: Any = session.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.state == StudyState.RECEIVING,
                Study.last_received_at <= cutoff,
            )
            .values(state=StudyState.ROUTED, run_number=Study.run_number + 1, routed_at=now)
        )
        if claimed.rowcount != 1:
            return None  # another sweeper took it, or an instance just arrived
        study = session.get(Study, study_id)
        assert study is not None
        rows = session.execute(
            select(Series.attributes, Instance.id, Instance.sop_instance_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
        ).all()
        inputs: dict[str, list[tuple[int, str]]] = defaultdict(list)
        specs = {}
        for attributes, instance_id, sop_uid in rows:
            for spec in self.rules.select(attributes):
                inputs[spec.name].append((instance_id, sop_uid))
                specs[spec.name] = spec
        created: list[tuple[int, str]] = []
        for pipeline, members in inputs.items():
            spec = specs[pipeline]
            digest = input_hash([sop for _, sop in members])
            exists = session.execute(
                select(Job.id).where(
                    Job.study_id == study_id, Job.pipeline == pipeline, Job.input_hash == digest
                )
            ).first()
            if exists is not None:
                continue  # the same inputs already ran (e.g. only duplicates arrived)
            job = Job(
                study_id=study_id,
                run_number=study.run_number,
                pipeline=pipeline,
                queue=spec.queue,
                model=spec.model,
                input_hash=digest,
                inputs=[instance_id for instance_id, _ in members],
                status=JobStatus.QUEUED,
                attempts=0,
                max_attempts=self.settings.job_max_attempts,
                created_at=now,
                queued_at=now,
            )
            session.add(job)
            session.flush()
            created.append((job.id, job.queue))
        audit.append(
            session,
            "study.stable",
            actor="sweeper",
            study_instance_uid=study.study_instance_uid,
            run=study.run_number,
            instances=len(rows),
            pipelines=sorted(inputs),
            jobs=[job_id for job_id, _ in created],
        )
        return created

    # Patients -------------------------------------------------------------------------

    def route_quiet_patients(self, now: datetime, report: SweepReport) -> None:
        """Patients with no event for PATIENT_STABLE_SECONDS get their clinical jobs."""
        cutoff = now - timedelta(seconds=self.settings.patient_stable_seconds)
        with self.database.session() as session:
            candidates = (
                session.execute(
                    select(Patient.id)
                    .where(
                        Patient.state == StudyState.RECEIVING, Patient.last_received_at <= cutoff
                    )
                    .limit(100)
                )
                .scalars()
                .all()
            )
        for patient_id in candidates:
            with self.database.session() as session:
                claimed: Any = session.execute(
                    update(Patient)
                    .where(
                        Patient.id == patient_id,
                        Patient.state == StudyState.RECEIVING,
                        Patient.last_received_at <= cutoff,
                    )
                    .values(
                        state=StudyState.ROUTED, run_number=Patient.run_number + 1, routed_at=now
                    )
                )
                if claimed.rowcount != 1:
                    continue
                patient = session.get(Patient, patient_id)
                assert patient is not None
                created = plan_patient_jobs(
                    session,
                    self.clinical_rules,
                    patient,
                    now,
                    self.settings.job_max_attempts,
                    self.settings.patient_id_system,
                )
            report.patients_routed += 1
            report.jobs_created.extend(created)

    # Stuck work ---------------------------------------------------------------------

    def requeue_stuck(self, now: datetime, report: SweepReport) -> None:
        stale = now - timedelta(seconds=self.settings.requeue_after_seconds)
        with self.database.session() as session:
            expired = (
                session.execute(
                    select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
                )
                .scalars()
                .all()
            )
            for job in expired:
                uid, subject = job_scope(session, job)
                if job.attempts >= job.max_attempts:
                    job.status = JobStatus.FAILED
                    job.finished_at = now
                    job.error = f"worker lost during attempt {job.attempts} of {job.max_attempts}"
                    report.jobs_failed += 1
                    audit.append(
                        session,
                        "job.failed",
                        actor="sweeper",
                        study_instance_uid=uid,
                        subject=subject,
                        job=job.id,
                        attempts=job.attempts,
                        error=job.error,
                    )
                else:
                    job.status = JobStatus.QUEUED
                    job.queued_at = now
                    job.lease_owner = None
                    report.jobs_requeued.append((job.id, job.queue))
                    audit.append(
                        session,
                        "job.lease_expired",
                        actor="sweeper",
                        study_instance_uid=uid,
                        subject=subject,
                        job=job.id,
                        attempts=job.attempts,
                    )
            lost = (
                session.execute(
                    select(Job).where(Job.status == JobStatus.QUEUED, Job.queued_at < stale)
                )
                .scalars()
                .all()
            )
            for job in lost:
                job.queued_at = now
                report.jobs_requeued.append((job.id, job.queue))
            session.execute(
                update(Delivery)
                .where(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_expires_at < now)
                .values(status=DeliveryStatus.PENDING, next_attempt_at=now)
            )
            due = (
                session.execute(
                    select(Delivery.id).where(
                        Delivery.status == DeliveryStatus.PENDING,
                        Delivery.next_attempt_at <= now,
                        or_(
                            Delivery.enqueued_at.is_(None),
                            Delivery.enqueued_at < Delivery.next_attempt_at,
                            Delivery.enqueued_at < stale,
                        ),
                    )
                )
                .scalars()
                .all()
            )
            if due:
                session.execute(
                    update(Delivery).where(Delivery.id.in_(due)).values(enqueued_at=now)
                )
            report.deliveries_published.extend(due)

    def requeue_fhir_events(self, now: datetime, report: SweepReport) -> None:
        """FHIR events the webhook committed but could not hand to the broker."""
        stale = now - timedelta(seconds=self.settings.requeue_after_seconds)
        with self.database.session() as session:
            due = (
                session.execute(
                    select(FhirEvent.id)
                    .where(
                        FhirEvent.status == FhirEventStatus.RECEIVED,
                        func.coalesce(FhirEvent.queued_at, FhirEvent.received_at) < stale,
                    )
                    .order_by(FhirEvent.id)
                    .limit(500)
                )
                .scalars()
                .all()
            )
            if due:  # the attempt time: a broker that stays down is retried once per period
                session.execute(
                    update(FhirEvent).where(FhirEvent.id.in_(due)).values(queued_at=now)
                )
        report.fhir_events_published.extend(due)

    # Loop ---------------------------------------------------------------------------

    def sweep_once(self, now: datetime | None = None) -> SweepReport:
        """One pass; publishes after the commits so a task never sees uncommitted rows."""
        now = now or utcnow()
        report = SweepReport()
        self.route_stable_studies(now, report)
        self.route_quiet_patients(now, report)
        self.requeue_stuck(now, report)
        self.requeue_fhir_events(now, report)
        for job_id, queue in report.jobs_created + report.jobs_requeued:
            self.dispatcher.publish_job(job_id, queue)
        for delivery_id in report.deliveries_published:
            self.dispatcher.publish_delivery(delivery_id)
        published = [
            (event_id, task_id)
            for event_id in report.fhir_events_published
            if (task_id := self.dispatcher.publish_fhir_event(event_id))
        ]
        if published:
            with self.database.session() as session:
                for event_id, task_id in published:
                    mark_queued(session, event_id, task_id, now)
        if report.fhir_events_published:
            log.info(
                "sweep: %d FHIR events re-sent, %d taken by the broker",
                len(report.fhir_events_published),
                len(published),
            )
        if report.patients_routed:
            log.info("sweep: %d patients routed", report.patients_routed)
        if report.studies_routed or report.jobs_requeued or report.jobs_failed:
            log.info(
                "sweep: %d studies routed, %d jobs created, %d re-sent, %d failed",
                report.studies_routed,
                len(report.jobs_created),
                len(report.jobs_requeued),
                report.jobs_failed,
            )
        return report

    def run(self, stop: threading.Event) -> None:
        """Sweep until ``stop`` is set; database errors are logged and retried."""
        while not stop.is_set():
            try:
                self.sweep_once()
            except Exception:
                log.exception("sweep failed; retrying")
                stop.wait(min(5.0, self.settings.sweep_interval_seconds * 10))
                continue
            stop.wait(self.settings.sweep_interval_seconds)
