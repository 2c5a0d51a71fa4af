"""Rank biomarker-directed therapies from an evidence table, and the model directory that holds it.

:func:`suggest` matches a patient's :class:`~models.treatment.biomarkers.Biomarker` findings and
cancer types against the rows of ``data/evidence.yaml`` and returns ranked
:class:`TreatmentSuggestion` proposals, each citing the rows (level and source) behind it. They
are decision support: the outputs built from them are CarePlan drafts with intent "proposal",
never orders.

Score of a matching row (documented in every card)::

    score = level weight x cancer-type match x biomarker match  (+ 0.1 if guideline-preferred)

* level weight: level 1 = 1.0, 2 = 0.85, 3A = 0.6;
* cancer-type match: the row's own cancer type 1.0; a tumour-agnostic row 0.9 (a specific
  indication is stronger evidence than a pan-tumour one); NSCLC evidence for a lung cancer whose
  histology is not coded (ICD-10-CM C34) 0.8;
* biomarker match: the exact change / status / threshold named by the row 1.0; a class rule
  (EGFR exon 19 deletion, a codon list, a pathogenic variant of the gene) 0.95; a germline-only
  row matched by a variant whose origin is not stated 0.8.

Rows of the same therapy merge into one suggestion (its best score, all rows cited). A matching
resistance row (level R1) removes that therapy and is reported in
:attr:`TreatmentAssessment.resistance`. A finding no row names gives no suggestion.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from models.card import (
    LabelSpec,
    ModelCard,
    ModelLoadError,
    WeightsSpec,
    read_model_card,
)
from models.provenance import ModelProvenance, device_uid_for
from models.treatment.biomarkers import (
    CANCER_TYPES,
    Biomarker,
    BiomarkerKind,
    CancerType,
    protein_positions,
)

TASK = "treatment-suggestion"
MODEL_NAME = "treatment-evidence"
EVIDENCE_FILE = "evidence.yaml"
DEFAULT_EVIDENCE = Path(__file__).resolve().parent / "data" / EVIDENCE_FILE
SCHEMA = "carebridge.treatment.evidence/1"
RESISTANCE_LEVELS = frozenset({"R1"})
LEVEL_WEIGHTS: dict[str, float] = {"1": 1.0, "2": 0.85, "3A": 0.6}
PREFERRED_BONUS = 0.1
TUMOUR_AGNOSTIC = "solid"
_EXON19_CODONS = (729, 761)

SCORING: dict[str, Any] = {
    "formula": "level weight x cancer-type match x biomarker match (+0.1 if preferred)",
    "level_weights": LEVEL_WEIGHTS,
    "cancer_match": {"exact": 1.0, "tumour-agnostic": 0.9, "histology not coded": 0.8},
    "biomarker_match": {"exact": 1.0, "class rule": 0.95, "origin not stated": 0.8},
    "resistance": "a matching R1 row removes its therapy",
}


class EvidenceTableError(ValueError):
    """The evidence table is malformed; the message names the row and field."""


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drug:
    """One drug of a therapy, with its RxNorm ingredient code."""

    name: str
    rxnorm: str


@dataclass(frozen=True)
class BiomarkerPattern:
    """What finding a row needs (see the header of evidence.yaml)."""

    kind: BiomarkerKind
    genes: tuple[str, ...] = ()
    protein: tuple[str, ...] = ()
    variant_class: str | None = None
    codons: tuple[int, ...] = ()
    origin: str | None = None
    status: str | None = None
    minimum: float | None = None

    def describe(self) -> str:
        """Human-readable biomarker requirement."""
        genes = "/".join(self.genes)
        if self.kind == BiomarkerKind.VARIANT:
            options = [f"p.{p}" for p in self.protein]
            if self.variant_class == "exon19_deletion":
                options.append("exon 19 deletion")
            elif self.variant_class == "pathogenic":
                options.append("pathogenic variant")
            if self.codons:
                options.append(f"mutation at codon {'/'.join(map(str, self.codons))}")
            origin = f" ({self.origin})" if self.origin else ""
            return f"{genes} {' or '.join(options)}{origin}"
        if self.kind == BiomarkerKind.FUSION:
            return f"{genes} fusion"
        if self.kind == BiomarkerKind.TMB:
            return f"TMB >= {self.minimum:g} mut/Mb"
        if self.kind == BiomarkerKind.PDL1_TPS:
            return f"PD-L1 TPS >= {self.minimum:g} %"
        return f"{self.kind.value.upper()} {self.status}"

    def match(self, finding: Biomarker) -> float:
        """Match strength (0 = no match) of one finding against this pattern."""
        if finding.kind != self.kind:
            return 0.0
        if self.kind in (BiomarkerKind.TMB, BiomarkerKind.PDL1_TPS):
            if self.minimum is None or finding.value is None:
                return 0.0
            return 1.0 if finding.value >= self.minimum else 0.0
        if self.kind not in (BiomarkerKind.VARIANT, BiomarkerKind.FUSION):
            return 1.0 if finding.status == self.status else 0.0
        if finding.gene not in self.genes:
            return 0.0
        if self.kind == BiomarkerKind.FUSION:
            return 1.0
        change = finding.protein_change or ""
        strength = 1.0 if change and change in self.protein else self._class_strength(finding)
        if strength and self.origin:
            if finding.origin is None:
                strength *= 0.8
            elif finding.origin != self.origin:
                strength = 0.0
        return strength

    def _class_strength(self, finding: Biomarker) -> float:
        """0.95 when a class rule of the pattern covers the finding, else 0."""
        change = finding.protein_change or ""
        if self.variant_class == "exon19_deletion" and _is_exon19_deletion(change):
            return 0.95
        if self.codons and _is_missense_at(change, self.codons):
            return 0.95
        pathogenic = finding.significance in ("pathogenic", "likely pathogenic")
        if self.variant_class == "pathogenic" and pathogenic:
            return 0.95
        return 0.0


def _is_exon19_deletion(change: str) -> bool:
    if "del" not in change or "fs" in change:
        return False
    positions = protein_positions(change)
    lo, hi = _EXON19_CODONS
    return positions is not None and lo <= positions[0] and positions[1] <= hi


def _is_missense_at(change: str, codons: tuple[int, ...]) -> bool:
    if len(change) < 3 or not change[1:-1].isdigit() or change[-1] in "*=":
        return False
    return int(change[1:-1]) in codons


@dataclass(frozen=True)
class EvidenceRow:
    """One row of the evidence table."""

    id: str
    biomarker: BiomarkerPattern
    cancer: str
    therapy: tuple[Drug, ...]
    level: str
    source_id: str
    citation: str
    setting: str
    preferred: bool = False
    exclude_cancer: tuple[str, ...] = ()
    exclude_if: tuple[BiomarkerPattern, ...] = ()

    @property
    def therapy_name(self) -> str:
        """The drugs of the therapy joined by " + "."""
        return " + ".join(d.name for d in self.therapy)

    @property
    def resistance(self) -> bool:
        """Whether the row records resistance rather than benefit."""
        return self.level in RESISTANCE_LEVELS


@dataclass(frozen=True)
class EvidenceTable:
    """The parsed evidence table and the sha256 of the exact bytes it came from."""

    version: str
    rows: tuple[EvidenceRow, ...]
    levels: Mapping[str, str]
    intended_use: str
    sha256: str

    @classmethod
    def from_bytes(cls, blob: bytes) -> EvidenceTable:
        """Parse and validate evidence YAML; raises :class:`EvidenceTableError`."""
        try:
            data = yaml.safe_load(blob.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise EvidenceTableError(f"evidence table is not valid YAML: {exc}") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise EvidenceTableError(f"evidence table must declare schema {SCHEMA!r}")
        sources = _mapping(data, "sources")
        drugs = _mapping(data, "drugs")
        levels = _mapping(data, "levels")
        rows = [_parse_row(raw, sources, drugs, levels) for raw in data.get("rows") or []]
        ids = [row.id for row in rows]
        if not rows or len(set(ids)) != len(ids):
            raise EvidenceTableError("evidence table needs rows with unique ids")
        return cls(
            version=str(data.get("version", "")),
            rows=tuple(rows),
            levels={str(k): str(v) for k, v in levels.items()},
            intended_use=str(data.get("intended_use", "")),
            sha256=hashlib.sha256(blob).hexdigest(),
        )

    @classmethod
    def load(cls, path: Path = DEFAULT_EVIDENCE) -> EvidenceTable:
        """Read an evidence table file."""
        return cls.from_bytes(Path(path).read_bytes())

    @property
    def drugs(self) -> tuple[Drug, ...]:
        """Every drug the table names, once each, sorted by name."""
        return tuple(sorted({d for row in self.rows for d in row.therapy}, key=lambda d: d.name))


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict) or not value:
        raise EvidenceTableError(f"evidence table needs a non-empty {key!r} mapping")
    return value


def _pattern(raw: Any, where: str) -> BiomarkerPattern:
    if not isinstance(raw, dict):
        raise EvidenceTableError(f"{where}: biomarker must be a mapping")
    try:
        kind = BiomarkerKind(str(raw.get("kind")))
    except ValueError:
        raise EvidenceTableError(f"{where}: unknown biomarker kind {raw.get('kind')!r}") from None
    allowed = {"kind", "genes", "protein", "class", "codons", "origin", "status", "min"}
    unknown = set(raw) - allowed
    if unknown:
        raise EvidenceTableError(f"{where}: unknown biomarker keys {sorted(unknown)}")
    pattern = BiomarkerPattern(
        kind=kind,
        genes=tuple(str(g) for g in raw.get("genes") or ()),
        protein=tuple(str(p) for p in raw.get("protein") or ()),
        variant_class=raw.get("class"),
        codons=tuple(int(c) for c in raw.get("codons") or ()),
        origin=raw.get("origin"),
        status=raw.get("status"),
        minimum=float(raw["min"]) if "min" in raw else None,
    )
    if kind in (BiomarkerKind.VARIANT, BiomarkerKind.FUSION) and not pattern.genes:
        raise EvidenceTableError(f"{where}: a {kind} pattern needs genes")
    if kind == BiomarkerKind.VARIANT and not (
        pattern.protein or pattern.variant_class or pattern.codons
    ):
        raise EvidenceTableError(f"{where}: a variant pattern needs protein, class or codons")
    if pattern.variant_class not in (None, "exon19_deletion", "pathogenic"):
        raise EvidenceTableError(f"{where}: unknown class {pattern.variant_class!r}")
    if kind in (BiomarkerKind.TMB, BiomarkerKind.PDL1_TPS) and pattern.minimum is None:
        raise EvidenceTableError(f"{where}: a {kind} pattern needs min")
    if kind in (BiomarkerKind.MSI, BiomarkerKind.HER2, BiomarkerKind.ER, BiomarkerKind.PR) and (
        not pattern.status
    ):
        raise EvidenceTableError(f"{where}: a {kind} pattern needs status")
    return pattern


def _parse_row(
    raw: Any, sources: Mapping[str, Any], drugs: Mapping[str, Any], levels: Mapping[str, Any]
) -> EvidenceRow:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        raise EvidenceTableError("every evidence row needs an id")
    where = f"row {raw['id']}"
    cancer = raw.get("cancer")
    if cancer != TUMOUR_AGNOSTIC and cancer not in CANCER_TYPES:
        raise EvidenceTableError(f"{where}: unknown cancer type {cancer!r}")
    excluded = tuple(str(c) for c in raw.get("exclude_cancer") or ())
    if any(c not in CANCER_TYPES for c in excluded):
        raise EvidenceTableError(f"{where}: unknown cancer type in exclude_cancer")
    level = str(raw.get("level"))
    if level not in levels or (level not in LEVEL_WEIGHTS and level not in RESISTANCE_LEVELS):
        raise EvidenceTableError(f"{where}: unknown level {level!r}")
    source = str(raw.get("source"))
    if source not in sources:
        raise EvidenceTableError(f"{where}: source {source!r} is not in sources")
    therapy = []
    for name in raw.get("therapy") or ():
        code = drugs.get(name)
        if not isinstance(code, str) or not code.isdigit():
            raise EvidenceTableError(f"{where}: drug {name!r} has no RxNorm code in drugs")
        therapy.append(Drug(str(name), code))
    if not therapy:
        raise EvidenceTableError(f"{where}: therapy must name at least one drug")
    return EvidenceRow(
        id=raw["id"],
        biomarker=_pattern(raw.get("biomarker"), where),
        cancer=str(cancer),
        therapy=tuple(therapy),
        level=level,
        source_id=str(source),
        citation=str(sources[source]),
        setting=str(raw.get("setting", "")),
        preferred=bool(raw.get("preferred", False)),
        exclude_cancer=excluded,
        exclude_if=tuple(_pattern(p, f"{where} exclude_if") for p in raw.get("exclude_if") or ()),
    )


# --- matching and scoring -------------------------------------------------------------------


@dataclass(frozen=True)
class CitedEvidence:
    """One evidence row behind a suggestion, with the findings that matched it."""

    row_id: str
    level: str
    level_text: str
    source_id: str
    citation: str
    requirement: str
    cancer: str
    setting: str
    matched_findings: tuple[str, ...]
    score: float


@dataclass(frozen=True)
class TreatmentSuggestion:
    """One proposed therapy, ranked, with the evidence it rests on."""

    rank: int
    therapy: str
    drugs: tuple[Drug, ...]
    score: float
    evidence: tuple[CitedEvidence, ...]
    basis: tuple[str, ...]
    rationale: str
    provenance: ModelProvenance | None = None

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.drugs or not self.evidence:
            raise ValueError("a suggestion needs a rank, drugs and cited evidence")


@dataclass(frozen=True)
class TreatmentAssessment:
    """Suggestions, resistance evidence found, and findings no row names."""

    suggestions: tuple[TreatmentSuggestion, ...]
    resistance: tuple[CitedEvidence, ...] = ()
    findings_without_evidence: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def _cancer_match(row: EvidenceRow, cancers: Sequence[CancerType]) -> tuple[float, list[str]]:
    """(strength, Condition references) of the patient's cancer types for a row."""
    keys = {c.key for c in cancers}
    if row.cancer == TUMOUR_AGNOSTIC:
        if keys & set(row.exclude_cancer):
            return 0.0, []
        refs = [c.source for c in cancers]
        return (0.9, refs) if refs else (0.0, [])
    exact = [c.source for c in cancers if c.key == row.cancer]
    if exact:
        return 1.0, exact
    parent = CANCER_TYPES[row.cancer].parent
    loose = [c.source for c in cancers if parent and c.key == parent]
    return (0.8, loose) if loose else (0.0, [])


def _therapy_key(row: EvidenceRow) -> tuple[str, ...]:
    return tuple(sorted(d.rxnorm for d in row.therapy))


def assess(
    biomarkers: Sequence[Biomarker],
    cancer_types: Sequence[CancerType],
    table: EvidenceTable | None = None,
    provenance: ModelProvenance | None = None,
) -> TreatmentAssessment:
    """Match findings and cancer types against the table; rank, cite and explain."""
    table = table or EvidenceTable.load()
    matched: dict[tuple[str, ...], list[tuple[EvidenceRow, CitedEvidence, list[str]]]] = {}
    resistance: list[CitedEvidence] = []
    used_findings: set[str] = set()
    notes: list[str] = []
    for row in table.rows:
        cancer_strength, cancer_refs = _cancer_match(row, cancer_types)
        if cancer_strength == 0.0:
            continue
        hits = [(f, row.biomarker.match(f)) for f in biomarkers]
        hits = [(f, s) for f, s in hits if s > 0.0]
        if not hits:
            continue
        blockers = [f for p in row.exclude_if for f in biomarkers if p.match(f) > 0]
        if blockers:
            used_findings.update(f.source for f, _ in hits)
            notes.append(
                f"{row.id} not applied: the label excludes "
                f"{', '.join(sorted({f.description for f in blockers}))}"
            )
            continue
        strength = max(s for _, s in hits)
        weight = LEVEL_WEIGHTS.get(row.level, 1.0)
        score = weight * cancer_strength * strength + (PREFERRED_BONUS if row.preferred else 0.0)
        cited = CitedEvidence(
            row_id=row.id,
            level=row.level,
            level_text=table.levels.get(row.level, ""),
            source_id=row.source_id,
            citation=row.citation,
            requirement=row.biomarker.describe(),
            cancer="solid tumours (tumour-agnostic)"
            if row.cancer == TUMOUR_AGNOSTIC
            else CANCER_TYPES[row.cancer].display,
            setting=row.setting,
            matched_findings=tuple(f.description for f, _ in hits),
            score=round(score, 4),
        )
        refs = [f.source for f, _ in hits] + cancer_refs
        if row.resistance:
            resistance.append(cited)
            used_findings.update(f.source for f, _ in hits)
            continue
        used_findings.update(f.source for f, _ in hits)
        matched.setdefault(_therapy_key(row), []).append((row, cited, refs))

    resisted = {_therapy_key(row) for row in table.rows if row.id in {r.row_id for r in resistance}}
    ranked: list[tuple[float, EvidenceRow, tuple[CitedEvidence, ...], tuple[str, ...]]] = []
    for key, entries in matched.items():
        if key in resisted:
            continue
        entries.sort(key=lambda e: -e[1].score)
        best_row, best_cited, _ = entries[0]
        basis = tuple(sorted({ref for _, _, refs in entries for ref in refs}))
        ranked.append((best_cited.score, best_row, tuple(c for _, c, _ in entries), basis))
    ranked.sort(key=lambda item: (-item[0], item[1].therapy_name))

    suggestions = []
    for rank, (score, best_row, cited_rows, basis) in enumerate(ranked, start=1):
        suggestions.append(
            TreatmentSuggestion(
                rank=rank,
                therapy=best_row.therapy_name,
                drugs=best_row.therapy,
                score=round(score, 4),
                evidence=cited_rows,
                basis=basis,
                rationale=_rationale(best_row.therapy_name, cited_rows, resistance),
                provenance=provenance,
            )
        )
    unexplained = tuple(f.description for f in biomarkers if f.source not in used_findings)
    if any(c.key == "lung" for c in cancer_types):
        notes.append("lung cancer histology not coded: NSCLC evidence applied at reduced weight")
    return TreatmentAssessment(
        suggestions=tuple(suggestions),
        resistance=tuple(resistance),
        findings_without_evidence=unexplained,
        notes=tuple(notes),
    )


def _rationale(
    therapy: str, cited: Sequence[CitedEvidence], resistance: Sequence[CitedEvidence]
) -> str:
    first = cited[0]
    findings = ", ".join(first.matched_findings)
    text = (
        f'{therapy}: {findings} in {first.cancer} meets "{first.requirement}" '
        f"(evidence level {first.level}; {first.setting}). Source: {first.citation}"
    )
    if len(cited) > 1:
        text += f" Also supported by {len(cited) - 1} further row(s): " + "; ".join(
            f"{c.row_id} (level {c.level})" for c in cited[1:]
        )
        text += "."
    if resistance:
        text += " Resistance noted for: " + "; ".join(
            f"{c.row_id} ({', '.join(c.matched_findings)})" for c in resistance
        )
        text += "."
    return text + " Proposal for clinician review, not an order."


def suggest(
    biomarkers: Sequence[Biomarker],
    cancer_types: Sequence[CancerType],
    table: EvidenceTable | None = None,
) -> list[TreatmentSuggestion]:
    """Ranked therapy suggestions for the findings and cancer types (packaged table default)."""
    return list(assess(biomarkers, cancer_types, table).suggestions)


# --- the model directory --------------------------------------------------------------------


def _atomic_write(target: Path, blob: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_model_dir(out_dir: Path, evidence: Path = DEFAULT_EVIDENCE) -> Path:
    """Write a treatment-suggestion model directory: the evidence table as its weights file.

    The card records the table's sha256 (so every output names the exact table), its version as
    the model version, the drugs as coded labels (RxNorm) and the scoring rule. ``demo`` is
    false: the table is curated from public sources, not trained on generated data; the card's
    intended use says it is decision support, never orders. Returns ``out_dir``.
    """
    blob = Path(evidence).read_bytes()
    table = EvidenceTable.from_bytes(blob)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = table.version or "unversioned"
    card = ModelCard(
        name=MODEL_NAME,
        version=version,
        device_uid=device_uid_for(MODEL_NAME, version),
        task=TASK,
        labels=tuple(
            LabelSpec(name=d.name, code_value=d.rxnorm, coding_scheme="RXNORM", code_meaning=d.name)
            for d in table.drugs
        ),
        input={
            "observations": "genomic and biomarker Observations (HL7 Genomics Reporting IG, "
            "mCODE), see models.treatment.biomarkers",
            "conditions": "cancer type Conditions (SNOMED CT, ICD-10-CM)",
        },
        preprocessing={"id": "carebridge.treatment.biomarkers/1"},
        weights=WeightsSpec(file=EVIDENCE_FILE, sha256=table.sha256),
        architecture={"family": "carebridge.treatment.EvidenceTable", "scoring": SCORING},
        training={
            "data": "curated evidence table (FDA prescribing information, pivotal trials); "
            "not trained",
            "rows": len(table.rows),
            "intended_use": table.intended_use,
            "output": "proposals only: CarePlan status draft, intent proposal; CDS Hooks cards",
        },
        metrics={},
        demo=False,
        manufacturer="carebridge",
        created=datetime.now(UTC).replace(microsecond=0),
    )
    _atomic_write(out / EVIDENCE_FILE, blob)
    _atomic_write(out / "model-card.json", card.to_json().encode("utf-8"))
    return out


class TreatmentModel:
    """A loaded evidence table with its card, ready to suggest."""

    def __init__(self, table: EvidenceTable, card: ModelCard) -> None:
        """Wrap a table whose sha256 matches ``card``; prefer :meth:`load`."""
        if table.sha256 != card.weights.sha256:
            raise ModelLoadError("evidence table does not match its card")
        self.table = table
        self.card = card
        self.provenance: ModelProvenance = card.provenance

    @classmethod
    def load(cls, model_dir: Path) -> TreatmentModel:
        """Read the card, check task and sha256 on the exact bytes parsed, parse the table.

        Raises :class:`ModelLoadError` saying what is wrong and what to do.
        """
        card = read_model_card(Path(model_dir))
        if card.task != TASK:
            raise ModelLoadError(
                f"model {card.name} {card.version} has task {card.task!r}, expected {TASK!r}: "
                "configure the right pipeline for it or write it with build_model_dir"
            )
        path = Path(model_dir) / card.weights.file
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(
                f"evidence table {card.weights.file!r} of {card.name} {card.version} cannot be "
                f"read ({exc.__class__.__name__}): write the model directory again"
            ) from exc
        actual = hashlib.sha256(blob).hexdigest()
        if actual != card.weights.sha256:
            raise ModelLoadError(
                f"evidence table {card.weights.file!r} of {card.name} {card.version} does not "
                f"match its card: card sha256 {card.weights.sha256}, file sha256 {actual}. "
                "Restore the right file or write the model directory again"
            )
        try:
            table = EvidenceTable.from_bytes(blob)
        except EvidenceTableError as exc:
            raise ModelLoadError(f"evidence table of {card.name} is invalid: {exc}") from exc
        return cls(table, card)

    def assess(
        self, biomarkers: Sequence[Biomarker], cancer_types: Sequence[CancerType]
    ) -> TreatmentAssessment:
        """Suggestions (with this model's provenance), resistance and unexplained findings."""
        return assess(biomarkers, cancer_types, self.table, self.provenance)

    def suggest(
        self, biomarkers: Sequence[Biomarker], cancer_types: Sequence[CancerType]
    ) -> list[TreatmentSuggestion]:
        """Ranked suggestions carrying this model's provenance."""
        return list(self.assess(biomarkers, cancer_types).suggestions)
