"""The risk model's feature vector, read from FHIR R4 resources (plain JSON dicts).

Twelve features, in network order (:data:`FEATURES`). Each is read from LOINC-coded
Observations (or the Patient, Conditions and medication statements where noted); the unit of
every Quantity is read from its UCUM code and converted to the feature's canonical unit, and a
value outside the feature's plausible range is refused with a reason rather than used.

======================  ===========================================  =====================
feature                 source (LOINC unless noted)                  canonical unit, units
======================  ===========================================  =====================
``age``                 Patient.birthDate at the assessment time,     a
                        else Observation 30525-0 (Age)
``sex_male``            Patient.gender (male 1, female 0; other and   1/0
                        unknown are missing)
``bmi``                 39156-5 BMI; else 29463-7 weight (kg, g,      kg/m2
                        [lb_av]) / 8302-2 height (cm, m, [in_i])^2
``sbp``                 8480-6, alone or as a component of the        mm[Hg]
                        85354-9 / 55284-4 blood pressure panel
``dbp``                 8462-4, likewise                              mm[Hg]
``total_cholesterol``   2093-3 (mg/dL) or 14647-2 (mmol/L)            mg/dL (mmol/L x 38.67)
``hdl_cholesterol``     2085-9 (mg/dL) or 14646-4 (mmol/L)            mg/dL (mmol/L x 38.67)
``hba1c``               4548-4 / 17856-6 (%), 59261-8 (mmol/mol)      % NGSP (0.09148 x IFCC
                                                                      + 2.152)
``fasting_glucose``     1558-6 (mg/dL) or 14771-0 (mmol/L)            mg/dL (mmol/L x 18.016)
``current_smoker``      72166-2 with a SNOMED CT answer               1/0
``diabetes``            active Condition (SNOMED 73211009, 44054006,  1/0
                        46635009; ICD-10-CM E08-E13), or HbA1c >=
                        6.5 % / fasting glucose >= 126 mg/dL (ADA
                        laboratory threshold)
``bp_treated``          active MedicationStatement/MedicationRequest  1/0
                        of an antihypertensive (ATC C02, C03, C07,
                        C08, C09, or a listed RxNorm ingredient)
======================  ===========================================  =====================

Rules: only Observations with status final, amended or corrected are read; one with a
dataAbsentReason, without an id (it could not be cited as basis) or dated after the assessment
time is skipped; for each feature the latest value wins (effective time, else issued; undated
values rank below dated ones). Whether diabetes and antihypertensive treatment are *missing* or
*absent* depends on whether the caller supplied the patient's conditions / medications at all:
``None`` means "not known" (missing), an empty sequence means "none recorded" (0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

# --- code sets ------------------------------------------------------------------------------

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"

LOINC_AGE = "30525-0"
LOINC_BMI = "39156-5"
LOINC_WEIGHT = "29463-7"
LOINC_HEIGHT = "8302-2"
LOINC_SBP = "8480-6"
LOINC_DBP = "8462-4"
LOINC_BP_PANELS = frozenset({"85354-9", "55284-4"})
LOINC_TOTAL_CHOLESTEROL = frozenset({"2093-3", "14647-2"})
LOINC_HDL_CHOLESTEROL = frozenset({"2085-9", "14646-4"})
LOINC_HBA1C = frozenset({"4548-4", "17856-6", "59261-8"})
LOINC_FASTING_GLUCOSE = frozenset({"1558-6", "14771-0"})
LOINC_SMOKING_STATUS = "72166-2"

#: Answers to 72166-2 (Tobacco smoking status), SNOMED CT.
SMOKING_CURRENT = frozenset(
    {
        "449868002",  # Current every day smoker
        "428041000124106",  # Current some day smoker
        "77176002",  # Smoker, current status unknown
        "428071000124103",  # Current heavy tobacco smoker
        "428061000124105",  # Current light tobacco smoker
    }
)
SMOKING_NOT_CURRENT = frozenset({"8517006", "266919005"})  # Ex-smoker; Never smoked tobacco
SMOKING_UNKNOWN = frozenset({"266927001"})  # Unknown if ever smoked

#: Diabetes mellitus (73211009), type 2 (44054006), type 1 (46635009).
DIABETES_SNOMED = frozenset({"73211009", "44054006", "46635009"})
#: ICD-10-CM E08-E13: diabetes mellitus (secondary, drug-induced, type 1, type 2, other).
DIABETES_ICD10_PREFIXES = ("E08", "E09", "E10", "E11", "E13")

#: ATC groups of antihypertensives: antihypertensives, diuretics, beta blockers, calcium
#: channel blockers, agents acting on the renin-angiotensin system.
ANTIHYPERTENSIVE_ATC_PREFIXES = ("C02", "C03", "C07", "C08", "C09")
#: Common antihypertensive ingredients by RxNorm code (not exhaustive; ATC coding is preferred).
ANTIHYPERTENSIVE_RXNORM = frozenset(
    {
        "29046",  # lisinopril
        "1998",  # captopril
        "52175",  # losartan
        "17767",  # amlodipine
        "7417",  # nifedipine
        "3443",  # diltiazem
        "11170",  # verapamil
        "5487",  # hydrochlorothiazide
        "4603",  # furosemide
        "9997",  # spironolactone
        "6918",  # metoprolol
        "20352",  # carvedilol
        "8787",  # propranolol
        "5470",  # hydralazine
    }
)

#: ADA laboratory thresholds for diabetes (one value; a clinician confirms).
DIABETES_HBA1C_PERCENT = 6.5
DIABETES_FASTING_GLUCOSE_MG_DL = 126.0

_USABLE_OBSERVATION_STATUS = frozenset({"final", "amended", "corrected"})
_ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})
_REFUTED_CONDITION = frozenset({"refuted", "entered-in-error"})
_ACTIVE_MEDICATION = frozenset({"active", "intended", "on-hold"})

# --- the feature vector ---------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """One input of the risk model: name, canonical unit, plausible and training ranges."""

    name: str
    display: str
    unit: str
    binary: bool
    plausible: tuple[float, float]
    training_range: tuple[float, float]

    def __post_init__(self) -> None:
        lo, hi = self.plausible
        tlo, thi = self.training_range
        if not (lo < hi and tlo < thi and lo <= tlo and thi <= hi):
            raise ValueError(f"feature {self.name}: inconsistent ranges")


#: The feature vector in network order. ``training_range`` is the domain of the published
#: equations the demo cohort was simulated from (age 40-79, total cholesterol 130-320 mg/dL,
#: HDL 20-100 mg/dL, systolic 90-200 mm[Hg]); values outside it are clipped before they reach
#: the network and are named in the rationale.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("age", "age", "a", False, (18.0, 110.0), (40.0, 79.0)),
    FeatureSpec("sex_male", "male sex", "1", True, (0.0, 1.0), (0.0, 1.0)),
    FeatureSpec("bmi", "BMI", "kg/m2", False, (10.0, 80.0), (16.0, 60.0)),
    FeatureSpec("sbp", "systolic blood pressure", "mm[Hg]", False, (60.0, 260.0), (90.0, 200.0)),
    FeatureSpec("dbp", "diastolic blood pressure", "mm[Hg]", False, (30.0, 160.0), (50.0, 120.0)),
    FeatureSpec(
        "total_cholesterol", "total cholesterol", "mg/dL", False, (50.0, 600.0), (130.0, 320.0)
    ),
    FeatureSpec("hdl_cholesterol", "HDL cholesterol", "mg/dL", False, (5.0, 200.0), (20.0, 100.0)),
    FeatureSpec("hba1c", "HbA1c", "%", False, (3.0, 20.0), (4.0, 14.0)),
    FeatureSpec("fasting_glucose", "fasting glucose", "mg/dL", False, (20.0, 700.0), (60.0, 350.0)),
    FeatureSpec("current_smoker", "current smoker", "1", True, (0.0, 1.0), (0.0, 1.0)),
    FeatureSpec("diabetes", "diabetes", "1", True, (0.0, 1.0), (0.0, 1.0)),
    FeatureSpec("bp_treated", "antihypertensive treatment", "1", True, (0.0, 1.0), (0.0, 1.0)),
)
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in FEATURES)
FEATURE_BY_NAME: dict[str, FeatureSpec] = {spec.name: spec for spec in FEATURES}

# Plausible ranges of the two inputs BMI may be computed from (kg, cm).
_WEIGHT_KG = (20.0, 350.0)
_HEIGHT_CM = (100.0, 250.0)

_MG_DL_PER_MMOL_L_CHOLESTEROL = 38.67  # 1 / 0.02586
_MG_DL_PER_MMOL_L_GLUCOSE = 18.016  # molar mass 180.16 g/mol


def _ifcc_to_ngsp(mmol_per_mol: float) -> float:
    return 0.09148 * mmol_per_mol + 2.152  # NGSP/IFCC master equation


#: Accepted UCUM unit codes per quantity and their conversion to the canonical unit.
_CONVERSIONS: dict[str, dict[str, Any]] = {
    "age": {"a": lambda v: v},
    "bmi": {"kg/m2": lambda v: v},
    "sbp": {"mm[Hg]": lambda v: v},
    "dbp": {"mm[Hg]": lambda v: v},
    "total_cholesterol": {
        "mg/dL": lambda v: v,
        "mmol/L": lambda v: v * _MG_DL_PER_MMOL_L_CHOLESTEROL,
    },
    "hdl_cholesterol": {
        "mg/dL": lambda v: v,
        "mmol/L": lambda v: v * _MG_DL_PER_MMOL_L_CHOLESTEROL,
    },
    "hba1c": {"%": lambda v: v, "mmol/mol": _ifcc_to_ngsp},
    "fasting_glucose": {
        "mg/dL": lambda v: v,
        "mmol/L": lambda v: v * _MG_DL_PER_MMOL_L_GLUCOSE,
    },
    "weight": {"kg": lambda v: v, "g": lambda v: v / 1000.0, "[lb_av]": lambda v: v * 0.45359237},
    "height": {"cm": lambda v: v, "m": lambda v: v * 100.0, "[in_i]": lambda v: v * 2.54},
}

_LOINC_TO_QUANTITY: dict[str, str] = {
    LOINC_AGE: "age",
    LOINC_BMI: "bmi",
    LOINC_SBP: "sbp",
    LOINC_DBP: "dbp",
    LOINC_WEIGHT: "weight",
    LOINC_HEIGHT: "height",
    **{code: "total_cholesterol" for code in LOINC_TOTAL_CHOLESTEROL},
    **{code: "hdl_cholesterol" for code in LOINC_HDL_CHOLESTEROL},
    **{code: "hba1c" for code in LOINC_HBA1C},
    **{code: "fasting_glucose" for code in LOINC_FASTING_GLUCOSE},
}


@dataclass(frozen=True)
class RejectedInput:
    """A resource (or part of one) that was not used, and why."""

    reference: str
    what: str
    reason: str


@dataclass(frozen=True)
class RiskFeatures:
    """The feature vector of one patient at one time, with what is missing and where each
    value came from.

    ``values`` holds the present features in canonical units (binary features as 0/1);
    ``missing`` is every other feature; ``sources`` maps a feature to the references it was read
    from; ``basis`` is every reference used (for RiskAssessment.basis).
    """

    values: Mapping[str, float]
    basis: tuple[str, ...] = ()
    sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    rejected: tuple[RejectedInput, ...] = ()
    at: datetime | None = None

    def __post_init__(self) -> None:
        unknown = set(self.values) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown risk features {sorted(unknown)}; known: {FEATURE_NAMES}")
        for name, value in self.values.items():
            spec = FEATURE_BY_NAME[name]
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"feature {name} must be a finite number, got {value!r}")
            if spec.binary and value not in (0, 1):
                raise ValueError(f"feature {name} is binary (0 or 1), got {value!r}")
            lo, hi = spec.plausible
            if not lo <= value <= hi:
                raise ValueError(
                    f"feature {name} = {value} {spec.unit} is outside the plausible range "
                    f"{lo}-{hi} {spec.unit}"
                )
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("RiskFeatures.at must be timezone-aware")

    @property
    def missing(self) -> frozenset[str]:
        """Features with no usable value."""
        return frozenset(name for name in FEATURE_NAMES if name not in self.values)

    @classmethod
    def from_values(cls, values: Mapping[str, float], basis: Sequence[str] = ()) -> RiskFeatures:
        """Features given directly in canonical units (for evaluation and tests)."""
        return cls(values=dict(values), basis=tuple(basis))


# --- reading FHIR ---------------------------------------------------------------------------


def _codes(concept: Any, system: str) -> list[str]:
    if not isinstance(concept, Mapping):
        return []
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return []
    return [
        str(c["code"])
        for c in codings
        if isinstance(c, Mapping) and c.get("system") == system and isinstance(c.get("code"), str)
    ]


def _reference(resource: Mapping[str, Any]) -> str | None:
    rid = resource.get("id")
    rtype = resource.get("resourceType")
    if not isinstance(rid, str) or not rid or not isinstance(rtype, str):
        return None
    return f"{rtype}/{rid}"


_DATE_RE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")


def parse_fhir_datetime(text: Any) -> datetime | None:
    """Parse a FHIR date/dateTime/instant; partial dates take their first moment (UTC)."""
    if not isinstance(text, str) or not text:
        return None
    if _DATE_RE.match(text):
        parts = [int(p) for p in text.split("-")]
        while len(parts) < 3:
            parts.append(1)
        return datetime.combine(date(parts[0], parts[1], parts[2]), time(), tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _observation_time(obs: Mapping[str, Any]) -> datetime | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in obs:
            return parse_fhir_datetime(obs[key])
    period = obs.get("effectivePeriod")
    if isinstance(period, Mapping):
        return parse_fhir_datetime(period.get("end") or period.get("start"))
    return parse_fhir_datetime(obs.get("issued"))


def _quantity(value: Any) -> tuple[float, str] | str:
    """(value, UCUM code) of a Quantity, or the reason it cannot be used."""
    if not isinstance(value, Mapping):
        return "no valueQuantity"
    number = value.get("value")
    if isinstance(number, bool) or not isinstance(number, int | float):
        return "Quantity has no numeric value"
    if value.get("comparator"):
        return f"Quantity has comparator {value['comparator']!r}: not an exact value"
    code = value.get("code") if value.get("system", UCUM) == UCUM else None
    unit = code if isinstance(code, str) else value.get("unit")
    if not isinstance(unit, str):
        return "Quantity has no UCUM unit"
    return float(number), unit


@dataclass
class _Candidate:
    value: float
    when: datetime | None
    order: int
    references: tuple[str, ...]

    def key(self) -> tuple[int, datetime, int]:
        floor = datetime.min.replace(tzinfo=UTC)
        return (1 if self.when else 0, self.when or floor, self.order)


class _Reader:
    def __init__(self, at: datetime) -> None:
        self.at = at
        self.candidates: dict[str, list[_Candidate]] = {}
        self.rejected: list[RejectedInput] = []
        self.notes: list[str] = []
        self.order = 0

    def reject(self, reference: str, what: str, reason: str) -> None:
        self.rejected.append(RejectedInput(reference, what, reason))

    def offer(
        self,
        quantity_name: str,
        reference: str,
        value_field: Any,
        when: datetime | None,
        extra_refs: tuple[str, ...] = (),
    ) -> None:
        parsed = _quantity(value_field)
        if isinstance(parsed, str):
            self.reject(reference, quantity_name, parsed)
            return
        number, unit = parsed
        convert = _CONVERSIONS[quantity_name].get(unit)
        if convert is None:
            accepted = ", ".join(_CONVERSIONS[quantity_name])
            self.reject(
                reference, quantity_name, f"unit {unit!r} not accepted (accepted: {accepted})"
            )
            return
        canonical = float(convert(number))
        if quantity_name == "weight":
            lo, hi = _WEIGHT_KG
        elif quantity_name == "height":
            lo, hi = _HEIGHT_CM
        else:
            lo, hi = FEATURE_BY_NAME[quantity_name].plausible
        if not lo <= canonical <= hi:
            self.reject(
                reference,
                quantity_name,
                f"implausible value {canonical:g} (plausible {lo:g}-{hi:g}); not used",
            )
            return
        self.order += 1
        self.candidates.setdefault(quantity_name, []).append(
            _Candidate(canonical, when, self.order, (reference, *extra_refs))
        )

    def offer_value(self, name: str, value: float, when: datetime | None, reference: str) -> None:
        self.order += 1
        self.candidates.setdefault(name, []).append(
            _Candidate(value, when, self.order, (reference,))
        )

    def latest(self, name: str) -> _Candidate | None:
        found = self.candidates.get(name)
        return max(found, key=_Candidate.key) if found else None


def _read_observation(reader: _Reader, obs: Mapping[str, Any]) -> None:
    reference = _reference(obs)
    if reference is None or obs.get("resourceType") != "Observation":
        reader.reject(
            str(obs.get("id", "?")), "Observation", "not an Observation with an id: not citable"
        )
        return
    codes = _codes(obs.get("code"), LOINC)
    if not codes:
        reader.reject(reference, "Observation", "no LOINC code")
        return
    status = obs.get("status")
    if status not in _USABLE_OBSERVATION_STATUS:
        reader.reject(reference, codes[0], f"status {status!r} is not final/amended/corrected")
        return
    when = _observation_time(obs)
    if when is not None and when > reader.at:
        reader.reject(reference, codes[0], "dated after the assessment time")
        return
    if "dataAbsentReason" in obs:
        reader.reject(reference, codes[0], "dataAbsentReason given: no value")
        return
    code_set = set(codes)
    if code_set & LOINC_BP_PANELS:
        found = False
        for component in obs.get("component") or []:
            if not isinstance(component, Mapping):
                continue
            comp_codes = set(_codes(component.get("code"), LOINC))
            for loinc, name in ((LOINC_SBP, "sbp"), (LOINC_DBP, "dbp")):
                if loinc in comp_codes:
                    found = True
                    reader.offer(name, reference, component.get("valueQuantity"), when)
        if not found:
            reader.reject(reference, "blood pressure panel", "no systolic/diastolic component")
        return
    if LOINC_SMOKING_STATUS in code_set:
        answers = set(_codes(obs.get("valueCodeableConcept"), SNOMED))
        if answers & SMOKING_CURRENT:
            reader.offer_value("current_smoker", 1.0, when, reference)
        elif answers & SMOKING_NOT_CURRENT:
            reader.offer_value("current_smoker", 0.0, when, reference)
        elif answers & SMOKING_UNKNOWN:
            reader.reject(reference, "smoking status", "smoking status reported as unknown")
        else:
            reader.reject(reference, "smoking status", "no recognised SNOMED CT answer")
        return
    for code in codes:
        quantity_name = _LOINC_TO_QUANTITY.get(code)
        if quantity_name is not None:
            reader.offer(quantity_name, reference, obs.get("valueQuantity"), when)
            return
    reader.reject(reference, codes[0], "LOINC code is not an input of the risk model")


def _age_years(birth: str, at: datetime) -> float | None:
    """Age in years; a partial birth date is taken at the middle of its period."""
    if not isinstance(birth, str) or not _DATE_RE.match(birth):
        return None
    parts = [int(p) for p in birth.split("-")]
    if len(parts) == 1:
        born = date(parts[0], 7, 2)  # middle of the year
    elif len(parts) == 2:
        born = date(parts[0], parts[1], 15)
    else:
        born = date(parts[0], parts[1], parts[2])
    return (at.date() - born).days / 365.2425


def _read_patient(reader: _Reader, patient: Mapping[str, Any]) -> None:
    reference = _reference(patient) or "Patient"
    gender = patient.get("gender")
    if gender in ("male", "female"):
        reader.offer_value("sex_male", 1.0 if gender == "male" else 0.0, None, reference)
    elif gender is not None:
        reader.reject(reference, "sex", f"gender {gender!r}: the equations need male or female")
    if "birthDate" in patient:
        age = _age_years(patient["birthDate"], reader.at)
        lo, hi = FEATURE_BY_NAME["age"].plausible
        if age is None:
            reader.reject(reference, "age", "birthDate is not a FHIR date")
        elif not lo <= age <= hi:
            reader.reject(reference, "age", f"age {age:.0f} outside {lo:g}-{hi:g} years")
        else:
            # Patient-derived age outranks an Age observation: it is exact at ``at``.
            reader.candidates.setdefault("age_patient", []).append(
                _Candidate(age, reader.at, 0, (reference,))
            )


def _condition_is_diabetes(condition: Mapping[str, Any]) -> bool:
    snomed = set(_codes(condition.get("code"), SNOMED))
    icd = _codes(condition.get("code"), ICD10CM)
    return bool(snomed & DIABETES_SNOMED) or any(
        code.upper().startswith(DIABETES_ICD10_PREFIXES) for code in icd
    )


def _condition_active(condition: Mapping[str, Any]) -> bool:
    verification = _codes(
        condition.get("verificationStatus"),
        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
    )
    if set(verification) & _REFUTED_CONDITION:
        return False
    clinical = _codes(
        condition.get("clinicalStatus"),
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
    )
    return not clinical or bool(set(clinical) & _ACTIVE_CONDITION)


def _medication_is_antihypertensive(statement: Mapping[str, Any]) -> bool:
    concept = statement.get("medicationCodeableConcept")
    atc = _codes(concept, ATC)
    rxnorm = set(_codes(concept, RXNORM))
    return any(code.startswith(ANTIHYPERTENSIVE_ATC_PREFIXES) for code in atc) or bool(
        rxnorm & ANTIHYPERTENSIVE_RXNORM
    )


def extract_features(
    observations: Iterable[Mapping[str, Any]],
    patient: Mapping[str, Any] | None = None,
    conditions: Sequence[Mapping[str, Any]] | None = None,
    at: datetime | None = None,
    medications: Sequence[Mapping[str, Any]] | None = None,
) -> RiskFeatures:
    """Read the risk feature vector from FHIR R4 resources given as JSON dicts.

    ``at`` is the assessment time (default now, UTC): age is computed at ``at`` and later
    Observations are ignored. ``conditions`` / ``medications`` set to ``None`` mean "not
    supplied" (diabetes / treatment missing unless a lab value shows diabetes); a sequence, even
    an empty one, is read as the patient's complete list. Every resource not used is listed in
    ``rejected`` with the reason.
    """
    at = at or datetime.now(UTC)
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    reader = _Reader(at)
    for obs in observations:
        if not isinstance(obs, Mapping):
            reader.reject("?", "Observation", "not a JSON object")
            continue
        _read_observation(reader, obs)
    if patient is not None:
        _read_patient(reader, patient)

    values: dict[str, float] = {}
    sources: dict[str, tuple[str, ...]] = {}
    notes: list[str] = []

    def take(name: str, candidate: _Candidate | None) -> None:
        if candidate is not None:
            values[name] = candidate.value
            sources[name] = candidate.references

    take("age", reader.latest("age_patient") or reader.latest("age"))
    for name in ("sex_male", "sbp", "dbp", "total_cholesterol", "hdl_cholesterol"):
        take(name, reader.latest(name))
    for name in ("hba1c", "fasting_glucose", "current_smoker"):
        take(name, reader.latest(name))

    bmi = reader.latest("bmi")
    if bmi is not None:
        take("bmi", bmi)
    else:
        weight, height = reader.latest("weight"), reader.latest("height")
        if weight is not None and height is not None:
            computed = weight.value / (height.value / 100.0) ** 2
            lo, hi = FEATURE_BY_NAME["bmi"].plausible
            if lo <= computed <= hi:
                values["bmi"] = computed
                sources["bmi"] = weight.references + height.references
                notes.append(f"BMI {computed:.1f} kg/m2 computed from body weight and height")
            else:
                reason = f"computed BMI {computed:.1f} implausible"
                reader.reject(weight.references[0], "bmi", reason)

    if "sbp" in values and "dbp" in values and values["dbp"] >= values["sbp"]:
        for name in ("sbp", "dbp"):
            reader.reject(sources[name][0], name, "diastolic >= systolic: pressure not used")
            values.pop(name)
            sources.pop(name)

    # Diabetes: a recorded condition, or a lab value at the ADA threshold.
    diabetes_refs = [
        _reference(c) or "Condition"
        for c in conditions or ()
        if isinstance(c, Mapping) and _condition_is_diabetes(c) and _condition_active(c)
    ]
    lab_refs: list[str] = []
    if values.get("hba1c", 0.0) >= DIABETES_HBA1C_PERCENT:
        lab_refs.extend(sources["hba1c"])
    if values.get("fasting_glucose", 0.0) >= DIABETES_FASTING_GLUCOSE_MG_DL:
        lab_refs.extend(sources["fasting_glucose"])
    if diabetes_refs:
        values["diabetes"] = 1.0
        sources["diabetes"] = tuple(diabetes_refs)
    elif lab_refs:
        values["diabetes"] = 1.0
        sources["diabetes"] = tuple(lab_refs)
        notes.append(
            "diabetes taken from a laboratory value at the ADA threshold (HbA1c >= 6.5 % or "
            "fasting glucose >= 126 mg/dL); no diabetes condition was supplied"
        )
    elif conditions is not None:
        values["diabetes"] = 0.0
        sources["diabetes"] = ()

    if medications is not None:
        treated = [
            _reference(m) or "MedicationStatement"
            for m in medications
            if isinstance(m, Mapping)
            and m.get("status") in _ACTIVE_MEDICATION
            and _medication_is_antihypertensive(m)
        ]
        values["bp_treated"] = 1.0 if treated else 0.0
        sources["bp_treated"] = tuple(treated)

    # Only real references ("Type/id") can be cited; resources without an id still count.
    basis = sorted({ref for refs in sources.values() for ref in refs if "/" in ref})
    return RiskFeatures(
        values=values,
        basis=tuple(basis),
        sources=sources,
        notes=tuple(notes),
        rejected=tuple(reader.rejected),
        at=at,
    )
