"""Batched hand-over of committed FHIR events to the broker.

The webhook answers 202 once its events are committed (``listeners.fhir_batch``); the
events are then published here, from one thread, so the EHR never waits on the broker.
Publishing yields to the requests being taken and recorded (all compete for one
interpreter lock and one disk): a burst of requests is answered before its events are
published, each event waiting at most ``max_delay_s``. The events the broker took are
marked ``queued`` in one statement per batch, run by the group committer, so marking
shares a transaction with whatever is being recorded instead of taking the write lock and
an fsync on its own. A broker outage drops what is waiting: those events stay
``received`` and the sweeper re-sends them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from db import fhir_events as events_db
from db.schema import utcnow
from listeners.fhir_batch import IDLE_EXIT_S, GroupCommitter

if TYPE_CHECKING:
    from worker.runtime import Dispatcher

log = logging.getLogger("carebridge.fhir")

MAX_PUBLISH_BATCH = 64  # events handed to the broker before they are marked queued
MAX_PUBLISH_DELAY_S = 1.0  # the longest an event waits for the webhook to be idle
MARK_DELAY_S = 0.25  # the longest a published event waits to be marked queued


class RequestsInFlight:
    """Counts the webhook's requests between their arrival and their answer, so that the
    publisher can yield to them (``enter``/``leave`` from the event loop, cheap)."""

    def __init__(self) -> None:
        self._count = 0
        self._none_left = threading.Condition()

    def enter(self) -> None:
        """A request arrived."""
        with self._none_left:
            self._count += 1

    def leave(self) -> None:
        """A request was answered (or failed)."""
        with self._none_left:
            self._count -= 1
            if self._count == 0:
                self._none_left.notify_all()

    @property
    def busy(self) -> bool:
        """Some request is being taken."""
        return self._count > 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being taken; False if ``timeout`` passed first."""
        with self._none_left:
            return self._none_left.wait_for(lambda: self._count == 0, timeout)


class EventPublisher:
    """Hands committed events to the broker from one thread and marks them queued.

    ``add(ids)`` returns at once. Events are published in order. Publishing yields to
    the requests in flight (``in_flight``, when given) and to recording: while requests
    are being taken or the committer has requests to record, an event waits, but never
    longer than ``max_delay_s`` after it was added, so a burst of requests gets its 202s
    first and the broker hears of the events right after. A request that arrives while a
    batch is being published pauses it (up to the same deadlines). The events the broker
    took are marked ``queued`` together, through ``committer`` (sharing a transaction with
    what it records), once ``max_batch`` of them wait or the oldest has waited
    ``mark_delay_s``: a trickle of requests then costs one marking transaction per period,
    not one per request, and an event left unmarked by a crash is only sent again by the
    sweeper (the worker's effect is exactly-once). At the first refusal the events waiting
    are dropped: they stay ``received`` and the sweeper re-sends them, so one broker
    outage costs one timeout, not one per event.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        committer: GroupCommitter,
        *,
        max_batch: int = MAX_PUBLISH_BATCH,
        max_delay_s: float = MAX_PUBLISH_DELAY_S,
        mark_delay_s: float = MARK_DELAY_S,
        idle_exit_s: float = IDLE_EXIT_S,
        in_flight: RequestsInFlight | None = None,
    ) -> None:
        if max_batch < 1 or max_delay_s < 0 or mark_delay_s < 0 or idle_exit_s <= 0:
            raise ValueError(
                "max_batch must be >= 1, max_delay_s and mark_delay_s >= 0, idle_exit_s > 0"
            )
        self.dispatcher = dispatcher
        self.committer = committer
        self.in_flight = in_flight
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.mark_delay_s = mark_delay_s
        self.idle_exit_s = idle_exit_s
        self._pending: deque[tuple[int, float]] = deque()  # (event id, when added)
        self._unmarked: list[tuple[int, str]] = []  # (event id, task id): the thread's own
        self._unmarked_since = 0.0
        self._added = 0
        self._settled = 0  # events published and marked, or dropped
        self._hurry = 0  # flush() callers waiting: no yielding, no waiting to mark
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def add(self, event_ids: Sequence[int]) -> None:
        """Queue committed events for the broker."""
        if not event_ids:
            return
        now = time.monotonic()
        with self._changed:
            self._pending.extend((event_id, now) for event_id in event_ids)
            self._added += len(event_ids)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(
                    target=self._loop, name="fhir-publisher", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Publish and mark now; wait until every event added so far is published and
        marked, or dropped. False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            target = self._added
            self._hurry += 1
            self._changed.notify_all()
            try:
                while self._settled < target:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
            finally:
                self._hurry -= 1
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Publish and mark what is queued, then stop the thread; what is left stays for
        the sweeper."""
        with self._changed:
            thread = self._thread
            self._closing = True
            self._changed.notify_all()
        if thread is not None:
            thread.join(timeout)

    # The publisher thread --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            oldest = self._next_work()
            if oldest is None and not self._unmarked:
                return
            refused = False
            if oldest is not None:
                if not self._hurrying():
                    # Yield to the requests being taken and recorded, up to the oldest's
                    # deadline.
                    deadline = oldest + self.max_delay_s
                    if self.in_flight is not None:
                        self.in_flight.wait_idle(max(0.0, deadline - time.monotonic()))
                    self.committer.wait_idle(max(0.0, deadline - time.monotonic()))
                refused = self._publish_batch()
            due = self._unmarked_since + self.mark_delay_s <= time.monotonic()
            if self._unmarked and (
                refused or due or self._hurrying() or len(self._unmarked) >= self.max_batch
            ):
                self._mark()

    def _should_pause(self, added: float) -> bool:
        """A request is in flight and this event may still wait for it."""
        return (
            self.in_flight is not None
            and self.in_flight.busy
            and time.monotonic() < added + self.max_delay_s
            and not self._hurrying()
        )

    def _hurrying(self) -> bool:
        with self._changed:
            return self._closing or self._hurry > 0

    def _next_work(self) -> float | None:
        """Wait for events to publish (their oldest's time) or marks falling due (None);
        None with nothing unmarked: the thread ends."""
        with self._changed:
            idle_until = time.monotonic() + self.idle_exit_s
            while not self._pending:
                hurry = self._closing or self._hurry > 0
                if self._unmarked:
                    left = self._unmarked_since + self.mark_delay_s - time.monotonic()
                    if hurry or left <= 0:
                        return None
                else:
                    left = idle_until - time.monotonic()
                    if self._closing or left <= 0:
                        self._thread = None  # under the lock: add() starts a new one
                        return None
                self._changed.wait(left)
            return self._pending[0][1]

    def _publish_batch(self) -> bool:
        """Publish up to ``max_batch`` waiting events in order; True if the broker refused
        (what was waiting is then dropped, left ``received`` for the sweeper)."""
        with self._changed:
            count = min(self.max_batch, len(self._pending))
            batch = [self._pending.popleft() for _ in range(count)]
        published = 0
        refused = False
        for index, (event_id, added) in enumerate(batch):
            if self._should_pause(added):
                # A request arrived: the rest wait (in order) for it to be answered.
                with self._changed:
                    self._pending.extendleft(reversed(batch[index:]))
                batch = batch[:index]
                break
            try:
                task_id = self.dispatcher.publish_fhir_event(event_id)
            except Exception as exc:  # the class only: a message could quote the input
                log.error("publishing a FHIR event failed (%s)", type(exc).__name__)
                task_id = None
            if not task_id:
                refused = True
                break
            if not self._unmarked:
                self._unmarked_since = time.monotonic()
            self._unmarked.append((event_id, task_id))
            published += 1
        with self._changed:
            dropped = len(batch) - published
            if refused:
                dropped += len(self._pending)
                self._pending.clear()
            self._settled += dropped
            self._changed.notify_all()
        return refused

    def _mark(self) -> None:
        marks, self._unmarked = self._unmarked, []
        now = utcnow()
        try:
            self.committer.submit(
                lambda session: events_db.mark_queued_many(session, marks, now)
            ).result()
        except Exception as exc:
            # Left ``received``: the sweeper re-sends them, and a second message is
            # harmless (the worker's effect is exactly-once).
            log.warning("could not mark FHIR events queued (%s)", type(exc).__name__)
        with self._changed:
            self._settled += len(marks)
            self._changed.notify_all()
