"""Typed biomarker findings and cancer types, read from FHIR R4 resources (plain JSON dicts).

Observations are read as the HL7 Genomics Reporting IG (STU2) and mCODE code them:

=====================================  ================================================
finding                                Observation.code (LOINC) and value
=====================================  ================================================
variant (gene, c.HGVS, p.HGVS)         69548-6 Genetic variant assessment, value LA9633-4
                                       Present; components 48018-6 gene studied (HGNC),
                                       48004-6 c.HGVS, 48005-3 p.HGVS, 48002-0 genomic
                                       source class, 53037-8 clinical significance
fusion                                 69548-6 with 48019-4 DNA change type (or the
                                       molecular-consequence component) = SO:0001565
                                       gene_fusion; the genes are the 48018-6 components
clinical significance of a variant     a Diagnostic Implication (tbd-codes
                                       ``diagnostic-implication``) with 53037-8, whose
                                       derivedFrom references the variant
microsatellite instability             81695-9, LA26203-2 MSI-H / LA26202-4 MSI-L /
                                       LA14122-8 stable / LA11884-6 indeterminate
tumour mutational burden               94076-7, valueQuantity 1/1000000{Base} (mut/Mb)
PD-L1 tumour proportion score          83053-9 (PD-L1 positive tumour cells per 100
                                       viable tumour cells), valueQuantity in %
HER2                                   48676-1, 85319-2, 18474-7, 72383-3 (IHC or
                                       immunoassay: positive/negative, or IHC score 0, 1+,
                                       2+ equivocal, 3+); 85318-4, 31150-6 (ISH: positive/
                                       negative)
oestrogen / progesterone receptor      85337-4, 40556-3, 16112-5 / 85339-0, 40557-1,
(protein expression)                   16113-3: positive/negative
=====================================  ================================================

PD-L1 by its TPS quantity (83053-9) was chosen over the 22C3 "Interpretation"/report codes
(83052-1, 85147-7) because the evidence rows state TPS thresholds; the latter are skipped. A
finding that is Absent, an Observation whose status is not final/amended/corrected, and any
shape not described above (e.g. RNA expression values, for which there is no agreed coding) is
skipped with the reason -- never guessed. Positive/negative are read from SNOMED CT
(10828004 / 260385009; 42425007 equivocal) or LOINC answers (LA6576-8 / LA6577-6).

Cancer types come from Condition.code: SNOMED CT or ICD-10-CM codes of :data:`CANCER_TYPES`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# --- code sets ------------------------------------------------------------------------------

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
HGNC = "http://www.genenames.org/geneId"
HGVS = "http://varnomen.hgvs.org"
SEQUENCE_ONTOLOGY = "http://sequenceontology.org"
GENOMICS_TBD = "http://hl7.org/fhir/uv/genomics-reporting/CodeSystem/tbd-codes"
GENOMICS_TBD_CS = "http://hl7.org/fhir/uv/genomics-reporting/CodeSystem/tbd-codes-cs"

LOINC_VARIANT = "69548-6"
LOINC_GENE_STUDIED = "48018-6"
LOINC_DNA_CHANGE = "48004-6"
LOINC_AMINO_ACID_CHANGE = "48005-3"
LOINC_DNA_CHANGE_TYPE = "48019-4"
LOINC_GENOMIC_SOURCE = "48002-0"
LOINC_CLINICAL_SIGNIFICANCE = "53037-8"
LOINC_MSI = "81695-9"
LOINC_TMB = "94076-7"
LOINC_PDL1_TPS = "83053-9"
LOINC_HER2_IHC = frozenset({"48676-1", "85319-2", "18474-7", "72383-3"})
LOINC_HER2_ISH = frozenset({"85318-4", "31150-6"})
LOINC_ER = frozenset({"85337-4", "40556-3", "16112-5"})
LOINC_PR = frozenset({"85339-0", "40557-1", "16113-3"})
LOINC_PDL1_OTHER = frozenset({"83052-1", "85147-7", "83054-7"})

PRESENT = "LA9633-4"
ABSENT = "LA9634-2"
MSI_ANSWERS = {"LA26203-2": "MSI-H", "LA26202-4": "MSI-L", "LA14122-8": "MSS", "LA11884-6": None}
SIGNIFICANCE_ANSWERS = {
    "LA6668-3": "pathogenic",
    "LA26332-9": "likely pathogenic",
    "LA26333-7": "uncertain significance",
    "LA26334-5": "likely benign",
    "LA6675-8": "benign",
}
ORIGIN_ANSWERS = {"LA6683-2": "germline", "LA6684-0": "somatic"}
SO_GENE_FUSION = "SO:0001565"
TMB_UNIT = "1/1000000{Base}"

POSITIVE_CODES = frozenset({(SNOMED, "10828004"), (LOINC, "LA6576-8")})
NEGATIVE_CODES = frozenset({(SNOMED, "260385009"), (LOINC, "LA6577-6")})
EQUIVOCAL_CODES = frozenset({(SNOMED, "42425007")})
_IHC_SCORES = {"0": "negative", "1+": "negative", "2+": "equivocal", "3+": "positive"}

#: HGNC identifiers of the genes the evidence table names (symbol by HGNC ID).
HGNC_SYMBOLS: dict[str, str] = {
    "HGNC:3236": "EGFR",
    "HGNC:6407": "KRAS",
    "HGNC:1097": "BRAF",
    "HGNC:427": "ALK",
    "HGNC:10261": "ROS1",
    "HGNC:3430": "ERBB2",
    "HGNC:1100": "BRCA1",
    "HGNC:1101": "BRCA2",
    "HGNC:8031": "NTRK1",
    "HGNC:8032": "NTRK2",
    "HGNC:8033": "NTRK3",
    "HGNC:7989": "NRAS",
}

_USABLE_STATUS = frozenset({"final", "amended", "corrected"})

_AMINO_ACIDS = {
    "Ala": "A", "Arg": "R", "Asn": "N", "Asp": "D", "Cys": "C", "Gln": "Q", "Glu": "E",
    "Gly": "G", "His": "H", "Ile": "I", "Leu": "L", "Lys": "K", "Met": "M", "Phe": "F",
    "Pro": "P", "Ser": "S", "Thr": "T", "Trp": "W", "Tyr": "Y", "Val": "V", "Ter": "*",
    "Sec": "U", "Pyl": "O",
}  # fmt: skip
_THREE_LETTER = re.compile("|".join(_AMINO_ACIDS))
_PROTEIN_CHANGE = re.compile(r"^[A-Z*][0-9]+(_[A-Z*][0-9]+)?[A-Za-z0-9*_=]*$")
_POSITIONS = re.compile(r"[A-Z*]([0-9]+)")


@dataclass(frozen=True)
class CancerTypeSpec:
    """A cancer type the evidence table can name, with the codes that mean it."""

    key: str
    display: str
    snomed: frozenset[str]
    icd10_prefixes: tuple[str, ...]
    parent: str | None = None


#: Cancer types by key. ``lung`` is the parent of ``nsclc``: ICD-10-CM C34 does not code the
#: histology, so a C34 patient matches NSCLC evidence only as "histology not coded".
CANCER_TYPES: dict[str, CancerTypeSpec] = {
    spec.key: spec
    for spec in (
        CancerTypeSpec("lung", "lung cancer", frozenset({"363358000", "93880001"}), ("C34",)),
        CancerTypeSpec(
            "nsclc",
            "non-small cell lung cancer",
            frozenset({"254637007", "254626006", "254634000"}),  # NSCLC, adeno, squamous
            (),
            parent="lung",
        ),
        CancerTypeSpec("melanoma", "melanoma", frozenset({"372244006"}), ("C43",)),
        CancerTypeSpec("breast", "breast cancer", frozenset({"254837009"}), ("C50",)),
        CancerTypeSpec(
            "colorectal",
            "colorectal cancer",
            frozenset({"363406005", "363351006"}),
            ("C18", "C19", "C20"),
        ),
        CancerTypeSpec("ovarian", "ovarian cancer", frozenset({"363443007"}), ("C56",)),
        CancerTypeSpec("prostate", "prostate cancer", frozenset({"399068003"}), ("C61",)),
        CancerTypeSpec(
            "solid_other",
            "other solid tumour",
            frozenset({"363418001", "363349007"}),  # pancreas, stomach
            tuple(f"C{n:02d}" for n in range(0, 81)),  # C00-C80: solid sites
        ),
    )
}
#: Every key above is a solid tumour (haematological malignancies are C81-C96).
SOLID_TUMOUR_KEYS = frozenset(CANCER_TYPES)


class BiomarkerKind(StrEnum):
    """The kinds of finding the evidence table can cite."""

    VARIANT = "variant"
    FUSION = "fusion"
    MSI = "msi"
    TMB = "tmb"
    PDL1_TPS = "pd-l1-tps"
    HER2 = "her2"
    ER = "er"
    PR = "pr"


@dataclass(frozen=True)
class Biomarker:
    """One biomarker finding from one Observation."""

    kind: BiomarkerKind
    source: str
    gene: str | None = None
    protein_change: str | None = None  # one-letter HGVS without "p.", e.g. "L858R"
    dna_change: str | None = None
    partner_genes: tuple[str, ...] = ()
    status: str | None = None  # MSI-H / MSI-L / MSS, positive / negative / equivocal
    value: float | None = None  # TMB mut/Mb, PD-L1 TPS %
    origin: str | None = None  # germline / somatic
    significance: str | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("Biomarker.source must name the Observation it came from")
        if self.kind in (BiomarkerKind.VARIANT, BiomarkerKind.FUSION) and not self.gene:
            raise ValueError(f"a {self.kind} finding needs a gene")
        if self.kind in (BiomarkerKind.TMB, BiomarkerKind.PDL1_TPS) and self.value is None:
            raise ValueError(f"a {self.kind} finding needs a value")

    @property
    def description(self) -> str:
        """Human-readable finding, e.g. "EGFR p.L858R" or "PD-L1 TPS 80 %"."""
        if self.kind == BiomarkerKind.VARIANT:
            change = f"p.{self.protein_change}" if self.protein_change else self.dna_change
            return f"{self.gene} {change or 'variant'}"
        if self.kind == BiomarkerKind.FUSION:
            partners = "::".join((*self.partner_genes, self.gene or ""))
            return (
                f"{self.gene} fusion ({partners})" if self.partner_genes else f"{self.gene} fusion"
            )
        if self.kind == BiomarkerKind.TMB:
            return f"TMB {self.value:g} mut/Mb"
        if self.kind == BiomarkerKind.PDL1_TPS:
            return f"PD-L1 TPS {self.value:g} %"
        label = {"msi": "MSI", "her2": "HER2", "er": "ER", "pr": "PR"}[self.kind.value]
        return f"{label} {self.status}"


@dataclass(frozen=True)
class SkippedResource:
    """A resource that gave no finding, and why."""

    reference: str
    reason: str


@dataclass(frozen=True)
class BiomarkerFindings:
    """What :func:`parse_biomarkers` found and what it skipped."""

    biomarkers: tuple[Biomarker, ...]
    skipped: tuple[SkippedResource, ...]


@dataclass(frozen=True)
class CancerType:
    """A cancer type of the patient, from one Condition."""

    key: str
    source: str
    code: str

    def __post_init__(self) -> None:
        if self.key not in CANCER_TYPES:
            raise ValueError(f"unknown cancer type {self.key!r}; known: {sorted(CANCER_TYPES)}")

    @property
    def display(self) -> str:
        """The cancer type's name."""
        return CANCER_TYPES[self.key].display


@dataclass(frozen=True)
class CancerTypes:
    """What :func:`parse_cancer_types` found and what it skipped."""

    cancer_types: tuple[CancerType, ...]
    skipped: tuple[SkippedResource, ...]


# --- helpers --------------------------------------------------------------------------------


def _codings(concept: Any) -> list[tuple[str, str, str]]:
    """(system, code, display) of each coding of a CodeableConcept."""
    if not isinstance(concept, Mapping) or not isinstance(concept.get("coding"), list):
        return []
    out = []
    for coding in concept["coding"]:
        if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
            out.append(
                (str(coding.get("system", "")), coding["code"], str(coding.get("display", "")))
            )
    return out


def _codes(concept: Any, system: str) -> set[str]:
    return {code for sys, code, _ in _codings(concept) if sys == system}


def _reference(resource: Mapping[str, Any]) -> str:
    rid = resource.get("id")
    rtype = resource.get("resourceType", "Observation")
    return f"{rtype}/{rid}" if isinstance(rid, str) and rid else f"{rtype}/?"


def normalise_protein_change(text: str) -> str | None:
    """One-letter protein change without reference or "p.": ``NP_005219.2:p.(Leu858Arg)`` ->
    ``L858R``. Returns None for text that is not a protein change."""
    change = text.strip()
    if ":" in change:
        change = change.rsplit(":", 1)[1]
    if change.startswith("p."):
        change = change[2:]
    change = change.strip("()")
    change = _THREE_LETTER.sub(lambda m: _AMINO_ACIDS[m.group(0)], change)
    return change if _PROTEIN_CHANGE.match(change) else None


def protein_positions(change: str) -> tuple[int, int] | None:
    """First and last residue positions named by a one-letter protein change."""
    found = [int(p) for p in _POSITIONS.findall(change.split("del")[0].split("ins")[0])]
    return (min(found), max(found)) if found else None


def _hgvs_text(value: Any) -> str | None:
    codes = [code for _, code, _ in _codings(value)]
    if codes:
        return codes[0]
    text = value.get("text") if isinstance(value, Mapping) else None
    return text if isinstance(text, str) and text else None


def _gene(value: Any) -> str | tuple[str, str] | None:
    """Gene symbol from a 48018-6 value; a (reason,) tuple when inconsistent."""
    for system, code, display in _codings(value):
        if system == HGNC or code.startswith("HGNC:"):
            symbol = HGNC_SYMBOLS.get(code)
            if symbol and display and display.upper() != symbol:
                return ("inconsistent", f"HGNC {code} is {symbol}, display says {display}")
            return symbol or (display.upper() if display else None)
    text = value.get("text") if isinstance(value, Mapping) else None
    return text.strip().upper() if isinstance(text, str) and text.strip() else None


def _status(obs: Mapping[str, Any]) -> str | None:
    concept = obs.get("valueCodeableConcept")
    pairs = {(system, code) for system, code, _ in _codings(concept)}
    if pairs & POSITIVE_CODES:
        return "positive"
    if pairs & NEGATIVE_CODES:
        return "negative"
    if pairs & EQUIVOCAL_CODES:
        return "equivocal"
    return None


def _ihc_score(obs: Mapping[str, Any]) -> str | None:
    text = obs.get("valueString")
    if not isinstance(text, str):
        concept = obs.get("valueCodeableConcept")
        text = concept.get("text") if isinstance(concept, Mapping) else None
    return _IHC_SCORES.get(text.strip()) if isinstance(text, str) else None


def _percent(obs: Mapping[str, Any], unit: str) -> float | str:
    quantity = obs.get("valueQuantity")
    if not isinstance(quantity, Mapping):
        return "no valueQuantity"
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "valueQuantity has no number"
    code = quantity.get("code") if quantity.get("system", UCUM) == UCUM else None
    if code != unit:
        return f"unit {code!r} is not {unit!r}"
    return float(value)


# --- parsing --------------------------------------------------------------------------------


def _first_answer(value: Any, answers: Mapping[str, str]) -> str | None:
    return next((answers[c] for c in sorted(_codes(value, LOINC)) if c in answers), None)


def _parse_variant(obs: Mapping[str, Any], ref: str) -> Biomarker | str:
    answers = _codes(obs.get("valueCodeableConcept"), LOINC)
    if ABSENT in answers:
        return "variant reported absent"
    if PRESENT not in answers:
        return "variant assessment is not 'Present' (LA9633-4)"
    genes: list[str] = []
    protein = dna = origin = significance = None
    fusion = False
    for component in obs.get("component") or []:
        if not isinstance(component, Mapping):
            continue
        code = _codes(component.get("code"), LOINC)
        tbd = _codes(component.get("code"), GENOMICS_TBD) | _codes(
            component.get("code"), GENOMICS_TBD_CS
        )
        value = component.get("valueCodeableConcept")
        if LOINC_GENE_STUDIED in code:
            gene = _gene(value)
            if isinstance(gene, tuple):
                return gene[1]
            if gene:
                genes.append(gene)
        elif LOINC_AMINO_ACID_CHANGE in code:
            text = _hgvs_text(value)
            protein = normalise_protein_change(text) if text else None
            if text and protein is None:
                return f"amino acid change {text!r} is not an HGVS protein change"
        elif LOINC_DNA_CHANGE in code:
            dna = _hgvs_text(value)
        elif LOINC_DNA_CHANGE_TYPE in code or "molecular-consequence" in tbd:
            fusion = fusion or SO_GENE_FUSION in _codes(value, SEQUENCE_ONTOLOGY)
        elif LOINC_GENOMIC_SOURCE in code:
            origin = next(
                (ORIGIN_ANSWERS[c] for c in _codes(value, LOINC) if c in ORIGIN_ANSWERS), None
            )
        elif LOINC_CLINICAL_SIGNIFICANCE in code:
            significance = next(
                (
                    SIGNIFICANCE_ANSWERS[c]
                    for c in _codes(value, LOINC)
                    if c in SIGNIFICANCE_ANSWERS
                ),
                None,
            )
    if not genes:
        return "variant without a gene studied (48018-6)"
    if fusion:
        # Fusions are cited by their therapeutic target; partners are the other genes named.
        targets = [g for g in genes if g in {"ALK", "ROS1", "NTRK1", "NTRK2", "NTRK3"}]
        gene = targets[0] if targets else genes[-1]
        partners = tuple(g for g in genes if g != gene)
        return Biomarker(
            BiomarkerKind.FUSION, ref, gene=gene, partner_genes=partners, origin=origin
        )
    if len(genes) > 1:
        return f"variant names several genes {genes} but is not a fusion"
    if protein is None and dna is None:
        return "variant without a c.HGVS (48004-6) or p.HGVS (48005-3) change"
    return Biomarker(
        BiomarkerKind.VARIANT,
        ref,
        gene=genes[0],
        protein_change=protein,
        dna_change=dna,
        origin=origin,
        significance=significance,
    )


def _implication_significance(obs: Mapping[str, Any]) -> tuple[list[str], str] | None:
    """(derivedFrom references, significance) of a Diagnostic Implication, if it is one."""
    codes = _codes(obs.get("code"), GENOMICS_TBD) | _codes(obs.get("code"), GENOMICS_TBD_CS)
    if "diagnostic-implication" not in codes:
        return None
    significance = None
    for component in obs.get("component") or []:
        if isinstance(component, Mapping) and LOINC_CLINICAL_SIGNIFICANCE in _codes(
            component.get("code"), LOINC
        ):
            for code in _codes(component.get("valueCodeableConcept"), LOINC):
                significance = SIGNIFICANCE_ANSWERS.get(code, significance)
    refs = [
        str(d.get("reference"))
        for d in obs.get("derivedFrom") or []
        if isinstance(d, Mapping) and d.get("reference")
    ]
    return (refs, significance) if significance else ([], "")


def _parse_one(obs: Mapping[str, Any], ref: str) -> Biomarker | str:
    codes = _codes(obs.get("code"), LOINC)
    if LOINC_VARIANT in codes:
        return _parse_variant(obs, ref)
    if LOINC_MSI in codes:
        answers = _codes(obs.get("valueCodeableConcept"), LOINC) & set(MSI_ANSWERS)
        if not answers:
            return "MSI value is not a LOINC answer of LL3994-2"
        status = MSI_ANSWERS[answers.pop()]
        if status is None:
            return "MSI reported indeterminate"
        return Biomarker(BiomarkerKind.MSI, ref, status=status)
    if LOINC_TMB in codes:
        value = _percent(obs, TMB_UNIT)
        if isinstance(value, str):
            return f"TMB: {value}"
        return Biomarker(BiomarkerKind.TMB, ref, value=value)
    if LOINC_PDL1_TPS in codes:
        value = _percent(obs, "%")
        if isinstance(value, str):
            return f"PD-L1 TPS: {value}"
        if not 0.0 <= value <= 100.0:
            return f"PD-L1 TPS {value:g} % is outside 0-100 %"
        return Biomarker(BiomarkerKind.PDL1_TPS, ref, value=value)
    if codes & LOINC_PDL1_OTHER:
        return "PD-L1 reported without a tumour proportion score (use 83053-9)"
    if codes & (LOINC_HER2_IHC | LOINC_HER2_ISH):
        status = _status(obs)
        if status is None and codes & LOINC_HER2_IHC:
            status = _ihc_score(obs)
        if status is None:
            return "HER2 value is neither a coded positive/negative nor an IHC score"
        return Biomarker(BiomarkerKind.HER2, ref, status=status)
    for kind, code_set in ((BiomarkerKind.ER, LOINC_ER), (BiomarkerKind.PR, LOINC_PR)):
        if codes & code_set:
            status = _status(obs)
            if status is None:
                return f"{kind.value.upper()} value is not a coded positive/negative"
            return Biomarker(kind, ref, status=status)
    return "not a biomarker Observation this model reads"


def parse_biomarkers(observations: Iterable[Mapping[str, Any]]) -> BiomarkerFindings:
    """Read biomarker findings from Observations; everything not used is listed with a reason.

    Diagnostic Implications are applied to the variants they are derived from (clinical
    significance), matched by ``Observation/<id>`` reference.
    """
    findings: list[Biomarker] = []
    skipped: list[SkippedResource] = []
    significance_by_ref: dict[str, str] = {}
    for obs in observations:
        if not isinstance(obs, Mapping) or obs.get("resourceType") != "Observation":
            skipped.append(SkippedResource("?", "not an Observation"))
            continue
        ref = _reference(obs)
        if ref.endswith("/?"):
            skipped.append(SkippedResource(ref, "Observation without an id cannot be cited"))
            continue
        status = obs.get("status")
        if status not in _USABLE_STATUS:
            skipped.append(SkippedResource(ref, f"status {status!r} is not final"))
            continue
        implication = _implication_significance(obs)
        if implication is not None:
            refs, significance = implication
            for target in refs:
                significance_by_ref[target] = significance
            if not refs:
                skipped.append(SkippedResource(ref, "implication without significance/variant"))
            continue
        result = _parse_one(obs, ref)
        if isinstance(result, str):
            skipped.append(SkippedResource(ref, result))
        else:
            findings.append(result)
    resolved = []
    for finding in findings:
        extra = significance_by_ref.get(finding.source)
        if extra and finding.kind == BiomarkerKind.VARIANT and finding.significance is None:
            finding = Biomarker(**{**finding.__dict__, "significance": extra})
        resolved.append(finding)
    return BiomarkerFindings(tuple(resolved), tuple(skipped))


def parse_cancer_types(conditions: Iterable[Mapping[str, Any]]) -> CancerTypes:
    """Cancer types from Condition resources (SNOMED CT or ICD-10-CM).

    The most specific type wins per Condition (a SNOMED code before an ICD-10-CM prefix; a
    specific site before "other solid tumour"). Refuted or entered-in-error Conditions are
    skipped.
    """
    found: list[CancerType] = []
    skipped: list[SkippedResource] = []
    for condition in conditions:
        if not isinstance(condition, Mapping) or condition.get("resourceType") != "Condition":
            skipped.append(SkippedResource("?", "not a Condition"))
            continue
        ref = _reference(condition)
        verification = _codes(
            condition.get("verificationStatus"),
            "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        )
        if verification & {"refuted", "entered-in-error"}:
            skipped.append(SkippedResource(ref, "condition refuted or entered in error"))
            continue
        snomed = _codes(condition.get("code"), SNOMED)
        icd = {c.upper() for c in _codes(condition.get("code"), ICD10CM)}
        match: CancerType | None = None
        for spec in CANCER_TYPES.values():
            hit = snomed & spec.snomed
            if hit:
                match = CancerType(spec.key, ref, sorted(hit)[0])
                break
        if match is None:
            for spec in CANCER_TYPES.values():
                hit_icd = sorted(c for c in icd if c.startswith(spec.icd10_prefixes))
                if hit_icd:
                    match = CancerType(spec.key, ref, hit_icd[0])
                    break
        if match is None:
            skipped.append(SkippedResource(ref, "no cancer type of the evidence table coded"))
        else:
            found.append(match)
    return CancerTypes(tuple(found), tuple(skipped))
