"""Clinical events into the patient context, and the patient context into jobs.

The webhook commits each FHIR event and queues ``carebridge.process_fhir_event``. Processing
an event (:func:`process_event`) files the resource under its patient: the newest version
of every resource is kept in ``clinical_resources`` and the patient's quiet-period clock
restarts. An id-only notification is read from the EHR first. The sweeper later routes a
patient that has been quiet (:func:`plan_patient_jobs`): each clinical pipeline whose
trigger resources changed gets a job over the patient's current resources, exactly like a
stable study gets imaging jobs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import audit
from db.fhir_events import catch_up_range, record_event
from db.schema import (
    ClinicalResource,
    FhirEvent,
    FhirEventSource,
    FhirEventStatus,
    Job,
    JobStatus,
    Patient,
    Result,
    Study,
    StudyState,
    utcnow,
)
from worker.clinical_rules import LOINC, ClinicalRules
from worker.runtime import Runtime

log = logging.getLogger("carebridge.clinical")

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_REFERENCE = re.compile(r"(?:^|/)(Patient)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


class ClinicalInputError(ValueError):
    """A clinical resource carebridge cannot file (no patient, a malformed id...)."""


def patient_reference(resource: Mapping[str, Any]) -> str:
    """``Patient/<id>`` for a Patient, or the patient a resource is about."""
    if resource.get("resourceType") == "Patient":
        ident = resource.get("id")
        if not isinstance(ident, str) or not _ID.match(ident):
            raise ClinicalInputError("a Patient needs an id to be filed")
        return f"Patient/{ident}"
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    match = _REFERENCE.search(reference) if isinstance(reference, str) else None
    if match is None:
        raise ClinicalInputError(
            f"{resource.get('resourceType')} has no subject of the form Patient/<id>"
        )
    return f"Patient/{match.group(2)}"


def content_sha256(resource: Mapping[str, Any]) -> str:
    """Digest of the canonical JSON of a resource (identifies one version)."""
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _primary_code(resource: Mapping[str, Any]) -> tuple[str | None, str | None]:
    code = resource.get("code")
    codings = [c for c in (code.get("coding", []) if isinstance(code, dict) else []) if c]
    codings.sort(key=lambda coding: coding.get("system") != LOINC)  # LOINC first
    for coding in codings:
        if isinstance(coding, dict) and coding.get("code"):
            return (str(coding.get("system") or "")[:200] or None, str(coding["code"])[:64])
    return None, None


def _effective(resource: Mapping[str, Any]) -> datetime | None:
    for field in ("effectiveDateTime", "issued", "date", "recordedDate", "onsetDateTime"):
        value = resource.get(field)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(UTC).replace(tzinfo=None)
            return parsed
    return None


def _touch_patient(session: Session, reference: str, now: datetime) -> Patient:
    """The patient row, its quiet-period clock restarted."""
    patient = session.execute(
        select(Patient).where(Patient.reference == reference).with_for_update()
    ).scalar_one_or_none()
    if patient is None:
        patient = Patient(
            reference=reference,
            state=StudyState.RECEIVING,
            run_number=0,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(patient)
        session.flush()
    else:
        patient.state = StudyState.RECEIVING
        patient.last_received_at = now
    return patient


def file_resource(
    session: Session, event_id: int, resource: Mapping[str, Any], now: datetime
) -> tuple[ClinicalResource, bool]:
    """Keep the newest version of ``resource`` under its patient; True when it changed."""
    resource_type = str(resource.get("resourceType"))
    reference = patient_reference(resource)
    resource_id = resource.get("id")
    if resource_id is None:
        resource_id = f"cb-{event_id}"
    elif not isinstance(resource_id, str) or not _ID.match(resource_id):
        raise ClinicalInputError(f"{resource_type} id is not a valid FHIR id")
    patient = _touch_patient(session, reference, now)
    digest = content_sha256(resource)
    system, code = _primary_code(resource)
    row = session.execute(
        select(ClinicalResource).where(
            ClinicalResource.resource_type == resource_type,
            ClinicalResource.resource_id == resource_id,
        )
    ).scalar_one_or_none()
    if row is None:
        row = ClinicalResource(resource_type=resource_type, resource_id=resource_id)
        session.add(row)
    elif row.content_sha256 == digest:
        return row, False
    row.patient_id = patient.id
    row.content_sha256 = digest
    row.code_system, row.code = system, code
    row.effective_at = _effective(resource)
    row.body = dict(resource)
    row.fhir_event_id = event_id
    row.updated_at = now
    session.flush()
    return row, True


@dataclass(frozen=True)
class _EventSnapshot:
    id: int
    resource_type: str
    resource_id: str | None
    body: dict[str, Any] | None
    subscription: str | None = None
    catch_up: tuple[int, int] | None = None


def _finish_event(
    runtime: Runtime,
    event_id: int,
    status: FhirEventStatus,
    *,
    error: str | None = None,
    subject: str | None = None,
    **detail: Any,
) -> None:
    with runtime.database.session() as session:
        session.execute(
            update(FhirEvent)
            .where(FhirEvent.id == event_id)
            .values(status=status, error=error[:2000] if error else None)
        )
        audit.append(
            session,
            "fhir.event_processed" if status == FhirEventStatus.PROCESSED else "fhir.event_failed",
            actor=runtime.owner,
            subject=subject,
            event=event_id,
            error=error,
            **detail,
        )


def process_event(runtime: Runtime, event_id: int) -> None:
    """Task body of ``carebridge.process_fhir_event``: file one event's resource."""
    with runtime.database.session() as session:
        event = session.get(FhirEvent, event_id)
        if event is None or event.status in (FhirEventStatus.PROCESSED, FhirEventStatus.FAILED):
            log.info("FHIR event %d: nothing to do", event_id)
            return
        snapshot = _EventSnapshot(
            event.id,
            event.resource_type,
            event.resource_id,
            event.body,
            event.subscription,
            catch_up_range(event),
        )
    if snapshot.catch_up is not None:
        _catch_up(runtime, snapshot)
        return
    body = snapshot.body
    if body is None:
        body = _read_from_ehr(runtime, snapshot)
        if body is None:
            return
    now = utcnow()
    try:
        with runtime.database.session() as session:
            row, changed = file_resource(session, snapshot.id, body, now)
            patient = session.get(Patient, row.patient_id)
            assert patient is not None
            session.execute(
                update(FhirEvent)
                .where(FhirEvent.id == snapshot.id)
                .values(status=FhirEventStatus.PROCESSED, error=None)
            )
            audit.append(
                session,
                "fhir.event_processed",
                actor=runtime.owner,
                subject=patient.reference,
                event=snapshot.id,
                resource=f"{row.resource_type}/{row.resource_id}",
                content_sha256=row.content_sha256,
                changed=changed,
                fetched=snapshot.body is None,
            )
    except ClinicalInputError as exc:
        log.warning("FHIR event %d refused: %s", event_id, exc)
        _finish_event(runtime, event_id, FhirEventStatus.FAILED, error=str(exc))
        return
    log.info("FHIR event %d filed (%s)", event_id, snapshot.resource_type)


def _read_from_ehr(runtime: Runtime, event: _EventSnapshot) -> dict[str, Any] | None:
    """The resource of an id-only notification, read from EHR_BASE_URL.

    A transient failure leaves the event RECEIVED, so the sweeper re-sends it later; a
    missing configuration or a refusal fails it with the reason.
    """
    from worker.ehr import ehr_client  # HTTP client only where it is needed
    from worker.senders.dicom import DeliveryError

    client = ehr_client(runtime.settings)
    if client is None or event.resource_id is None:
        _finish_event(
            runtime,
            event.id,
            FhirEventStatus.FAILED,
            error="id-only notification, but CAREBRIDGE_EHR_BASE_URL is not set"
            if client is None
            else "id-only notification without a resource id",
        )
        return None
    try:
        with client:
            resource = client.read(event.resource_type, event.resource_id)
    except ValueError as exc:  # an id or type that is not safe to put in a URL
        _finish_event(runtime, event.id, FhirEventStatus.FAILED, error=f"EHR read: {exc}")
        return None
    except DeliveryError as exc:
        if exc.transient:
            with runtime.database.session() as session:
                session.execute(
                    update(FhirEvent)
                    .where(FhirEvent.id == event.id)
                    .values(status=FhirEventStatus.RECEIVED, queued_at=utcnow(), error=str(exc))
                )
            log.warning(
                "FHIR event %d: EHR read failed (HTTP %s), will retry",
                event.id,
                getattr(exc, "status_code", None) or "no answer",
            )
            return None
        _finish_event(runtime, event.id, FhirEventStatus.FAILED, error=f"EHR read: {exc}")
        return None
    if resource.get("resourceType") != event.resource_type:
        _finish_event(
            runtime, event.id, FhirEventStatus.FAILED, error="EHR returned another resource type"
        )
        return None
    return resource


def _last_seen_before(session: Session, subscription: str, number: int) -> datetime | None:
    """When the last event numbered below ``number`` of ``subscription`` arrived."""
    return session.execute(
        select(FhirEvent.received_at)
        .where(
            FhirEvent.subscription == subscription,
            FhirEvent.event_number.is_not(None),
            FhirEvent.event_number < number,
        )
        .order_by(FhirEvent.event_number.desc())
        .limit(1)
    ).scalar_one_or_none()


def _catch_up(runtime: Runtime, request: _EventSnapshot) -> None:
    """Fetch a Subscription's missed events from the EHR and file what comes back."""
    from worker.catchup import body_sha256, missed_resources
    from worker.ehr import ehr_client
    from worker.senders.dicom import DeliveryError

    assert request.catch_up is not None and request.subscription is not None
    since_number, until_number = request.catch_up
    client = ehr_client(runtime.settings)
    if client is None:
        _finish_event(
            runtime,
            request.id,
            FhirEventStatus.FAILED,
            error="events were missed, but CAREBRIDGE_EHR_BASE_URL is not set to ask for them",
        )
        return
    with runtime.database.session() as session:
        since = _last_seen_before(session, request.subscription, since_number)
    try:
        with client:
            found = missed_resources(
                client, request.subscription, since_number, until_number, since
            )
    except ValueError as exc:
        _finish_event(runtime, request.id, FhirEventStatus.FAILED, error=f"catch-up: {exc}")
        return
    except DeliveryError as exc:
        if exc.transient:  # the sweeper re-sends the request later
            with runtime.database.session() as session:
                session.execute(
                    update(FhirEvent)
                    .where(FhirEvent.id == request.id)
                    .values(status=FhirEventStatus.RECEIVED, queued_at=utcnow(), error=str(exc))
                )
            return
        _finish_event(runtime, request.id, FhirEventStatus.FAILED, error=f"catch-up: {exc}")
        return
    now = utcnow()
    filed: list[str] = []
    with runtime.database.session() as session:
        for resource in found.resources:
            event = record_event(
                session,
                source=FhirEventSource.SUBSCRIPTION,
                fhir_version="R4",
                resource_type=str(resource["resourceType"]),
                resource_id=resource.get("id"),
                body=resource,
                body_sha256=body_sha256(resource),
                subscription=request.subscription,
                now=now,
            )
            try:
                with session.begin_nested():
                    row, _ = file_resource(session, event.id, resource, now)
            except ClinicalInputError as exc:
                event.status, event.error = FhirEventStatus.FAILED, str(exc)
                continue
            event.status = FhirEventStatus.PROCESSED
            filed.append(f"{row.resource_type}/{row.resource_id}")
        session.execute(
            update(FhirEvent)
            .where(FhirEvent.id == request.id)
            .values(status=FhirEventStatus.PROCESSED, error=None)
        )
        audit.append(
            session,
            "fhir.catch_up",
            actor=runtime.owner,
            event=request.id,
            subscription=request.subscription,
            missing_from=since_number,
            missing_to=until_number,
            method=found.method,
            detail=found.detail,
            resources=filed,
        )
    log.info("catch-up %d: %d resources by %s", request.id, len(filed), found.method)


# Routing a quiet patient ---------------------------------------------------------------


def _input_hash(resources: Sequence[ClinicalResource], imaging: Sequence[Result] = ()) -> str:
    keys = sorted(f"{r.resource_type}/{r.resource_id}@{r.content_sha256}" for r in resources)
    keys += sorted(f"Result/{r.id}" for r in imaging)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def patient_keys(resources: Sequence[ClinicalResource], patient_id_system: str | None) -> set[str]:
    """The DICOM Patient IDs of a patient: its Patient resource's identifier values in
    ``patient_id_system`` (the system carebridge's imaging outputs name patients with)."""
    if not patient_id_system:
        return set()
    keys: set[str] = set()
    for row in resources:
        if row.resource_type != "Patient":
            continue
        for identifier in row.body.get("identifier") or []:
            if not isinstance(identifier, dict) or identifier.get("system") != patient_id_system:
                continue
            if isinstance(identifier.get("value"), str):
                keys.add(identifier["value"])
    return keys


def latest_imaging_results(
    session: Session, keys: set[str], pipelines: Sequence[str]
) -> list[Result]:
    """The newest result of each imaging pipeline on the studies of these Patient IDs."""
    if not keys or not pipelines:
        return []
    rows = session.execute(
        select(Result)
        .join(Study, Result.study_id == Study.id)
        .where(Study.patient_key.in_(sorted(keys)), Result.pipeline.in_(list(pipelines)))
        .order_by(Result.created_at.desc(), Result.id.desc())
    ).scalars()
    latest: dict[str, Result] = {}
    for row in rows:
        latest.setdefault(row.pipeline, row)
    return [latest[name] for name in pipelines if name in latest]


def plan_patient_jobs(
    session: Session,
    rules: ClinicalRules,
    patient: Patient,
    now: datetime,
    max_attempts: int,
    patient_id_system: str | None = None,
) -> list[tuple[int, str]]:
    """Create the jobs a quiet patient's resources call for; (job id, queue) of each new one.

    A pipeline with ``imaging`` in the rules also gets the patient's latest imaging
    results; their ids are part of the job's input hash, so a newer result gives a new job
    the next time the patient is routed.
    """
    resources = list(
        session.execute(
            select(ClinicalResource)
            .where(ClinicalResource.patient_id == patient.id)
            .order_by(ClinicalResource.id)
        ).scalars()
    )
    keys = patient_keys(resources, patient_id_system)
    created: list[tuple[int, str]] = []
    for pipeline in rules.pipelines:
        triggers = [r for r in resources if pipeline.is_trigger(r.body)]
        if not triggers:
            continue
        extras = [r for r in resources if r not in triggers and pipeline.is_input(r.body)]
        imaging = latest_imaging_results(session, keys, pipeline.imaging)
        groups = [[t] for t in triggers] if pipeline.per_resource else [triggers + extras]
        for group in groups:
            digest = _input_hash(group, imaging)
            exists = session.execute(
                select(Job.id).where(
                    Job.patient_id == patient.id,
                    Job.pipeline == pipeline.name,
                    Job.input_hash == digest,
                )
            ).first()
            if exists is not None:
                continue
            job = Job(
                patient_id=patient.id,
                run_number=patient.run_number,
                pipeline=pipeline.name,
                queue=pipeline.queue,
                model=pipeline.model,
                input_hash=digest,
                inputs=[r.id for r in group],
                imaging_inputs=[r.id for r in imaging] or None,
                status=JobStatus.QUEUED,
                attempts=0,
                max_attempts=max_attempts,
                created_at=now,
                queued_at=now,
            )
            session.add(job)
            session.flush()
            created.append((job.id, job.queue))
    audit.append(
        session,
        "patient.stable",
        actor="sweeper",
        subject=patient.reference,
        run=patient.run_number,
        resources=len(resources),
        jobs=[job_id for job_id, _ in created],
    )
    return created


def load_clinical_inputs(session: Session, ids: Sequence[int]) -> list[ClinicalResource]:
    """A job's input resources, in id order."""
    return list(
        session.execute(
            select(ClinicalResource)
            .where(ClinicalResource.id.in_(list(ids)))
            .order_by(ClinicalResource.id)
        ).scalars()
    )
