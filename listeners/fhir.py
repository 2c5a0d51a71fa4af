"""The FHIR webhook: clinical events taken durably, then queued by task name.

Thin on purpose, like the DICOM SCP: check the credentials, read a bounded body, parse
and validate it completely, then record the events, the Subscription state and the audit
event together, commit, and only then answer 202 and publish
``carebridge.process_fhir_event`` (args [event id], queue ``cpu``) per event. Requests that
arrive together share one transaction (group commit, ``listeners/fhir_batch.py``): the
direct POSTs of a batch are recorded with one INSERT and one audit append, other requests
each in a savepoint of its own, so a burst costs one fsync per batch instead of one per
request. A broker outage never refuses an event (it stays ``received`` and the sweeper
re-sends it); a database outage is a 503 so the sender retries. Nothing is stored or queued
for a request that is refused. Publishing runs on a thread of its own after the commit and
yields to the requests in flight, so the EHR never waits on the broker.

Endpoints (every error body is an OperationOutcome, ``application/fhir+json``):

- ``POST /fhir`` a supported resource or a batch/transaction/collection/history Bundle
  of them; a Subscription notification posted here is handled as on ``/fhir/notify``.
- ``POST /fhir/{type}`` for DocumentReference, Observation, Condition, Patient.
- ``POST /fhir/notify`` Subscription notifications: R4 backport, R4B, R5; handshake,
  heartbeat, event-notification (full-resource and id-only payloads).
- ``GET /cds-services``, ``POST /cds-services/carebridge-treatment``: CDS Hooks
  (``listeners/cds_hooks.py``).
- ``GET /healthz`` (alive), ``GET /readyz`` (database reachable), ``GET /metrics``.

Answers: 202 events recorded (OperationOutcome with one informational issue per event;
``issue.details.coding`` = {system EVENT_ID_SYSTEM, code = the event id}); 200 nothing to
record (handshake, heartbeat, repeated notification, replayed webhook-id); 400 not JSON;
401 credentials missing; 403 credentials wrong; 413 body over MAX_BODY_BYTES; 415 not
JSON media type; 422 not acceptable FHIR or an unsupported type/notification; 503
database unavailable.

Health and metrics endpoints carry no credentials check: they hold counts, never PHI.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.engine import Database
from listeners.cds_hooks import cds_hooks_access, register_cds_hooks
from listeners.fhir_auth import (
    MAX_WEBHOOK_ID_LENGTH,
    CredentialsRefused,
    check_bearer,
    decode_secret,
    require_signature_headers,
    verify_signature,
)
from listeners.fhir_batch import GroupCommitter, Together
from listeners.fhir_payloads import (
    PayloadError,
    is_notification,
    parse_direct,
    parse_json,
    parse_notification,
    warm_up,
)
from listeners.fhir_publisher import EventPublisher, RequestsInFlight
from listeners.fhir_recorder import DirectPost, EventRecorder, Parsed, Taken
from worker.runtime import Dispatcher
from worker.settings import Settings

log = logging.getLogger("carebridge.fhir")

MAX_BODY_BYTES = 10 * 1024 * 1024  # 10 MiB: a large transaction Bundle, not a data dump
FHIR_JSON = "application/fhir+json"
ACCEPTED_MEDIA_TYPES = (FHIR_JSON, "application/json")
EVENT_ID_SYSTEM = "urn:carebridge:fhir-event"
# Bodies up to this size are parsed and validated on the event loop: that takes well under
# a millisecond or two, less than handing the work to a thread and back under load.
INLINE_PARSE_BYTES = 4 * 1024


# Responses -----------------------------------------------------------------------------


Issue = tuple[str, str]  # (OperationOutcome issue code, diagnostics)


def operation_outcome(
    issues: list[Issue], severity: str = "error", details: list[str | None] | None = None
) -> dict[str, Any]:
    """An OperationOutcome; ``details`` optionally tags each issue with an event id."""
    body: list[dict[str, Any]] = []
    for index, (code, diagnostics) in enumerate(issues):
        issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
        tag = details[index] if details else None
        if tag is not None:
            issue["details"] = {"coding": [{"system": EVENT_ID_SYSTEM, "code": tag}]}
        body.append(issue)
    return {"resourceType": "OperationOutcome", "issue": body}


def _answer(
    status: int,
    issues: list[Issue],
    *,
    severity: str = "error",
    details: list[str | None] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        operation_outcome(issues, severity, details),
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


class Refused(Exception):
    """A request refused before anything was stored."""

    def __init__(self, status: int, issues: list[Issue]) -> None:
        super().__init__(status)
        self.status = status
        self.issues = issues


# Metrics -------------------------------------------------------------------------------


class WebhookMetrics:
    """Prometheus counters of one app, in a registry of its own.

    In a group of webhook processes (``listen-fhir --processes N``, which sets
    ``PROMETHEUS_MULTIPROC_DIR``) each process keeps its counters in that directory and a
    scrape of any of them reports the group's sums.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "carebridge_fhir_requests",
            "HTTP requests by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.events = Counter(
            "carebridge_fhir_events_recorded",
            "FHIR events committed, by resource type and source.",
            ["resource_type", "source"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "carebridge_fhir_auth_failures",
            "Requests refused for missing or wrong credentials, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The Prometheus text exposition: this app's counters, or its group's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            group = CollectorRegistry()
            multiprocess.MultiProcessCollector(group)
            return generate_latest(group)
        return generate_latest(self.registry)


class _CountRequests:
    """ASGI middleware: count every response by route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: WebhookMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()


# Request checks ------------------------------------------------------------------------


def _media_type_accepted(content_type: str | None) -> bool:
    if not content_type:
        return False
    media, *parameters = (part.strip() for part in content_type.split(";"))
    if media.lower() not in ACCEPTED_MEDIA_TYPES:
        return False
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` (declared or actually sent)."""
    too_large = Refused(413, [("too-costly", f"the body is larger than {limit} bytes")])
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Refused(400, [("structure", "Content-Length is not a number")])
        if int(declared) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _plain_webhook_id(value: str | None) -> str | None:
    """A webhook-id header sent without a configured secret: kept for replay detection."""
    if value and len(value) <= MAX_WEBHOOK_ID_LENGTH and value.isprintable():
        return value
    return None


# Requests ------------------------------------------------------------------------------


class FhirIntake:
    """One request's path: credentials, media type, bounded body, parse, record, queue."""

    def __init__(
        self,
        settings: Settings,
        committer: GroupCommitter,
        publisher: EventPublisher,
        metrics: WebhookMetrics,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        clock: Callable[[], float] = time.time,
        in_flight: RequestsInFlight | None = None,
    ) -> None:
        self.recorder = EventRecorder()
        self.in_flight = in_flight or RequestsInFlight()
        self.committer = committer
        self.publisher = publisher
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
        self.key = (
            decode_secret(settings.webhook_secret.get_secret_value())
            if settings.webhook_secret
            else None
        )

    async def take(
        self, request: Request, route: str, parse: Callable[[dict[str, Any]], Parsed]
    ) -> Response:
        """Check, parse, record and queue one request; answer with an OperationOutcome."""
        self.in_flight.enter()  # the publisher yields until it is answered
        try:
            return await self._take(request, route, parse)
        finally:
            self.in_flight.leave()

    async def _take(
        self, request: Request, route: str, parse: Callable[[dict[str, Any]], Parsed]
    ) -> Response:
        try:
            # Header checks first: missing credentials are refused before the body is read.
            if self.token is not None:
                check_bearer(self.token, request.headers.get("authorization"))
            if self.key is not None:
                require_signature_headers(request.headers)
            if not _media_type_accepted(request.headers.get("content-type")):
                raise Refused(
                    415, [("not-supported", "send application/fhir+json or application/json")]
                )
            raw = await _read_body(request, self.max_body_bytes)
            webhook_id: str | None
            if self.key is not None:
                webhook_id = verify_signature(self.key, request.headers, raw, self.clock())
            else:
                webhook_id = _plain_webhook_id(request.headers.get("webhook-id"))
            if len(raw) <= INLINE_PARSE_BYTES:
                parsed = parse(parse_json(raw))
            else:  # validating up to MAX_BODY_BYTES is CPU work: off the event loop
                parsed = await run_in_threadpool(lambda: parse(parse_json(raw)))
        except CredentialsRefused as exc:
            return await self._refuse_credentials(request, route, exc)
        except (Refused, PayloadError) as exc:
            return _answer(exc.status, exc.issues)
        body_sha256 = hashlib.sha256(raw).hexdigest()

        def record(session: Session) -> Taken:
            return self.recorder.record(session, parsed, webhook_id, body_sha256)

        try:
            # Resolved only after the transaction holding this request committed. Direct
            # POSTs of a batch are recorded together (one INSERT, one audit append).
            together = None
            if isinstance(parsed, list):
                post = DirectPost(parsed, webhook_id, body_sha256)
                together = Together(self.recorder.record_direct_many, post)
            taken = await self.committer.run(record, size=len(raw), together=together)
        except SQLAlchemyError as exc:
            log.error("FHIR request refused: database unavailable (%s)", type(exc).__name__)
            return _answer(
                503,
                [("transient", "the database is unavailable; retry later")],
                headers={"Retry-After": "5"},
            )
        if not taken.events:
            return _answer(taken.status, [("informational", taken.message)], severity="information")
        source = taken.source.value if taken.source else ""
        for _, resource_type in taken.events:
            self.metrics.events.labels(resource_type, source).inc()
        # The events are committed; the publisher thread hands them to the broker, so a
        # slow or absent broker never holds the EHR's connection (the sweeper re-sends).
        self.publisher.add([event_id for event_id, _ in taken.events])
        return _answer(
            202,
            [("informational", f"recorded as FHIR event {i} ({t})") for i, t in taken.events],
            severity="information",
            details=[str(event_id) for event_id, _ in taken.events],
        )

    async def _refuse_credentials(
        self, request: Request, route: str, exc: CredentialsRefused
    ) -> Response:
        self.metrics.auth_failures.labels(exc.reason).inc()
        peer = request.client.host if request.client else None
        log.warning("FHIR request on %s refused (%s) from %s", route, exc.reason, peer)

        def audit_refusal(session: Session) -> None:
            self.recorder.audit_refusal(session, route, exc.status, exc.reason, peer)

        try:
            await self.committer.run(audit_refusal)
        except SQLAlchemyError:
            log.error("could not audit a refused FHIR request")
        headers = None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer" if self.token else "Signature"}
        return _answer(
            exc.status,
            [("login" if exc.status == 401 else "forbidden", exc.diagnostics)],
            headers=headers,
        )


# Application ---------------------------------------------------------------------------


_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Move what is alive after start-up (modules, models, the app) out of the collector's
    sight, once per process. Otherwise each full collection walks those hundreds of
    thousands of objects, a pause of 40-120 ms in the middle of a burst of requests."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()


def _direct(path_type: str | None) -> Callable[[dict[str, Any]], Parsed]:
    def parse(document: dict[str, Any]) -> Parsed:
        if path_type is None and is_notification(document):
            return parse_notification(document)
        return parse_direct(document, path_type)

    return parse


def create_app(
    settings: Settings,
    database: Database,
    dispatcher: Dispatcher,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
    committer: GroupCommitter | None = None,
) -> FastAPI:
    """The webhook application. Raises ValueError for an unusable WEBHOOK_SECRET or CDS
    Hooks key set.

    ``committer`` (default: a GroupCommitter on ``database`` with its default bounds)
    records the requests; its threads and the publisher's are stopped at shutdown, after
    recording and publishing what is queued.
    """
    metrics = WebhookMetrics()
    committer = committer or GroupCommitter(database)
    in_flight = RequestsInFlight()
    publisher = EventPublisher(dispatcher, committer, in_flight=in_flight)
    intake = FhirIntake(
        settings,
        committer,
        publisher,
        metrics,
        max_body_bytes=max_body_bytes,
        clock=clock,
        in_flight=in_flight,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(warm_up)
        _freeze_startup_objects()
        yield
        # Requests in flight have their answers; hand what is committed to the broker
        # (the marks go through the committer), then let the committer finish.
        await run_in_threadpool(publisher.close)
        await run_in_threadpool(committer.close)

    app = FastAPI(
        title="carebridge FHIR webhook",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.intake = intake
    app.state.committer = committer
    app.state.publisher = publisher
    app.add_middleware(_CountRequests, metrics=metrics)
    register_cds_hooks(app, database, cds_hooks_access(settings, intake.token, database))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return _answer(exc.status_code, [(code, str(exc.detail))])

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # The class and the frames only: an exception's message can quote the input.
        log.error(
            "unhandled %s\n%s",
            type(exc).__name__,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        return _answer(500, [("exception", "internal error")])

    @app.post("/fhir/notify")
    async def notify(request: Request) -> Response:
        """Subscription notifications (R4 backport, R4B, R5)."""
        return await intake.take(request, "/fhir/notify", parse_notification)

    @app.post("/fhir")
    async def post_base(request: Request) -> Response:
        """A resource or a Bundle of them (or a notification posted to the base URL)."""
        return await intake.take(request, "/fhir", _direct(None))

    @app.post("/fhir/{resource_type}")
    async def post_resource(resource_type: str, request: Request) -> Response:
        """One resource of a supported type."""
        return await intake.take(request, "/fhir/{resource_type}", _direct(resource_type))

    @app.get("/healthz")
    async def healthz() -> Response:
        """The process is alive."""
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready when the database answers."""

        def ping() -> None:
            with database.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except SQLAlchemyError as exc:
            return JSONResponse(
                {"status": "unavailable", "database": type(exc).__name__}, status_code=503
            )
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition of the webhook's counters."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
