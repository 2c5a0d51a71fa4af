"""Check a FHIR resource against R4 before it leaves: HL7's JSON schema and the R4B models.

Two checks, because neither is complete on its own:

* the official FHIR R4 (4.0.1) JSON schema (``data/fhir.r4.schema.json.gz``, see the
  README next to it) knows R4 exactly: element names, types, primitive formats and the
  codes of required bindings (e.g. ``Observation.status``). It cannot say that a
  primitive is mandatory (the value may sit in ``_status`` instead), nor that a choice
  element such as ``value[x]`` appears once;
* the ``fhir.resources.R4B`` models check cardinality (a missing ``status``) and choice
  elements, but not codes. R4B is R4 plus new resource types; for the types carebridge
  writes (Bundle, Device, Provenance, DiagnosticReport, Observation, RiskAssessment,
  CarePlan, ImagingStudy) the elements of the R4B models equal the R4 schema's. Where R4B
  allows more (e.g. ``Extension.valueCodeableReference``) the schema refuses it, and a
  type that R4B dropped (e.g. ``MedicinalProduct``) is only schema-checked.

The schema is read once, lazily (about 50 ms, its ``$ref``s linked), and one validator
is kept per resource type: the Bundle of one result checks in 1-3 ms. A Bundle is
checked as a shell plus one check per entry resource, which avoids the schema's 146-way
``oneOf`` over every resource type and keeps error paths readable.
Problems name the element path and never echo element values (they may be clinical).
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from jsonschema import Draft6Validator, ValidationError
from pydantic import ValidationError as ModelValidationError

__all__ = ["SCHEMA_FILE", "FhirValidationError", "load_schema", "validate_r4"]

#: The packaged HL7 FHIR R4 JSON schema (gzip), relative to this package.
SCHEMA_FILE = "data/fhir.r4.schema.json.gz"

_MAX_LISTED = 20
_lock = threading.Lock()
_schema: dict[str, Any] | None = None


class FhirValidationError(ValueError):
    """A resource is not valid FHIR R4; ``problems`` lists each one as ``path: what``."""

    def __init__(self, resource_type: str, problems: Sequence[str]) -> None:
        self.resource_type = resource_type
        self.problems = tuple(problems)
        listed = "; ".join(self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        if more > 0:
            listed += f"; and {more} more"
        super().__init__(f"{resource_type} is not valid FHIR R4: {listed}")


def load_schema() -> dict[str, Any]:
    """Return the FHIR R4 JSON schema, reading it on first use (about 40 ms)."""
    global _schema
    with _lock:
        if _schema is None:
            data = resources.files("worker.outputs").joinpath(SCHEMA_FILE).read_bytes()
            _schema = json.loads(gzip.decompress(data))
        return _schema


def _definitions() -> Mapping[str, Any]:
    return load_schema()["definitions"]  # type: ignore[no-any-return]


def _resource_types() -> frozenset[str]:
    return frozenset(load_schema()["discriminator"]["mapping"])


@cache
def _primitive_names() -> dict[str, str]:
    """The names of the primitive types (``dateTime``, ``uri/url``...) by their pattern."""
    names: dict[str, list[str]] = {}
    for name, schema in _definitions().items():
        if name[:1].islower() and "pattern" in schema:
            names.setdefault(schema["pattern"], []).append(name)
    return {pattern: "/".join(sorted(found)) for pattern, found in names.items()}


@cache
def _linked_definitions() -> dict[str, dict[str, Any]]:
    """The definitions with every ``$ref`` replaced by the definition it names.

    Resolving ``$ref`` through the schema registry on every step was a third of the
    validation time; linking once makes the schema a graph of plain dicts (cycles, such
    as Extension in Extension, are fine: validation follows the instance, which is
    finite). Draft-06 ignores the siblings of ``$ref``, so dropping them changes nothing.
    """
    definitions = _definitions()
    linked: dict[str, dict[str, Any]] = {name: {} for name in definitions}
    prefix = "#/definitions/"

    def link(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix):
                return linked[ref[len(prefix) :]]
            return {key: link(value) for key, value in node.items()}
        if isinstance(node, list):
            return [link(value) for value in node]
        return node

    for name, schema in definitions.items():
        linked[name].update(link(schema))
    return linked


@cache
def _validator(resource_type: str) -> Draft6Validator:
    """A compiled validator for one resource type (a Bundle's entry resources left open)."""
    linked = _linked_definitions()
    schema = linked[resource_type]
    if resource_type == "Bundle":
        # The shell only: each entry resource is checked by its own type's validator.
        entry_schema = schema["properties"]["entry"]
        entry = entry_schema["items"]
        entry = {**entry, "properties": {**entry["properties"], "resource": {"type": "object"}}}
        entries = {**entry_schema, "items": entry}
        schema = {**schema, "properties": {**schema["properties"], "entry": entries}}
    return Draft6Validator(schema)


def _path(prefix: str, parts: Iterable[str | int]) -> str:
    text = prefix
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _describe(error: ValidationError) -> str:
    """What is wrong, without repeating the offending value."""
    keyword, expected = error.validator, error.validator_value
    if keyword == "type":
        return f"must be of JSON type {expected}"
    if keyword == "enum":
        return "must be one of " + ", ".join(str(value) for value in expected)
    if keyword == "const":
        return f"must be {expected!r}"
    if keyword == "pattern":
        primitive = _primitive_names().get(expected)
        if primitive is not None:
            return f"is not a valid FHIR {primitive}"
        return f"does not match the pattern {expected}"
    if keyword in ("required", "additionalProperties", "minItems", "maxItems"):
        return error.message  # names properties, never values
    return f"fails the schema rule {keyword!r}"


def _schema_problems(resource: Mapping[str, Any], prefix: str) -> list[str]:
    problems: list[str] = []
    validator = _validator(str(resource["resourceType"]))
    errors = validator.iter_errors(resource)
    for error in sorted(errors, key=lambda e: [(isinstance(p, str), p) for p in e.absolute_path]):
        problems.append(f"{_path(prefix, error.absolute_path)}: {_describe(error)}")
    return problems


def _model_problems(resource: Mapping[str, Any], prefix: str) -> list[str]:
    resource_type = str(resource["resourceType"])
    try:
        model = get_fhir_model_class(resource_type)
    except KeyError:  # an R4 type that R4B no longer has: schema-checked only
        return []
    try:
        model.model_validate(resource)
    except ModelValidationError as exc:
        return [
            f"{_path(prefix, [p for p in err['loc'] if p != '__root__'])}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        ]
    return []


def _check_one(resource: object, prefix: str) -> list[str]:
    if not isinstance(resource, Mapping):
        return [f"{prefix}: must be a JSON object"]
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in _resource_types():
        return [f"{prefix}.resourceType: not an R4 resource type"]
    problems = _schema_problems(resource, prefix)
    if resource_type == "Bundle":
        entries = resource.get("entry")
        entries = entries if isinstance(entries, list) else []
        if not problems:
            shell = {**resource, "entry": [_without_resource(entry) for entry in entries]}
            problems = _model_problems(shell, prefix)
        for index, entry in enumerate(entries):
            if isinstance(entry, Mapping) and "resource" in entry:
                inner = entry["resource"]
                where = f"{prefix}.entry[{index}].resource"
                if isinstance(inner, Mapping) and isinstance(inner.get("resourceType"), str):
                    where += f".ofType({inner['resourceType']})"  # FHIRPath
                problems += _check_one(inner, where)
        return problems
    if problems:
        # The model check repeats what the schema says about types and formats; run it
        # only on what the schema accepts, so that each problem is reported once.
        return problems
    return _model_problems(resource, prefix)


def validate_r4(resource: Mapping[str, Any]) -> None:
    """Raise :class:`FhirValidationError` unless ``resource`` is valid FHIR R4 JSON.

    The resource is checked against HL7's R4 JSON schema and parsed with the matching
    ``fhir.resources.R4B`` model; a Bundle's entry resources are each checked the same
    way. Every problem is reported with its path, e.g.
    ``Bundle.entry[2].resource.ofType(RiskAssessment).prediction[0].probabilityDecimal:
    must be of JSON type number``.
    """
    resource_type = "resource"
    if isinstance(resource, Mapping) and isinstance(resource.get("resourceType"), str):
        resource_type = resource["resourceType"]
    problems = _check_one(resource, resource_type)
    if problems:
        raise FhirValidationError(resource_type, problems)


def _without_resource(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key != "resource"}
