"""The outbox sender: one delivery row = one object to one destination.

A delivery is claimed (pending -> sending, attempts + 1, a lease), sent, and recorded:
sent; pending again with exponential backoff while the peer is unavailable; dead-lettered
after ``max_attempts`` or when the peer refuses it permanently. Every attempt is audited.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from db import audit
from db.schema import Delivery, DeliveryStatus, OutputObject, Patient, Result, Study, utcnow
from worker.results import FHIR_BUNDLE
from worker.runtime import Runtime
from worker.senders.dicom import DeliveryError, parse_destinations, send_files

log = logging.getLogger("carebridge.delivery")

SEND_LEASE_SECONDS = 300
MAX_BACKOFF_SECONDS = 300.0


def backoff_seconds(base: float, attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: base, 2*base, 4*base... capped at 5 minutes."""
    return float(min(MAX_BACKOFF_SECONDS, base * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True)
class _Claimed:
    id: int
    destination: str
    path: str
    attempt: int
    max_attempts: int
    study_instance_uid: str | None
    subject: str | None
    sop_instance_uid: str | None
    kind: str


def _claim(runtime: Runtime, delivery_id: int) -> _Claimed | None:
    now = utcnow()
    with runtime.database.session() as session:
        taken: Any = session.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.status == DeliveryStatus.PENDING,
                Delivery.next_attempt_at <= now + timedelta(seconds=1),
            )
            .values(
                status=DeliveryStatus.SENDING,
                attempts=Delivery.attempts + 1,
                lease_expires_at=now + timedelta(seconds=SEND_LEASE_SECONDS),
            )
        )
        if taken.rowcount != 1:
            return None
        delivery, output, study_uid, subject = session.execute(
            select(Delivery, OutputObject, Study.study_instance_uid, Patient.reference)
            .join(OutputObject, OutputObject.id == Delivery.output_id)
            .join(Result, Result.id == OutputObject.result_id)
            .outerjoin(Study, Study.id == Result.study_id)
            .outerjoin(Patient, Patient.id == Result.patient_id)
            .where(Delivery.id == delivery_id)
        ).one()
        return _Claimed(
            id=delivery.id,
            destination=delivery.destination,
            path=output.path,
            attempt=delivery.attempts,
            max_attempts=delivery.max_attempts,
            study_instance_uid=study_uid,
            subject=subject,
            sop_instance_uid=output.sop_instance_uid,
            kind=output.kind,
        )


def _send_fhir(runtime: Runtime, base_url: str, path: Path) -> tuple[str, dict[str, Any]]:
    """POST a transaction Bundle; the HTTP status and the created resources' locations."""
    from worker.ehr import ehr_client

    client = ehr_client(runtime.settings)
    if client is None or runtime.settings.ehr_base_url != base_url:
        raise DeliveryError(
            f"the EHR {base_url} is no longer configured (CAREBRIDGE_EHR_BASE_URL)",
            transient=False,
        )
    bundle = json.loads(path.read_text(encoding="utf-8"))
    with client:
        result = client.post_transaction(bundle)
    return "200", {
        "entries": [
            {"status": entry.status, "location": entry.location} for entry in result.entries
        ]
    }


def execute_delivery(runtime: Runtime, delivery_id: int) -> None:
    """Task body of ``carebridge.deliver``."""
    claimed = _claim(runtime, delivery_id)
    if claimed is None:
        log.info("delivery %d: nothing to do (sent, dead, or not due yet)", delivery_id)
        return
    settings = runtime.settings
    error: DeliveryError | None = None
    sent_status = ""
    response: dict[str, Any] | None = None
    path = settings.archive_dir.resolve() / claimed.path
    try:
        if claimed.kind == FHIR_BUNDLE:
            sent_status, response = _send_fhir(runtime, claimed.destination, path)
        else:
            (destination,) = parse_destinations(claimed.destination)
            statuses = send_files(destination, [path], calling_ae=settings.dicom_ae_title)
            sent_status = ",".join(f"0x{status:04X}" for status in statuses)
    except DeliveryError as exc:
        error = exc
        response = getattr(exc, "operation_outcome", None)
    except (OSError, ValueError) as exc:
        error = DeliveryError(f"{type(exc).__name__}: {exc}", transient=False)

    now = utcnow()
    with runtime.database.session() as session:
        delivery = session.get(Delivery, claimed.id)
        assert delivery is not None
        delivery.lease_expires_at = None
        delivery.response = response
        if error is None:
            delivery.status = DeliveryStatus.SENT
            delivery.sent_at = now
            delivery.last_status = sent_status[:32]
            delivery.last_error = None
            event = "delivery.sent"
        else:
            delivery.last_error = str(error)[:2000]
            delivery.last_status = "transient" if error.transient else "permanent"
            if error.transient and claimed.attempt < claimed.max_attempts:
                delivery.status = DeliveryStatus.PENDING
                delay = backoff_seconds(settings.delivery_backoff_seconds, claimed.attempt)
                retry_after = getattr(error, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > delay:
                    delay = min(MAX_BACKOFF_SECONDS, float(retry_after))  # 429 Retry-After
                delivery.next_attempt_at = now + timedelta(seconds=delay)
                event = "delivery.retry"
            else:
                delivery.status = DeliveryStatus.DEAD
                event = "delivery.dead"
        audit.append(
            session,
            event,
            actor=runtime.owner,
            study_instance_uid=claimed.study_instance_uid,
            subject=claimed.subject,
            delivery=claimed.id,
            kind=claimed.kind,
            destination=claimed.destination,
            sop_instance_uid=claimed.sop_instance_uid,
            attempt=claimed.attempt,
            max_attempts=claimed.max_attempts,
            status=delivery.last_status,
            error=delivery.last_error,
            next_attempt_at=delivery.next_attempt_at if event == "delivery.retry" else None,
        )
    if error is None:
        log.info("delivery %d sent to %s", claimed.id, claimed.destination)
    else:
        # An EHR's OperationOutcome may quote the resource it refused: the text stays in
        # deliveries.last_error, the log gets the HTTP status only.
        reason = (
            f"HTTP {getattr(error, 'status_code', None) or 'no answer'}"
            if claimed.kind == FHIR_BUNDLE
            else str(error)
        )
        log.warning("delivery %d to %s: %s (%s)", claimed.id, claimed.destination, event, reason)
