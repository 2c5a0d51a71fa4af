"""Symptom analysis: a clinical note in, ranked coded conditions with calibrated confidence out.

How a note is read
    1. The note is split into sentences; the knowledge base's finding phrases (with synonyms and
       abbreviations), condition names and vital signs are found in each (:mod:`knowledge`).
    2. ConText (:mod:`context`) decides for each mention whether it is negated, about a
       relative, historical, hypothetical or merely possible. Only *affirmed* mentions (none of
       those) are evidence for a condition; explicitly negated findings about the patient now
       ("denies fever", "afebrile", "HR 78") are evidence against.
    3. The text that asserts something about the patient now -- the note minus every ConText
       scope, categorised section and absent-finding phrase -- is embedded with the MiniLM
       encoder (:mod:`encoder`), so "denies chest pain" never reaches the encoder as chest pain.

How conditions are scored
    For condition ``c`` with finding set ``S_c`` and finding weights ``w_f = ln(1 + N/n_f)``
    (``n_f`` conditions list finding ``f``), with ``A`` the affirmed and ``D`` the negated
    findings of the note and ``e`` the unit-length note embedding::

        logit_c = W_c . e + b_c                              (the seed's encoder + linear head)
                + a_1 * cos_w(A, S_c)                        (tf-idf cosine, affirmed findings)
                + a_2 * sum_{f in D & S_c} w_f^2 / |S_c|_w^2 (share of S_c explicitly absent)
                + a_3 * [c named, affirmed] + a_4 * [c named, negated]
                + a_5 * cos(e, p_c)                          (p_c: embedding of c's KB entry)

    This is multinomial logistic regression over the encoder features plus five knowledge-base
    evidence features whose coefficients ``a`` are learnt jointly with ``W``, ``b`` by
    cross-entropy. The KB terms carry what the head cannot learn from few examples (specific
    signs, negation); the encoder carries paraphrases no term list has.

How confidence is calibrated
    Probabilities are ``softmax(logits / T)``; the temperature ``T`` is fitted by minimising
    the negative log-likelihood on held-out notes (temperature scaling, Guo et al., ICML 2017)
    and stored in the model card (``architecture.calibration.temperature``).

Outputs are provisional and unverified; demo models say so (``provenance.demo``). Nothing here
logs note text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from models.card import ModelCard, ModelLoadError, load_weights, read_model_card
from models.device import resolve_device
from models.provenance import CodedLabel, ModelProvenance
from models.symptoms.context import Category, ConText, ContextRules
from models.symptoms.encoder import EMBEDDING_DIM, EncoderInfo, SentenceEncoder, encoder_info
from models.symptoms.knowledge import (
    Code,
    Condition,
    FindingMatcher,
    KnowledgeBase,
    Target,
    TargetKind,
)

TASK = "symptom-analysis"
PREPROCESSING_ID = "symptoms-context-v1"
ARCHITECTURE_FAMILY = "minilm-mean-pool+linear+kb-evidence"
#: Evidence features, in the order of the learnt coefficients ``a``.
EVIDENCE_FEATURES = (
    "kb_affirmed_cosine",
    "kb_negated_share",
    "name_affirmed",
    "name_negated",
    "prototype_cosine",
)
DEFAULT_TOP_K = 5


# --- outputs ------------------------------------------------------------------------------


class MentionStatus(StrEnum):
    """What a note says about a mentioned finding or condition."""

    AFFIRMED = "affirmed"
    NEGATED = "negated"
    FAMILY = "family"
    HISTORICAL = "historical"
    HYPOTHETICAL = "hypothetical"
    POSSIBLE = "possible"


@dataclass(frozen=True)
class Mention:
    """A finding or condition named in the note, where, and what ConText decided about it.

    ``start``/``end`` and ``sentence_start``/``sentence_end`` are character offsets into the note.
    ``absent`` is set when the phrase itself says the finding is absent ("afebrile", "HR 72").
    """

    kind: TargetKind
    ref: str
    display: str
    text: str
    start: int
    end: int
    sentence_start: int
    sentence_end: int
    categories: frozenset[Category]
    absent: bool = False
    source: str = "term"

    @property
    def negated(self) -> bool:
        """Whether the note says this is absent ("no fever", "afebrile"; "not afebrile" is not)."""
        return (Category.NEGATED_EXISTENCE in self.categories) != self.absent

    @property
    def status(self) -> MentionStatus:
        """The single status the mention counts under (relatives and time before negation)."""
        if Category.FAMILY in self.categories:
            return MentionStatus.FAMILY
        if Category.HYPOTHETICAL in self.categories:
            return MentionStatus.HYPOTHETICAL
        if Category.POSSIBLE in self.categories:
            return MentionStatus.POSSIBLE
        if Category.HISTORICAL in self.categories:
            return MentionStatus.HISTORICAL
        return MentionStatus.NEGATED if self.negated else MentionStatus.AFFIRMED

    @property
    def affirmed(self) -> bool:
        """Present now, in the patient, and asserted: the only mentions that count as evidence."""
        return self.status is MentionStatus.AFFIRMED


@dataclass(frozen=True)
class RankedCondition:
    """One condition of the ranking: codes, calibrated confidence and the mentions behind it."""

    rank: int
    condition_id: str
    display: str
    icd10cm: Code
    snomed: Code
    confidence: float
    evidence: tuple[Mention, ...]

    @property
    def coded_label(self) -> CodedLabel:
        """The condition coded in SNOMED CT (the model's label)."""
        return CodedLabel(self.condition_id, self.snomed.code, "SCT", self.snomed.display)


@dataclass(frozen=True)
class SymptomAnalysis:
    """The result for one note: ranked conditions, every mention, and what produced them."""

    conditions: tuple[RankedCondition, ...]
    mentions: tuple[Mention, ...]
    provenance: ModelProvenance
    encoder_sha256: str
    knowledge_base_sha256: str
    temperature: float

    @property
    def affirmed_mentions(self) -> tuple[Mention, ...]:
        """Mentions that count as evidence (present, in the patient, now, asserted)."""
        return tuple(m for m in self.mentions if m.affirmed)

    @property
    def has_evidence(self) -> bool:
        """Whether the note affirms any known finding or condition (else the ranking is weak)."""
        return any(m.affirmed for m in self.mentions)

    @property
    def top(self) -> RankedCondition:
        """The most probable condition."""
        return self.conditions[0]


# --- features -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteEvidence:
    """What the featurizer read from one note before the encoder runs."""

    mentions: tuple[Mention, ...]
    asserted_text: str
    kb_features: torch.Tensor  # (len(EVIDENCE_FEATURES) - 1, N)


class NoteFeaturizer:
    """Reads notes into mentions, asserted text and knowledge-base evidence features."""

    def __init__(self, kb: KnowledgeBase, context: ConText) -> None:
        """Prepare the matcher and finding weights of ``kb``."""
        self.kb = kb
        self.context = context
        self.matcher = FindingMatcher(kb)
        self._index = {c.id: i for i, c in enumerate(kb.conditions)}
        weights = kb.finding_weights()
        fids = list(kb.findings)
        self._fid_index = {f: i for i, f in enumerate(fids)}
        w = torch.tensor([weights[f] for f in fids], dtype=torch.float32)
        member = torch.zeros(len(kb.conditions), len(fids))
        for ci, condition in enumerate(kb.conditions):
            for fid in condition.findings:
                member[ci, self._fid_index[fid]] = 1.0
        self._w2 = w * w
        # Weighted membership: M[c, f] = w_f^2 if f in S_c; |S_c|_w^2 = sum_f M[c, f].
        self._m = member * self._w2
        self._norm2 = self._m.sum(dim=1)

    def read(self, text: str) -> NoteEvidence:
        """Mentions, asserted text and evidence features of one note."""
        if not isinstance(text, str):
            raise TypeError(f"a clinical note must be text, got {type(text).__name__}")
        sentences = self.context.sentences(text)
        targets: list[Target] = []
        for sentence in sentences:
            targets.extend(self.matcher.targets(text, sentence))
        result = self.context.annotate(text, [(t.start, t.end) for t in targets], sentences)
        mentions = tuple(
            Mention(
                kind=t.kind,
                ref=t.ref,
                display=self._display(t),
                text=text[t.start : t.end],
                start=t.start,
                end=t.end,
                sentence_start=ctx.sentence.start,
                sentence_end=ctx.sentence.end,
                categories=ctx.categories,
                absent=t.absent,
                source=t.source,
            )
            for t, ctx in zip(targets, result.contexts, strict=True)
        )
        removed = list(result.unasserted)
        removed.extend((m.start, m.end) for m in mentions if m.absent)
        return NoteEvidence(
            mentions, _asserted_text(text, result.sentences, removed), self._kb(mentions)
        )

    def _display(self, target: Target) -> str:
        if target.kind is TargetKind.FINDING:
            return self.kb.findings[target.ref].display
        return self.kb.conditions[self._index[target.ref]].display

    def _kb(self, mentions: Sequence[Mention]) -> torch.Tensor:
        n_f = len(self._fid_index)
        present = torch.zeros(n_f)
        absent = torch.zeros(n_f)
        named = torch.zeros(len(self._index))
        named_not = torch.zeros(len(self._index))
        for m in mentions:
            status = m.status
            if m.kind is TargetKind.FINDING:
                if status is MentionStatus.AFFIRMED:
                    present[self._fid_index[m.ref]] = 1.0
                elif status is MentionStatus.NEGATED:
                    absent[self._fid_index[m.ref]] = 1.0
            elif status is MentionStatus.AFFIRMED:
                named[self._index[m.ref]] = 1.0
            elif status is MentionStatus.NEGATED:
                named_not[self._index[m.ref]] = 1.0
        absent = absent * (1.0 - present)  # affirmed anywhere in the note wins
        note_norm = torch.sqrt((present * self._w2).sum())
        if note_norm > 0:
            cosine = (self._m @ present) / (torch.sqrt(self._norm2) * note_norm)
        else:
            cosine = torch.zeros(len(self._index))
        negated_share = (self._m @ absent) / self._norm2
        return torch.stack([cosine, negated_share, named, named_not])


def _asserted_text(text: str, sentences: Sequence[Any], removed: Sequence[tuple[int, int]]) -> str:
    """The note's sentences with the removed ranges cut out, one sentence per line."""
    cuts = sorted(removed)
    pieces: list[str] = []
    for sentence in sentences:
        parts: list[str] = []
        pos = sentence.start
        for start, end in cuts:
            if end <= pos or start >= sentence.end:
                continue
            if start > pos:
                parts.append(text[pos:start])
            pos = max(pos, end)
        if pos < sentence.end:
            parts.append(text[pos : sentence.end])
        kept = " ".join(" ".join(p.split()) for p in parts if p.strip())
        if any(ch.isalnum() for ch in kept):
            pieces.append(kept)
    return "\n".join(pieces)


def condition_prototype_text(condition: Condition, kb: KnowledgeBase) -> str:
    """The text whose embedding stands for a condition: its name and typical findings."""
    findings = ", ".join(kb.findings[f].display.lower() for f in condition.findings)
    return f"{condition.display}: {findings}."


# --- the model ----------------------------------------------------------------------------


class SymptomHead(torch.nn.Module):
    """Linear head over the note embedding plus learnt weights of the evidence features."""

    def __init__(self, num_conditions: int, dim: int = EMBEDDING_DIM) -> None:
        """An untrained head for ``num_conditions`` conditions."""
        super().__init__()
        self.linear = torch.nn.Linear(dim, num_conditions)
        self.evidence = torch.nn.Parameter(torch.zeros(len(EVIDENCE_FEATURES)))
        self.register_buffer("prototypes", torch.zeros(num_conditions, dim))
        self.prototypes: torch.Tensor

    def forward(self, embedding: torch.Tensor, kb_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, N) from embeddings (B, D) and KB features (B, F-1, N)."""
        prototype = (embedding @ self.prototypes.T).unsqueeze(1)
        features = torch.cat([kb_features, prototype], dim=1)
        return self.linear(embedding) + torch.einsum("f,bfn->bn", self.evidence, features)


def architecture_spec(
    kb: KnowledgeBase, encoder: EncoderInfo, temperature: float
) -> dict[str, Any]:
    """The ``architecture`` entry of a symptom model's card."""
    return {
        "family": ARCHITECTURE_FAMILY,
        "encoder": encoder.as_card(),
        "head": "linear",
        "embedding_dim": EMBEDDING_DIM,
        "num_classes": len(kb.conditions),
        "evidence_features": list(EVIDENCE_FEATURES),
        "calibration": {"method": "temperature scaling", "temperature": temperature},
    }


def preprocessing_spec(kb: KnowledgeBase, rules: ContextRules) -> dict[str, Any]:
    """The ``preprocessing`` entry of a symptom model's card."""
    return {
        "id": PREPROCESSING_ID,
        "knowledge_base": {"file": kb.file_name, "version": kb.version, "sha256": kb.sha256},
        "context_rules": {"file": "context_rules.yaml", "sha256": rules.sha256},
        "encoder_input": "asserted text (ConText scopes, categorised sections and absent "
        "findings removed)",
    }


INPUT_SPEC: dict[str, Any] = {"type": "clinical-note-text", "language": "en"}


def check_card(
    card: ModelCard, kb: KnowledgeBase, rules: ContextRules, encoder: EncoderInfo
) -> float:
    """Raise :class:`ModelLoadError` unless this code can run ``card``; return its temperature."""
    problems: list[str] = []
    if card.task != TASK:
        problems.append(f"task is {card.task!r}, expected {TASK!r}")
    want = tuple(c.coded_label for c in kb.conditions)
    if card.coded_labels != want:
        problems.append(
            f"labels ({len(card.labels)}) are not the {len(want)} conditions of knowledge base "
            f"{kb.version} in order"
        )
    pre = card.preprocessing
    if pre.get("id") != PREPROCESSING_ID:
        problems.append(f"preprocessing id is {pre.get('id')!r}, expected {PREPROCESSING_ID!r}")
    kb_entry = pre.get("knowledge_base")
    kb_sha = kb_entry.get("sha256") if isinstance(kb_entry, dict) else None
    if kb_sha != kb.sha256:
        problems.append(
            f"it was trained with knowledge base sha256 {kb_sha}, this installation has "
            f"{kb.sha256} ({kb.file_name} {kb.version}): retrain it with this knowledge base"
        )
    rules_entry = pre.get("context_rules")
    rules_sha = rules_entry.get("sha256") if isinstance(rules_entry, dict) else None
    if rules_sha != rules.sha256:
        problems.append(
            f"it was trained with ConText rules sha256 {rules_sha}, this installation has "
            f"{rules.sha256}: retrain it with these rules"
        )
    arch = card.architecture
    if arch.get("family") != ARCHITECTURE_FAMILY:
        problems.append(
            f"architecture family is {arch.get('family')!r}, expected {ARCHITECTURE_FAMILY!r}"
        )
    if arch.get("evidence_features") != list(EVIDENCE_FEATURES):
        problems.append(f"evidence features are {arch.get('evidence_features')}")
    enc = arch.get("encoder")
    enc_sha = enc.get("weights_sha256") if isinstance(enc, dict) else None
    if enc_sha != encoder.weights_sha256:
        problems.append(
            f"it was trained on encoder weights sha256 {enc_sha}, the installed "
            f"{encoder.package} {encoder.version} has {encoder.weights_sha256}: install the "
            "encoder it was trained with or retrain it"
        )
    calibration = arch.get("calibration")
    temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
    if not isinstance(temperature, int | float) or not 0.01 <= float(temperature) <= 100.0:
        problems.append(f"calibration temperature {temperature!r} is not a positive number")
        temperature = 1.0
    if problems:
        raise ModelLoadError(
            f"model {card.name} {card.version} cannot be used for symptom analysis here: "
            f"{'; '.join(problems)}"
        )
    return float(temperature)


class SymptomAnalyzer:
    """A loaded symptom model: reads notes and ranks the knowledge base's conditions."""

    def __init__(
        self,
        head: SymptomHead,
        card: ModelCard,
        featurizer: NoteFeaturizer,
        encoder: SentenceEncoder,
        temperature: float,
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        """Wrap a head whose weights match ``card``; prefer :meth:`load`."""
        if top_k < 1:
            raise ValueError("top_k must be positive")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.head = head.to(encoder.device).eval()
        self.card = card
        self.provenance: ModelProvenance = card.provenance
        self.featurizer = featurizer
        self.encoder = encoder
        self.temperature = temperature
        self.top_k = top_k

    @property
    def kb(self) -> KnowledgeBase:
        """The knowledge base whose conditions the model ranks."""
        return self.featurizer.kb

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: str = "cpu",
        *,
        top_k: int = DEFAULT_TOP_K,
        knowledge_base: KnowledgeBase | None = None,
        rules: ContextRules | None = None,
    ) -> SymptomAnalyzer:
        """Load a model directory written by :mod:`models.symptoms.train`.

        Reads and checks the card, refuses a model made for another knowledge base, ConText
        rules or encoder, verifies the weights' sha256 and loads them. ``device`` is ``"cpu"``,
        ``"cuda"``/``"cuda:N"`` or ``"auto"``. Raises :class:`ModelLoadError` saying what to do.
        """
        model_dir = Path(model_dir)
        card = read_model_card(model_dir)
        kb = knowledge_base or KnowledgeBase.from_yaml()
        context_rules = rules or ContextRules.from_yaml()
        temperature = check_card(card, kb, context_rules, encoder_info())
        resolved = resolve_device(device)
        state = load_weights(model_dir, card, map_location="cpu")
        head = SymptomHead(len(kb.conditions))
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"weights of model {card.name} {card.version} do not fit the symptom head "
                "named by its card: write the model directory again with models.symptoms.train"
            ) from exc
        featurizer = NoteFeaturizer(kb, ConText(context_rules))
        return cls(head, card, featurizer, SentenceEncoder.shared(resolved), temperature, top_k)

    def logits(self, evidence: Sequence[NoteEvidence]) -> torch.Tensor:
        """Uncalibrated logits (B, N) of notes already read by the featurizer."""
        if not evidence:
            return torch.zeros(0, len(self.kb.conditions))
        embedding = self.encoder.embed([e.asserted_text for e in evidence])
        kb_features = torch.stack([e.kb_features for e in evidence])
        device = self.encoder.device
        with torch.inference_mode():
            return self.head(embedding.to(device), kb_features.to(device)).float().cpu()

    def analyze(self, text: str, *, top_k: int | None = None) -> SymptomAnalysis:
        """Rank the conditions a clinical note suggests (see :meth:`analyze_many`)."""
        return self.analyze_many([text], top_k=top_k)[0]

    def analyze_many(
        self, texts: Sequence[str], *, top_k: int | None = None
    ) -> list[SymptomAnalysis]:
        """Rank the conditions each note suggests; notes are encoded in batches.

        Each result lists the ``top_k`` most probable conditions (calibrated confidence in
        [0, 1] over all conditions), each with its ICD-10-CM and SNOMED CT codes and the
        affirmed mentions that support it, plus every mention found in the note.
        """
        k = self.top_k if top_k is None else top_k
        if k < 1:
            raise ValueError("top_k must be positive")
        evidence = [self.featurizer.read(text) for text in texts]
        probabilities = torch.softmax(self.logits(evidence) / self.temperature, dim=-1)
        enc_sha = self.encoder.info.weights_sha256
        results = []
        for ev, probs in zip(evidence, probabilities, strict=True):
            values, indices = torch.topk(probs, min(k, probs.numel()))
            ranked = []
            for rank, (p, i) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), 1):
                condition = self.kb.conditions[i]
                members = set(condition.findings)
                support = tuple(
                    m
                    for m in ev.mentions
                    if m.affirmed
                    and (
                        (m.kind is TargetKind.FINDING and m.ref in members)
                        or (m.kind is TargetKind.CONDITION and m.ref == condition.id)
                    )
                )
                ranked.append(
                    RankedCondition(
                        rank=rank,
                        condition_id=condition.id,
                        display=condition.display,
                        icd10cm=condition.icd10cm,
                        snomed=condition.snomed,
                        confidence=float(min(1.0, max(0.0, p))),
                        evidence=support,
                    )
                )
            results.append(
                SymptomAnalysis(
                    conditions=tuple(ranked),
                    mentions=ev.mentions,
                    provenance=self.provenance,
                    encoder_sha256=enc_sha,
                    knowledge_base_sha256=self.kb.sha256,
                    temperature=self.temperature,
                )
            )
        return results
