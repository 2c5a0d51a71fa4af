"""Catching up on Subscription notifications that never arrived.

Subscription notifications carry ``events-since-subscription-start``; when numbers are
skipped (or a heartbeat reports more events than were received) the webhook records a
catch-up request for the missing range. The worker then asks the EHR for what was missed:

1. the Subscriptions backport ``$events`` operation (``Subscription/{id}/$events`` with
   ``eventsSinceNumber``/``eventsUntilNumber``, full resources) where the server has it;
2. otherwise a search with the Subscription's own criteria (R4 ``Subscription.criteria``
   as ``Type?params``, or the backport's filter-criteria extension), limited to resources
   changed since the last notification before the gap.

Each resource found is recorded as a FHIR event of that Subscription and filed under its
patient like any other; a resource that arrives twice changes nothing (the patient
context keeps one version per content hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from worker.senders.fhir import FhirClient, FhirDeliveryError

log = logging.getLogger("carebridge.catchup")

BACKPORT_FILTER_CRITERIA = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria"
)
ACCEPTED_TYPES = ("DocumentReference", "Observation", "Condition", "Patient")
#: Answers to ``$events`` that mean the server does not have it (the search is used).
NO_OPERATION_STATUSES = frozenset({400, 404, 405, 501})
# Clocks of the EHR and of carebridge differ: search a little before the last notification.
CLOCK_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class CatchUp:
    """What the EHR gave for a gap, and how it was asked."""

    method: str  # "$events", "search" or "none"
    resources: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


def subscription_id(reference: str) -> str:
    """The id of ``[base/]Subscription/<id>``."""
    head, _, ident = reference.rstrip("/").rpartition("/")
    if not head.endswith("Subscription") or not ident:
        raise ValueError("the notification's subscription is not a Subscription reference")
    return ident


def _focus_resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The resources of a notification Bundle (its status Parameters left out)."""
    found = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, dict) and resource.get("resourceType") in ACCEPTED_TYPES:
            found.append(resource)
    return found


def _criteria(subscription: Mapping[str, Any]) -> str | None:
    """A ``Type?params`` search the Subscription stands for, if it says one."""
    criteria = subscription.get("criteria")
    candidates: list[Any] = [criteria]
    for holder in (subscription, subscription.get("_criteria") or {}):
        for extension in holder.get("extension") or []:
            if extension.get("url") == BACKPORT_FILTER_CRITERIA:
                candidates.insert(0, extension.get("valueString"))
    for candidate in candidates:
        if isinstance(candidate, str) and "?" in candidate:
            resource_type = candidate.split("?", 1)[0]
            if resource_type in ACCEPTED_TYPES:
                return candidate
    return None


def missed_resources(
    client: FhirClient,
    subscription: str,
    missing_from: int,
    missing_to: int,
    since: datetime | None,
) -> CatchUp:
    """Ask the EHR for the events ``missing_from``..``missing_to`` of ``subscription``.

    Transient failures raise :class:`FhirDeliveryError` (transient) so the caller retries.
    """
    ident = subscription_id(subscription)
    try:
        bundle = client.subscription_events(ident, missing_from, missing_to)
        return CatchUp("$events", _focus_resources(bundle), "backport $events operation")
    except FhirDeliveryError as exc:
        # 501 Not Implemented and 405 say the operation is missing, not that it failed.
        if exc.transient and exc.status_code not in NO_OPERATION_STATUSES:
            raise
        log.info("the EHR has no $events for this Subscription (%s); searching", exc.status_code)
    resource = client.read("Subscription", ident)
    query = _criteria(resource)
    if query is None:
        return CatchUp("none", [], "the Subscription names no searchable criteria")
    resource_type, _, text = query.partition("?")
    params: dict[str, list[str]] = {}
    for key, value in parse_qsl(text, keep_blank_values=False):
        params.setdefault(key, []).append(value)
    if since is not None:
        params.setdefault("_lastUpdated", []).append(
            "ge" + (since - CLOCK_MARGIN).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    found = client.search(resource_type, params)
    return CatchUp("search", found, f"search of {resource_type} with the Subscription criteria")


def body_sha256(resource: Mapping[str, Any]) -> str:
    """Digest of a resource fetched during a catch-up (there is no HTTP body of ours)."""
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
