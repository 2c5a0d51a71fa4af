"""FHIR events as the webhook records them, and Subscription event numbering.

Every function works in the caller's transaction: the webhook records its events, the
Subscription state and the audit event together and commits once, before it answers.
Subscription servers number their notifications (``events-since-subscription-start``);
keeping the highest number seen per Subscription tells a repeated notification (a no-op)
from a gap (events that never arrived).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from db.schema import (
    FhirEvent,
    FhirEventSource,
    FhirEventStatus,
    FhirSubscriptionState,
    utcnow,
)


class EventNumberVerdict(enum.StrEnum):
    """Where an event number falls relative to the last one seen for its Subscription."""

    OK = "ok"  # the next number, or the first one seen
    REPEAT = "repeat"  # already seen: the notification was re-sent
    GAP = "gap"  # numbers were skipped: those events never arrived here


@dataclass(frozen=True)
class EventNumberCheck:
    """The verdict on one event number, with the missing range on a gap (inclusive)."""

    verdict: EventNumberVerdict
    missing_from: int | None = None
    missing_to: int | None = None


def record_event(
    session: Session,
    *,
    source: FhirEventSource,
    fhir_version: str,
    resource_type: str,
    resource_id: str | None,
    body: dict[str, Any] | None,
    body_sha256: str,
    subscription: str | None = None,
    event_number: int | None = None,
    webhook_id: str | None = None,
    now: datetime | None = None,
) -> FhirEvent:
    """Add one event in status RECEIVED and flush it, so its id is known before commit."""
    event = FhirEvent(
        received_at=now or utcnow(),
        source=source,
        fhir_version=fhir_version,
        resource_type=resource_type,
        resource_id=resource_id,
        subscription=subscription,
        event_number=event_number,
        webhook_id=webhook_id,
        body_sha256=body_sha256,
        body=body,
        status=FhirEventStatus.RECEIVED,
    )
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class NewEvent:
    """One event for :func:`record_events` (the fields of :func:`record_event`)."""

    source: FhirEventSource
    fhir_version: str
    resource_type: str
    resource_id: str | None
    body: dict[str, Any] | None
    body_sha256: str
    subscription: str | None = None
    event_number: int | None = None
    webhook_id: str | None = None


def _new_ids(session: Session, table: Table, count: int) -> list[int] | None:
    """``count`` ids for new events, taken before the INSERT so that it can run as one
    executemany (RETURNING with its rows in order costs one statement per row on SQLite);
    None where this dialect has no way here."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        # The transaction holds SQLite's write lock (BEGIN IMMEDIATE, db/engine.py): no one
        # else inserts before it commits. SQLite itself numbers a new row max(id) + 1.
        last = session.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one()
        return list(range(last + 1, last + 1 + count))
    if dialect == "postgresql":
        # The column's own sequence: the same numbers the INSERT would have drawn.
        rows = session.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('fhir_events', 'id')) "
                "FROM generate_series(1, :count)"
            ),
            {"count": count},
        )
        return [int(row_id) for (row_id,) in rows]
    return None


def record_events(
    session: Session, new_events: Sequence[NewEvent], *, now: datetime | None = None
) -> list[int]:
    """Add events in status RECEIVED as one INSERT executed for all; their ids, in order.

    Core, not ORM objects: the webhook records a batch of requests at once and needs only
    the ids. A unique-key clash fails the whole statement (IntegrityError).
    """
    if not new_events:
        return []
    received_at = now or utcnow()
    table = cast(Table, FhirEvent.__table__)
    rows: list[dict[str, Any]] = [
        {
            "received_at": received_at,
            "source": event.source,
            "fhir_version": event.fhir_version,
            "resource_type": event.resource_type,
            "resource_id": event.resource_id,
            "subscription": event.subscription,
            "event_number": event.event_number,
            "webhook_id": event.webhook_id,
            "body_sha256": event.body_sha256,
            "body": event.body,
            "status": FhirEventStatus.RECEIVED,
        }
        for event in new_events
    ]
    ids = _new_ids(session, table, len(rows))
    if ids is None:
        result = session.execute(
            insert(table).returning(table.c.id, sort_by_parameter_order=True), rows
        )
        return [row_id for (row_id,) in result]
    for row, row_id in zip(rows, ids, strict=True):
        row["id"] = row_id
    session.execute(insert(table), rows)
    return ids


CATCH_UP_TYPE = "Subscription"  # resource type of a catch-up request event


def record_catch_up(
    session: Session,
    subscription: str,
    missing_from: int,
    missing_to: int,
    *,
    now: datetime | None = None,
) -> FhirEvent:
    """Record a request to fetch a Subscription's missed events ``missing_from``..``to``.

    It is an event like the others (committed with the notification, queued, re-sent by
    the sweeper), whose body is a Parameters resource naming the range.
    """
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "eventsSinceNumber", "valueInteger": missing_from},
            {"name": "eventsUntilNumber", "valueInteger": missing_to},
        ],
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")) + subscription
    return record_event(
        session,
        source=FhirEventSource.SUBSCRIPTION,
        fhir_version="R4",
        resource_type=CATCH_UP_TYPE,
        resource_id=None,
        body=body,
        body_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
        subscription=subscription,
        now=now,
    )


def catch_up_range(event: FhirEvent) -> tuple[int, int] | None:
    """(since, until) of a catch-up request event; None for any other event."""
    if event.resource_type != CATCH_UP_TYPE or not isinstance(event.body, dict):
        return None
    values = {p.get("name"): p.get("valueInteger") for p in event.body.get("parameter", [])}
    since, until = values.get("eventsSinceNumber"), values.get("eventsUntilNumber")
    if isinstance(since, int) and isinstance(until, int):
        return since, until
    return None


def find_by_webhook_id(session: Session, webhook_id: str) -> FhirEvent | None:
    """The event a Standard Webhooks delivery with this id recorded, if any."""
    return session.execute(
        select(FhirEvent).where(FhirEvent.webhook_id == webhook_id)
    ).scalar_one_or_none()


def find_webhook_ids(session: Session, webhook_ids: Sequence[str]) -> dict[str, int]:
    """Of these Standard Webhooks ids, those already recorded: id -> its event's id."""
    if not webhook_ids:
        return {}
    rows = session.execute(
        select(FhirEvent.webhook_id, FhirEvent.id).where(FhirEvent.webhook_id.in_(webhook_ids))
    )
    return {webhook_id: event_id for webhook_id, event_id in rows if webhook_id is not None}


def mark_queued(session: Session, event_id: int, task_id: str, now: datetime) -> bool:
    """RECEIVED -> QUEUED after the broker took the task; False if it had moved on."""
    changed: Any = session.execute(
        update(FhirEvent)
        .where(FhirEvent.id == event_id, FhirEvent.status == FhirEventStatus.RECEIVED)
        .values(status=FhirEventStatus.QUEUED, task_id=task_id, queued_at=now)
    )
    return bool(changed.rowcount == 1)


def mark_queued_many(session: Session, queued: Sequence[tuple[int, str]], now: datetime) -> None:
    """RECEIVED -> QUEUED for each (event id, task id) the broker took, as one statement
    executed for all of them; events that had moved on are left as they are."""
    if not queued:
        return
    table = cast(Table, FhirEvent.__table__)  # Core: one statement, executed for each event
    session.execute(
        update(table)
        .where(
            table.c.id == bindparam("event_id"),
            table.c.status == FhirEventStatus.RECEIVED,
        )
        .values(status=FhirEventStatus.QUEUED, task_id=bindparam("broker_task_id"), queued_at=now),
        [{"event_id": event_id, "broker_task_id": task_id} for event_id, task_id in queued],
    )


def _locked_state(session: Session, subscription: str, now: datetime) -> FhirSubscriptionState:
    # FOR UPDATE serialises notifications of one Subscription on PostgreSQL (SQLite
    # transactions are already serial). Two first notifications racing to insert the row
    # make one commit fail on the unique constraint; the webhook retries that transaction.
    state = session.execute(
        select(FhirSubscriptionState)
        .where(FhirSubscriptionState.subscription == subscription)
        .with_for_update()
    ).scalar_one_or_none()
    if state is None:
        state = FhirSubscriptionState(
            subscription=subscription, last_event_number=0, updated_at=now
        )
        session.add(state)
        session.flush()
    return state


def check_event_number(
    session: Session, subscription: str, event_number: int, *, now: datetime | None = None
) -> EventNumberCheck:
    """Check one notification event's number and advance the Subscription's state.

    Numbering starts at 1, so the first event seen with a higher number is a gap: the
    events before it were sent before carebridge recorded this Subscription.
    """
    now = now or utcnow()
    state = _locked_state(session, subscription, now)
    last = state.last_event_number
    if event_number <= last:
        return EventNumberCheck(EventNumberVerdict.REPEAT)
    state.last_event_number = event_number
    state.updated_at = now
    if event_number > last + 1:
        return EventNumberCheck(EventNumberVerdict.GAP, last + 1, event_number - 1)
    return EventNumberCheck(EventNumberVerdict.OK)


def note_status(
    session: Session,
    subscription: str,
    events_since_start: int | None,
    *,
    heartbeat: bool,
    now: datetime | None = None,
) -> EventNumberCheck:
    """Record a handshake or heartbeat: the server says how many events it has sent.

    More than we have seen is a gap (the missing events are the ones after our last);
    the state then moves on so the same gap is reported once.
    """
    now = now or utcnow()
    state = _locked_state(session, subscription, now)
    state.updated_at = now
    if heartbeat:
        state.last_heartbeat_at = now
    last = state.last_event_number
    if events_since_start is None or events_since_start <= last:
        return EventNumberCheck(EventNumberVerdict.OK)
    state.last_event_number = events_since_start
    return EventNumberCheck(EventNumberVerdict.GAP, last + 1, events_since_start)


def advance_to(
    session: Session, subscription: str, events_since_start: int, *, now: datetime | None = None
) -> None:
    """Move the Subscription's last event number up to ``events_since_start`` (never down)."""
    now = now or utcnow()
    state = _locked_state(session, subscription, now)
    if events_since_start > state.last_event_number:
        state.last_event_number = events_since_start
        state.updated_at = now
