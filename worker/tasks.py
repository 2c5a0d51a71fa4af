"""Celery tasks. Thin: each takes an id and calls the function that does the work."""

from __future__ import annotations

from celery import Celery

from worker.celery_app import DELIVER_TASK, PROCESS_FHIR_EVENT_TASK, RUN_JOB_TASK
from worker.runtime import get_runtime


def register_tasks(app: Celery) -> None:
    """Bind the task names to their implementations on ``app``."""

    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
    def run_job(job_id: int) -> None:
        from worker.jobs import execute_job

        execute_job(get_runtime(), int(job_id))

    @app.task(name=PROCESS_FHIR_EVENT_TASK, acks_late=True, reject_on_worker_lost=True)
    def process_fhir_event(event_id: int) -> None:
        from worker.clinical import process_event

        process_event(get_runtime(), int(event_id))

    @app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True)
    def deliver(delivery_id: int) -> None:
        from worker.delivery import execute_delivery

        execute_delivery(get_runtime(), int(delivery_id))
