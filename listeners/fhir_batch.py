"""Group commit for the FHIR webhook: requests that arrive together share one transaction.

A commit costs an fsync (SQLite ``synchronous=FULL``, PostgreSQL ``fsync``), and the
audit chain serialises every writer on its head row, so one transaction per request caps
the webhook at one request per fsync. Here one committer thread takes the requests that
arrived together and records them in ONE transaction:

- requests submitted "together" with the same ``record_many`` (direct POSTs) are recorded
  by ONE call of it, in one SAVEPOINT: one INSERT of their events, one append of their
  audit events. Should that call fail (a unique-key race, one request's own failure), its
  savepoint is rolled back and each of those requests is recorded alone, as below, so
  the failure stays with the request that caused it;
- other work (and the fallback above) runs in a SAVEPOINT per request, so a request that
  loses a unique-key race (a replayed webhook-id, the first notification of a
  Subscription) is rolled back to its savepoint and retried, and a request whose work
  fails is rolled back alone, while the others of the batch go on;
- the committer commits, and only then resolves each request's future: the webhook
  answers 202 after the commit, as before;
- when the commit (or the database) fails, every request of the batch gets the error
  (the webhook answers 503) and nothing of the batch is stored;
- the audit chain keeps one event per request, in the batch's transaction (the groups
  recorded together come first, then the other work in the order it arrived).

A batch holds at most ``max_batch`` requests and ``max_batch_bytes`` of request bodies
(always at least one). It takes what is waiting when the committer becomes free; with
``max_wait_s`` > 0 it also waits up to that long after its first request for more. The
default waits not at all: under load, requests pile up while the previous batch commits,
so batches grow with the load and an idle webhook adds no delay.

Committed events are handed to the broker by ``listeners.fhir_publisher.EventPublisher``,
which marks them queued through this committer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.orm import Session

from db.engine import Database

log = logging.getLogger("carebridge.fhir")

T = TypeVar("T")
R = TypeVar("R")  # a request recorded together with others


@dataclass(frozen=True)
class Together(Generic[R, T]):
    """Lets a request be recorded with the others of its batch that name the same
    ``record_many``: one call ``record_many(session, [request, ...])`` that returns one
    result per request, in order. Should that call fail, each request's own work runs
    alone instead (in a savepoint of its own), so it must do the same as that call."""

    record_many: Callable[[Session, list[R]], list[T]]
    request: R


MAX_BATCH = 64  # requests per transaction
MAX_BATCH_BYTES = 16 * 1024 * 1024  # request bodies per transaction (a large Bundle is alone)
STORE_ATTEMPTS = 3  # a lost race on a unique key is rolled back to its savepoint and retried
IDLE_EXIT_S = 5.0  # an idle thread ends; the next request starts it again


@dataclass(eq=False)
class _Work(Generic[T]):
    """One request's share of a batch."""

    run: Callable[[Session], T]
    size: int
    submitted: float
    together: Together[Any, T] | None = None
    future: Future[T] = field(default_factory=Future)
    # Set by run(): the caller's event loop and its future, told once per batch and loop.
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[T] | None = None
    result: T | None = None
    error: BaseException | None = None

    def resolve(self) -> None:
        """Hand the outcome to ``future`` (call from the committer thread)."""
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)  # type: ignore[arg-type]


def _wake(items: list[_Work[Any]]) -> None:
    """On an event loop: resolve the waiters of the batch's requests from that loop."""
    for item in items:
        waiter = item.waiter
        if waiter is None or waiter.done():  # the request's task was cancelled
            continue
        if item.error is not None:
            waiter.set_exception(item.error)
        else:
            waiter.set_result(item.result)


def _own_failure(exc: Exception) -> bool:
    """Whether ``exc`` is one request's own (its data), after which rolling back to its
    savepoint leaves the transaction usable for the others; not a connection or the
    transaction itself failing."""
    if not isinstance(exc, SQLAlchemyError):
        return True
    if isinstance(exc, (IntegrityError, DataError)):
        return True
    # Parameters that could not be bound (a value of the wrong kind) never reached the
    # database; every other DBAPI error may mean the connection or transaction is gone.
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


class GroupCommitter:
    """One thread that records concurrent requests in shared transactions.

    ``submit(work)`` queues ``work(session)``; the returned future resolves after the
    transaction holding it committed (with ``work``'s result, or the exception that
    rolled it back), or fails with the SQLAlchemyError that lost the whole batch.
    """

    def __init__(
        self,
        database: Database,
        *,
        max_batch: int = MAX_BATCH,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_wait_s: float = 0.0,
        idle_exit_s: float = IDLE_EXIT_S,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_batch_bytes < 1:
            raise ValueError("max_batch_bytes must be at least 1")
        if max_wait_s < 0 or idle_exit_s <= 0:
            raise ValueError("max_wait_s must be >= 0 and idle_exit_s > 0")
        self.database = database
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_wait_s = max_wait_s
        self.idle_exit_s = idle_exit_s
        self.batches = 0  # transactions committed or attempted, for tests and metrics
        self._pending: deque[_Work[Any]] = deque()
        self._lock = threading.Lock()
        self._work_waiting = threading.Condition(self._lock)  # the committer waits on it
        self._went_idle = threading.Condition(self._lock)  # wait_idle() callers wait on it
        self._busy = False  # a batch is being recorded
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(
        self,
        work: Callable[[Session], T],
        size: int = 0,
        *,
        together: Together[Any, T] | None = None,
    ) -> Future[T]:
        """Queue ``work`` for the next batch; ``size`` (body bytes) bounds the batch.

        With ``together``, the batch's requests that name the same ``record_many`` are
        recorded by one call of it, and ``work`` runs only if that call fails.
        """
        return self._enqueue(_Work(work, size, time.monotonic(), together=together)).future

    async def run(
        self,
        work: Callable[[Session], T],
        size: int = 0,
        *,
        together: Together[Any, T] | None = None,
    ) -> T:
        """Submit ``work`` (as ``submit``) and wait for its batch's commit without
        blocking the loop.

        The committer wakes each event loop once per batch (not once per request).
        A request cancelled before its batch began is never stored.
        """
        return await self._wait(_Work(work, size, time.monotonic(), together=together))

    async def _wait(self, item: _Work[T]) -> T:
        loop = asyncio.get_running_loop()
        item.loop, item.waiter = loop, loop.create_future()
        self._enqueue(item)
        assert item.waiter is not None
        try:
            return await item.waiter
        except asyncio.CancelledError:
            item.future.cancel()  # succeeds only while its batch has not begun
            raise

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being recorded; False if ``timeout`` passed."""
        with self._lock:
            return self._went_idle.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _enqueue(self, item: _Work[T]) -> _Work[T]:
        with self._lock:
            self._pending.append(item)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(
                    target=self._loop, name="fhir-group-commit", daemon=True
                )
                self._thread.start()
            self._work_waiting.notify()
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Record what is queued, then stop the thread (a later submit starts it again)."""
        with self._lock:
            thread = self._thread
            self._closing = True
            self._work_waiting.notify()
        if thread is not None:
            thread.join(timeout)

    # The committer thread --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._commit(batch)
            except BaseException as exc:  # never leave a request waiting forever
                for item in batch:
                    if not item.future.done():
                        item.error = exc
                        item.resolve()
                self._wake_loops(batch)
                if not isinstance(exc, Exception):
                    raise
            finally:
                with self._lock:
                    self._busy = False
                    if not self._pending:
                        self._went_idle.notify_all()

    def _next_batch(self) -> list[_Work[Any]] | None:
        with self._lock:
            idle_until = time.monotonic() + self.idle_exit_s
            while not self._pending:
                left = idle_until - time.monotonic()
                if self._closing or left <= 0:
                    self._thread = None  # under the lock: submit() starts a new one
                    return None
                self._work_waiting.wait(left)
            if self.max_wait_s > 0:
                deadline = self._pending[0].submitted + self.max_wait_s
                while len(self._pending) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._work_waiting.wait(left)
            self._busy = True
            batch: list[_Work[Any]] = [self._pending.popleft()]
            size = batch[0].size
            while (
                self._pending
                and len(batch) < self.max_batch
                and size + self._pending[0].size <= self.max_batch_bytes
            ):
                item = self._pending.popleft()
                size += item.size
                batch.append(item)
            return batch

    def _commit(self, batch: list[_Work[Any]]) -> None:
        # A request whose caller gave up before its batch began is skipped, never stored.
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        groups: dict[Callable[[Session, list[Any]], list[Any]], list[_Work[Any]]] = {}
        alone: list[_Work[Any]] = []
        for item in live:
            if item.together is None:
                alone.append(item)
            else:
                groups.setdefault(item.together.record_many, []).append(item)
        try:
            # A turn at SQLite's writer among this process's and the other listener
            # processes' writers (a no-op on PostgreSQL).
            with self.database.writer_turn(), self.database.session() as session:
                for record_many, members in groups.items():
                    self._run_together(session, record_many, members)
                for item in alone:
                    self._run_one(session, item)
        except SQLAlchemyError as exc:
            # The commit failed, or the database went away mid-batch: nothing of the batch
            # is stored, and every request of it is told so.
            log.error("group commit of %d requests failed (%s)", len(live), type(exc).__name__)
            for item in live:
                item.result, item.error = None, exc
        for item in live:
            item.resolve()
        self._wake_loops(live)

    @staticmethod
    def _wake_loops(items: list[_Work[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Work[Any]]] = {}
        for item in items:
            if item.loop is not None:
                by_loop.setdefault(item.loop, []).append(item)
        for loop, waiting in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, waiting)

    @classmethod
    def _run_together(
        cls,
        session: Session,
        record_many: Callable[[Session, list[Any]], list[Any]],
        members: list[_Work[Any]],
    ) -> None:
        """Record a group with one call in one savepoint; each alone if that fails."""
        if len(members) > 1:
            try:
                with session.begin_nested():
                    requests = [item.together.request for item in members if item.together]
                    results = record_many(session, requests)
                    if len(results) != len(members):
                        raise RuntimeError("record_many returned a result count that differs")
            except Exception as exc:
                if not _own_failure(exc):
                    raise  # the connection or the transaction itself: the batch is lost
                # A lost unique-key race or one request's own failure: each alone finds it.
                log.info(
                    "recording %d requests together failed (%s); one by one",
                    len(members),
                    type(exc).__name__,
                )
            else:
                for item, result in zip(members, results, strict=True):
                    item.result, item.error = result, None
                return
        for item in members:
            cls._run_one(session, item)

    @staticmethod
    def _run_one(session: Session, item: _Work[Any]) -> None:
        """Run one request in a savepoint; raise only what spoils the whole transaction."""
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                with session.begin_nested():
                    item.result = item.run(session)
                item.error = None
                return
            except IntegrityError as exc:
                # Another transaction (or an earlier savepoint) won a unique key: rolled
                # back to this request's savepoint, the next attempt sees the winner's row.
                item.error = exc
                if attempt == STORE_ATTEMPTS:
                    return
            except Exception as exc:
                if not _own_failure(exc):
                    raise  # the connection or the transaction itself: the batch is lost
                item.error = exc  # this request's own failure; the others go on
                return
