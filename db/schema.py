"""The database schema: what was received, what ran, what it found, where it went, and the
append-only audit trail. SQLAlchemy 2 typed declarative models; migrations live in
``db/migrations`` and are the only way the schema changes."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC now: every timestamp in the database is naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; the quiet-period clock runs
    ROUTED = "routed"  # the last quiet period ended and its jobs were created


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # e.g. no model installed for the pipeline


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for (re)send at next_attempt_at
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"  # dead-lettered after the last attempt or a permanent refusal


class FhirEventSource(enum.StrEnum):
    DIRECT = "direct"  # POSTed to /fhir or /fhir/{type}
    SUBSCRIPTION = "subscription"  # a Subscription notification's focus


class FhirEventStatus(enum.StrEnum):
    RECEIVED = "received"  # committed; not yet handed to the broker
    QUEUED = "queued"  # handed to the broker
    PROCESSED = "processed"
    FAILED = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # The DICOM Patient ID (0010,0020) of the study's first instance: joins imaging results
    # to a FHIR Patient whose identifier in PATIENT_ID_SYSTEM has this value.
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    run_number: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    routed_at: Mapped[datetime | None] = mapped_column(DateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_state_last", "state", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # Routing attributes, copied from the first instance (no PHI).
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(300))  # relative to ARCHIVE_DIR
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Patient(Base):
    """A patient of the EHR side, as events name it; clinical work waits for a quiet period.

    ``reference`` is the EHR's literal reference (``Patient/123``). Like a study, a patient
    is routed once no event about them has arrived for the quiet period, so a Bundle of
    vitals and labs yields one risk assessment, not one per Observation.
    """

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference: Mapped[str] = mapped_column(String(300), unique=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    run_number: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    routed_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (Index("ix_patients_state_last", "state", "last_received_at"),)


class ClinicalResource(Base):
    """The newest version of one clinical resource (Observation, Condition, note...).

    The patient context (the inputs of the clinical pipelines) is read from here; the
    FhirEvent that brought each version stays the record of what arrived.
    """

    __tablename__ = "clinical_resources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    # The sender's id; ``cb-<event id>`` for a resource that came without one.
    resource_id: Mapped[str] = mapped_column(String(64))
    content_sha256: Mapped[str] = mapped_column(String(64))  # canonical JSON of ``body``
    code_system: Mapped[str | None] = mapped_column(String(200))  # first coding of .code
    code: Mapped[str | None] = mapped_column(String(64))
    effective_at: Mapped[datetime | None] = mapped_column(DateTime)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    fhir_event_id: Mapped[int] = mapped_column(ForeignKey("fhir_events.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id"),
        Index("ix_clinical_resources_patient_type", "patient_id", "resource_type"),
    )


class Job(Base):
    """One pipeline run on one study's inputs; the database, not the broker, is its truth."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Exactly one of study (imaging) and patient (clinical) is set.
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    run_number: Mapped[int] = mapped_column(Integer)
    pipeline: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(128))
    input_hash: Mapped[str] = mapped_column(String(64))
    inputs: Mapped[list[Any]] = mapped_column(JSON)  # instance or clinical resource ids
    # A clinical job's imaging context: ids of the patient's imaging results it was given.
    imaging_inputs: Mapped[list[int] | None] = mapped_column(JSON)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # stage -> ms
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("study_id", "pipeline", "input_hash"),
        UniqueConstraint("patient_id", "pipeline", "input_hash"),
        Index("ix_jobs_status_queued", "status", "queued_at"),
    )


class Result(Base):
    """A model's finding on a job's inputs, with the provenance of the model that made it.

    Unique per (study, pipeline, model version, input hash): a redelivered task finds the
    existing row instead of making a second result.
    """

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    input_hash: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    device_uid: Mapped[str] = mapped_column(UID)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    demo_weights: Mapped[bool] = mapped_column(Boolean)
    finding_code: Mapped[str] = mapped_column(String(64))
    finding_scheme: Mapped[str] = mapped_column(String(16))
    finding_meaning: Mapped[str] = mapped_column(String(128))
    probability: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("study_id", "pipeline", "model_version", "input_hash"),
        UniqueConstraint("patient_id", "pipeline", "model_version", "input_hash"),
    )


class OutputObject(Base):
    """A produced object (DICOM SR/SEG, FHIR bundle) kept in the archive before delivery."""

    __tablename__ = "output_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # "dicom-sr", "dicom-seg", ...
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(300))  # relative to ARCHIVE_DIR
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Delivery(Base):
    """The outbox: one row per (object, destination); the sender works from here."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output_objects.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[str | None] = mapped_column(String(32))
    # What the peer answered: for the EHR, the created resources' locations or the
    # OperationOutcome of a refusal.
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
    )


class FhirEvent(Base):
    """One clinical event taken by the FHIR webhook: a resource (or, for an id-only
    notification, its type and id) committed before the sender got its 202."""

    __tablename__ = "fhir_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    source: Mapped[FhirEventSource] = mapped_column(_enum(FhirEventSource))
    # The model family the body was validated with: "R4" (direct POSTs and R4 backport
    # notifications), "R4B" or "R5"; the processor parses the body with the same family.
    fhir_version: Mapped[str] = mapped_column(String(8))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    subscription: Mapped[str | None] = mapped_column(String(300))  # Subscription reference
    event_number: Mapped[int | None] = mapped_column(BigInteger)  # events-since-start numbering
    # Standard Webhooks id of the delivery, kept on the first event a delivery recorded
    # (a Bundle records several): a replayed id is answered without recording again.
    webhook_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    body_sha256: Mapped[str] = mapped_column(String(64))  # of the HTTP body as received
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the resource; None: id-only
    status: Mapped[FhirEventStatus] = mapped_column(
        _enum(FhirEventStatus), default=FhirEventStatus.RECEIVED
    )
    task_id: Mapped[str | None] = mapped_column(String(64))
    # When it was last handed to the broker; a failed hand-over leaves status RECEIVED.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_fhir_events_status_received", "status", "received_at"),)


class FhirSubscriptionState(Base):
    """Per Subscription: the highest event number seen (events-since-subscription-start),
    so a repeated notification is recognised and a gap is noticed."""

    __tablename__ = "fhir_subscription_states"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscription: Mapped[str] = mapped_column(String(300), unique=True)
    last_event_number: Mapped[int] = mapped_column(BigInteger, default=0)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CdsHooksToken(Base):
    """A CDS Client JWT already accepted (its issuer and jti, hashed), kept until it
    expires so that a replay is refused by every webhook process."""

    __tablename__ = "cds_hooks_tokens"

    token_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class AuditEvent(Base):
    """Append-only audit trail; each row carries the hash of the previous one."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTime)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    subject: Mapped[str | None] = mapped_column(String(300), index=True)  # Patient/123
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """A single row holding the chain's last sequence number and hash.

    Writers lock it (an UPDATE) before appending, which serialises appends on every
    database and lets ``verify`` notice a deleted last row.
    """

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
