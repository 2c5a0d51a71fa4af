"""Recording received instances: the rows a C-STORE commits before it answers success."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, DateTime, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
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
    patient_key: str | None = None  # DICOM Patient ID, to join imaging to the EHR's patient


def instance_exists(session: Session, sop_instance_uid: str) -> bool:
    """True when this SOP Instance UID was already committed."""
    found = session.execute(
        select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return found is not None


class InstanceRecorder:
    """Records received instances; one per listener process.

    The SQL statements are built once per dialect, and study and series ids are cached
    (rows are never deleted), so a typical C-STORE costs two statements: the instance
    insert and the study's clock update.
    """

    def __init__(self, dialect: str, cache_size: int = 4096) -> None:
        if dialect == "postgresql":
            insert: Any = pg_insert
            self._greatest: Any = func.greatest
        elif dialect == "sqlite":
            insert = sqlite_insert
            self._greatest = func.max
        else:  # pragma: no cover - other databases are not supported yet
            raise RuntimeError(f"unsupported database dialect {dialect}")
        study = insert(Study.__table__)
        self._study = study.on_conflict_do_update(
            index_elements=[Study.study_instance_uid],
            set_={"study_instance_uid": study.excluded.study_instance_uid},
        ).returning(Study.id)
        series = insert(Series.__table__)
        self._series = series.on_conflict_do_update(
            index_elements=[Series.series_instance_uid],
            set_={"series_instance_uid": series.excluded.series_instance_uid},
        ).returning(Series.id)
        self._instance = insert(Instance.__table__).on_conflict_do_nothing().returning(Instance.id)
        self._touch_study = (
            update(Study)
            .where(Study.id == bindparam("study_id"))
            .values(
                state=StudyState.RECEIVING,
                last_received_at=self._greatest(
                    Study.last_received_at, bindparam("now", type_=DateTime())
                ),
                instance_count=Study.instance_count + 1,
            )
        )
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def _id(self, connection: Any, statement: Any, uid: str, values: dict[str, Any]) -> int:
        cached = self._cache.get(uid)
        if cached is not None:
            return cached
        ident = int(connection.execute(statement, values).scalar_one())
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[uid] = ident
        return ident

    def forget(self) -> None:
        """Drop cached ids (after a rollback, a cached id may name a row that never was)."""
        self._cache.clear()

    def record(self, connection: Connection, received: ReceivedInstance) -> bool:
        """Add the instance (and its study and series) in the caller's transaction.

        Returns False when the instance was already recorded (a duplicate is a no-op).
        The study's quiet-period clock restarts, and a study that was already routed goes
        back to receiving, so the next quiet period starts a new run.
        """
        now = utcnow()
        study_id = self._id(
            connection,
            self._study,
            received.study_instance_uid,
            {
                "study_instance_uid": received.study_instance_uid,
                "patient_key": received.patient_key,
                "state": StudyState.RECEIVING.value,
                "run_number": 0,
                "instance_count": 0,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        series_id = self._id(
            connection,
            self._series,
            received.series_instance_uid,
            {
                "study_id": study_id,
                "series_instance_uid": received.series_instance_uid,
                "attributes": received.series_attributes,
                "created_at": now,
            },
        )
        inserted = connection.execute(
            self._instance,
            {
                "study_id": study_id,
                "series_id": series_id,
                "sop_instance_uid": received.sop_instance_uid,
                "sop_class_uid": received.sop_class_uid,
                "transfer_syntax_uid": received.transfer_syntax_uid,
                "path": received.path,
                "size_bytes": received.size_bytes,
                "sha256": received.sha256,
                "calling_ae": received.calling_ae,
                "received_at": now,
            },
        ).first()
        if inserted is None:
            return False
        connection.execute(self._touch_study, {"study_id": study_id, "now": now})
        return True
