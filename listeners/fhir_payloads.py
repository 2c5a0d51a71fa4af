"""What a FHIR request body holds: resources to record, or a Subscription notification.

Pure functions, no database and no network: the webhook parses and validates the whole
body here first and stores nothing unless this succeeded. Resources are validated with
the ``fhir.resources`` models of their family: R4B (the R4 family; ``fhir.resources``'
top-level models are R5) for direct POSTs, R4 backport and R4B notifications, R5 for R5
notifications. The body kept for an event is the resource exactly as received.

Notification shapes (Subscriptions R5 Backport IG; FHIR R4B and R5):

- R4 backport: Bundle ``history``, first entry a ``Parameters`` (profile
  backport-subscription-status-r4) with ``subscription``, ``type``,
  ``events-since-subscription-start`` and ``notification-event`` parts (``event-number``,
  ``focus``).
- R4B: Bundle ``history``, first entry a ``SubscriptionStatus``.
- R5: Bundle ``subscription-notification``, first entry a ``SubscriptionStatus``.

A focus found among the Bundle's entries (full-resource payload) is recorded with its
body; otherwise (id-only payload) with its type and id only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

SUPPORTED_RESOURCE_TYPES = ("DocumentReference", "Observation", "Condition", "Patient")
DIRECT_BUNDLE_TYPES = ("batch", "transaction", "collection", "history")
NOTIFICATION_KINDS = ("handshake", "heartbeat", "event-notification")
BACKPORT_STATUS_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "backport-subscription-status-r4"
)
MAX_REPORTED_ISSUES = 20
MAX_EVENT_NUMBER = 2**63 - 1
MAX_ID_LENGTH = 64
MAX_SUBSCRIPTION_LENGTH = 300

FhirVersion = Literal["R4", "R4B", "R5"]
NotificationKind = Literal["handshake", "heartbeat", "event-notification"]

# A literal reference: [base/]Type/id[/_history/vid]
_REFERENCE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


class PayloadError(Exception):
    """The body cannot be taken: ``status`` 400 (not JSON) or 422 (not acceptable FHIR).

    ``issues`` are (OperationOutcome issue code, diagnostics) pairs. Diagnostics name
    element paths and rules, never element values (which can be PHI).
    """

    def __init__(self, status: int, issues: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(text for _, text in issues))
        self.status = status
        self.issues = issues


def _invalid(text: str) -> PayloadError:
    return PayloadError(422, [("invalid", text)])


def _not_supported(text: str) -> PayloadError:
    return PayloadError(422, [("not-supported", text)])


@dataclass(frozen=True)
class IncomingResource:
    """One resource to record; ``body`` is None for an id-only notification."""

    resource_type: str
    resource_id: str | None
    body: dict[str, Any] | None
    event_number: int | None = None


@dataclass(frozen=True)
class Notification:
    """A Subscription notification, reduced to what the webhook records."""

    fhir_version: FhirVersion
    kind: NotificationKind
    subscription: str
    events_since_start: int | None
    resources: list[IncomingResource] = field(default_factory=list)


# Parsing -------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is not JSON, 422 when not an object."""
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PayloadError(400, [("structure", "the body is not valid UTF-8 JSON")]) from None
    if not isinstance(document, dict):
        raise _invalid("the body is not a FHIR resource (a JSON object with resourceType)")
    return document


def _location(root: str, loc: tuple[int | str, ...]) -> str:
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate(document: dict[str, Any], family: Literal["R4B", "R5"]) -> None:
    """Validate a resource (a Bundle with its entries) against the family's models."""
    resource_type = document.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise _invalid("resourceType is missing")
    if family == "R4B":
        from fhir.resources.R4B import get_fhir_model_class
    else:
        from fhir.resources import get_fhir_model_class
    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError):
        raise _not_supported(f"{resource_type[:64]!r} is not a FHIR resource type") from None
    try:
        model.model_validate(document)
    except ValidationError as exc:
        issues = [
            ("invalid", f"{_location(resource_type, tuple(error['loc']))}: {error['msg']}")
            for error in exc.errors()[:MAX_REPORTED_ISSUES]
        ]
        raise PayloadError(422, issues) from None
    except Exception:
        # fhir.resources raises KeyError/TypeError on some malformed nesting (an unknown
        # resourceType inside a Bundle); its message may quote the input, so it is dropped.
        raise _invalid(f"the {resource_type} is not valid FHIR") from None


# What the webhook validates most: loaded by warm_up() before the first request.
WARM_UP_TYPES = {
    "R4B": (*SUPPORTED_RESOURCE_TYPES, "Bundle", "Parameters", "SubscriptionStatus"),
    "R5": (*SUPPORTED_RESOURCE_TYPES, "Bundle", "SubscriptionStatus"),
}


def warm_up() -> None:
    """Load the models the webhook validates with (building them takes seconds), so the
    first requests do not pay for it and what they build is not left for the collector."""
    from fhir.resources import get_fhir_model_class as r5_model
    from fhir.resources.R4B import get_fhir_model_class as r4b_model

    for family, load in (("R4B", r4b_model), ("R5", r5_model)):
        for resource_type in WARM_UP_TYPES[family]:
            load(resource_type)


def _supported(resource_type: str, where: str) -> None:
    if resource_type not in SUPPORTED_RESOURCE_TYPES:
        raise _not_supported(
            f"{where}: resource type {resource_type[:64]!r} is not taken here; supported: "
            + ", ".join(SUPPORTED_RESOURCE_TYPES)
        )


def _resource_of(resource: dict[str, Any]) -> IncomingResource:
    resource_id = resource.get("id")
    # FHIR ids are at most 64 characters; the models do not check the length.
    if isinstance(resource_id, str) and len(resource_id) > MAX_ID_LENGTH:
        raise _invalid(f"{resource['resourceType']}.id is longer than {MAX_ID_LENGTH} characters")
    return IncomingResource(
        resource_type=str(resource["resourceType"]),
        resource_id=resource_id if isinstance(resource_id, str) else None,
        body=resource,
    )


def parse_direct(document: dict[str, Any], path_type: str | None) -> list[IncomingResource]:
    """Resources of a direct POST: one resource of ``path_type``, or (``path_type`` None)
    a supported resource or a batch/transaction/collection/history Bundle of them."""
    resource_type = document.get("resourceType")
    if path_type is not None:
        _supported(path_type, f"POST /fhir/{path_type[:64]}")
        if resource_type != path_type:
            raise _invalid(f"resourceType does not match the URL: expected {path_type}")
    if resource_type != "Bundle":
        if not isinstance(resource_type, str):
            raise _invalid("resourceType is missing")
        _supported(resource_type, "the body")
        validate(document, "R4B")
        return [_resource_of(document)]
    if document.get("type") not in DIRECT_BUNDLE_TYPES:
        raise _not_supported("Bundle.type must be one of " + ", ".join(DIRECT_BUNDLE_TYPES))
    entries = document.get("entry")
    if not isinstance(entries, list) or not entries:
        raise _invalid("the Bundle has no entries to record")
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise _not_supported(
                f"Bundle.entry[{index}] has no resource (only resources are taken)"
            )
        _supported(str(resource.get("resourceType")), f"Bundle.entry[{index}]")
    validate(document, "R4B")
    return [_resource_of(entry["resource"]) for entry in entries]


# Notifications -------------------------------------------------------------------------


def is_notification(document: dict[str, Any]) -> bool:
    """True when ``document`` has the shape of a Subscription notification Bundle."""
    if document.get("resourceType") != "Bundle":
        return False
    if document.get("type") == "subscription-notification":
        return True
    if document.get("type") != "history":
        return False
    first = _first_resource(document)
    return first is not None and (
        first.get("resourceType") == "SubscriptionStatus" or _is_backport_status(first)
    )


def _first_resource(document: dict[str, Any]) -> dict[str, Any] | None:
    entries = document.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    resource = entries[0].get("resource")
    return resource if isinstance(resource, dict) else None


def _is_backport_status(resource: dict[str, Any]) -> bool:
    if resource.get("resourceType") != "Parameters":
        return False
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    if isinstance(profiles, list) and any(
        isinstance(p, str) and p.split("|")[0] == BACKPORT_STATUS_PROFILE for p in profiles
    ):
        return True
    # Servers that leave meta.profile out still send the profile's mandatory parameters.
    names = {p.get("name") for p in resource.get("parameter") or [] if isinstance(p, dict)}
    return {"subscription", "type"} <= names


def _event_number(value: Any, what: str) -> int:
    # integer64 is a JSON string in R4B/R5 and a valueString in the R4 backport.
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isdigit() and len(value) <= 19:
        number = int(value)
    else:
        raise _invalid(f"{what} is not a non-negative integer")
    if number > MAX_EVENT_NUMBER:
        raise _invalid(f"{what} is out of range")
    return number


def _reference(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None


@dataclass
class _Status:
    kind: str
    subscription: str | None
    events_since_start: int | None
    events: list[tuple[int | None, str | None]]  # (event number, focus reference)


def _value(parameter: dict[str, Any]) -> Any:
    for key, value in parameter.items():
        if key.startswith("value"):
            return value
    return None


def _backport_status(parameters: dict[str, Any]) -> _Status:
    status = _Status(kind="", subscription=None, events_since_start=None, events=[])
    for parameter in parameters.get("parameter") or []:
        name, value = parameter.get("name"), _value(parameter)
        if name == "subscription":
            status.subscription = _reference(value)
        elif name == "type" and isinstance(value, str):
            status.kind = value
        elif name == "events-since-subscription-start" and value is not None:
            status.events_since_start = _event_number(value, "events-since-subscription-start")
        elif name == "notification-event":
            number: int | None = None
            focus: str | None = None
            for part in parameter.get("part") or []:
                if part.get("name") == "event-number" and _value(part) is not None:
                    number = _event_number(_value(part), "notification-event.event-number")
                elif part.get("name") == "focus":
                    focus = _reference(_value(part))
            status.events.append((number, focus))
    return status


def _subscription_status(resource: dict[str, Any]) -> _Status:
    since = resource.get("eventsSinceSubscriptionStart")
    events: list[tuple[int | None, str | None]] = []
    for event in resource.get("notificationEvent") or []:
        number = event.get("eventNumber")
        events.append(
            (
                None if number is None else _event_number(number, "notificationEvent.eventNumber"),
                _reference(event.get("focus")),
            )
        )
    return _Status(
        kind=str(resource.get("type") or ""),
        subscription=_reference(resource.get("subscription")),
        events_since_start=(
            None if since is None else _event_number(since, "eventsSinceSubscriptionStart")
        ),
        events=events,
    )


def _focus_resource(focus: str, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry resource a focus reference points at, matched by fullUrl or Type/id."""
    target = _REFERENCE.search(focus)
    for entry in entries:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if entry.get("fullUrl") == focus:
            return resource
        if (
            target is not None
            and resource.get("resourceType") == target["type"]
            and resource.get("id") == target["id"]
        ):
            return resource
    return None


def parse_notification(document: dict[str, Any]) -> Notification:
    """A Subscription notification (R4 backport, R4B or R5), validated; 422 otherwise."""
    if not is_notification(document):
        raise _not_supported(
            "not a Subscription notification: expected a Bundle of type history (R4 backport "
            "Parameters or R4B SubscriptionStatus first) or subscription-notification (R5)"
        )
    first = _first_resource(document)
    assert first is not None
    if document.get("type") == "subscription-notification":
        version: FhirVersion = "R5"
        if first.get("resourceType") != "SubscriptionStatus":
            raise _invalid("an R5 notification starts with a SubscriptionStatus")
    else:
        version = "R4B" if first.get("resourceType") == "SubscriptionStatus" else "R4"
    validate(document, "R5" if version == "R5" else "R4B")
    status = _backport_status(first) if version == "R4" else _subscription_status(first)
    if status.kind not in NOTIFICATION_KINDS:
        raise _not_supported(
            f"notification type {status.kind[:32]!r} is not taken here; supported: "
            + ", ".join(NOTIFICATION_KINDS)
        )
    if not status.subscription:
        raise _invalid("the notification names no Subscription reference")
    if len(status.subscription) > MAX_SUBSCRIPTION_LENGTH:
        raise _invalid(
            f"the Subscription reference is longer than {MAX_SUBSCRIPTION_LENGTH} characters"
        )
    resources: list[IncomingResource] = []
    if status.kind == "event-notification":
        entries = [e for e in document["entry"][1:] if isinstance(e, dict)]
        resources = _notified_resources(status, entries)
    kind: NotificationKind = status.kind  # type: ignore[assignment]
    return Notification(
        fhir_version=version,
        kind=kind,
        subscription=status.subscription,
        events_since_start=status.events_since_start,
        resources=resources,
    )


def _notified_resources(status: _Status, entries: list[dict[str, Any]]) -> list[IncomingResource]:
    resources: list[IncomingResource] = []
    if not status.events:
        # Some servers leave out notification-event: take the resources the Bundle carries.
        for entry in entries:
            resource = entry.get("resource")
            if isinstance(resource, dict):
                _supported(str(resource.get("resourceType")), "notification entry")
                resources.append(_resource_of(resource))
    for number, focus in status.events:
        if focus is None:
            raise _not_supported(
                "a notification event without a focus (empty payload) is not taken: configure "
                "the Subscription with content id-only or full-resource"
            )
        resource = _focus_resource(focus, entries)
        if resource is not None:
            _supported(str(resource.get("resourceType")), "notification focus")
            taken = _resource_of(resource)
            resources.append(
                IncomingResource(taken.resource_type, taken.resource_id, taken.body, number)
            )
            continue
        # id-only: the resource is fetched from EHR_BASE_URL by a later stage.
        target = _REFERENCE.search(focus)
        if target is None:
            raise _invalid("a notification focus is neither in the Bundle nor a Type/id reference")
        _supported(target["type"], "notification focus")
        resources.append(IncomingResource(target["type"], target["id"], None, number))
    if not resources:
        raise _not_supported("the event notification carries no event to record")
    return resources
