"""The outbox sender: one delivery row = one object to one destination.

A delivery is claimed (pending -> sending, attempts + 1, a lease), sent, and recorded:
sent; pending again with exponential backoff while the peer is unavailable; dead-lettered
after ``max_attempts`` or when the peer refuses it permanently. Every attempt is audited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from db import audit
from db.schema import Delivery, DeliveryStatus, OutputObject, Result, Study, utcnow
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
    study_instance_uid: str
    sop_instance_uid: str | None


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
        delivery, output, study_uid = session.execute(
            select(Delivery, OutputObject, Study.study_instance_uid)
            .join(OutputObject, OutputObject.id == Delivery.output_id)
            .join(Result, Result.id == OutputObject.result_id)
            .join(Study, Study.id == Result.study_id)
            .where(Delivery.id == delivery_id)
        ).one()
        return _Claimed(
            id=delivery.id,
            destination=delivery.destination,
            path=output.path,
            attempt=delivery.attempts,
            max_attempts=delivery.max_attempts,
            study_instance_uid=study_uid,
            sop_instance_uid=output.sop_instance_uid,
        )


def execute_delivery(runtime: Runtime, delivery_id: int) -> None:
    """Task body of ``carebridge.deliver``."""
    claimed = _claim(runtime, delivery_id)
    if claimed is None:
        log.info("delivery %d: nothing to do (sent, dead, or not due yet)", delivery_id)
        return
    settings = runtime.settings
    error: DeliveryError | None = None
    statuses: list[int] = []
    try:
        (destination,) = parse_destinations(claimed.destination)
        statuses = send_files(
            destination,
            [settings.archive_dir.resolve() / claimed.path],
            calling_ae=settings.dicom_ae_title,
        )
    except DeliveryError as exc:
        error = exc
    except (OSError, ValueError) as exc:
        error = DeliveryError(f"{type(exc).__name__}: {exc}", transient=False)

    now = utcnow()
    with runtime.database.session() as session:
        delivery = session.get(Delivery, claimed.id)
        assert delivery is not None
        delivery.lease_expires_at = None
        if error is None:
            delivery.status = DeliveryStatus.SENT
            delivery.sent_at = now
            delivery.last_status = ",".join(f"0x{status:04X}" for status in statuses)
            delivery.last_error = None
            event = "delivery.sent"
        else:
            delivery.last_error = str(error)[:2000]
            delivery.last_status = "transient" if error.transient else "permanent"
            if error.transient and claimed.attempt < claimed.max_attempts:
                delivery.status = DeliveryStatus.PENDING
                delivery.next_attempt_at = now + timedelta(
                    seconds=backoff_seconds(settings.delivery_backoff_seconds, claimed.attempt)
                )
                event = "delivery.retry"
            else:
                delivery.status = DeliveryStatus.DEAD
                event = "delivery.dead"
        audit.append(
            session,
            event,
            actor=runtime.owner,
            study_instance_uid=claimed.study_instance_uid,
            delivery=claimed.id,
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
        log.warning("delivery %d to %s: %s (%s)", claimed.id, claimed.destination, event, error)
