"""Per-process state of a worker: settings, database, broker client, loaded models.

Created lazily in each worker process (after the prefork fork), so database connections
and models are never shared between processes; models are loaded once and kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from db.engine import Database
from worker.celery_app import DELIVER_TASK, PROCESS_FHIR_EVENT_TASK, RUN_JOB_TASK, make_celery
from worker.routing import RoutingRules
from worker.settings import Settings

log = logging.getLogger("carebridge.worker")


class Dispatcher:
    """Publishes tasks by name. A failed publish is logged, never raised: the row is
    committed and the sweeper re-sends it."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish_job(self, job_id: int, queue: str) -> bool:
        return self._send(RUN_JOB_TASK, job_id, queue)

    def publish_delivery(self, delivery_id: int) -> bool:
        return self._send(DELIVER_TASK, delivery_id, "deliver")

    def publish_fhir_event(self, event_id: int) -> str | None:
        """Publish one FHIR event; the Celery task id, or None when the broker refused."""
        return self._publish(PROCESS_FHIR_EVENT_TASK, event_id, "cpu")

    def _send(self, task: str, ident: int, queue: str) -> bool:
        return self._publish(task, ident, queue) is not None

    def _publish(self, task: str, ident: int, queue: str) -> str | None:
        try:
            result = self.app.send_task(task, args=[ident], queue=queue, retry=False)
        except Exception as exc:  # broker down: the sweeper re-sends from the database
            log.warning(
                "could not publish %s(%d) to %s: %s", task, ident, queue, type(exc).__name__
            )
            return None
        return str(result.id)


@dataclass
class Runtime:
    """What a task needs, built once per process."""

    settings: Settings
    database: Database
    dispatcher: Dispatcher
    rules: RoutingRules
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    _models: dict[str, Any] = field(default_factory=dict)
    _models_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings, app: Celery | None = None) -> Runtime:
        return cls(
            settings=settings,
            database=Database(settings.database_url),
            dispatcher=Dispatcher(app or make_celery(settings)),
            rules=RoutingRules.load(settings.rules_file),
        )

    def model(self, key: str, loader: Callable[[], Any]) -> Any:
        """A loaded model, kept for the life of the process."""
        with self._models_lock:
            if key not in self._models:
                self._models[key] = loader()
            return self._models[key]


_runtime: Runtime | None = None
_settings: Settings | None = None
_app: Celery | None = None
_pid: int | None = None


def configure(settings: Settings, app: Celery) -> None:
    """Called by the entry point before the worker forks."""
    global _settings, _app, _runtime
    _settings, _app, _runtime = settings, app, None


def get_runtime() -> Runtime:
    """This process's runtime (a fork gets its own)."""
    global _runtime, _pid
    if _runtime is None or _pid != os.getpid():
        if _settings is None:
            raise RuntimeError("worker runtime used before worker.runtime.configure()")
        _runtime = Runtime.create(_settings, _app)
        _pid = os.getpid()
    return _runtime
