"""Engines and sessions. The URL comes from the caller (settings are read by entry points)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or refused the write; the caller should retry later."""


def _sqlite_engine(url: str, *, durable_commits: bool = True) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns. NORMAL (WAL): a commit survives a
        # crash of the process, and a power loss may undo the last ones; only the DICOM
        # listener uses it, and it re-indexes its archive files on start (see
        # listeners.dicom.StorageSCP.index_unrecorded).
        cursor.execute(f"PRAGMA synchronous={'FULL' if durable_commits else 'NORMAL'}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # fails at once with "database is locked" when another process writes meanwhile.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class SqliteWriterTurn:
    """Turns at writing an SQLite database, for a listener's threads and processes.

    SQLite has one writer at a time, and a connection that finds the database locked sleeps
    in steps of milliseconds before it retries. The writers that answer peers (the DICOM
    listener's associations, the webhook's committers, in every listener process) take
    turns here instead: a thread lock, then an exclusive ``flock`` on a file next to the
    database, which wakes the next writer as soon as it is released. A commit holds it for
    a fraction of a millisecond.
    """

    def __init__(self, url: str) -> None:
        self._threads = threading.Lock()
        database = make_url(url).database
        self._path = (
            Path(database).with_name(Path(database).name + ".writer-lock")
            if database and database != ":memory:"
            else None
        )
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no lock file (read-only directory): SQLite's own locking still holds

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


class Database:
    """One engine and its session factory."""

    def __init__(self, url: str, *, durable_commits: bool = True) -> None:
        """``durable_commits=False`` (SQLite only): commits are not synced to disk one by
        one; for a writer whose rows can be rebuilt from files it has synced itself."""
        self.url = url
        if url.startswith("sqlite"):
            self.engine = _sqlite_engine(url, durable_commits=durable_commits)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writer_turn: contextlib.AbstractContextManager[Any] = (
            SqliteWriterTurn(url) if self.dialect == "sqlite" else contextlib.nullcontext()
        )

    def writer_turn(self) -> contextlib.AbstractContextManager[Any]:
        """Hold around a write transaction (``with db.writer_turn(), db.session() as s``)
        for a turn at SQLite's one writer without its busy-wait; a no-op elsewhere. Not
        re-entrant: never nest it, nor wait for another thread's turn while holding it."""
        return self._writer_turn

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction: committed on success, rolled back on any
        exception. For hot paths of plain statements, without a session's bookkeeping."""
        with self.engine.begin() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()
