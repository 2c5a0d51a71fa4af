"""The hash-chained audit trail: appends, verification, and tampering found."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from db import audit
from db.engine import Database
from db.migrate import upgrade
from tests.harness import postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        with postgres_database() as url:
            yield url


def _append(database: Database, n: int, actor: str = "test") -> None:
    for i in range(n):
        with database.session() as session:
            audit.append(session, "test.event", actor=actor, study_instance_uid="1.2.3", n=i)


def _verify_cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listeners.cli", "audit", "verify"],
        env={"CAREBRIDGE_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chain_verifies_and_concurrent_appends_stay_linear(database_url: str) -> None:
    upgrade(database_url)
    database = Database(database_url)
    threads = [threading.Thread(target=_append, args=(database, 10, f"t{i}")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with database.session() as session:
        count, breaks = audit.verify(session)
    assert (count, breaks) == (40, [])
    result = _verify_cli(database_url)
    assert result.returncode == 0, result.stderr
    assert "40 events verified" in result.stdout
    database.dispose()


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 3", "event 3"),
        ("DELETE FROM audit_events WHERE seq = 4", "event 4"),
        ("DELETE FROM audit_events WHERE seq = 6", "trailing events were deleted"),
    ],
)
def test_tampering_is_found(database_url: str, tamper: str, expected: str) -> None:
    upgrade(database_url)
    database = Database(database_url)
    _append(database, 6)
    assert _verify_cli(database_url).returncode == 0
    with database.engine.begin() as connection:
        connection.execute(text(tamper))
    result = _verify_cli(database_url)
    assert result.returncode == 1
    assert expected in result.stderr
    database.dispose()


def test_detail_edit_found(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    database = Database(url)
    _append(database, 3)
    with database.engine.begin() as connection:
        connection.execute(text("""UPDATE audit_events SET detail = '{"n": 99}' WHERE seq = 2"""))
    with database.session() as session:
        _, breaks = audit.verify(session)
    assert [b.seq for b in breaks] == [2]
    assert "edited" in breaks[0].reason
    database.dispose()


def _entries(n: int, first: int = 0) -> list[audit.AuditEntry]:
    return [
        audit.AuditEntry("test.batch", "test", {"n": first + i, "events": [first + i]})
        for i in range(n)
    ]


def test_append_many_extends_the_same_chain(database_url: str) -> None:
    """Batches and single appends interleave, in one transaction and across transactions,
    on both databases: one linear chain that verifies (in-process and with the CLI)."""
    upgrade(database_url)
    database = Database(database_url)
    _append(database, 2)
    with database.session() as session:
        assert audit.append_many(session, _entries(5)) == [3, 4, 5, 6, 7]
        audit.append(session, "test.event", actor="test", n=99)  # after a batch
        assert audit.append_many(session, _entries(3, 10)) == [9, 10, 11]
        assert audit.append_many(session, []) == []
    with database.session() as session:
        audit.append(session, "test.event", actor="test", n=100)
        assert audit.append_many(session, _entries(1, 20)) == [13]
        count, breaks = audit.verify(session)
    assert (count, breaks) == (13, [])
    result = _verify_cli(database_url)
    assert result.returncode == 0, result.stderr
    assert "13 events verified" in result.stdout
    database.dispose()


def test_concurrent_batches_and_appends_stay_linear(database_url: str) -> None:
    upgrade(database_url)
    database = Database(database_url)

    def batches() -> None:
        for i in range(5):
            with database.session() as session:
                audit.append_many(session, _entries(4, 10 * i))

    threads = [threading.Thread(target=batches) for _ in range(2)]
    threads += [threading.Thread(target=_append, args=(database, 5, f"t{i}")) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with database.session() as session:
        assert audit.verify(session) == (50, [])
    database.dispose()


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        # Rows 3..7 were appended as one batch; each edit inside it is found.
        ("UPDATE audit_events SET detail = '{\"n\": 7}' WHERE seq = 5", "event 5"),
        ("UPDATE audit_events SET occurred_at = '2020-01-01 00:00:00' WHERE seq = 3", "event 3"),
        ("DELETE FROM audit_events WHERE seq = 4", "event 4"),
        ("DELETE FROM audit_events WHERE seq = 7", "trailing events were deleted"),
    ],
)
def test_tampering_inside_a_batch_is_found(database_url: str, tamper: str, expected: str) -> None:
    upgrade(database_url)
    database = Database(database_url)
    _append(database, 2)
    with database.session() as session:
        audit.append_many(session, _entries(5))
    assert _verify_cli(database_url).returncode == 0
    with database.engine.begin() as connection:
        connection.execute(text(tamper))
    result = _verify_cli(database_url)
    assert result.returncode == 1
    assert expected in result.stderr
    database.dispose()


def test_a_batch_rolled_back_leaves_no_hole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    database = Database(url)
    _append(database, 1)
    with pytest.raises(RuntimeError), database.session() as session:
        audit.append_many(session, _entries(3))
        raise RuntimeError("the change it audits failed")
    with database.session() as session:
        assert audit.append_many(session, _entries(2)) == [2, 3]
        assert audit.verify(session) == (3, [])
    database.dispose()
