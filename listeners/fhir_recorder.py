"""Recording what the FHIR webhook took: events, Subscription state and audit, in a session.

No HTTP and no broker here: the webhook hands over a parsed and validated request, and
``listeners.fhir_batch.GroupCommitter`` runs :meth:`EventRecorder.record` in the request's
savepoint of a shared transaction and commits it before the webhook answers. Everything a
request changes is in that savepoint, so a request rolled back leaves nothing behind.

Direct POSTs (the bulk of a busy EHR's traffic) are recorded together instead:
:meth:`EventRecorder.record_direct_many` takes every direct POST of a batch in one
savepoint, with one lookup of their webhook-ids, one INSERT of their events and one
append of their audit events (one per request, as before).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from db import audit
from db import fhir_events as events_db
from db.audit import AuditEntry
from db.schema import FhirEventSource, utcnow
from listeners.fhir_payloads import IncomingResource, Notification

log = logging.getLogger("carebridge.fhir")

ACTOR = "listener"

Parsed = list[IncomingResource] | Notification


@dataclass
class Taken:
    """What a committed request produced: events (id, resource type), or a 200 message."""

    status: int
    message: str
    events: list[tuple[int, str]] = field(default_factory=list)
    source: FhirEventSource | None = None


@dataclass(frozen=True)
class DirectPost:
    """A validated direct POST (a resource or a Bundle of them) waiting to be recorded."""

    resources: list[IncomingResource]
    webhook_id: str | None
    body_sha256: str


class EventRecorder:
    """Records parsed requests in the caller's transaction (the caller commits)."""

    def record(
        self, session: Session, parsed: Parsed, webhook_id: str | None, body_sha256: str
    ) -> Taken:
        """Record one request: its events, Subscription state and audit event.

        A replayed webhook-id (seen in this transaction or committed before) is a no-op.
        Raises IntegrityError when a concurrent transaction won a unique key (the same
        webhook-id, the first notification of a Subscription): roll back and call again.
        """
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

    def record_direct_many(self, session: Session, posts: list[DirectPost]) -> list[Taken]:
        """Record direct POSTs together; one Taken per post, in order.

        The same outcome as :meth:`record` for each post in turn: a webhook-id recorded
        before, or by an earlier post of this list, is a no-op. Raises IntegrityError when
        a concurrent transaction won a webhook-id: roll back and record them one by one.
        """
        now = utcnow()
        source = FhirEventSource.DIRECT
        prior = events_db.find_webhook_ids(
            session, [post.webhook_id for post in posts if post.webhook_id is not None]
        )
        first_of: dict[str, int] = {}  # webhook-id -> index of the post that records it
        replay_of: dict[int, str] = {}  # post index -> the webhook-id it repeats
        new_events: list[events_db.NewEvent] = []
        for index, post in enumerate(posts):
            webhook_id = post.webhook_id
            if webhook_id is not None:
                if webhook_id in prior or webhook_id in first_of:
                    replay_of[index] = webhook_id
                    continue
                first_of[webhook_id] = index
            new_events += [
                events_db.NewEvent(
                    source=source,
                    fhir_version="R4",
                    resource_type=resource.resource_type,
                    resource_id=resource.resource_id,
                    body=resource.body,
                    body_sha256=post.body_sha256,
                    event_number=resource.event_number,
                    # One delivery, one webhook id: on its first event (the column is unique).
                    webhook_id=webhook_id if position == 0 else None,
                )
                for position, resource in enumerate(post.resources)
            ]
        event_ids = iter(events_db.record_events(session, new_events, now=now))
        taken: list[Taken] = []
        entries: list[AuditEntry] = []
        for index, post in enumerate(posts):
            if index in replay_of:
                taken.append(Taken(0, ""))  # filled in below, once every id is known
                continue
            ids = [next(event_ids) for _ in post.resources]
            types = [resource.resource_type for resource in post.resources]
            entries.append(
                AuditEntry(
                    "fhir.received",
                    ACTOR,
                    # No PHI: internal ids, types, counts and the hash of the body as received.
                    {
                        "source": source.value,
                        "fhir_version": "R4",
                        "subscription": None,
                        "events": ids,
                        "resource_types": sorted(set(types)),
                        "id_only": sum(1 for r in post.resources if r.body is None),
                        "body_sha256": post.body_sha256,
                        "webhook_id": post.webhook_id,
                    },
                )
            )
            taken.append(
                Taken(202, "recorded", events=list(zip(ids, types, strict=True)), source=source)
            )
        for index, webhook_id in replay_of.items():
            if webhook_id in prior:
                event_id = prior[webhook_id]
            else:
                event_id = taken[first_of[webhook_id]].events[0][0]
            log.info("webhook-id replayed (event %d); nothing recorded", event_id)
            taken[index] = Taken(200, f"webhook-id already received as event {event_id}; no-op")
        audit.append_many(session, entries, now=now)
        recorded = [event_id for one in taken for event_id, _ in one.events]
        if recorded:
            log.info("recorded FHIR events %s (%s)", recorded, source.value)
        return taken

    @staticmethod
    def audit_refusal(
        session: Session, route: str, status: int, reason: str, peer: str | None
    ) -> None:
        """Audit a request refused for its credentials (never its body)."""
        audit.append(
            session,
            "fhir.auth_failed",
            actor=ACTOR,
            route=route,
            status=status,
            reason=reason,
            peer=peer,
        )

    # One request ----------------------------------------------------------------------

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
            catch_up = self._audit_gap(session, subscription, check, now)
            if notification.kind == "handshake":  # heartbeats only update the state row
                audit.append(
                    session,
                    "fhir.subscription_handshake",
                    actor=ACTOR,
                    subscription=subscription,
                    fhir_version=notification.fhir_version,
                )
            if catch_up:
                return Taken(
                    202,
                    "gap recorded for catch-up",
                    events=catch_up,
                    source=FhirEventSource.SUBSCRIPTION,
                )
            return Taken(200, f"{notification.kind} received")
        taken: list[IncomingResource] = []
        catch_ups: list[tuple[int, str]] = []
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
                catch_ups += self._audit_gap(session, subscription, check, now)
            taken.append(resource)
        if notification.events_since_start is not None:
            events_db.advance_to(session, subscription, notification.events_since_start, now=now)
        if not taken:
            log.info("repeated notification: every event was received before")
            return Taken(200, "every event of this notification was received before; no-op")
        recorded = self._record_events(
            session,
            FhirEventSource.SUBSCRIPTION,
            notification.fhir_version,
            subscription,
            taken,
            webhook_id,
            body_sha256,
            now,
        )
        recorded.events = catch_ups + recorded.events
        return recorded

    def _audit_gap(
        self,
        session: Session,
        subscription: str,
        check: events_db.EventNumberCheck,
        now: datetime,
    ) -> list[tuple[int, str]]:
        """On a gap: audit it and record a catch-up request (queued like any event; the
        worker asks the EHR for the missing events). The request's (event id, type)."""
        if check.verdict is not events_db.EventNumberVerdict.GAP:
            return []
        assert check.missing_from is not None and check.missing_to is not None
        log.warning(
            "notification gap: events %s..%s never arrived", check.missing_from, check.missing_to
        )
        request = events_db.record_catch_up(
            session, subscription, check.missing_from, check.missing_to, now=now
        )
        audit.append(
            session,
            "fhir.notification_gap",
            actor=ACTOR,
            subscription=subscription,
            missing_from=check.missing_from,
            missing_to=check.missing_to,
            catch_up_event=request.id,
        )
        return [(request.id, request.resource_type)]

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
