"""The typed inputs and outputs of carebridge's FHIR R4 writer, and its code set.

:mod:`worker.outputs.fhir` turns these into resources; they are kept apart so that the
code set (SNOMED CT, LOINC, ICD-10-CM, RxNorm, UCUM, DCM and HL7 terminology) is in one
place and callers can build inputs without the builders. Every class validates in its
constructor and raises ``ValueError`` naming the field, never patient data.

* :class:`Coding` / :class:`Concept`: a code and a CodeableConcept;
* :class:`SubjectRef`, :class:`ResourceRef`: references to the patient and to inputs;
* :class:`ResultContext`: what every output of one result shares (id, subject, model,
  time);
* :class:`CandidateCondition`, :class:`RiskOutcome`, :class:`TreatmentProposal`,
  :class:`ImagingFinding`, :class:`OrganVolume`: the typed results;
* :class:`FhirEntry` / :class:`FhirOutput`: the resources of one result, each with the
  business identifier it is conditionally created on.
"""

from __future__ import annotations

import math
import numbers
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from models.provenance import CodedLabel, ModelProvenance

__all__ = [
    "AI_ASSERTED",
    "AI_DEVICE_TYPE",
    "AUTHOR_PARTICIPANT",
    "CHEST_XRAY",
    "CREATE_ACTIVITY",
    "DCM",
    "DEFAULT_RESULT_SYSTEM",
    "DEMO_NOTE",
    "DEMO_TAG",
    "DICOM_UID_SYSTEM",
    "EVALUATION_NOTE",
    "ICD10CM",
    "IMAGING_CATEGORY",
    "LIVER_STRUCTURE",
    "LOINC",
    "MILLILITER",
    "PROBABILITY_UNIT",
    "RADIOLOGY",
    "RXNORM",
    "SNOMED",
    "UCUM",
    "UNVERIFIED_TAG",
    "VOLUME",
    "YEARS",
    "CandidateCondition",
    "Coding",
    "Concept",
    "FhirEntry",
    "FhirOutput",
    "ImagingFinding",
    "LogicalRef",
    "OrganVolume",
    "ResourceRef",
    "ResultContext",
    "RiskOutcome",
    "SubjectRef",
    "TreatmentProposal",
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

#: Said wherever a result was made with demo weights.
DEMO_NOTE = "DEMO WEIGHTS - not for clinical use"
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s|]+")
_CODE_RE = re.compile(r"[^\s]+( [^\s]+)*")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,63}")
_REFERENCE_RE = re.compile(
    r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9.\-]{1,64})(/_history/[A-Za-z0-9.\-]{1,64})?"
)
# Changing this namespace changes every fullUrl: a retry would no longer match.
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
#: Tag of a result made with demo weights.
DEMO_TAG = Coding(_TAG_SYSTEM, "demo-weights", DEMO_NOTE)
#: DiagnosticReport code of a symptom analysis (a differential is an evaluation).
EVALUATION_NOTE = Coding(LOINC, "51848-0", "Evaluation note")
#: Default exam code of the chest X-ray report: views unspecified.
CHEST_XRAY = Coding(LOINC, "30745-4", "Chest X-ray")
#: Observation code of an organ volume (the concept name in the DICOM volume SR).
VOLUME = Coding(SNOMED, "118565006", "Volume")
#: Body site of the liver volume (the finding site of the DICOM volume SR).
LIVER_STRUCTURE = Coding(SNOMED, "10200004", "Liver structure")
#: Device type and Observation method of every result: the model is an AI.
AI_DEVICE_TYPE = Coding(DCM, "123110", "Artificial Intelligence")
#: DiagnosticReport category (diagnostic service section) of imaging reports.
RADIOLOGY = Coding(_V2_0074, "RAD", "Radiology")
#: Observation category of imaging results.
IMAGING_CATEGORY = Coding(_OBSERVATION_CATEGORY, "imaging", "Imaging")
#: Provenance agent type of the model's Device.
AUTHOR_PARTICIPANT = Coding(_PARTICIPANT_TYPE, "author", "Author")
#: Provenance activity: the outputs were created.
CREATE_ACTIVITY = Coding(_V3_DATA_OPERATION, "CREATE", "create")
#: UCUM units of the Quantity values written.
MILLILITER = {"unit": "mL", "system": UCUM, "code": "mL"}
PROBABILITY_UNIT = {"unit": "probability", "system": UCUM, "code": "1"}
YEARS = {"unit": "years", "system": UCUM, "code": "a"}


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
class LogicalRef:
    """A reference by business identifier, for a resource whose id in the EHR is not
    known here (e.g. another result's output, conditionally created there)."""

    resource_type: str
    system: str
    value: str
    display: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Z][A-Za-z]{1,63}", self.resource_type or ""):
            raise ValueError("LogicalRef.resource_type must be a FHIR resource type")
        if not isinstance(self.system, str) or not _URI_RE.fullmatch(self.system):
            raise ValueError("LogicalRef.system must be an absolute URI without spaces or '|'")
        if not isinstance(self.value, str) or not self.value.strip():
            raise ValueError("LogicalRef.value must be a non-empty identifier")

    def as_fhir(self) -> dict[str, Any]:
        """The FHIR ``Reference`` JSON (type, identifier and display; no literal URL)."""
        out: dict[str, Any] = {
            "type": self.resource_type,
            "identifier": {"system": self.system, "value": self.value},
        }
        if self.display:
            out["display"] = self.display
        return out


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
