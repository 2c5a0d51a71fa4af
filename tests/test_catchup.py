"""Catching up on missed Subscription notifications, against an HTTP server on the wire.

The end-to-end EHR test covers the search fallback with a real FHIR server (which has no
``$events``); here a small server that does implement the backport's ``$events``
operation checks the request carebridge sends and what it takes from the answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from worker.catchup import missed_resources
from worker.senders.fhir import FhirClient, FhirDeliveryError

SUBSCRIPTION = "https://ehr.example.org/fhir/Subscription/sub-1"
OBSERVATIONS = [
    {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": 120 + n, "unit": "mm[Hg]"},
    }
    for n in (3, 4)
]


def _notification(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A backport event-notification Bundle (history) for events 3 and 4."""
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": SUBSCRIPTION}},
            {"name": "type", "valueCode": "query-event"},
            {"name": "events-since-subscription-start", "valueString": "4"},
        ],
    }
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"resource": status}] + [{"resource": r} for r in resources],
    }


class Ehr:
    """What the test server answers and what it was asked."""

    def __init__(self, events_status: int) -> None:
        self.events_status = events_status
        self.requests: list[tuple[str, dict[str, list[str]]]] = []


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(ehr: Ehr) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                ehr.requests.append((url.path, parse_qs(url.query)))
                if url.path == "/fhir/Subscription/sub-1/$events":
                    if ehr.events_status == 200:
                        self._send(200, _notification(OBSERVATIONS))
                    else:
                        outcome = {
                            "resourceType": "OperationOutcome",
                            "issue": [{"severity": "error", "code": "not-supported"}],
                        }
                        self._send(ehr.events_status, outcome)
                elif url.path == "/fhir/Subscription/sub-1":
                    self._send(
                        200,
                        {
                            "resourceType": "Subscription",
                            "id": "sub-1",
                            "status": "active",
                            "criteria": "Observation?patient=Patient/p1",
                            "channel": {"type": "rest-hook"},
                        },
                    )
                elif url.path == "/fhir/Observation":
                    self._send(
                        200,
                        {
                            "resourceType": "Bundle",
                            "type": "searchset",
                            "entry": [{"resource": OBSERVATIONS[1], "search": {"mode": "match"}}],
                        },
                    )
                else:
                    self._send(404, {"resourceType": "OperationOutcome", "issue": []})

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/fhir"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_missed_events_come_from_the_backport_events_operation(serve: Any) -> None:
    ehr = Ehr(events_status=200)
    with FhirClient(serve(ehr)) as client:
        caught = missed_resources(client, SUBSCRIPTION, 3, 4, since=None)
    assert caught.method == "$events"
    assert caught.resources == OBSERVATIONS  # the status Parameters left out
    ((path, query),) = ehr.requests
    assert path == "/fhir/Subscription/sub-1/$events"
    assert query == {
        "eventsSinceNumber": ["3"],
        "eventsUntilNumber": ["4"],
        "content": ["full-resource"],
    }


def test_without_events_the_subscription_criteria_are_searched(serve: Any) -> None:
    ehr = Ehr(events_status=501)
    since = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    with FhirClient(serve(ehr)) as client:
        caught = missed_resources(client, SUBSCRIPTION, 3, 4, since=since)
    assert caught.method == "search"
    assert caught.resources == [OBSERVATIONS[1]]
    paths = [path for path, _ in ehr.requests]
    assert paths == [
        "/fhir/Subscription/sub-1/$events",
        "/fhir/Subscription/sub-1",
        "/fhir/Observation",
    ]
    search = ehr.requests[2][1]
    assert search["patient"] == ["Patient/p1"]
    assert search["_lastUpdated"] == ["ge2026-11-28T09:55:00Z"]  # five minutes' margin


def test_a_transient_failure_of_events_is_retried_not_searched(serve: Any) -> None:
    ehr = Ehr(events_status=503)
    with FhirClient(serve(ehr)) as client, pytest.raises(FhirDeliveryError) as caught:
        missed_resources(client, SUBSCRIPTION, 3, 4, since=None)
    assert caught.value.transient
    assert [path for path, _ in ehr.requests] == ["/fhir/Subscription/sub-1/$events"]
