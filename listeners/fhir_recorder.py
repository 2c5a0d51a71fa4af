"""Recording what the FHIR webhook took: events, Subscription state, audit, then the broker.

No HTTP here: the webhook hands over a parsed and validated request and gets back what
was committed. Everything a request changes is one transaction; the broker is told only
after the commit, and an event the broker did not take stays ``received`` for the
sweeper to re-send.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from db import audit
from db import fhir_events as events_db
from db.engine import Database
from db.schema import FhirEventSource, utcnow
from listeners.fhir_payloads import IncomingResource, Notification
from worker.runtime import Dispatcher

log = logging.getLogger("carebridge.fhir")

ACTOR = "listener"
STORE_ATTEMPTS = 3  # a lost race on a unique key (webhook-id, new Subscription) is retried

Parsed = list[IncomingResource] | Notification


@dataclass
class Taken:
    """What a committed request produced: events (id, resource type), or a 200 message."""

    status: int
    message: str
    events: list[tuple[int, str]] = field(default_factory=list)
    source: FhirEventSource | None = None


class EventRecorder:
    """Records parsed requests in the database and publishes the committed events."""

    def __init__(self, database: Database, dispatcher: Dispatcher) -> None:
        self.database = database
        self.dispatcher = dispatcher

    def record(self, parsed: Parsed, webhook_id: str | None, body_sha256: str) -> Taken:
        """Record one request in one transaction and commit it.

        Raises SQLAlchemyError when the database is unavailable (nothing was stored).
        """
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                with self.database.session() as session:
                    return self._record(session, parsed, webhook_id, body_sha256)
            except IntegrityError:
                # A concurrent request won a unique key (the same webhook-id, or the first
                # notification of a Subscription): the next attempt sees its row.
                if attempt == STORE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def audit_refusal(self, route: str, status: int, reason: str, peer: str | None) -> None:
        """Audit a request refused for its credentials (never its body)."""
        try:
            with self.database.session() as session:
                audit.append(
                    session,
                    "fhir.auth_failed",
                    actor=ACTOR,
                    route=route,
                    status=status,
                    reason=reason,
                    peer=peer,
                )
        except SQLAlchemyError:
            log.error("could not audit a refused FHIR request")

    def publish(self, event_ids: list[int]) -> None:
        """Hand committed events to the broker; stop at the first refusal (the sweeper
        re-sends whatever stays ``received``, so one outage costs one timeout)."""
        queued: list[tuple[int, str]] = []
        for event_id in event_ids:
            task_id = self.dispatcher.publish_fhir_event(event_id)
            if not task_id:
                break
            queued.append((event_id, task_id))
        if not queued:
            return
        try:
            now = utcnow()
            with self.database.session() as session:
                for event_id, task_id in queued:
                    events_db.mark_queued(session, event_id, task_id, now)
        except SQLAlchemyError as exc:
            log.warning("could not mark FHIR events queued (%s)", type(exc).__name__)

    # One transaction ------------------------------------------------------------------

    def _record(
        self, session: Session, parsed: Parsed, webhook_id: str | None, body_sha256: str
    ) -> Taken:
        if webhook_id is not None:
            prior = events_db.find_by_webhook_id(session, webhook_id)
            if prior is not None:
                log.info("webhook-id replayed (event %d); nothing recorded", prior.id)
                return Taken(200, f"webhook-id already received as event {prior.id}; no-op")
        now = utcnow()
        if isinstance(parsed, Notification):
            return self._record_notification(session, parsed, webhook_id, body_sha256, now)
        return self._record_events(
            session, FhirEventSource.DIRECT, "R4", None, parsed, webhook_id, body_sha256, now
        )

    def _record_notification(
        self,
        session: Session,
        notification: Notification,
        webhook_id: str | None,
        body_sha256: str,
        now: datetime,
    ) -> Taken:
        subscription = notification.subscription
        if notification.kind in ("handshake", "heartbeat"):
            check = events_db.note_status(
                session,
                subscription,
                notification.events_since_start,
                heartbeat=notification.kind == "heartbeat",
                now=now,
            )
            self._audit_gap(session, subscription, check)
            if notification.kind == "handshake":  # heartbeats only update the state row
                audit.append(
                    session,
                    "fhir.subscription_handshake",
                    actor=ACTOR,
                    subscription=subscription,
                    fhir_version=notification.fhir_version,
                )
            return Taken(200, f"{notification.kind} received")
        taken: list[IncomingResource] = []
        # In number order, so events listed out of order are not mistaken for repeats.
        ordered = sorted(
            notification.resources, key=lambda r: (r.event_number is None, r.event_number or 0)
        )
        for resource in ordered:
            if resource.event_number is not None:
                check = events_db.check_event_number(
                    session, subscription, resource.event_number, now=now
                )
                if check.verdict is events_db.EventNumberVerdict.REPEAT:
                    continue
                self._audit_gap(session, subscription, check)
            taken.append(resource)
        if notification.events_since_start is not None:
            events_db.advance_to(session, subscription, notification.events_since_start, now=now)
        if not taken:
            log.info("repeated notification: every event was received before")
            return Taken(200, "every event of this notification was received before; no-op")
        return self._record_events(
            session,
            FhirEventSource.SUBSCRIPTION,
            notification.fhir_version,
            subscription,
            taken,
            webhook_id,
            body_sha256,
            now,
        )

    def _audit_gap(
        self, session: Session, subscription: str, check: events_db.EventNumberCheck
    ) -> None:
        if check.verdict is not events_db.EventNumberVerdict.GAP:
            return
        # The catch-up query (the server's $events operation, or a search) is a later
        # stage; the gap is audited so it is visible and can be caught up.
        log.warning(
            "notification gap: events %s..%s never arrived", check.missing_from, check.missing_to
        )
        audit.append(
            session,
            "fhir.notification_gap",
            actor=ACTOR,
            subscription=subscription,
            missing_from=check.missing_from,
            missing_to=check.missing_to,
        )

    def _record_events(
        self,
        session: Session,
        source: FhirEventSource,
        fhir_version: str,
        subscription: str | None,
        resources: list[IncomingResource],
        webhook_id: str | None,
        body_sha256: str,
        now: datetime,
    ) -> Taken:
        recorded = [
            events_db.record_event(
                session,
                source=source,
                fhir_version=fhir_version,
                resource_type=resource.resource_type,
                resource_id=resource.resource_id,
                body=resource.body,
                body_sha256=body_sha256,
                subscription=subscription,
                event_number=resource.event_number,
                # One delivery, one webhook id: kept on its first event (the column is unique).
                webhook_id=webhook_id if index == 0 else None,
                now=now,
            )
            for index, resource in enumerate(resources)
        ]
        ids = [event.id for event in recorded]
        # No PHI: internal ids, types, counts and the hash of the body as received.
        audit.append(
            session,
            "fhir.received",
            actor=ACTOR,
            source=source.value,
            fhir_version=fhir_version,
            subscription=subscription,
            events=ids,
            resource_types=sorted({event.resource_type for event in recorded}),
            id_only=sum(1 for event in recorded if event.body is None),
            body_sha256=body_sha256,
            webhook_id=webhook_id,
        )
        log.info("recorded FHIR events %s (%s)", ids, source.value)
        return Taken(
            202,
            "recorded",
            events=[(event.id, event.resource_type) for event in recorded],
            source=source,
        )
