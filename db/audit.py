"""The append-only, hash-chained audit trail.

Each event's hash covers its content and the previous event's hash, so editing or deleting
any row breaks the chain from that point; ``verify`` walks the chain and reports the first
break. Appends are serialised by locking the single ``audit_head`` row; ``append_many``
adds a whole batch of events under one lock, one read of the head and one INSERT.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select, update
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


def _hash(prev_hash: str, canonical: bytes) -> str:
    digest = hashlib.sha256(prev_hash.encode())
    digest.update(canonical)
    return digest.hexdigest()


def event_hash(prev_hash: str, event: AuditEvent) -> str:
    """The hash an event must carry, given the previous event's hash."""
    return _hash(
        prev_hash,
        _canonical(
            event.seq,
            event.occurred_at,
            event.event_type,
            event.actor,
            event.study_instance_uid,
            event.detail,
            event.subject,
        ),
    )


@dataclass(frozen=True)
class AuditEntry:
    """One event for :func:`append_many`; ``detail`` holds no PHI (as for ``append``)."""

    event_type: str
    actor: str
    detail: dict[str, Any] = field(default_factory=dict)
    study_instance_uid: str | None = None
    subject: str | None = None


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


def append_many(
    session: Session, entries: Sequence[AuditEntry], *, now: datetime | None = None
) -> list[int]:
    """Append events in order, in the caller's transaction; their sequence numbers.

    The same chain as ``append`` one at a time, at the cost of one: the head row is locked
    and read once, the hashes are chained here, and the rows go in as one executemany.
    """
    if not entries:
        return []
    count = len(entries)
    # The UPDATE takes the row lock first (as in append), reserving ``count`` numbers.
    head = cast(Table, AuditHead.__table__)  # Core: no ORM object to keep in step
    last_seq, prev_hash = session.execute(
        update(head)
        .where(head.c.id == 1)
        .values(seq=head.c.seq + count)
        .returning(head.c.seq, head.c.hash)
    ).one()
    occurred_at = now or utcnow()
    rows: list[dict[str, Any]] = []
    seq = last_seq - count
    for entry in entries:
        seq += 1
        detail = json.loads(json.dumps(entry.detail, default=str))  # as the column returns it
        row_hash = _hash(
            prev_hash,
            _canonical(
                seq,
                occurred_at,
                entry.event_type,
                entry.actor,
                entry.study_instance_uid,
                detail,
                entry.subject,
            ),
        )
        rows.append(
            {
                "seq": seq,
                "occurred_at": occurred_at,
                "event_type": entry.event_type,
                "actor": entry.actor,
                "study_instance_uid": entry.study_instance_uid,
                "subject": entry.subject,
                "detail": detail,
                "prev_hash": prev_hash,
                "row_hash": row_hash,
            }
        )
        prev_hash = row_hash
    # Core: one statement executed for every row, no ORM objects to track.
    session.execute(insert(cast(Table, AuditEvent.__table__)), rows)
    session.execute(update(head).where(head.c.id == 1).values(hash=prev_hash))
    # An AuditHead that ``append`` loaded in this session no longer says what the row holds.
    for loaded in list(session.identity_map.values()):
        if isinstance(loaded, AuditHead):
            session.expire(loaded)
    return [row["seq"] for row in rows]


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
