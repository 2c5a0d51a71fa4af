"""Encode typed AI results as FHIR R4 resources and a transaction Bundle for the EHR.

This module holds no model logic: each builder turns one typed result plus the
:class:`~models.provenance.ModelProvenance` of the model that made it into a
:class:`FhirOutput`, the resources to send with their business identifiers:

* symptom analysis: a DiagnosticReport (LOINC 51848-0 "Evaluation note") whose results
  are one Observation per candidate condition (code = the condition, SNOMED CT and/or
  ICD-10-CM; value = its probability), the top ones as ``conclusionCode``;
* risk: a RiskAssessment (``performer`` = the model's Device, ``basis`` = the inputs,
  one ``prediction`` per outcome with ``probabilityDecimal`` and ``whenRange``);
* treatment: a CarePlan (draft, intent proposal, authored by the Device) with one
  medication activity per proposal, its evidence level and source, ``supportingInfo`` =
  the biomarker Observations;
* imaging: a chest X-ray DiagnosticReport (LOINC 30745-4 "Chest X-ray": the number of
  views is not known to the model) with the finding Observation, the ImagingStudy and
  the UIDs of the DICOM SR holding the same result, so one result exists in both worlds;
* liver volume: an Observation (SNOMED CT 118565006 "Volume" at body site 10200004
  "Liver structure", the codes of the DICOM volume SR) in mL.

Every result also carries the model's Device (identifier ``urn:dicom:uid`` |
``urn:oid:<Device UID>``, weights digest, "DEMO WEIGHTS" where so) and a Provenance
(target = the outputs, agent = the Device as author, entity = the inputs as source).
Every output resource is labelled AI-generated with the security label AIAST
(``v3-ObservationValue``, "Artificial Intelligence asserted", the label HL7's AI
Transparency guide uses) and tagged unverified; its status is ``preliminary`` or ``draft``.

:func:`transaction_bundle` makes one transaction Bundle of several outputs. Each entry is
a conditional create (``ifNoneExist`` on its business identifier) with a ``urn:uuid``
fullUrl derived from that identifier, so a retry builds a byte-identical Bundle and the
EHR creates nothing twice. Provenance has no ``identifier`` element in R4; its business
identifier is a ``meta.tag`` searched with ``_tag``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from models.provenance import CodedLabel, ModelProvenance
from worker.outputs.dicom_sr import SRReference
from worker.outputs.fhir_schema import FhirValidationError, validate_r4

__all__ = [
    "AI_ASSERTED",
    "CHEST_XRAY",
    "DEFAULT_RESULT_SYSTEM",
    "DICOM_UID_SYSTEM",
    "EVALUATION_NOTE",
    "ICD10CM",
    "LIVER_STRUCTURE",
    "LOINC",
    "RXNORM",
    "SNOMED",
    "UNVERIFIED_TAG",
    "CandidateCondition",
    "Coding",
    "Concept",
    "FhirEntry",
    "FhirOutput",
    "FhirValidationError",
    "ImagingFinding",
    "OrganVolume",
    "ResourceRef",
    "ResultContext",
    "RiskOutcome",
    "SubjectRef",
    "TreatmentProposal",
    "bundle_bytes",
    "device_entry",
    "device_resource",
    "imaging_report",
    "liver_volume_observation",
    "risk_assessment",
    "symptom_report",
    "transaction_bundle",
    "treatment_careplan",
    "validate_r4",
    "write_bundle",
]

# ------------------------------------------------------------------------------ code set
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
_V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
#: Identifier system of DICOM UIDs in FHIR; the value is ``urn:oid:<UID>``.
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: Default system of the business identifiers of carebridge's results.
DEFAULT_RESULT_SYSTEM = "urn:carebridge:result"
#: carebridge's own tags (R4 has no standard code for "not verified by a clinician").
_TAG_SYSTEM = "urn:carebridge:tag"
#: The private DICOM coding scheme 99CAREBRIDGE (see dicom_sr) as a FHIR system.
_PRIVATE_SYSTEM = "urn:carebridge:codes"

#: DICOM coding scheme designators (PS3.16) and their FHIR code systems.
_DICOM_SCHEMES = {
    "SCT": SNOMED,
    "LN": LOINC,
    "DCM": DCM,
    "UCUM": UCUM,
    "I10C": ICD10CM,
    "RXNORM": RXNORM,
    "99CAREBRIDGE": _PRIVATE_SYSTEM,
}

_DEMO_NOTE = "DEMO WEIGHTS - not for clinical use"
_UNVERIFIED_NOTE = "AI-generated by {model}; not verified by a clinician."
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s|]+")
_CODE_RE = re.compile(r"[^\s]+( [^\s]+)*")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,63}")
_REFERENCE_RE = re.compile(
    r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9.\-]{1,64})(/_history/[A-Za-z0-9.\-]{1,64})?"
)
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FULL_URL_NAMESPACE = uuid.UUID("5d0c3b7e-2a41-4f4e-8f7c-6a9d1e0b2c55")


# ------------------------------------------------------------------------ typed inputs
@dataclass(frozen=True)
class Coding:
    """One code of a code system, e.g. ``Coding(SNOMED, "233604007", "Pneumonia")``."""

    system: str
    code: str
    display: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.system, str) or not _URI_RE.fullmatch(self.system):
            raise ValueError("Coding.system must be an absolute URI without spaces or '|'")
        if not isinstance(self.code, str) or not _CODE_RE.fullmatch(self.code):
            raise ValueError("Coding.code must be a non-empty code without stray whitespace")
        if self.display is not None and (not isinstance(self.display, str) or not self.display):
            raise ValueError("Coding.display must be a non-empty string or None")

    @classmethod
    def from_coded_label(cls, label: CodedLabel) -> Coding:
        """Translate a DICOM-style :class:`CodedLabel` (e.g. ``SCT``) to a FHIR coding."""
        system = _DICOM_SCHEMES.get(label.coding_scheme)
        if system is None:
            raise ValueError(f"no FHIR code system known for scheme {label.coding_scheme!r}")
        return cls(system, label.code_value, label.code_meaning)

    def as_fhir(self) -> dict[str, Any]:
        """The FHIR ``Coding`` JSON."""
        out: dict[str, Any] = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


@dataclass(frozen=True)
class Concept:
    """A FHIR ``CodeableConcept``: one or more codings of one meaning, and/or a text."""

    codings: tuple[Coding, ...] = ()
    text: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.codings, tuple) or not all(
            isinstance(c, Coding) for c in self.codings
        ):
            raise ValueError("Concept.codings must be a tuple of Coding")
        if self.text is not None and (not isinstance(self.text, str) or not self.text.strip()):
            raise ValueError("Concept.text must be a non-empty string or None")
        if not self.codings and self.text is None:
            raise ValueError("a Concept needs a coding or a text")

    @classmethod
    def of(cls, *codings: Coding, text: str | None = None) -> Concept:
        """Build a concept from codings given as arguments."""
        return cls(tuple(codings), text)

    def systems(self) -> set[str]:
        """The code systems of this concept's codings."""
        return {coding.system for coding in self.codings}

    def as_fhir(self) -> dict[str, Any]:
        """The FHIR ``CodeableConcept`` JSON."""
        out: dict[str, Any] = {}
        if self.codings:
            out["coding"] = [coding.as_fhir() for coding in self.codings]
        if self.text:
            out["text"] = self.text
        return out


#: Security label: "Artificial Intelligence asserted" (HL7 v3 ObservationValue AIAST).
AI_ASSERTED = Coding(_V3_OBSERVATION_VALUE, "AIAST", "Artificial Intelligence asserted")
#: Tag: the content has not been verified by a clinician.
UNVERIFIED_TAG = Coding(_TAG_SYSTEM, "unverified", "AI-generated, not verified by a clinician")
_DEMO_TAG = Coding(_TAG_SYSTEM, "demo-weights", _DEMO_NOTE)
#: DiagnosticReport code of a symptom analysis (a differential is an evaluation).
EVALUATION_NOTE = Coding(LOINC, "51848-0", "Evaluation note")
#: Default exam code of the chest X-ray report: views unspecified.
CHEST_XRAY = Coding(LOINC, "30745-4", "Chest X-ray")
_VOLUME = Coding(SNOMED, "118565006", "Volume")
#: Body site of the liver volume (the finding site of the DICOM volume SR).
LIVER_STRUCTURE = Coding(SNOMED, "10200004", "Liver structure")
_AI_DEVICE_TYPE = Coding(DCM, "123110", "Artificial Intelligence")
_RADIOLOGY = Coding(_V2_0074, "RAD", "Radiology")
_IMAGING = Coding(_OBSERVATION_CATEGORY, "imaging", "Imaging")
_AUTHOR = Coding(_PARTICIPANT_TYPE, "author", "Author")
_CREATE = Coding(_V3_DATA_OPERATION, "CREATE", "create")
_MILLILITER = {"unit": "mL", "system": UCUM, "code": "mL"}
_PROBABILITY_UNIT = {"unit": "probability", "system": UCUM, "code": "1"}
_YEAR = {"unit": "years", "system": UCUM, "code": "a"}


def _check_probability(owner: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner} must be a number")
    if not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner} must lie in [0, 1]")


def _check_text(owner: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{owner} must be a non-empty string")


@dataclass(frozen=True)
class SubjectRef:
    """The patient a result is about: a literal reference or a logical identifier.

    Use :meth:`literal` (``"Patient/123"``) when the EHR's id is known, else
    :meth:`by_identifier` (e.g. the MRN), which becomes a logical reference.
    """

    reference: str | None = None
    identifier_system: str | None = None
    identifier_value: str | None = None

    def __post_init__(self) -> None:
        by_identifier = self.identifier_system is not None or self.identifier_value is not None
        if (self.reference is None) == (not by_identifier):
            raise ValueError("SubjectRef needs either a reference or an identifier, not both")
        if self.reference is not None:
            match = _REFERENCE_RE.fullmatch(self.reference)
            if match is None or match.group(1) != "Patient":
                raise ValueError("SubjectRef.reference must look like 'Patient/<id>'")
        else:
            if not isinstance(self.identifier_system, str) or not _URI_RE.fullmatch(
                self.identifier_system
            ):
                raise ValueError("SubjectRef.identifier_system must be an absolute URI")
            _check_text("SubjectRef.identifier_value", self.identifier_value)

    @classmethod
    def literal(cls, reference: str) -> SubjectRef:
        """A literal reference such as ``"Patient/123"``."""
        return cls(reference=reference)

    @classmethod
    def by_identifier(cls, system: str, value: str) -> SubjectRef:
        """A logical reference by the patient's business identifier."""
        return cls(identifier_system=system, identifier_value=value)

    def as_fhir(self) -> dict[str, Any]:
        """The FHIR ``Reference`` JSON."""
        if self.reference is not None:
            return {"reference": self.reference}
        return {
            "type": "Patient",
            "identifier": {"system": self.identifier_system, "value": self.identifier_value},
        }


@dataclass(frozen=True)
class ResourceRef:
    """A literal reference to an input resource in the EHR, e.g. ``"Observation/42"``."""

    reference: str

    def __post_init__(self) -> None:
        if not isinstance(self.reference, str) or not _REFERENCE_RE.fullmatch(self.reference):
            raise ValueError("ResourceRef.reference must look like '<ResourceType>/<id>'")

    @property
    def resource_type(self) -> str:
        """The type named by the reference."""
        return self.reference.split("/", 1)[0]

    def as_fhir(self) -> dict[str, Any]:
        """The FHIR ``Reference`` JSON."""
        return {"reference": self.reference}


@dataclass(frozen=True)
class ResultContext:
    """What every output of one result shares.

    ``result_id`` is the stable id of the result (e.g. its database key); business
    identifiers are ``<identifier_system>|<result_id>-<part>``. ``when`` (timezone-aware)
    is the time of the result; pass the same value on a retry.
    """

    result_id: str
    subject: SubjectRef
    provenance: ModelProvenance
    when: datetime
    identifier_system: str = DEFAULT_RESULT_SYSTEM

    def __post_init__(self) -> None:
        if not isinstance(self.result_id, str) or not _ID_RE.fullmatch(self.result_id):
            raise ValueError("ResultContext.result_id must be 1-64 of [A-Za-z0-9.-]")
        if not isinstance(self.subject, SubjectRef):
            raise ValueError("ResultContext.subject must be a SubjectRef")
        if not isinstance(self.provenance, ModelProvenance):
            raise ValueError("ResultContext.provenance must be a ModelProvenance")
        if not isinstance(self.when, datetime) or self.when.utcoffset() is None:
            raise ValueError("ResultContext.when must be a timezone-aware datetime")
        if not isinstance(self.identifier_system, str) or not _URI_RE.fullmatch(
            self.identifier_system
        ):
            raise ValueError("ResultContext.identifier_system must be an absolute URI")


@dataclass(frozen=True)
class CandidateCondition:
    """One candidate condition of a symptom analysis and its probability."""

    condition: Concept
    probability: float

    def __post_init__(self) -> None:
        if not isinstance(self.condition, Concept):
            raise ValueError("CandidateCondition.condition must be a Concept")
        if not self.condition.systems() & {SNOMED, ICD10CM}:
            raise ValueError("CandidateCondition.condition needs a SNOMED CT or ICD-10-CM code")
        _check_probability("CandidateCondition.probability", self.probability)


@dataclass(frozen=True)
class RiskOutcome:
    """One predicted outcome: probability within ``when_years`` (low, high) from now."""

    outcome: Concept
    probability: float
    when_years: tuple[float, float] | None = None
    rationale: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.outcome, Concept):
            raise ValueError("RiskOutcome.outcome must be a Concept")
        _check_probability("RiskOutcome.probability", self.probability)
        if self.when_years is not None:
            low, high = self.when_years
            for value in (low, high):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ValueError("RiskOutcome.when_years must be two numbers")
            if not 0 <= float(low) <= float(high) < math.inf:
                raise ValueError("RiskOutcome.when_years must satisfy 0 <= low <= high")
        _check_text("RiskOutcome.rationale", self.rationale, optional=True)


@dataclass(frozen=True)
class TreatmentProposal:
    """A proposed therapy (RxNorm), the evidence for it and, optionally, its reason."""

    therapy: Concept
    evidence_level: str
    evidence_source: str
    reason: Concept | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.therapy, Concept) or RXNORM not in self.therapy.systems():
            raise ValueError("TreatmentProposal.therapy must be a Concept with an RxNorm code")
        _check_text("TreatmentProposal.evidence_level", self.evidence_level)
        _check_text("TreatmentProposal.evidence_source", self.evidence_source)
        if self.reason is not None and not isinstance(self.reason, Concept):
            raise ValueError("TreatmentProposal.reason must be a Concept or None")


@dataclass(frozen=True)
class ImagingFinding:
    """The classification of an image: the coded finding, its probability, all classes."""

    finding: Concept
    probability: float
    class_probabilities: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.finding, Concept) or not self.finding.codings:
            raise ValueError("ImagingFinding.finding must be a coded Concept")
        _check_probability("ImagingFinding.probability", self.probability)
        for name, value in self.class_probabilities.items():
            _check_text("ImagingFinding.class_probabilities key", name)
            _check_probability(f"ImagingFinding.class_probabilities[{name!r}]", value)


@dataclass(frozen=True)
class OrganVolume:
    """A segmented organ's volume in mL (the liver by default)."""

    volume_ml: float
    body_site: Coding = LIVER_STRUCTURE

    def __post_init__(self) -> None:
        value = self.volume_ml
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError("OrganVolume.volume_ml must be a number")
        if not 0.0 <= float(value) < math.inf:
            raise ValueError("OrganVolume.volume_ml must be a finite number >= 0")


# ------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class FhirEntry:
    """One resource to send, with the business identifier it is conditionally created on.

    ``search`` is the search parameter of that identifier: ``identifier``, or ``_tag``
    for a Provenance (no ``identifier`` element in R4).
    """

    resource: Mapping[str, Any]
    system: str
    value: str
    search: str = "identifier"

    @property
    def full_url(self) -> str:
        """``urn:uuid`` derived from the business identifier (stable across retries)."""
        return _full_url(self.system, self.value)

    @property
    def if_none_exist(self) -> str:
        """The ``ifNoneExist`` query of the conditional create."""
        return f"{self.search}={self.system}|{self.value}"


@dataclass(frozen=True)
class FhirOutput:
    """The resources of one result, its Device and Provenance included."""

    entries: tuple[FhirEntry, ...]

    def resources(self, resource_type: str | None = None) -> list[Mapping[str, Any]]:
        """The resources, optionally only those of one type."""
        return [
            entry.resource
            for entry in self.entries
            if resource_type is None or entry.resource["resourceType"] == resource_type
        ]


def _full_url(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_FULL_URL_NAMESPACE, f'{system}|{value}')}"


def _instant(when: datetime) -> str:
    timespec = "seconds" if when.microsecond == 0 else "milliseconds"
    return when.isoformat(timespec=timespec)


def _number(value: float) -> float:
    """A stable decimal: rounded so that a retry prints the same digits."""
    return round(float(value), 6)


def _dicom_identifier(uid: str, label: str | None = None) -> dict[str, Any]:
    if not isinstance(uid, str) or len(uid) > 64 or not _UID_RE.fullmatch(uid):
        raise ValueError("not a valid DICOM UID")
    out: dict[str, Any] = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
    if label:
        out["type"] = {"text": label}
    return out


def _ref(url: str) -> dict[str, str]:
    return {"reference": url}


class _Result:
    """Collects the entries of one result and the pieces every resource shares."""

    def __init__(self, context: ResultContext) -> None:
        self.context = context
        provenance = context.provenance
        self.device = device_entry(provenance)
        self.model_text = f"{provenance.name} {provenance.version}"
        self.entries: list[FhirEntry] = [self.device]
        self.outputs: list[FhirEntry] = []
        self.sources: list[dict[str, Any]] = []

    def output(
        self,
        part: str,
        resource_type: str,
        body: dict[str, Any],
        other_identifiers: Sequence[dict[str, Any]] = (),
    ) -> FhirEntry:
        """An AI-generated resource: labelled, identified, added to the Provenance target."""
        context = self.context
        tags = [UNVERIFIED_TAG.as_fhir()]
        if context.provenance.demo:
            tags.append(_DEMO_TAG.as_fhir())
        value = f"{context.result_id}-{part}"
        resource: dict[str, Any] = {
            "resourceType": resource_type,
            "meta": {"security": [AI_ASSERTED.as_fhir()], "tag": tags},
            "identifier": [
                {"system": context.identifier_system, "value": value},
                *other_identifiers,
            ],
        }
        resource.update(body)
        entry = FhirEntry(resource, context.identifier_system, value)
        self.entries.append(entry)
        self.outputs.append(entry)
        return entry

    def note(self) -> list[dict[str, str]]:
        notes = [{"text": _UNVERIFIED_NOTE.format(model=self.model_text)}]
        if self.context.provenance.demo:
            notes.append({"text": _DEMO_NOTE})
        return notes

    def method(self) -> dict[str, Any]:
        return Concept.of(_AI_DEVICE_TYPE, text=f"AI model {self.model_text}").as_fhir()

    def add_sources(self, refs: Iterable[dict[str, Any]]) -> None:
        for ref in refs:
            if ref not in self.sources:
                self.sources.append(ref)

    def finish(self) -> FhirOutput:
        """Append the Provenance of everything produced and return the output."""
        context = self.context
        value = f"{context.result_id}-provenance"
        provenance: dict[str, Any] = {
            "resourceType": "Provenance",
            "meta": {"tag": [{"system": context.identifier_system, "code": value}]},
            "target": [_ref(entry.full_url) for entry in self.outputs],
            "recorded": _instant(context.when),
            "activity": Concept.of(_CREATE).as_fhir(),
            "agent": [{"type": Concept.of(_AUTHOR).as_fhir(), "who": _ref(self.device.full_url)}],
        }
        if self.sources:
            provenance["entity"] = [{"role": "source", "what": ref} for ref in self.sources]
        self.entries.append(FhirEntry(provenance, context.identifier_system, value, "_tag"))
        return FhirOutput(tuple(self.entries))


# ------------------------------------------------------------------------------ builders
def device_resource(provenance: ModelProvenance) -> dict[str, Any]:
    """The FHIR Device of a model version: Device UID, name, version, weights digest."""
    notes = [{"text": f"weights sha256: {provenance.weights_sha256}"}]
    if provenance.demo:
        notes.append({"text": _DEMO_NOTE})
    return {
        "resourceType": "Device",
        "identifier": [_dicom_identifier(provenance.device_uid, "DICOM Device UID")],
        "status": "active",
        "manufacturer": provenance.manufacturer,
        "deviceName": [{"name": provenance.name, "type": "model-name"}],
        "modelNumber": provenance.name,
        "type": Concept.of(_AI_DEVICE_TYPE, text="AI model").as_fhir(),
        "version": [{"value": provenance.version}],
        "property": [
            {
                "type": {"text": "weights sha256"},
                "valueCode": [{"text": provenance.weights_sha256}],
            }
        ],
        "note": notes,
    }


def device_entry(provenance: ModelProvenance) -> FhirEntry:
    """The Device as an entry, conditionally created on its Device UID."""
    resource = device_resource(provenance)
    identifier = resource["identifier"][0]
    return FhirEntry(resource, identifier["system"], identifier["value"])


def symptom_report(
    context: ResultContext,
    candidates: Sequence[CandidateCondition],
    *,
    inputs: Sequence[ResourceRef] = (),
    conclusion_count: int = 3,
) -> FhirOutput:
    """A DiagnosticReport with one provisional Observation per candidate condition.

    Candidates are ranked by probability (stable for ties); the first
    ``conclusion_count`` become the report's ``conclusionCode``. ``inputs`` (e.g. the
    DocumentReference of the note) are the Observations' ``derivedFrom`` where R4 allows
    the type, and the Provenance's sources.
    """
    if not candidates:
        raise ValueError("symptom_report needs at least one candidate condition")
    if conclusion_count < 1:
        raise ValueError("conclusion_count must be at least 1")
    result = _Result(context)
    subject, when = context.subject.as_fhir(), _instant(context.when)
    derived = [ref.as_fhir() for ref in inputs if ref.resource_type in _DERIVED_FROM_TYPES]
    ranked = sorted(candidates, key=lambda c: -float(c.probability))
    observations = []
    for rank, candidate in enumerate(ranked, start=1):
        body: dict[str, Any] = {
            "status": "preliminary",
            "code": candidate.condition.as_fhir(),
            "subject": subject,
            "effectiveDateTime": when,
            "issued": when,
            "valueQuantity": {"value": _number(candidate.probability), **_PROBABILITY_UNIT},
            "method": result.method(),
            "device": _ref(result.device.full_url),
            "note": result.note(),
        }
        if derived:
            body["derivedFrom"] = derived
        observations.append(result.output(f"condition-{rank}", "Observation", body))
    top = ranked[:conclusion_count]
    summary = ", ".join(f"{_label(c.condition)} ({float(c.probability):.0%})" for c in top)
    result.output(
        "report",
        "DiagnosticReport",
        {
            "status": "preliminary",
            "code": Concept.of(EVALUATION_NOTE, text="AI symptom analysis").as_fhir(),
            "subject": subject,
            "effectiveDateTime": when,
            "issued": when,
            "result": [_ref(entry.full_url) for entry in observations],
            "conclusion": _conclusion(result, f"Candidate conditions: {summary}."),
            "conclusionCode": [c.condition.as_fhir() for c in top],
        },
    )
    result.add_sources(ref.as_fhir() for ref in inputs)
    return result.finish()


# Observation.derivedFrom accepts these types only (R4).
_DERIVED_FROM_TYPES = frozenset(
    {
        "DocumentReference",
        "ImagingStudy",
        "Media",
        "QuestionnaireResponse",
        "Observation",
        "MolecularSequence",
    }
)


def _label(concept: Concept) -> str:
    if concept.text:
        return concept.text
    first = concept.codings[0]
    return first.display or first.code


def _conclusion(result: _Result, text: str) -> str:
    parts = [text, _UNVERIFIED_NOTE.format(model=result.model_text)]
    if result.context.provenance.demo:
        parts.append(_DEMO_NOTE)
    return " ".join(parts)


def risk_assessment(
    context: ResultContext,
    outcomes: Sequence[RiskOutcome],
    *,
    basis: Sequence[ResourceRef] = (),
    status: str = "preliminary",
) -> FhirOutput:
    """A RiskAssessment made by the model's Device from the ``basis`` resources.

    ``status`` is ``preliminary`` (the default: nobody has reviewed it) or ``final``.
    """
    if not outcomes:
        raise ValueError("risk_assessment needs at least one outcome")
    if status not in ("preliminary", "final"):
        raise ValueError("risk_assessment status must be 'preliminary' or 'final'")
    result = _Result(context)
    predictions = []
    for outcome in outcomes:
        prediction: dict[str, Any] = {
            "outcome": outcome.outcome.as_fhir(),
            "probabilityDecimal": _number(outcome.probability),
        }
        if outcome.when_years is not None:
            low, high = outcome.when_years
            prediction["whenRange"] = {
                "low": {"value": _number(low), **_YEAR},
                "high": {"value": _number(high), **_YEAR},
            }
        if outcome.rationale:
            prediction["rationale"] = outcome.rationale
        predictions.append(prediction)
    body: dict[str, Any] = {
        "status": status,
        "method": result.method(),
        "subject": context.subject.as_fhir(),
        "occurrenceDateTime": _instant(context.when),
        "performer": _ref(result.device.full_url),
    }
    if basis:
        body["basis"] = [ref.as_fhir() for ref in basis]
    body["prediction"] = predictions
    body["note"] = result.note()
    result.output("risk", "RiskAssessment", body)
    result.add_sources(ref.as_fhir() for ref in basis)
    return result.finish()


def treatment_careplan(
    context: ResultContext,
    proposals: Sequence[TreatmentProposal],
    *,
    supporting_info: Sequence[ResourceRef] = (),
) -> FhirOutput:
    """A draft CarePlan (intent proposal) with one medication activity per proposal.

    ``supporting_info`` are the biomarker Observations (and other results) it rests on.
    """
    if not proposals:
        raise ValueError("treatment_careplan needs at least one proposal")
    result = _Result(context)
    activities = []
    for proposal in proposals:
        detail: dict[str, Any] = {
            "kind": "MedicationRequest",
            "status": "not-started",
            "doNotPerform": False,
            "productCodeableConcept": proposal.therapy.as_fhir(),
            "description": (
                f"Proposed {_label(proposal.therapy)}. Evidence level "
                f"{proposal.evidence_level}; source: {proposal.evidence_source}."
            ),
        }
        if proposal.reason is not None:
            detail["reasonCode"] = [proposal.reason.as_fhir()]
        activities.append({"detail": detail})
    body: dict[str, Any] = {
        "status": "draft",
        "intent": "proposal",
        "title": "AI treatment suggestion",
        "description": _conclusion(result, "Proposed therapies for clinician review."),
        "subject": context.subject.as_fhir(),
        "created": _instant(context.when),
        "author": _ref(result.device.full_url),
    }
    if supporting_info:
        body["supportingInfo"] = [ref.as_fhir() for ref in supporting_info]
    body["activity"] = activities
    body["note"] = result.note()
    result.output("careplan", "CarePlan", body)
    result.add_sources(ref.as_fhir() for ref in supporting_info)
    return result.finish()


def _imaging_study(result: _Result, study_instance_uid: str) -> FhirEntry:
    """The ImagingStudy, conditionally created on its Study Instance UID.

    Only a stub: where the EHR already has the study, the conditional create finds it
    and the references resolve to the EHR's own resource.
    """
    identifier = _dicom_identifier(study_instance_uid)
    resource = {
        "resourceType": "ImagingStudy",
        "identifier": [{"use": "official", **identifier}],
        "status": "available",
        "subject": result.context.subject.as_fhir(),
    }
    entry = FhirEntry(resource, identifier["system"], identifier["value"])
    result.entries.append(entry)
    result.add_sources([_ref(entry.full_url)])
    return entry


def imaging_report(
    context: ResultContext,
    finding: ImagingFinding,
    *,
    sr: SRReference,
    exam: Coding = CHEST_XRAY,
    rendering_png: bytes | None = None,
) -> FhirOutput:
    """A chest X-ray DiagnosticReport with the finding Observation; the SR's twin.

    ``sr`` is the DICOM SR holding the same finding: its SOP Instance and Series UIDs
    become identifiers of the report and its study the ImagingStudy. ``rendering_png``
    (a PNG image) is attached as ``presentedForm`` when given.
    """
    if not isinstance(sr, SRReference):
        raise ValueError("imaging_report needs the SRReference of the matching DICOM SR")
    if rendering_png is not None and not rendering_png.startswith(_PNG_SIGNATURE):
        raise ValueError("rendering_png must be a PNG image")
    result = _Result(context)
    study = _imaging_study(result, sr.study_instance_uid)
    subject, when = context.subject.as_fhir(), _instant(context.when)
    observation: dict[str, Any] = {
        "status": "preliminary",
        "category": [Concept.of(_IMAGING).as_fhir()],
        "code": finding.finding.as_fhir(),
        "subject": subject,
        "effectiveDateTime": when,
        "issued": when,
        "valueQuantity": {"value": _number(finding.probability), **_PROBABILITY_UNIT},
        "method": result.method(),
        "device": _ref(result.device.full_url),
        "derivedFrom": [_ref(study.full_url)],
        "note": result.note(),
    }
    if finding.class_probabilities:
        observation["component"] = [
            {
                "code": {"text": name},
                "valueQuantity": {"value": _number(value), **_PROBABILITY_UNIT},
            }
            for name, value in sorted(finding.class_probabilities.items())
        ]
    finding_entry = result.output("finding", "Observation", observation)
    label = f"{_label(finding.finding)} ({float(finding.probability):.0%})"
    report: dict[str, Any] = {
        "status": "preliminary",
        "category": [Concept.of(_RADIOLOGY).as_fhir()],
        "code": Concept.of(exam).as_fhir(),
        "subject": subject,
        "effectiveDateTime": when,
        "issued": when,
        "result": [_ref(finding_entry.full_url)],
        "imagingStudy": [_ref(study.full_url)],
        "conclusion": _conclusion(result, f"AI classification: {label}."),
        "conclusionCode": [finding.finding.as_fhir()],
    }
    if rendering_png is not None:
        report["presentedForm"] = [
            {
                "contentType": "image/png",
                "data": base64.b64encode(rendering_png).decode("ascii"),
                "hash": base64.b64encode(
                    hashlib.sha1(rendering_png, usedforsecurity=False).digest()
                ).decode("ascii"),
                "title": "AI result rendering (not for diagnosis)",
            }
        ]
    # The SR's own UIDs as identifiers: the same result found from either world.
    sr_identifiers = [
        _dicom_identifier(sr.sop_instance_uid, "DICOM SR SOP Instance UID"),
        _dicom_identifier(sr.series_instance_uid, "DICOM SR Series Instance UID"),
    ]
    result.output("report", "DiagnosticReport", report, sr_identifiers)
    return result.finish()


def liver_volume_observation(
    context: ResultContext,
    volume: OrganVolume,
    *,
    study_instance_uid: str,
    dicom_outputs: Sequence[SRReference] = (),
) -> FhirOutput:
    """An Observation of the segmented liver's volume in mL.

    ``study_instance_uid`` is the CT study (the Observation is ``derivedFrom`` its
    ImagingStudy); ``dicom_outputs`` are the SEG and SR holding the same measurement,
    whose SOP Instance UIDs become identifiers of the Observation.
    """
    result = _Result(context)
    study = _imaging_study(result, study_instance_uid)
    when = _instant(context.when)
    dicom_identifiers = [
        _dicom_identifier(dicom.sop_instance_uid, "DICOM SOP Instance UID")
        for dicom in dicom_outputs
    ]
    site = volume.body_site.display or "Organ"
    result.output(
        "liver-volume",
        "Observation",
        {
            "status": "preliminary",
            "category": [Concept.of(_IMAGING).as_fhir()],
            "code": Concept.of(_VOLUME, text=f"{site} volume").as_fhir(),
            "subject": context.subject.as_fhir(),
            "effectiveDateTime": when,
            "issued": when,
            "valueQuantity": {"value": _number(volume.volume_ml), **_MILLILITER},
            "bodySite": Concept.of(volume.body_site).as_fhir(),
            "method": result.method(),
            "device": _ref(result.device.full_url),
            "derivedFrom": [_ref(study.full_url)],
            "note": result.note(),
        },
        dicom_identifiers,
    )
    return result.finish()


# -------------------------------------------------------------------------------- bundle
def transaction_bundle(outputs: Sequence[FhirOutput], *, validate: bool = True) -> dict[str, Any]:
    """One transaction Bundle of conditional creates for ``outputs``.

    Entries shared by several outputs (the Device, the ImagingStudy) appear once; two
    different resources with one business identifier are refused. Every internal
    reference must resolve to an entry's fullUrl. With ``validate`` (the default) the
    Bundle is checked with :func:`validate_r4` and :class:`FhirValidationError` raised.
    The result depends on the inputs only: a retry produces the same bytes
    (:func:`bundle_bytes`).
    """
    if not outputs:
        raise ValueError("transaction_bundle needs at least one output")
    seen: dict[str, FhirEntry] = {}
    for output in outputs:
        for entry in output.entries:
            earlier = seen.get(entry.full_url)
            if earlier is not None and earlier.resource != entry.resource:
                raise ValueError(
                    f"two different resources share the business identifier "
                    f"{entry.system}|{entry.value}"
                )
            seen.setdefault(entry.full_url, entry)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": entry.full_url,
                "resource": copy.deepcopy(dict(entry.resource)),
                "request": {
                    "method": "POST",
                    "url": entry.resource["resourceType"],
                    "ifNoneExist": entry.if_none_exist,
                },
            }
            for entry in seen.values()
        ],
    }
    unresolved = sorted(
        url for url in _references(bundle["entry"]) if url.startswith("urn:") and url not in seen
    )
    if unresolved:
        raise ValueError(f"{len(unresolved)} internal reference(s) resolve to no entry")
    if validate:
        validate_r4(bundle)
    return bundle


def _references(value: object) -> Iterable[str]:
    """Every ``Reference.reference`` string inside ``value``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


def bundle_bytes(bundle: Mapping[str, Any]) -> bytes:
    """The JSON of a Bundle as sent: compact UTF-8, the same bytes for the same Bundle."""
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_bundle(bundle: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Write ``bundle`` to ``path`` atomically and return it as read back.

    The JSON goes to a temporary file in the same directory, is fsynced and renamed over
    ``path``, and the directory is fsynced. The file is then read back and compared with
    ``bundle``; on a mismatch it is removed and ``ValueError`` raised.
    """
    path = Path(path)
    data = bundle_bytes(bundle)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    try:
        back = json.loads(path.read_bytes())
        if back != json.loads(data):
            raise ValueError("the Bundle read back from disk differs from the one written")
    except ValueError:
        path.unlink(missing_ok=True)
        raise
    return back  # type: ignore[no-any-return]


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open directories)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
