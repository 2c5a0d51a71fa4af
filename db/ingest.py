"""Recording received instances: the rows a C-STORE commits before it answers success."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.schema import Instance, Series, Study, StudyState, utcnow


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP knows about one stored instance (validated UIDs, no PHI)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the archive
    size_bytes: int
    sha256: str
    calling_ae: str
    series_attributes: dict[str, Any] = field(default_factory=dict)


def instance_exists(session: Session, sop_instance_uid: str) -> bool:
    """True when this SOP Instance UID was already committed."""
    found = session.execute(
        select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return found is not None


def _insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(pg_insert(table).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        session.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - other databases are not supported yet
        raise RuntimeError(f"unsupported database dialect {dialect}")


def record_instance(session: Session, received: ReceivedInstance) -> bool:
    """Add the instance (and its study and series) in the caller's transaction.

    Returns False when the instance was already recorded (a duplicate is a no-op). The
    study's quiet-period clock restarts, and a study that was already routed goes back to
    receiving, so the next quiet period starts a new run.
    """
    now = utcnow()
    _insert_ignore(
        session,
        Study.__table__,
        {
            "study_instance_uid": received.study_instance_uid,
            "state": StudyState.RECEIVING.value,
            "run_number": 0,
            "instance_count": 0,
            "first_received_at": now,
            "last_received_at": now,
        },
    )
    study_id = session.execute(
        select(Study.id).where(Study.study_instance_uid == received.study_instance_uid)
    ).scalar_one()
    _insert_ignore(
        session,
        Series.__table__,
        {
            "study_id": study_id,
            "series_instance_uid": received.series_instance_uid,
            "attributes": received.series_attributes,
            "created_at": now,
        },
    )
    series_id = session.execute(
        select(Series.id).where(Series.series_instance_uid == received.series_instance_uid)
    ).scalar_one()
    try:
        with session.begin_nested():
            session.add(
                Instance(
                    study_id=study_id,
                    series_id=series_id,
                    sop_instance_uid=received.sop_instance_uid,
                    sop_class_uid=received.sop_class_uid,
                    transfer_syntax_uid=received.transfer_syntax_uid,
                    path=received.path,
                    size_bytes=received.size_bytes,
                    sha256=received.sha256,
                    calling_ae=received.calling_ae,
                    received_at=now,
                )
            )
    except IntegrityError:
        return False
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(
            state=StudyState.RECEIVING,
            last_received_at=func.max(Study.last_received_at, now)
            if session.get_bind().dialect.name == "sqlite"
            else func.greatest(Study.last_received_at, now),
            instance_count=Study.instance_count + 1,
        )
    )
    return True
