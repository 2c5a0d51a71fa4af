"""The FHIR webhook as an EHR sees it: status codes and OperationOutcomes on the wire, rows
committed in fhir_events, the audit trail, and what was handed to the broker."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from db import audit
from db.engine import Database
from db.fhir_events import catch_up_range
from db.migrate import upgrade
from db.schema import AuditEvent, FhirEvent, FhirEventStatus, FhirSubscriptionState, utcnow
from listeners.fhir import MAX_BODY_BYTES, create_app
from listeners.fhir_auth import sign
from listeners.fhir_batch import GroupCommitter, Together
from listeners.fhir_payloads import IncomingResource
from listeners.fhir_publisher import EventPublisher, RequestsInFlight
from listeners.fhir_recorder import DirectPost, EventRecorder
from tests.peers import free_port, wait_for_port
from worker.routing import RoutingRules
from worker.settings import Settings
from worker.sweeper import Sweeper

REPO = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
TOKEN = "s3cret-token-for-tests"
FHIR_JSON = "application/fhir+json"
BACKPORT_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "backport-subscription-status-r4"
)
SUBSCRIPTION = "https://ehr.example.org/fhir/Subscription/admission"
PATIENT_NAME = "Zebedee Quuxworth"  # must never reach a log, an audit row or an error

RESOURCES: dict[str, dict[str, Any]] = {
    "Observation": {
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/pat-1"},
        "valueQuantity": {"value": 72, "unit": "/min"},
    },
    "Condition": {
        "resourceType": "Condition",
        "id": "cond-1",
        "code": {"text": "pneumonia"},
        "subject": {"reference": "Patient/pat-1"},
    },
    "DocumentReference": {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "data": base64.b64encode(b"cough and fever for three days").decode(),
                }
            }
        ],
    },
    "Patient": {
        "resourceType": "Patient",
        "id": "pat-1",
        "name": [{"family": PATIENT_NAME.split()[1], "given": [PATIENT_NAME.split()[0]]}],
        "birthDate": "1970-01-01",
    },
}


# Fixtures and helpers ------------------------------------------------------------------


class RecordingDispatcher:
    """Stands in for worker.runtime.Dispatcher: records what was published, or refuses
    everything while the broker is 'down'."""

    def __init__(self) -> None:
        self.up = True
        self.published: list[int] = []

    def publish_fhir_event(self, event_id: int) -> str | None:
        if not self.up:
            return None
        self.published.append(event_id)
        return f"task-{event_id}-{len(self.published)}"

    def publish_job(self, job_id: int, queue: str) -> bool:
        return self.up

    def publish_delivery(self, delivery_id: int) -> bool:
        return self.up


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CAREBRIDGE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


def settings_for(database: Database, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        database_url=database.url, archive_dir=tmp_path / "var" / "archive", **overrides
    )


@pytest.fixture
def make_client(
    database: Database, dispatcher: RecordingDispatcher, tmp_path: Path
) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        options = {k: overrides.pop(k) for k in ("max_body_bytes", "committer") if k in overrides}
        settings = settings_for(database, tmp_path, **overrides)
        app = create_app(settings, database, dispatcher, **options)  # type: ignore[arg-type]
        client = TestClient(app)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Any) -> TestClient:
    return make_client()


def events(database: Database) -> list[FhirEvent]:
    with database.session() as session:
        return list(session.execute(select(FhirEvent).order_by(FhirEvent.id)).scalars())


def audit_events(database: Database, event_type: str | None = None) -> list[AuditEvent]:
    with database.session() as session:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        if event_type is not None:
            query = query.where(AuditEvent.event_type == event_type)
        return list(session.execute(query).scalars())


def subscription_state(database: Database) -> FhirSubscriptionState | None:
    with database.session() as session:
        return session.execute(select(FhirSubscriptionState)).scalar_one_or_none()


def settle(client: TestClient) -> None:
    """Wait until the events answered so far were handed to the broker (or dropped): the
    webhook publishes on a thread of its own after the 202."""
    assert client.app.state.publisher.flush(timeout=30)  # type: ignore[attr-defined]


def post(client: TestClient, path: str, body: Any, **headers: str) -> Any:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=payload, headers={"Content-Type": FHIR_JSON, **headers})
    settle(client)
    return response


def signed_headers(body: bytes, webhook_id: str = "msg_1", at: float | None = None) -> dict:
    timestamp = str(int(time.time() if at is None else at))
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign(KEY, webhook_id, timestamp, body),
    }


def outcome(response: Any, status: int) -> dict[str, Any]:
    """Assert the status and that the body is a valid R4 OperationOutcome; return it."""
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    OperationOutcome.model_validate(body)
    assert body["issue"] and all("diagnostics" in issue for issue in body["issue"])
    return body


def event_ids(body: dict[str, Any]) -> list[int]:
    return [
        int(issue["details"]["coding"][0]["code"]) for issue in body["issue"] if "details" in issue
    ]


def assert_nothing_taken(database: Database, dispatcher: RecordingDispatcher) -> None:
    assert events(database) == []
    assert audit_events(database, "fhir.received") == []
    assert dispatcher.published == []


def assert_chain_verifies(database: Database) -> None:
    with database.session() as session:
        checked, breaks = audit.verify(session)
    assert breaks == [] and checked == len(audit_events(database))


def post_concurrently(client: TestClient, requests_: list[tuple[str, Any, dict[str, str]]]) -> list:
    """POST every (path, body, headers) from a thread of its own, released all at once."""
    start = threading.Barrier(len(requests_))

    def one(request: tuple[str, Any, dict[str, str]]) -> Any:
        path, body, headers = request
        start.wait()
        return client.post(
            path,
            content=json.dumps(body).encode(),
            headers={"Content-Type": FHIR_JSON, **headers},
        )

    with ThreadPoolExecutor(len(requests_)) as pool:
        return list(pool.map(one, requests_))


def commits_of(database: Database) -> list[float]:
    """The times of the transactions committed on ``database`` from now on."""
    times: list[float] = []
    event.listen(database.engine, "commit", lambda _connection: times.append(time.monotonic()))
    return times


# Notification builders -----------------------------------------------------------------


def backport(
    kind: str,
    events_since: int,
    notified: list[tuple[int, str]] = (),  # type: ignore[assignment]
    resources: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """An R4 backport notification: (event number, focus reference) per event."""
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": SUBSCRIPTION}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/vitals"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events_since)},
    ]
    for number, focus in notified:
        parameters.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(number)},
                    {"name": "focus", "valueReference": {"reference": focus}},
                ],
            }
        )
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": "urn:uuid:9e1b1d2c-1b7c-4d1c-9bb0-3c2f0a5d6e7f",
            "resource": {
                "resourceType": "Parameters",
                "meta": {"profile": [BACKPORT_PROFILE]},
                "parameter": parameters,
            },
        }
    ]
    for resource in resources:
        entries.append(
            {
                "fullUrl": f"https://ehr.example.org/fhir/{resource['resourceType']}/{resource['id']}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
                "response": {"status": "200"},
            }
        )
    return {"resourceType": "Bundle", "type": "history", "entry": entries}


def subscription_status_bundle(
    bundle_type: str, events_since: int | str, number: int | str, resource: dict[str, Any]
) -> dict[str, Any]:
    """An R4B (history) or R5 (subscription-notification) full-resource notification."""
    focus = f"https://ehr.example.org/fhir/{resource['resourceType']}/{resource['id']}"
    return {
        "resourceType": "Bundle",
        "type": bundle_type,
        "entry": [
            {
                "fullUrl": "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": events_since,
                    "notificationEvent": [{"eventNumber": number, "focus": {"reference": focus}}],
                    "subscription": {"reference": SUBSCRIPTION},
                    "topic": "http://example.org/topic/vitals",
                },
            },
            {"fullUrl": focus, "resource": resource},
        ],
    }


# Direct POSTs --------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", sorted(RESOURCES))
def test_direct_post_is_committed_audited_and_queued(
    client: TestClient,
    database: Database,
    dispatcher: RecordingDispatcher,
    resource_type: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    resource = RESOURCES[resource_type]
    response = post(client, f"/fhir/{resource_type}", resource)
    body = outcome(response, 202)
    (row,) = events(database)
    assert event_ids(body) == [row.id]
    assert row.resource_type == resource_type and row.resource_id == resource["id"]
    assert row.body == resource and row.source == "direct" and row.fhir_version == "R4"
    assert row.status is FhirEventStatus.QUEUED and row.task_id and row.queued_at
    assert dispatcher.published == [row.id]
    (received,) = audit_events(database, "fhir.received")
    assert received.detail["events"] == [row.id]
    assert received.detail["resource_types"] == [resource_type]
    assert PATIENT_NAME.split()[1] not in json.dumps(received.detail)
    assert PATIENT_NAME.split()[1] not in caplog.text


def test_bundle_records_every_entry(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": RESOURCES["Observation"],
                "request": {"method": "POST", "url": "Observation"},
            },
            {"resource": RESOURCES["Condition"], "request": {"method": "POST", "url": "Condition"}},
        ],
    }
    body = outcome(post(client, "/fhir", bundle), 202)
    rows = events(database)
    assert [r.resource_type for r in rows] == ["Observation", "Condition"]
    assert event_ids(body) == [r.id for r in rows] == dispatcher.published
    assert len({r.body_sha256 for r in rows}) == 1  # one delivery, one body hash
    (received,) = audit_events(database, "fhir.received")
    assert received.detail["events"] == [r.id for r in rows]


# Refusals: nothing stored, nothing queued ----------------------------------------------


def test_missing_signature_is_401_and_audited(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    client = make_client(webhook_secret=SECRET)
    body = outcome(post(client, "/fhir/Observation", RESOURCES["Observation"]), 401)
    assert body["issue"][0]["code"] == "login"
    assert_nothing_taken(database, dispatcher)
    (failure,) = audit_events(database, "fhir.auth_failed")
    assert failure.detail["status"] == 401 and failure.detail["reason"] == "missing_signature"
    assert "Observation" not in json.dumps(failure.detail["reason"])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bad_signature", "bad_signature"),
        ("stale_timestamp", "stale_timestamp"),
        ("future_timestamp", "stale_timestamp"),
        ("other_body", "bad_signature"),
    ],
)
def test_wrong_signature_is_403(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher, case: str, reason: str
) -> None:
    client = make_client(webhook_secret=SECRET)
    payload = json.dumps(RESOURCES["Observation"]).encode()
    headers = signed_headers(payload)
    if case == "bad_signature":
        headers["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    elif case == "stale_timestamp":
        headers = signed_headers(payload, at=time.time() - 301)
    elif case == "future_timestamp":
        headers = signed_headers(payload, at=time.time() + 400)
    else:
        headers = signed_headers(b'{"resourceType": "Observation"}')
    body = outcome(post(client, "/fhir/Observation", payload, **headers), 403)
    assert body["issue"][0]["code"] == "forbidden"
    assert_nothing_taken(database, dispatcher)
    (failure,) = audit_events(database, "fhir.auth_failed")
    assert failure.detail["reason"] == reason


def test_signed_delivery_is_taken_once_and_a_replay_is_a_no_op(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    client = make_client(webhook_secret=SECRET)
    payload = json.dumps(RESOURCES["Observation"]).encode()
    headers = signed_headers(payload, webhook_id="msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")
    # Rotation: the sender may send several signatures; one valid is enough.
    headers["webhook-signature"] = (
        "v1," + base64.b64encode(b"y" * 32).decode() + " " + headers["webhook-signature"]
    )
    first = outcome(post(client, "/fhir/Observation", payload, **headers), 202)
    replay = outcome(post(client, "/fhir/Observation", payload, **headers), 200)
    assert replay["issue"][0]["severity"] == "information"
    (row,) = events(database)
    assert event_ids(first) == [row.id] and row.webhook_id == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    assert dispatcher.published == [row.id]
    assert len(audit_events(database, "fhir.received")) == 1


def test_webhook_id_without_a_secret_still_detects_replays(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher
) -> None:
    headers = {"webhook-id": "msg_plain_1"}
    outcome(post(client, "/fhir/Condition", RESOURCES["Condition"], **headers), 202)
    outcome(post(client, "/fhir/Condition", RESOURCES["Condition"], **headers), 200)
    assert len(events(database)) == 1 and len(dispatcher.published) == 1


def test_concurrent_duplicate_delivery_is_answered_as_a_replay(
    client: TestClient,
    database: Database,
    dispatcher: RecordingDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two deliveries of one webhook-id race: the loser's insert hits the unique key,
    its transaction is retried and sees the winner's row."""
    from db import fhir_events

    headers = {"webhook-id": "msg_race"}
    outcome(post(client, "/fhir/Observation", RESOURCES["Observation"], **headers), 202)
    real = fhir_events.find_by_webhook_id
    looked_up: list[str] = []

    def not_yet_visible(session: Any, webhook_id: str) -> Any:
        looked_up.append(webhook_id)
        return None if len(looked_up) == 1 else real(session, webhook_id)

    monkeypatch.setattr(fhir_events, "find_by_webhook_id", not_yet_visible)
    outcome(post(client, "/fhir/Observation", RESOURCES["Observation"], **headers), 200)
    assert looked_up == ["msg_race", "msg_race"]
    assert len(events(database)) == 1 and len(audit_events(database, "fhir.received")) == 1


def test_secret_without_prefix_and_bearer_token_together(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    client = make_client(webhook_secret=base64.b64encode(KEY).decode(), webhook_token=TOKEN)
    payload = json.dumps(RESOURCES["Condition"]).encode()
    unsigned = post(client, "/fhir/Condition", payload, Authorization=f"Bearer {TOKEN}")
    outcome(unsigned, 401)
    no_token = post(client, "/fhir/Condition", payload, **signed_headers(payload))
    outcome(no_token, 401)
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert_nothing_taken(database, dispatcher)
    both = post(
        client,
        "/fhir/Condition",
        payload,
        Authorization=f"Bearer {TOKEN}",
        **signed_headers(payload),
    )
    outcome(both, 202)
    assert len(events(database)) == 1


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Basic dXNlcjpwdw==", 401), ("Bearer wrong", 403), (f"bearer {TOKEN}", 202)],
)
def test_bearer_token(
    make_client: Any,
    database: Database,
    dispatcher: RecordingDispatcher,
    authorization: str | None,
    status: int,
) -> None:
    client = make_client(webhook_token=TOKEN)
    headers = {"Authorization": authorization} if authorization else {}
    outcome(post(client, "/fhir/Observation", RESOURCES["Observation"], **headers), status)
    if status == 202:
        assert len(events(database)) == 1
    else:
        assert_nothing_taken(database, dispatcher)
        assert len(audit_events(database, "fhir.auth_failed")) == 1


def test_unusable_secret_is_refused_at_start(database: Database, tmp_path: Path) -> None:
    settings = settings_for(database, tmp_path, webhook_secret="whsec_not*base64")
    with pytest.raises(ValueError, match="CAREBRIDGE_WEBHOOK_SECRET"):
        create_app(settings, database, RecordingDispatcher())  # type: ignore[arg-type]


def test_body_over_the_cap_is_413(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    client = make_client()
    declared = post(client, "/fhir/Observation", b" " * (MAX_BODY_BYTES + 1))
    outcome(declared, 413)
    small = make_client(max_body_bytes=1024)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies to what is read
        yield json.dumps(RESOURCES["Observation"]).encode()
        yield b" " * 2048

    streamed = small.post(
        "/fhir/Observation", content=chunks(), headers={"Content-Type": FHIR_JSON}
    )
    outcome(streamed, 413)
    assert_nothing_taken(database, dispatcher)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/fhir+xml", ""]
)
def test_wrong_content_type_is_415(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher, content_type: str
) -> None:
    response = client.post(
        "/fhir/Observation",
        content=json.dumps(RESOURCES["Observation"]).encode(),
        headers={"Content-Type": content_type},
    )
    outcome(response, 415)
    assert_nothing_taken(database, dispatcher)


def test_plain_json_content_type_is_accepted(client: TestClient, database: Database) -> None:
    response = client.post(
        "/fhir/Observation",
        content=json.dumps(RESOURCES["Observation"]).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    outcome(response, 202)


@pytest.mark.parametrize("payload", [b"{not json", b"", b'{"a": NaN}', b"\xff\xfe"])
def test_bad_json_is_400(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher, payload: bytes
) -> None:
    outcome(post(client, "/fhir", payload), 400)
    assert_nothing_taken(database, dispatcher)


INVALID = {
    "missing status": ("/fhir/Observation", {"resourceType": "Observation", "code": {"text": "x"}}),
    "unknown element": ("/fhir/Patient", {**RESOURCES["Patient"], "favouriteColour": "blue"}),
    "type mismatch": ("/fhir/Condition", RESOURCES["Observation"]),
    "id too long": ("/fhir/Observation", {**RESOURCES["Observation"], "id": "a" * 65}),
    "unsupported type": ("/fhir/Encounter", {"resourceType": "Encounter", "status": "planned"}),
    "not a resource": ("/fhir", [RESOURCES["Observation"]]),
    "no resourceType": ("/fhir", {"status": "final"}),
    "unknown resourceType": ("/fhir", {"resourceType": "Nonsense"}),
    "bundle type": ("/fhir", {"resourceType": "Bundle", "type": "document", "entry": []}),
    "bundle entry type": (
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": RESOURCES["Observation"]},
                {"resource": {"resourceType": "Encounter", "status": "planned"}},
            ],
        },
    ),
    "bundle invalid entry": (
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": RESOURCES["Observation"]},
                {"resource": {"resourceType": "Observation"}},
            ],
        },
    ),
    "notification focus type": (
        "/fhir/notify",
        backport("event-notification", 1, [(1, "https://ehr.example.org/fhir/Encounter/e1")]),
    ),
    "notification query-status": ("/fhir/notify", backport("query-status", 3)),
    "notification not a notification": ("/fhir/notify", RESOURCES["Observation"]),
    "notification empty payload": (
        "/fhir/notify",
        {
            "resourceType": "Bundle",
            "type": "history",
            "entry": [
                {
                    "resource": {
                        "resourceType": "SubscriptionStatus",
                        "status": "active",
                        "type": "event-notification",
                        "notificationEvent": [{"eventNumber": "1"}],
                        "subscription": {"reference": SUBSCRIPTION},
                    }
                }
            ],
        },
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_fhir_is_422(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher, case: str
) -> None:
    path, body = INVALID[case]
    outcome(post(client, path, body), 422)
    assert_nothing_taken(database, dispatcher)
    assert subscription_state(database) is None


def test_errors_never_quote_the_input(
    client: TestClient, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    patient = {**RESOURCES["Patient"], "birthDate": PATIENT_NAME, "gender": [PATIENT_NAME]}
    body = outcome(post(client, "/fhir/Patient", patient), 422)
    diagnostics = " ".join(issue["diagnostics"] for issue in body["issue"])
    assert "Patient.birthDate" in diagnostics
    assert PATIENT_NAME not in json.dumps(body) and PATIENT_NAME not in caplog.text


def test_unknown_path_is_an_operation_outcome(client: TestClient) -> None:
    outcome(client.get("/fhir/Observation"), 405)
    outcome(client.get("/nowhere"), 404)


# Subscription notifications ------------------------------------------------------------


def test_handshake_and_heartbeat_record_state_without_events(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher
) -> None:
    outcome(post(client, "/fhir/notify", backport("handshake", 0)), 200)
    state = subscription_state(database)
    assert state is not None and state.subscription == SUBSCRIPTION
    assert state.last_event_number == 0 and state.last_heartbeat_at is None
    assert len(audit_events(database, "fhir.subscription_handshake")) == 1
    outcome(post(client, "/fhir/notify", backport("heartbeat", 0)), 200)
    state = subscription_state(database)
    assert state is not None and state.last_heartbeat_at is not None
    assert_nothing_taken(database, dispatcher)
    assert audit_events(database, "fhir.notification_gap") == []


def test_heartbeat_reveals_missed_events(client: TestClient, database: Database) -> None:
    outcome(post(client, "/fhir/notify", backport("handshake", 0)), 200)
    # The heartbeat says 3 events were sent: a catch-up request is recorded and queued.
    body = outcome(post(client, "/fhir/notify", backport("heartbeat", 3)), 202)
    (request,) = events(database)
    assert event_ids(body) == [request.id]
    assert request.resource_type == "Subscription" and request.subscription == SUBSCRIPTION
    assert catch_up_range(request) == (1, 3)
    (gap,) = audit_events(database, "fhir.notification_gap")
    assert (gap.detail["missing_from"], gap.detail["missing_to"]) == (1, 3)
    assert gap.detail["catch_up_event"] == request.id
    outcome(post(client, "/fhir/notify", backport("heartbeat", 3)), 200)
    assert len(audit_events(database, "fhir.notification_gap")) == 1  # reported once
    assert len(events(database)) == 1


def test_backport_full_resource_notification(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher
) -> None:
    observation = RESOURCES["Observation"]
    notification = backport(
        "event-notification",
        1,
        [(1, "https://ehr.example.org/fhir/Observation/obs-1")],
        [observation],
    )
    body = outcome(post(client, "/fhir/notify", notification), 202)
    (row,) = events(database)
    assert event_ids(body) == [row.id] == dispatcher.published
    assert row.source == "subscription" and row.fhir_version == "R4"
    assert row.subscription == SUBSCRIPTION and row.event_number == 1
    assert row.resource_type == "Observation" and row.resource_id == "obs-1"
    assert row.body == observation
    (received,) = audit_events(database, "fhir.received")
    assert received.detail["subscription"] == SUBSCRIPTION
    state = subscription_state(database)
    assert state is not None and state.last_event_number == 1


def test_backport_id_only_notification(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher
) -> None:
    notification = backport(
        "event-notification",
        2,
        [
            (1, "https://ehr.example.org/fhir/DocumentReference/doc-9/_history/3"),
            (2, "Condition/cond-7"),
        ],
    )
    outcome(post(client, "/fhir/notify", notification), 202)
    rows = events(database)
    assert [(r.resource_type, r.resource_id, r.body, r.event_number) for r in rows] == [
        ("DocumentReference", "doc-9", None, 1),
        ("Condition", "cond-7", None, 2),
    ]
    assert dispatcher.published == [r.id for r in rows]
    (received,) = audit_events(database, "fhir.received")
    assert received.detail["id_only"] == 2


@pytest.mark.parametrize(
    ("bundle_type", "number", "version"),
    [("history", "1", "R4B"), ("subscription-notification", 1, "R5")],
)
def test_r4b_and_r5_notifications(
    client: TestClient,
    database: Database,
    dispatcher: RecordingDispatcher,
    bundle_type: str,
    number: int | str,
    version: str,
) -> None:
    observation = RESOURCES["Observation"]  # valid in R4B and R5
    notification = subscription_status_bundle(bundle_type, number, number, observation)
    body = outcome(post(client, "/fhir/notify", notification), 202)
    (row,) = events(database)
    assert event_ids(body) == [row.id] == dispatcher.published
    assert row.fhir_version == version and row.event_number == 1
    assert row.body == observation and row.subscription == SUBSCRIPTION


def test_notification_posted_to_the_base_url(client: TestClient, database: Database) -> None:
    notification = backport("event-notification", 1, [(1, "Observation/obs-1")])
    outcome(post(client, "/fhir", notification), 202)
    (row,) = events(database)
    assert row.source == "subscription" and row.body is None


def test_repeated_notification_is_a_no_op(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher
) -> None:
    notification = backport("event-notification", 1, [(1, "Observation/obs-1")])
    outcome(post(client, "/fhir/notify", notification), 202)
    again = outcome(post(client, "/fhir/notify", notification), 200)
    assert again["issue"][0]["severity"] == "information"
    assert len(events(database)) == 1 and len(dispatcher.published) == 1
    assert audit_events(database, "fhir.notification_gap") == []


def test_gap_in_event_numbers_is_audited_and_the_event_recorded(
    client: TestClient, database: Database
) -> None:
    outcome(
        post(client, "/fhir/notify", backport("event-notification", 1, [(1, "Observation/a")])), 202
    )
    outcome(
        post(client, "/fhir/notify", backport("event-notification", 4, [(4, "Observation/b")])), 202
    )
    recorded = events(database)
    assert [(r.resource_type, r.event_number) for r in recorded] == [
        ("Observation", 1),
        ("Subscription", None),  # the catch-up request for events 2..3
        ("Observation", 4),
    ]
    assert catch_up_range(recorded[1]) == (2, 3)
    (gap,) = audit_events(database, "fhir.notification_gap")
    assert gap.detail == {
        "subscription": SUBSCRIPTION,
        "missing_from": 2,
        "missing_to": 3,
        "catch_up_event": recorded[1].id,
    }
    # A late event from the gap is a repeat by number: the catch-up query fetches it.
    outcome(
        post(client, "/fhir/notify", backport("event-notification", 4, [(3, "Observation/c")])), 200
    )
    assert len(events(database)) == 3


def test_events_listed_out_of_order_are_all_recorded(
    client: TestClient, database: Database
) -> None:
    notification = backport("event-notification", 2, [(2, "Observation/b"), (1, "Observation/a")])
    outcome(post(client, "/fhir/notify", notification), 202)
    assert sorted(r.event_number or 0 for r in events(database)) == [1, 2]
    assert audit_events(database, "fhir.notification_gap") == []


# Concurrent requests: group commit -----------------------------------------------------


def observation(number: int) -> dict[str, Any]:
    return {**RESOURCES["Observation"], "id": f"obs-{number}"}


def test_concurrent_requests_share_transactions_and_each_is_committed_and_audited(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    """50 EHR requests at once: each answered 202 with its own event id only once that
    event and its audit event are committed; they took far fewer transactions than
    requests, the audit chain verifies, and every event reached the broker once."""
    committer = GroupCommitter(database, max_batch=64, max_wait_s=0.2)
    client = make_client(committer=committer)
    commits = commits_of(database)
    with client:
        responses = post_concurrently(
            client, [("/fhir/Observation", observation(n), {}) for n in range(50)]
        )
        settle(client)
    ids = [event_ids(outcome(response, 202)) for response in responses]
    assert all(len(one) == 1 for one in ids)
    flat = [event_id for (event_id,) in ids]
    assert len(set(flat)) == 50
    rows = {row.id: row for row in events(database)}
    assert sorted(rows) == sorted(flat)
    # Each response names the event of its own body.
    for number, (event_id,) in enumerate(ids):
        assert rows[event_id].resource_id == f"obs-{number}"
    received = audit_events(database, "fhir.received")
    assert sorted(e for r in received for e in r.detail["events"]) == sorted(flat)
    assert_chain_verifies(database)
    # Grouped: 50 requests (and the marks of their hand-over) in far fewer transactions.
    assert committer.batches < 25 and len(commits) < 25
    assert sorted(dispatcher.published) == sorted(flat)
    assert all(row.status is FhirEventStatus.QUEUED and row.task_id for row in rows.values())


def test_replayed_webhook_id_among_concurrent_requests_is_recorded_once(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    client = make_client(committer=GroupCommitter(database, max_wait_s=0.2))
    requests_ = [
        ("/fhir/Observation", observation(n), {"webhook-id": f"msg_{n}"}) for n in range(20)
    ]
    requests_ += [("/fhir/Observation", observation(99), {"webhook-id": "msg_dup"})] * 10
    with client:
        responses = post_concurrently(client, requests_)
        settle(client)
    statuses = [response.status_code for response in responses]
    assert statuses[:20] == [202] * 20
    assert sorted(statuses[20:]) == [200] * 9 + [202]
    for response in responses[20:]:
        if response.status_code == 200:
            assert "no-op" in outcome(response, 200)["issue"][0]["diagnostics"]
    rows = events(database)
    assert len(rows) == 21
    assert [r.webhook_id for r in rows].count("msg_dup") == 1
    assert len(audit_events(database, "fhir.received")) == 21
    assert_chain_verifies(database)
    assert sorted(dispatcher.published) == sorted(r.id for r in rows)


def test_a_failed_commit_answers_503_to_its_whole_batch_and_stores_nothing(
    make_client: Any, database: Database, dispatcher: RecordingDispatcher
) -> None:
    client = make_client(committer=GroupCommitter(database, max_wait_s=0.2))

    def disk_full(_connection: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    event.listen(database.engine, "commit", disk_full)
    with client:
        responses = post_concurrently(
            client, [("/fhir/Observation", observation(n), {}) for n in range(10)]
        )
        event.remove(database.engine, "commit", disk_full)
        for response in responses:
            body = outcome(response, 503)
            assert body["issue"][0]["code"] == "transient"
            assert response.headers["retry-after"] == "5"
        settle(client)
        assert_nothing_taken(database, dispatcher)
        assert audit_events(database) == []
        # The committer goes on once the database takes commits again.
        outcome(post(client, "/fhir/Observation", observation(1)), 202)
    assert len(events(database)) == 1
    assert_chain_verifies(database)


def test_database_down_answers_503_to_concurrent_requests(tmp_path: Path) -> None:
    database = Database(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    dispatcher = RecordingDispatcher()
    app = create_app(settings_for(database, tmp_path), database, dispatcher)  # type: ignore[arg-type]
    with TestClient(app) as client:
        responses = post_concurrently(
            client, [("/fhir/Observation", observation(n), {}) for n in range(10)]
        )
        assert [r.status_code for r in responses] == [503] * 10
    assert dispatcher.published == []
    database.dispose()


def record_observation(number: int) -> Any:
    """Committer work: one event and its audit event, as the webhook records them."""

    def work(session: Any) -> int:
        from db import fhir_events
        from db.schema import FhirEventSource

        row = fhir_events.record_event(
            session,
            source=FhirEventSource.DIRECT,
            fhir_version="R4",
            resource_type="Observation",
            resource_id=f"obs-{number}",
            body=observation(number),
            body_sha256="0" * 64,
        )
        audit.append(session, "fhir.received", actor="listener", events=[row.id])
        return row.id

    return work


def test_a_failing_request_is_rolled_back_alone_and_its_batch_commits(database: Database) -> None:
    """Three requests in one batch; the second fails after its audit append: its savepoint
    is rolled back, the other two are committed, and the audit chain has no hole."""
    committer = GroupCommitter(database, max_batch=3, max_wait_s=5)

    def fails_after_auditing(session: Any) -> int:
        record_observation(2)(session)
        raise ValueError("this request's own failure")

    first = committer.submit(record_observation(1))
    second = committer.submit(fails_after_auditing)
    third = committer.submit(record_observation(3))
    one, three = first.result(10), third.result(10)
    with pytest.raises(ValueError, match="own failure"):
        second.result(10)
    committer.close()
    assert committer.batches == 1
    assert [(r.id, r.resource_id) for r in events(database)] == [(one, "obs-1"), (three, "obs-3")]
    assert [a.detail["events"] for a in audit_events(database)] == [[one], [three]]
    assert_chain_verifies(database)


def test_a_request_given_up_before_its_batch_is_never_stored(database: Database) -> None:
    committer = GroupCommitter(database, max_batch=2, max_wait_s=5)
    abandoned = committer.submit(record_observation(1))
    assert abandoned.cancel()  # the caller went away while the batch was still forming
    kept = committer.submit(record_observation(2))
    kept.result(10)
    committer.close()
    assert [r.resource_id for r in events(database)] == ["obs-2"]
    assert_chain_verifies(database)


def test_publishing_yields_to_recording_for_at_most_its_delay(
    database: Database, dispatcher: RecordingDispatcher
) -> None:
    """While the committer is busy the broker hand-over waits, but no longer than
    max_delay_s; the events are then marked queued once the committer is free."""
    committer = GroupCommitter(database)
    ids = [committer.submit(record_observation(n)).result(10) for n in (1, 2)]
    publisher = EventPublisher(dispatcher, committer, max_delay_s=0.5)  # type: ignore[arg-type]
    release = threading.Event()
    busy = committer.submit(lambda _session: release.wait(30))
    started = time.monotonic()
    publisher.add(ids)
    time.sleep(0.1)
    assert dispatcher.published == []  # recording goes first
    while not dispatcher.published and time.monotonic() - started < 10:
        time.sleep(0.02)
    assert dispatcher.published == ids and not busy.done()  # the delay ran out first
    release.set()
    assert publisher.flush(timeout=10)
    assert all(row.status is FhirEventStatus.QUEUED for row in events(database))
    publisher.close()
    committer.close()


def direct_post(number: int, webhook_id: str | None = None) -> DirectPost:
    """A validated direct POST of observation(number), as the webhook hands it over."""
    body = observation(number)
    return DirectPost(
        [IncomingResource("Observation", body["id"], body)], webhook_id, f"{number:064x}"
    )


def submit_posts(committer: GroupCommitter, posts: list[DirectPost]) -> list[Any]:
    """Submit posts as the webhook does: together, each with its own work as fallback."""
    recorder = EventRecorder()
    return [
        committer.submit(
            lambda session, post=post: recorder.record(
                session, post.resources, post.webhook_id, post.body_sha256
            ),
            together=Together(recorder.record_direct_many, post),
        )
        for post in posts
    ]


def test_direct_posts_of_a_batch_are_recorded_together(database: Database) -> None:
    """One batch: a Bundle of two, plain posts, a webhook-id repeated within the batch and
    one received before. Each post gets its own events (in its own order), the repeats
    are no-ops naming the first event, one audit event per recorded post, one chain."""
    committer = GroupCommitter(database, max_batch=10, max_wait_s=5)
    earlier = submit_posts(committer, [direct_post(0, "msg_before")])[0].result(10)
    bundle = DirectPost(
        [
            IncomingResource("Observation", "obs-b1", observation(11)),
            IncomingResource("Condition", "cond-b2", None),
        ],
        "msg_bundle",
        "b" * 64,
    )
    posts = [
        direct_post(1),
        bundle,
        direct_post(2, "msg_2"),
        direct_post(3, "msg_before"),  # recorded by an earlier batch
        direct_post(4, "msg_2"),  # repeats a post of this batch
        direct_post(5),
    ]
    results = [future.result(10) for future in submit_posts(committer, posts)]
    committer.close()
    assert committer.batches == 2
    assert [taken.status for taken in results] == [202, 202, 202, 200, 200, 202]
    rows = {row.id: row for row in events(database)}
    first, second, third, _, _, sixth = results
    assert [rows[i].resource_id for i, _ in first.events] == ["obs-1"]
    assert [(rows[i].resource_id, t) for i, t in second.events] == [
        ("obs-b1", "Observation"),
        ("cond-b2", "Condition"),
    ]
    assert rows[second.events[0][0]].webhook_id == "msg_bundle"
    assert rows[second.events[1][0]].webhook_id is None and rows[second.events[1][0]].body is None
    assert [rows[i].resource_id for i, _ in third.events] == ["obs-2"]
    assert [rows[i].resource_id for i, _ in sixth.events] == ["obs-5"]
    assert f"event {earlier.events[0][0]};" in results[3].message
    assert f"event {third.events[0][0]};" in results[4].message
    assert len(rows) == 6
    received = audit_events(database, "fhir.received")
    assert [a.detail["events"] for a in received] == [
        [i for i, _ in taken.events] for taken in (earlier, first, second, third, sixth)
    ]
    assert received[2].detail["id_only"] == 1
    assert received[2].detail["resource_types"] == ["Condition", "Observation"]
    assert_chain_verifies(database)


def test_a_lost_webhook_id_race_in_a_batch_falls_back_to_one_by_one(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's lookup misses a webhook-id another transaction committed meanwhile:
    its INSERT fails on the unique key, the batch's savepoint is rolled back, and each
    post is recorded alone: the repeat is a no-op, the others are committed."""
    from db import fhir_events

    committer = GroupCommitter(database, max_batch=3, max_wait_s=5)
    earlier = submit_posts(committer, [direct_post(0, "msg_race")])[0].result(10)
    monkeypatch.setattr(fhir_events, "find_webhook_ids", lambda _session, _ids: {})
    results = [
        future.result(10)
        for future in submit_posts(
            committer, [direct_post(1), direct_post(2, "msg_race"), direct_post(3)]
        )
    ]
    committer.close()
    assert [taken.status for taken in results] == [202, 200, 202]
    assert f"event {earlier.events[0][0]};" in results[1].message
    assert [r.resource_id for r in events(database)] == ["obs-0", "obs-1", "obs-3"]
    assert len(audit_events(database, "fhir.received")) == 3
    assert_chain_verifies(database)


def test_a_post_that_fails_in_a_batch_fails_alone(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One post of a batch cannot be stored (its body does not serialise): the batch's
    savepoint is rolled back, the others are recorded one by one, and only that post's
    caller gets the error; nothing of it is stored or audited."""
    committer = GroupCommitter(database, max_batch=3, max_wait_s=5)
    broken = DirectPost(
        [IncomingResource("Observation", "obs-x", {"resourceType": "Observation", "x": {1j}})],
        None,
        "c" * 64,
    )
    futures = submit_posts(committer, [direct_post(1), broken, direct_post(3)])
    first, third = futures[0].result(10), futures[2].result(10)
    with pytest.raises(Exception, match="serializable"):
        futures[1].result(10)
    committer.close()
    assert committer.batches == 1
    assert [r.resource_id for r in events(database)] == ["obs-1", "obs-3"]
    assert [a.detail["events"] for a in audit_events(database)] == [
        [first.events[0][0]],
        [third.events[0][0]],
    ]
    assert_chain_verifies(database)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_events_recorded_together_get_their_own_ids(backend: str, tmp_path: Path) -> None:
    """record_events numbers the rows itself (one INSERT for all): each id is its own row's,
    in order, and rows recorded one at a time afterwards continue the numbering."""
    from db import fhir_events
    from db.schema import FhirEventSource
    from tests.harness import postgres_database

    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'events.db'}"
        else:
            url = stack.enter_context(postgres_database())
        upgrade(url)
        database = Database(url)
        stack.callback(database.dispose)

        def new(number: int) -> fhir_events.NewEvent:
            return fhir_events.NewEvent(
                FhirEventSource.DIRECT, "R4", "Observation", f"obs-{number}", None, "0" * 64
            )

        with database.session() as session:
            single = fhir_events.record_event(
                session,
                source=FhirEventSource.DIRECT,
                fhir_version="R4",
                resource_type="Observation",
                resource_id="obs-0",
                body=None,
                body_sha256="0" * 64,
            ).id
            ids = fhir_events.record_events(session, [new(n) for n in range(1, 6)])
            assert fhir_events.record_events(session, []) == []
        with database.session() as session:
            after = fhir_events.record_event(
                session,
                source=FhirEventSource.DIRECT,
                fhir_version="R4",
                resource_type="Observation",
                resource_id="obs-6",
                body=None,
                body_sha256="0" * 64,
            ).id
        assert len(set(ids)) == 5 and single < min(ids) and max(ids) < after
        by_id = {row.id: row.resource_id for row in events(database)}
        assert [by_id[i] for i in ids] == [f"obs-{n}" for n in range(1, 6)]
        assert all(row.status is FhirEventStatus.RECEIVED for row in events(database))


def test_publishing_waits_for_the_requests_in_flight(
    database: Database, dispatcher: RecordingDispatcher
) -> None:
    """While a request is being taken the broker hand-over waits (the EHR's 202s first);
    it goes on as soon as none is left, or once max_delay_s ran out."""
    committer = GroupCommitter(database)
    ids = [committer.submit(record_observation(n)).result(10) for n in (1, 2)]
    in_flight = RequestsInFlight()
    publisher = EventPublisher(
        dispatcher,  # type: ignore[arg-type]
        committer,
        max_delay_s=30,
        in_flight=in_flight,
    )
    in_flight.enter()
    publisher.add(ids)
    time.sleep(0.3)
    assert dispatcher.published == []
    in_flight.leave()
    assert publisher.flush(timeout=10)
    assert dispatcher.published == ids
    # The delay bounds the wait: a request that never ends holds nothing up for long.
    impatient = EventPublisher(
        dispatcher,  # type: ignore[arg-type]
        committer,
        max_delay_s=0.3,
        in_flight=in_flight,
    )
    more = [committer.submit(record_observation(n)).result(10) for n in (3, 4)]
    in_flight.enter()
    started = time.monotonic()
    impatient.add(more)
    while dispatcher.published != ids + more and time.monotonic() - started < 10:
        time.sleep(0.02)
    assert dispatcher.published == ids + more and in_flight.busy
    in_flight.leave()
    assert impatient.flush(timeout=10)
    assert all(row.status is FhirEventStatus.QUEUED for row in events(database))
    for each in (publisher, impatient):
        each.close()
    committer.close()


# Broker and database outages -----------------------------------------------------------


def test_broker_down_still_202_and_the_sweeper_resends(
    client: TestClient, database: Database, dispatcher: RecordingDispatcher, tmp_path: Path
) -> None:
    dispatcher.up = False
    body = outcome(post(client, "/fhir/Observation", RESOURCES["Observation"]), 202)
    (row,) = events(database)
    assert event_ids(body) == [row.id]
    assert row.status is FhirEventStatus.RECEIVED and row.queued_at is None
    assert dispatcher.published == []

    settings = settings_for(database, tmp_path, requeue_after_seconds=30)
    sweeper = Sweeper(settings, database, dispatcher, RoutingRules.load(None))  # type: ignore[arg-type]
    sweeper.sweep_once(utcnow() + timedelta(seconds=5))  # not stale yet
    later = utcnow() + timedelta(seconds=60)
    report = sweeper.sweep_once(later)  # stale, broker still down: tried once
    assert report.fhir_events_published == [row.id]
    (row,) = events(database)
    assert row.status is FhirEventStatus.RECEIVED and row.queued_at == later
    dispatcher.up = True
    assert sweeper.sweep_once(later + timedelta(seconds=5)).fhir_events_published == []
    sweeper.sweep_once(later + timedelta(seconds=31))
    (row,) = events(database)
    assert dispatcher.published == [row.id]
    assert row.status is FhirEventStatus.QUEUED and row.task_id
    sweeper.sweep_once(later + timedelta(seconds=120))
    assert dispatcher.published == [row.id]  # queued events are not re-sent


def test_database_down_is_503_and_not_ready(tmp_path: Path) -> None:
    database = Database(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    dispatcher = RecordingDispatcher()
    app = create_app(settings_for(database, tmp_path), database, dispatcher)  # type: ignore[arg-type]
    with TestClient(app) as client:
        outcome(post(client, "/fhir/Observation", RESOURCES["Observation"]), 503)
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
    assert dispatcher.published == []
    database.dispose()


# Health and metrics --------------------------------------------------------------------


def test_health_readiness_and_metrics(make_client: Any) -> None:
    client = make_client(webhook_token=TOKEN)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outcome(post(client, "/fhir/Observation", RESOURCES["Observation"], **auth), 202)
    outcome(post(client, "/fhir/Observation", RESOURCES["Observation"]), 401)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'carebridge_fhir_requests_total{route="/fhir/{resource_type}",status="202"} 1.0' in text
    assert 'carebridge_fhir_requests_total{route="/fhir/{resource_type}",status="401"} 1.0' in text
    assert (
        'carebridge_fhir_events_recorded_total{resource_type="Observation",source="direct"} 1.0'
        in text
    )
    assert 'carebridge_fhir_auth_failures_total{reason="missing_token"} 1.0' in text


def test_webhook_module_never_imports_torch() -> None:
    code = (
        "import sys, listeners.fhir, listeners.fhir_payloads;"
        "listeners.fhir_payloads.validate({'resourceType': 'Patient'}, 'R4B');"
        "sys.exit(1 if 'torch' in sys.modules or 'monai' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# The real command ----------------------------------------------------------------------


@dataclass
class ListenFhir:
    """A running `carebridge listen-fhir` and what a test checks once it stopped."""

    port: int
    url: str
    log_path: Path
    returncode: int | None = None
    pid: int = 0

    def post(self, body: Any, **headers: str) -> requests.Response:
        return requests.post(
            f"http://127.0.0.1:{self.port}/fhir/Observation",
            data=json.dumps(body),
            headers={"Content-Type": FHIR_JSON, "Authorization": f"Bearer {TOKEN}", **headers},
            timeout=60,
        )


@contextlib.contextmanager
def listen_fhir(tmp_path: Path, *options: str) -> Iterator[ListenFhir]:
    """`carebridge listen-fhir [options]` on a free port with a migrated SQLite database,
    once it says it is ready; stopped with SIGTERM on leaving."""
    port = free_port()
    url = f"sqlite:///{tmp_path / 'var' / 'carebridge.db'}"
    upgrade(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    env.update(
        CAREBRIDGE_DATABASE_URL=url,
        CAREBRIDGE_ARCHIVE_DIR=str(tmp_path / "var" / "archive"),
        CAREBRIDGE_FHIR_PORT=str(port),
        CAREBRIDGE_WEBHOOK_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    server = ListenFhir(port, url, tmp_path / "listen-fhir.log")
    with server.log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "listeners.cli", "listen-fhir", *options],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server.pid = proc.pid
    try:
        wait_for_port("127.0.0.1", port, timeout=60, proc=proc)
        deadline = time.monotonic() + 120
        while "carebridge listen-fhir: ready" not in server.log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, server.log_path.read_text()
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        server.returncode = proc.wait(30)


def test_listen_fhir_command_takes_an_observation(tmp_path: Path) -> None:
    """`carebridge listen-fhir` on a free port: an Observation POSTed with requests is a
    committed row, handed to the embedded broker; SIGTERM stops it cleanly."""
    with listen_fhir(tmp_path) as server:
        response = server.post(RESOURCES["Observation"])
        assert response.status_code == 202, response.text
        (event_id,) = event_ids(response.json())
    output = server.log_path.read_text()
    assert server.returncode == 0, output
    assert "carebridge listen-fhir: ready" in output
    database = Database(server.url)
    try:
        (row,) = events(database)
    finally:
        database.dispose()
    assert row.id == event_id and row.body == RESOURCES["Observation"]
    assert row.status is FhirEventStatus.QUEUED and row.task_id  # the embedded broker took it


def test_listen_fhir_command_takes_concurrent_requests(tmp_path: Path) -> None:
    """50 EHR connections at once against the real command, 5 of them one delivery sent
    again: 46 events, each answered 202 with its own id, committed with its audit event,
    handed to the embedded broker once; the replays are no-ops; the chain verifies."""
    bodies = [(observation(n), {"webhook-id": f"msg_{n}"}) for n in range(45)]
    bodies += [(observation(99), {"webhook-id": "msg_again"})] * 5
    start = threading.Barrier(len(bodies))

    with listen_fhir(tmp_path) as server:

        def one(request: tuple[dict[str, Any], dict[str, str]]) -> requests.Response:
            start.wait()
            return server.post(request[0], **request[1])

        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(one, bodies))
    assert server.returncode == 0, server.log_path.read_text()
    assert [r.status_code for r in responses[:45]] == [202] * 45, responses[0].text
    assert sorted(r.status_code for r in responses[45:]) == [200] * 4 + [202]
    answered = [event_ids(r.json())[0] for r in responses if r.status_code == 202]
    database = Database(server.url)
    try:
        rows = events(database)
        received = audit_events(database, "fhir.received")
        assert_chain_verifies(database)
    finally:
        database.dispose()
    assert sorted(answered) == [row.id for row in rows] and len(rows) == 46
    assert sorted(e for r in received for e in r.detail["events"]) == sorted(answered)
    # Shutting down hands whatever was still waiting to the broker.
    assert all(row.status is FhirEventStatus.QUEUED and row.task_id for row in rows)
    assert len({row.task_id for row in rows}) == 46


def test_listen_fhir_group_shares_its_port(tmp_path: Path) -> None:
    """`listen-fhir --processes 2`: two processes on one port take 60 concurrent EHR
    connections between them; every request is one committed event handed to the broker
    once, the chain verifies, /metrics of either process counts the whole group, a second
    group on the same port is refused, and SIGTERM stops both processes."""
    start = threading.Barrier(60)
    with listen_fhir(tmp_path, "--processes", "2") as server:
        metrics_dir = tmp_path / "var" / "fhir-metrics"

        def one(n: int) -> requests.Response:
            start.wait()
            return server.post(observation(n), **{"webhook-id": f"group_{n}"})

        with ThreadPoolExecutor(60) as pool:
            responses = list(pool.map(one, range(60)))
        # A request is counted once its answer is sent: the last counts may trail a little.
        counted = 'carebridge_fhir_requests_total{route="/fhir/{resource_type}",status="202"} 60.0'
        deadline = time.monotonic() + 10
        while True:
            exposition = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=30).text
            if counted in exposition or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        counter_files = sorted(metrics_dir.glob("counter_*.db"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
        env.update(
            CAREBRIDGE_DATABASE_URL=server.url,
            CAREBRIDGE_ARCHIVE_DIR=str(tmp_path / "var" / "archive"),
            CAREBRIDGE_FHIR_PORT=str(server.port),
            CAREBRIDGE_WEBHOOK_TOKEN=TOKEN,
        )
        second = subprocess.run(
            [sys.executable, "-m", "listeners.cli", "listen-fhir", "--processes", "2"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        pids = {int(path.stem.split("_")[1]) for path in counter_files}
    output = server.log_path.read_text()
    assert server.returncode == 0, output
    assert "ready (2 processes)" in output
    assert [r.status_code for r in responses] == [202] * 60, responses[0].text
    assert second.returncode == 1 and "is in use" in second.stderr
    # Both processes answered requests (the kernel spread 60 connections over the two).
    assert len(pids) == 2, counter_files
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # both stopped
    assert counted in exposition, exposition
    answered = sorted(event_ids(r.json())[0] for r in responses)
    database = Database(server.url)
    try:
        rows = events(database)
        assert_chain_verifies(database)
    finally:
        database.dispose()
    assert answered == [row.id for row in rows]
    assert all(row.status is FhirEventStatus.QUEUED and row.task_id for row in rows)
    assert len({row.task_id for row in rows}) == 60


def test_listen_fhir_group_stops_when_one_process_dies(tmp_path: Path) -> None:
    """A process of the group that dies takes the group down with exit status 1, so that
    the service manager restarts it whole (never half a group on the port)."""
    with listen_fhir(tmp_path, "--processes", "2") as server:
        (child,) = [
            int(pid)
            for children in Path(f"/proc/{server.pid}/task").glob("*/children")
            for pid in children.read_text().split()
        ]
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{server.pid}").exists() and time.monotonic() < deadline:
            if "Z" in Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]:
                break  # exited, waiting to be reaped by the test
            time.sleep(0.1)
    assert server.returncode == 1, server.log_path.read_text()
    assert "stopping the group" in server.log_path.read_text()
