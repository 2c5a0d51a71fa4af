"""The condition knowledge base (``data/conditions.yaml``) and how its findings are found in text.

:class:`KnowledgeBase` reads and validates the file: unique ids, well-formed ICD-10-CM codes,
SNOMED CT concept ids with a valid Verhoeff check digit, every finding a condition names defined,
every finding used. :class:`FindingMatcher` finds, in one sentence, the phrases that name a
finding (present or absent, e.g. "afebrile") or a condition, and reads abnormal or normal vital
signs and a few lab values ("T 38.9", "HR 118", "SpO2 88%", "BP 82/50", "TSH 14",
"glucose 540") as findings too. Whether a mention is
negated, historical, hypothetical or about a relative is decided afterwards by ConText.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from models.provenance import CodedLabel
from models.symptoms.context import PhraseMatcher, Sentence, tokenize

#: The knowledge base shipped with the project.
DEFAULT_KB_PATH = Path(__file__).resolve().parent / "data" / "conditions.yaml"

SNOMED_SCHEME = "SCT"
ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED_SYSTEM = "http://snomed.info/sct"

_ICD10CM_RE = re.compile(r"^[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?$")
_SCTID_RE = re.compile(r"^[1-9][0-9]{5,17}$")
_ID_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")

#: Findings that vital signs and lab values can show; the knowledge base must define each.
MEASURED_FINDINGS = (
    "fever",
    "tachycardia",
    "bradycardia",
    "tachypnea",
    "hypoxia",
    "hypotension",
    "elevated_blood_pressure",
    "hyperglycemia",
    "low_blood_sugar",
    "tsh_high",
    "tsh_low",
    "elevated_lipase",
    "anemia",
    "elevated_lactate",
    "ketosis",
    "hyperuricemia",
    "elevated_inflammatory_markers",
)

# Verhoeff tables (dihedral group D5 multiplication and position permutation).
_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def is_valid_sctid(value: str) -> bool:
    """Whether ``value`` is a SNOMED CT concept id: digits, Verhoeff check, concept partition."""
    if not _SCTID_RE.match(value):
        return False
    check = 0
    for i, ch in enumerate(reversed(value)):
        check = _D[check][_P[i % 8][int(ch)]]
    # Partition identifier (2nd and 3rd digit from the right): 00 short or 10 long concept id.
    return check == 0 and value[-3:-1] in ("00", "10")


def is_valid_icd10cm(value: str) -> bool:
    """Whether ``value`` has the form of an ICD-10-CM code (letter, digit, alnum, "." and 1-4)."""
    return bool(_ICD10CM_RE.match(value))


@dataclass(frozen=True)
class Code:
    """A code and its display text in one code system."""

    code: str
    display: str


@dataclass(frozen=True)
class Finding:
    """A symptom or sign and the phrases that say it is present or absent."""

    id: str
    display: str
    terms: tuple[str, ...]
    absent_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    """A condition: id, display, ICD-10-CM and SNOMED CT codes, names and typical findings."""

    id: str
    display: str
    icd10cm: Code
    snomed: Code
    names: tuple[str, ...]
    findings: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.id):
            raise ValueError(f"condition id {self.id!r} must be lowercase letters, digits or _")
        if not is_valid_icd10cm(self.icd10cm.code):
            raise ValueError(f"condition {self.id}: {self.icd10cm.code!r} is not an ICD-10-CM code")
        if not is_valid_sctid(self.snomed.code):
            raise ValueError(
                f"condition {self.id}: {self.snomed.code!r} is not a SNOMED CT concept id "
                "(digits with a valid Verhoeff check digit)"
            )
        if not self.findings:
            raise ValueError(f"condition {self.id} lists no findings")
        if len(set(self.findings)) != len(self.findings):
            raise ValueError(f"condition {self.id} lists a finding twice")

    @property
    def coded_label(self) -> CodedLabel:
        """The condition as a model label coded in SNOMED CT."""
        return CodedLabel(self.id, self.snomed.code, SNOMED_SCHEME, self.snomed.display)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str | int | float) or not str(value).strip():
        raise ValueError(f"{where} must be a non-empty string")
    return str(value).strip()


def _str_list(value: Any, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if value is None and allow_empty:
        return ()
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError(f"{where} must be a list of strings")
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(value))


def _check_keys(value: dict[Any, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {unknown} (a display with a comma needs quotes)"
        )


def _code(value: Any, where: str) -> Code:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping with code and display")
    _check_keys(value, {"code", "display"}, where)
    return Code(
        _str(value.get("code"), f"{where}.code"), _str(value.get("display"), f"{where}.display")
    )


@dataclass(frozen=True)
class KnowledgeBase:
    """The validated content of ``conditions.yaml`` and the file's sha256 digest."""

    version: str
    sources: tuple[str, ...]
    findings: Mapping[str, Finding]
    conditions: tuple[Condition, ...]
    sha256: str
    file_name: str = "conditions.yaml"

    def __post_init__(self) -> None:
        ids = [c.id for c in self.conditions]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"condition ids must be unique, repeated: {dup}")
        icd = [c.icd10cm.code for c in self.conditions]
        if len(set(icd)) != len(icd):
            raise ValueError("ICD-10-CM codes must be unique so a code names one condition")
        used: set[str] = set()
        for condition in self.conditions:
            missing = [f for f in condition.findings if f not in self.findings]
            if missing:
                raise ValueError(f"condition {condition.id} names undefined findings {missing}")
            used.update(condition.findings)
        unused = sorted(set(self.findings) - used)
        if unused:
            raise ValueError(f"findings not used by any condition: {unused}")
        missing_measured = [f for f in MEASURED_FINDINGS if f not in self.findings]
        if missing_measured:
            raise ValueError(
                f"the knowledge base must define the measured findings {missing_measured}"
            )
        if not self.sources:
            raise ValueError("the knowledge base must name its sources")

    @classmethod
    def from_yaml(cls, path: Path = DEFAULT_KB_PATH) -> KnowledgeBase:
        """Read and validate a knowledge base file; ``ValueError`` names what is wrong."""
        raw = Path(path).read_bytes()
        data = yaml.safe_load(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{Path(path).name} must hold a mapping")
        _check_keys(data, {"version", "sources", "findings", "conditions"}, Path(path).name)
        raw_findings = data.get("findings")
        if not isinstance(raw_findings, dict) or not raw_findings:
            raise ValueError("findings must be a mapping of finding id to its terms")
        findings: dict[str, Finding] = {}
        for fid, body in raw_findings.items():
            where = f"findings.{fid}"
            if not isinstance(fid, str) or not _ID_RE.match(fid):
                raise ValueError(f"{where}: finding ids are lowercase letters, digits or _")
            if not isinstance(body, dict):
                raise ValueError(f"{where} must be a mapping")
            _check_keys(body, {"display", "terms", "absent_terms"}, where)
            findings[fid] = Finding(
                id=fid,
                display=_str(body.get("display"), f"{where}.display"),
                terms=_str_list(body.get("terms"), f"{where}.terms"),
                absent_terms=_str_list(
                    body.get("absent_terms"), f"{where}.absent_terms", allow_empty=True
                ),
            )
        raw_conditions = data.get("conditions")
        if not isinstance(raw_conditions, list) or not raw_conditions:
            raise ValueError("conditions must be a non-empty list")
        conditions = []
        for i, body in enumerate(raw_conditions):
            where = f"conditions[{i}]"
            if not isinstance(body, dict):
                raise ValueError(f"{where} must be a mapping")
            where = f"conditions[{i}] ({body.get('id')})"
            _check_keys(body, {"id", "display", "icd10cm", "snomed", "names", "findings"}, where)
            conditions.append(
                Condition(
                    id=_str(body.get("id"), f"{where}.id"),
                    display=_str(body.get("display"), f"{where}.display"),
                    icd10cm=_code(body.get("icd10cm"), f"{where}.icd10cm"),
                    snomed=_code(body.get("snomed"), f"{where}.snomed"),
                    names=_str_list(body.get("names"), f"{where}.names", allow_empty=True),
                    findings=_str_list(body.get("findings"), f"{where}.findings"),
                )
            )
        return cls(
            version=_str(data.get("version"), "version"),
            sources=_str_list(data.get("sources"), "sources"),
            findings=findings,
            conditions=tuple(conditions),
            sha256=hashlib.sha256(raw).hexdigest(),
            file_name=Path(path).name,
        )

    @property
    def condition_ids(self) -> tuple[str, ...]:
        """Condition ids in knowledge-base (and model output) order."""
        return tuple(c.id for c in self.conditions)

    def condition(self, condition_id: str) -> Condition:
        """The condition with ``condition_id``; ``KeyError`` when there is none."""
        for condition in self.conditions:
            if condition.id == condition_id:
                return condition
        raise KeyError(condition_id)

    def resolve_label(self, label: str) -> Condition | None:
        """The condition a training label names: its id, or its ICD-10-CM code (any case)."""
        wanted = label.strip()
        for condition in self.conditions:
            if condition.id == wanted.lower() or condition.icd10cm.code == wanted.upper():
                return condition
        return None

    def finding_weights(self) -> dict[str, float]:
        """Inverse condition frequency of each finding: ``ln(1 + N / n_f)``.

        A finding most conditions share (fever, fatigue) says less about which condition a note
        describes than one only a few have (Murphy sign), as in tf-idf retrieval.
        """
        counts: dict[str, int] = dict.fromkeys(self.findings, 0)
        for condition in self.conditions:
            for fid in condition.findings:
                counts[fid] += 1
        n = len(self.conditions)
        return {fid: math.log(1.0 + n / max(1, c)) for fid, c in counts.items()}


# --- finding the phrases in text ----------------------------------------------------------


class TargetKind(StrEnum):
    """What a phrase found in a note names."""

    FINDING = "finding"
    CONDITION = "condition"


@dataclass(frozen=True)
class Target:
    """A phrase naming a finding or condition: what it names, where, and whether it says absent."""

    kind: TargetKind
    ref: str
    start: int
    end: int
    absent: bool = False
    source: str = "term"  # "term" or "measurement" (a vital sign or lab value)


# Vital signs and a few laboratory values: label, optional "of/:/=/is/was", value. Labels are
# case-sensitive where a lower-case form is an ordinary word ("T", "P", "HR", "Hb"); values are
# range-checked, and the thresholds are the usual adult reference limits.
_SEP = r"\s*(?:of|:|=|is|was|-)?\s*"
_NUM = r"(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)"
_END = r"(?![\d%]|\.\d)"
_TEMP_RE = re.compile(
    r"(?<![A-Za-z])(?:(?i:temperature|temp|tmax|t\s*max)|T)"
    + _SEP
    + r"(\d{2,3}(?:\.\d{1,2})?)\s*(?:°|º|deg(?:rees)?)?\s*([CFcf])?(?![A-Za-z\d])"
)
_BP_RE = re.compile(
    r"(?<![A-Za-z])(?:BP|[Bb]lood\s+pressure)" + _SEP + r"(\d{2,3})\s*/\s*(\d{2,3})(?!\d)"
)
_SPO2_RE = re.compile(
    r"(?<![A-Za-z])(?:SpO2|SaO2|O2\s*sats?|[Oo]2\s*saturation|[Oo]xygen\s+saturation|[Ss]ats?|"
    r"[Ss]atting|[Pp]ulse\s*ox(?:imetry)?|POx)" + _SEP + r"(\d{2,3})\s*%"
)
Reading = list[tuple[str, bool]]  # (finding id, absent)


def _heart_rate(v: float) -> Reading:
    if v > 100:
        return [("tachycardia", False)]
    return [("bradycardia", False)] if v < 50 else [("tachycardia", True)]


def _glucose(v: float) -> Reading:
    if v >= 200:
        return [("hyperglycemia", False)]
    return [("low_blood_sugar", False)] if v < 70 else []


def _tsh(v: float) -> Reading:
    if v > 4.5:
        return [("tsh_high", False)]
    return [("tsh_low", False)] if v < 0.3 else [("tsh_high", True), ("tsh_low", True)]


# (label pattern, plausible range, reading of the value)
_MEASUREMENTS: tuple[tuple[re.Pattern[str], tuple[float, float], Any], ...] = tuple(
    (re.compile(r"(?<![A-Za-z])(?:" + label + r")" + _SEP + _NUM + _END), bounds, read)
    for label, bounds, read in (
        (r"HR|[Hh]eart\s+rate|[Pp]ulse(?:\s+rate)?|P", (20, 250), _heart_rate),
        (
            r"RR|[Rr]esp(?:iratory)?\.?\s*rate|[Rr]espirations?",
            (4, 80),
            lambda v: [("tachypnea", v <= 20)],
        ),
        (
            r"[Gg]lucose|[Bb]lood\s+sugar|BG|FSBG|[Ff]ingerstick(?:\s+glucose)?|[Ss]ugars?",
            (10, 2000),
            _glucose,
        ),
        (r"TSH", (0.001, 500), _tsh),
        (r"[Ll]ipase", (1, 100000), lambda v: [("elevated_lipase", False)] if v > 180 else []),
        (
            r"[Hh]emoglobin|[Hh]gb|Hb",
            (2, 25),
            lambda v: [("anemia", False)] if v < 12 else [("anemia", True)] if v >= 13 else [],
        ),
        (
            r"[Ll]actate|[Ll]actic\s+acid",
            (0.1, 30),
            lambda v: [("elevated_lactate", v <= 2)],
        ),
        (r"[Aa]nion\s+gap|AG", (1, 60), lambda v: [("ketosis", False)] if v > 16 else []),
        (r"[Uu]ric\s+acid", (0.5, 30), lambda v: [("hyperuricemia", False)] if v > 7 else []),
        (
            r"ESR|[Ss]ed\s+rate",
            (1, 200),
            lambda v: [("elevated_inflammatory_markers", False)] if v > 30 else [],
        ),
    )
)


def _measurement_targets(text: str, start: int, end: int) -> Iterator[Target]:
    """Findings shown, or shown to be absent, by vital signs and lab values in a sentence."""

    def target(m: re.Match[str], fid: str, absent: bool = False) -> Target:
        return Target(TargetKind.FINDING, fid, m.start(), m.end(), absent, "measurement")

    for m in _TEMP_RE.finditer(text, start, end):
        value = float(m.group(1))
        unit = (m.group(2) or "").upper()
        celsius = (value - 32.0) * 5.0 / 9.0 if unit == "F" or (not unit and value > 45) else value
        if 30.0 <= celsius <= 45.0:
            yield target(m, "fever", absent=celsius < 38.0)
    for m in _SPO2_RE.finditer(text, start, end):
        saturation = int(m.group(1))
        if 50 <= saturation <= 100:
            if saturation < 92:
                yield target(m, "hypoxia")
            elif saturation >= 95:
                yield target(m, "hypoxia", absent=True)
    for m in _BP_RE.finditer(text, start, end):
        systolic, diastolic = int(m.group(1)), int(m.group(2))
        if 50 <= systolic <= 300 and 20 <= diastolic <= 200 and diastolic < systolic:
            if systolic < 90:
                yield target(m, "hypotension")
            elif systolic >= 140 or diastolic >= 90:
                yield target(m, "elevated_blood_pressure")
            else:
                yield target(m, "hypotension", absent=True)
                yield target(m, "elevated_blood_pressure", absent=True)
    for pattern, (low, high), read in _MEASUREMENTS:
        for m in pattern.finditer(text, start, end):
            value = float(m.group(1).replace(",", ""))
            if low <= value <= high:
                for fid, absent in read(value):
                    yield target(m, fid, absent)


@dataclass(frozen=True)
class _TermValue:
    kind: TargetKind
    ref: str
    absent: bool


class FindingMatcher:
    """Finds the knowledge base's finding and condition phrases, and vital signs, in sentences."""

    def __init__(self, kb: KnowledgeBase) -> None:
        """Compile every term, absent term and condition name of ``kb``."""
        self.kb = kb
        self._findings: PhraseMatcher[_TermValue] = PhraseMatcher()
        self._names: PhraseMatcher[_TermValue] = PhraseMatcher()
        for finding in kb.findings.values():
            for term in finding.terms:
                self._findings.add(
                    term, _TermValue(TargetKind.FINDING, finding.id, False), plural=True
                )
            for term in finding.absent_terms:
                self._findings.add(term, _TermValue(TargetKind.FINDING, finding.id, True))
        for condition in kb.conditions:
            for name in dict.fromkeys((condition.display, *condition.names)):
                self._names.add(
                    name, _TermValue(TargetKind.CONDITION, condition.id, False), plural=True
                )
        self._condition_findings = {c.id: frozenset(c.findings) for c in kb.conditions}

    def targets(self, text: str, sentence: Sentence) -> list[Target]:
        """Finding, condition and vital-sign targets of one sentence, in text order.

        Where a condition name and a finding phrase overlap, the longer wins ("CVA tenderness"
        is flank pain, not a stroke; "hay fever" is not a fever), except that a finding inside
        the name of a condition that has it is kept ("chronic constipation").
        """
        tokens = tokenize(text, sentence.start, sentence.end)
        finding_matches = self._findings.find(tokens)
        name_matches = self._names.find(tokens)
        found: list[Target] = []
        for nm in name_matches:
            # A phrase that is also a finding ("low back pain", "constipation") names the
            # symptom, not the diagnosis; a longer finding phrase wins over a name inside it.
            if any(fm.start <= nm.start and nm.end <= fm.end for fm in finding_matches):
                continue
            for value in dict.fromkeys(nm.values):
                found.append(Target(value.kind, value.ref, nm.start, nm.end))
        for fm in finding_matches:
            covering = [
                nm
                for nm in name_matches
                if nm.start <= fm.start
                and fm.end <= nm.end
                and (nm.end - nm.start) > (fm.end - fm.start)
            ]
            for value in dict.fromkeys(fm.values):
                if covering and not any(
                    value.ref in self._condition_findings[v.ref]
                    for nm in covering
                    for v in nm.values
                ):
                    continue
                found.append(Target(value.kind, value.ref, fm.start, fm.end, value.absent))
        found.extend(_measurement_targets(text, sentence.start, sentence.end))
        found.sort(key=lambda t: (t.start, t.end, t.kind, t.ref))
        return found
