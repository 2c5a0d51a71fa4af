"""The append-only, hash-chained audit trail.

Each event's hash covers its content and the previous event's hash, so editing or deleting
any row breaks the chain from that point; ``verify`` walks the chain and reports the first
break. Appends are serialised by locking the single ``audit_head`` row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.schema import AuditEvent, AuditHead, utcnow

GENESIS_HASH = "0" * 64


def _canonical(
    seq: int,
    occurred_at: datetime,
    event_type: str,
    actor: str,
    study_instance_uid: str | None,
    detail: dict[str, Any],
    subject: str | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "seq": seq,
        "occurred_at": occurred_at.replace(tzinfo=None).isoformat(timespec="microseconds"),
        "event_type": event_type,
        "actor": actor,
        "study_instance_uid": study_instance_uid,
        "detail": detail,
    }
    if subject is not None:  # absent from older rows' hashes, so they still verify
        body["subject"] = subject
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def event_hash(prev_hash: str, event: AuditEvent) -> str:
    """The hash an event must carry, given the previous event's hash."""
    digest = hashlib.sha256(prev_hash.encode())
    digest.update(
        _canonical(
            event.seq,
            event.occurred_at,
            event.event_type,
            event.actor,
            event.study_instance_uid,
            event.detail,
            event.subject,
        )
    )
    return digest.hexdigest()


def append(
    session: Session,
    event_type: str,
    *,
    actor: str,
    study_instance_uid: str | None = None,
    subject: str | None = None,
    **detail: Any,
) -> AuditEvent:
    """Append one event in the caller's transaction (committed with the change it audits).

    ``detail`` must hold no PHI: internal ids, UIDs, statuses, timings, error classes.
    """
    # The UPDATE takes the row lock first, serialising concurrent appenders.
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1))
    head = session.execute(
        select(AuditHead).where(AuditHead.id == 1).execution_options(populate_existing=True)
    ).scalar_one()
    detail = json.loads(json.dumps(detail, default=str))  # what the JSON column will return
    event = AuditEvent(
        seq=head.seq,
        occurred_at=utcnow(),
        event_type=event_type,
        actor=actor,
        study_instance_uid=study_instance_uid,
        subject=subject,
        detail=detail,
        prev_hash=head.hash,
        row_hash="",
    )
    event.row_hash = event_hash(head.hash, event)
    head.hash = event.row_hash
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class ChainBreak:
    """Where and why the audit chain does not verify."""

    seq: int
    reason: str


def iter_events(session: Session, batch: int = 1000) -> Iterator[AuditEvent]:
    """All events in chain order, read in batches."""
    last = 0
    while True:
        rows = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.seq > last)
                .order_by(AuditEvent.seq)
                .limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify(session: Session) -> tuple[int, list[ChainBreak]]:
    """Walk the chain; return the number of events checked and every break found."""
    breaks: list[ChainBreak] = []
    prev_hash = GENESIS_HASH
    expected_seq = 1
    count = 0
    for event in iter_events(session):
        count += 1
        if event.seq != expected_seq:
            breaks.append(
                ChainBreak(expected_seq, f"events {expected_seq}..{event.seq - 1} are missing")
            )
        if event.prev_hash != prev_hash:
            breaks.append(ChainBreak(event.seq, "previous-hash link does not match"))
        if event_hash(event.prev_hash, event) != event.row_hash:
            breaks.append(ChainBreak(event.seq, "content does not match its hash (edited)"))
        prev_hash = event.row_hash
        expected_seq = event.seq + 1
    head = session.get(AuditHead, 1)
    if head is None:
        breaks.append(ChainBreak(0, "the audit head row is missing"))
    elif head.seq != expected_seq - 1 or head.hash != prev_hash:
        breaks.append(
            ChainBreak(
                head.seq,
                f"the chain ends at event {expected_seq - 1} but the head says {head.seq}: "
                "trailing events were deleted or the head was edited",
            )
        )
    return count, breaks
