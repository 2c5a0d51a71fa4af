"""Read-only views of the audit database for the ``carebridge audit`` commands."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from db.engine import Database
from db.schema import (
    AuditEvent,
    ClinicalResource,
    Delivery,
    FhirEvent,
    Instance,
    Job,
    OutputObject,
    Patient,
    Result,
    Series,
    Study,
)


def studies_table(database: Database, limit: int) -> Table:
    """The newest studies with their state, instance count and job statuses."""
    table = Table("StudyInstanceUID", "state", "run", "instances", "jobs", "last received (UTC)")
    with database.session() as session:
        studies = session.execute(
            select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        ).scalars()
        for study in studies:
            statuses = Counter(
                session.execute(select(Job.status).where(Job.study_id == study.id)).scalars()
            )
            jobs = ", ".join(f"{count} {status.value}" for status, count in statuses.items())
            table.add_row(
                study.study_instance_uid,
                study.state.value,
                str(study.run_number),
                str(study.instance_count),
                jobs or "-",
                study.last_received_at.isoformat(timespec="seconds"),
            )
    return table


def study_report(database: Database, study_instance_uid: str) -> dict[str, Any] | None:
    """Everything recorded about one study, as plain data."""
    with database.session() as session:
        study = session.execute(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).scalar_one_or_none()
        if study is None:
            return None
        series_rows = session.execute(
            select(Series, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id, isouter=True)
            .where(Series.study_id == study.id)
            .group_by(Series.id)
            .order_by(Series.id)
        ).all()
        instances = session.execute(
            select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
        ).scalars()
        work = _work_report(
            session,
            Job.study_id == study.id,
            Result.study_id == study.id,
            AuditEvent.study_instance_uid == study_instance_uid,
        )
        return {
            "study": {
                "study_instance_uid": study.study_instance_uid,
                "state": study.state.value,
                "run": study.run_number,
                "instances": study.instance_count,
                "first_received_at": study.first_received_at,
                "last_received_at": study.last_received_at,
                "routed_at": study.routed_at,
            },
            "series": [
                {"series_instance_uid": s.series_instance_uid, "instances": n, **s.attributes}
                for s, n in series_rows
            ],
            "instances": [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "size_bytes": i.size_bytes,
                    "sha256": i.sha256,
                    "calling_ae": i.calling_ae,
                    "received_at": i.received_at,
                }
                for i in instances
            ],
            **work,
        }


def _work_report(
    session: Session,
    job_filter: ColumnElement[bool],
    result_filter: ColumnElement[bool],
    event_filter: ColumnElement[bool],
) -> dict[str, Any]:
    """Jobs, results, outputs, deliveries and audit events of one study or patient."""
    jobs = session.execute(select(Job).where(job_filter).order_by(Job.id)).scalars()
    results = list(
        session.execute(select(Result).where(result_filter).order_by(Result.id)).scalars()
    )
    outputs = (
        session.execute(
            select(OutputObject)
            .where(OutputObject.result_id.in_([r.id for r in results]))
            .order_by(OutputObject.id)
        )
        .scalars()
        .all()
    )
    deliveries = session.execute(
        select(Delivery)
        .where(Delivery.output_id.in_([o.id for o in outputs]))
        .order_by(Delivery.id)
    ).scalars()
    events = session.execute(
        select(AuditEvent).where(event_filter).order_by(AuditEvent.seq)
    ).scalars()
    return {
        "jobs": [
            {
                "id": j.id,
                "run": j.run_number,
                "pipeline": j.pipeline,
                "queue": j.queue,
                "status": j.status.value,
                "attempts": j.attempts,
                "max_attempts": j.max_attempts,
                "inputs": len(j.inputs),
                "input_hash": j.input_hash,
                "created_at": j.created_at,
                "started_at": j.started_at,
                "finished_at": j.finished_at,
                "timings_ms": j.timings,
                "error": j.error,
            }
            for j in jobs
        ],
        "results": [
            {
                "id": r.id,
                "job": r.job_id,
                "pipeline": r.pipeline,
                "finding": {
                    "code": r.finding_code,
                    "scheme": r.finding_scheme,
                    "meaning": r.finding_meaning,
                },
                "probability": r.probability,
                "model": {
                    "name": r.model_name,
                    "version": r.model_version,
                    "device_uid": r.device_uid,
                    "weights_sha256": r.weights_sha256,
                    "demo_weights": r.demo_weights,
                },
                "details": r.details,
                "created_at": r.created_at,
            }
            for r in results
        ],
        "outputs": [
            {
                "id": o.id,
                "result": o.result_id,
                "kind": o.kind,
                "sop_instance_uid": o.sop_instance_uid,
                "series_instance_uid": o.series_instance_uid,
                "sha256": o.sha256,
            }
            for o in outputs
        ],
        "deliveries": [
            {
                "id": d.id,
                "output": d.output_id,
                "destination": d.destination,
                "status": d.status.value,
                "attempts": d.attempts,
                "max_attempts": d.max_attempts,
                "last_status": d.last_status,
                "last_error": d.last_error,
                "sent_at": d.sent_at,
                "response": d.response,
            }
            for d in deliveries
        ],
        "events": [
            {
                "seq": e.seq,
                "at": e.occurred_at,
                "type": e.event_type,
                "actor": e.actor,
                "detail": e.detail,
            }
            for e in events
        ],
    }


def patient_report(database: Database, reference: str) -> dict[str, Any] | None:
    """Everything recorded about one patient (``Patient/<id>``): the clinical events that
    came in, the resources on file, the jobs, results, EHR deliveries and audit events."""
    with database.session() as session:
        patient = session.execute(
            select(Patient).where(Patient.reference == reference)
        ).scalar_one_or_none()
        if patient is None:
            return None
        resources = session.execute(
            select(ClinicalResource, FhirEvent)
            .join(FhirEvent, FhirEvent.id == ClinicalResource.fhir_event_id)
            .where(ClinicalResource.patient_id == patient.id)
            .order_by(ClinicalResource.id)
        ).all()
        work = _work_report(
            session,
            Job.patient_id == patient.id,
            Result.patient_id == patient.id,
            AuditEvent.subject == reference,
        )
        return {
            "patient": {
                "reference": patient.reference,
                "state": patient.state.value,
                "run": patient.run_number,
                "first_received_at": patient.first_received_at,
                "last_received_at": patient.last_received_at,
                "routed_at": patient.routed_at,
            },
            "resources": [
                {
                    "resource": f"{r.resource_type}/{r.resource_id}",
                    "code": f"{r.code_system}|{r.code}" if r.code else None,
                    "content_sha256": r.content_sha256,
                    "fhir_event": e.id,
                    "source": e.source.value,
                    "fhir_version": e.fhir_version,
                    "received_at": e.received_at,
                }
                for r, e in resources
            ],
            **work,
        }


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    return table


def _render_study_header(console: Console, report: dict[str, Any]) -> None:
    study = report["study"]
    console.print(
        f"[bold]Study {study['study_instance_uid']}[/bold]: {study['state']}, run "
        f"{study['run']}, {study['instances']} instances, last received "
        f"{study['last_received_at']} UTC"
    )
    console.print(
        _table(
            "Series",
            report["series"],
            ["series_instance_uid", "Modality", "BodyPartExamined", "instances"],
        )
    )
    console.print(
        _table(
            "Instances received",
            report["instances"],
            ["sop_instance_uid", "calling_ae", "size_bytes", "received_at"],
        )
    )


def render_report(console: Console, report: dict[str, Any]) -> None:
    """Print a study or patient report as tables."""
    if "patient" in report:
        patient = report["patient"]
        console.print(
            f"[bold]{patient['reference']}[/bold]: {patient['state']}, run {patient['run']}, "
            f"{len(report['resources'])} resources, last received "
            f"{patient['last_received_at']} UTC"
        )
        console.print(
            _table(
                "Clinical resources received",
                report["resources"],
                ["resource", "code", "fhir_event", "source", "fhir_version", "received_at"],
            )
        )
    else:
        _render_study_header(console, report)
    console.print(
        _table(
            "Jobs",
            report["jobs"],
            [
                "id",
                "run",
                "pipeline",
                "status",
                "attempts",
                "max_attempts",
                "started_at",
                "finished_at",
                "timings_ms",
                "error",
            ],
        )
    )
    results = [
        {
            "id": r["id"],
            "pipeline": r["pipeline"],
            "finding": f"{r['finding']['meaning']} ({r['finding']['scheme']} "
            f"{r['finding']['code']})",
            "probability": f"{r['probability']:.3f}" if r["probability"] is not None else "",
            "model": f"{r['model']['name']} {r['model']['version']}",
            "weights sha256": r["model"]["weights_sha256"],
            "demo": "DEMO WEIGHTS" if r["model"]["demo_weights"] else "",
        }
        for r in report["results"]
    ]
    console.print(
        _table(
            "Results",
            results,
            ["id", "pipeline", "finding", "probability", "model", "weights sha256", "demo"],
        )
    )
    console.print(
        _table("Outputs", report["outputs"], ["id", "kind", "sop_instance_uid", "sha256"])
    )
    console.print(
        _table(
            "Deliveries",
            report["deliveries"],
            [
                "id",
                "destination",
                "status",
                "attempts",
                "last_status",
                "last_error",
                "sent_at",
                "response",
            ],
        )
    )
    events = [{**e, "detail": str(e["detail"])[:120]} for e in report["events"]]
    console.print(_table("Audit events", events, ["seq", "at", "type", "actor", "detail"]))
