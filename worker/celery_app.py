"""The Celery application. Configured from Settings; imports no model code.

Queues: ``gpu`` (model inference that benefits from an accelerator; prefetch 1),
``cpu`` (model inference that does not), ``deliver`` (senders). Tasks take database ids,
never pixel data. Delivery is at-least-once (``acks_late`` with ``reject_on_worker_lost``);
the database makes the effect exactly-once, and the sweeper re-sends work a lost broker
message left behind, so the broker is never the only copy of anything.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.settings import Settings

QUEUES = ("gpu", "cpu", "deliver")
RUN_JOB_TASK = "carebridge.run_job"
DELIVER_TASK = "carebridge.deliver"
PROCESS_FHIR_EVENT_TASK = "carebridge.process_fhir_event"


def make_celery(settings: Settings) -> Celery:
    """A Celery app bound to the configured broker (embedded filesystem broker by default)."""
    app = Celery("carebridge", set_as_current=False)
    transport_options: dict[str, object] = {}
    if settings.broker_url is None:
        folder = settings.broker_folder
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        transport_options = {
            "control_folder": str(folder / "control"),  # exchange bindings; default is ./control
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # A folder listing per queue; cheap, and latency is what a radiologist waits.
            "polling_interval": 0.02,
        }
    elif settings.broker_url.startswith("redis"):
        # Unacked messages come back after this; the sweeper usually re-sends sooner.
        transport_options = {"visibility_timeout": 3600}
    broker_url = settings.effective_broker_url
    if broker_url == "filesystem://":
        from worker.broker import ALIAS  # registers the atomic variant with kombu

        broker_url = f"{ALIAS}://"
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=3,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        task_default_queue="cpu",
        task_queues=[Queue(name) for name in QUEUES],
        task_routes={DELIVER_TASK: {"queue": "deliver"}},
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
    )
    return app
