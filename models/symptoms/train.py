"""Train, calibrate and evaluate the symptom model; write it as a model directory.

* :func:`train_demo` trains the head on notes generated from the knowledge base
  (:mod:`models.symptoms.synthetic`) and writes a model directory whose card says
  ``demo: true``. It never sees patient data and must never be used on patients.
* :func:`train_head_from_csv` trains the head on a user CSV with columns ``note,label`` (label:
  a condition id of the knowledge base or its ICD-10-CM code), optionally starting from an
  existing model directory. Generated notes for every condition are mixed in so conditions the
  CSV does not cover keep a sensible score.
* :func:`evaluate_notes` reports top-1/top-3 accuracy and calibration on labelled notes, e.g.
  the hand-written notes of ``data/eval_notes.yaml`` (:func:`load_eval_notes`).

The encoder stays frozen (its weights are the package's, identified by sha256 in the card);
training fits the linear head and the evidence coefficients by full-batch L-BFGS on
cross-entropy with an L2 prior (see :func:`_fit`), then fits the calibration temperature on
held-out notes by minimising their negative log-likelihood. ``epochs`` counts L-BFGS iterations,
each at least one pass over all training notes.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from pydantic import JsonValue

from models.card import (
    LabelSpec,
    ModelCardDraft,
    ModelLoadError,
    load_weights,
    read_model_card,
    write_model_dir,
)
from models.symptoms.analyzer import (
    EVIDENCE_FEATURES,
    INPUT_SPEC,
    TASK,
    NoteFeaturizer,
    SymptomAnalyzer,
    SymptomHead,
    architecture_spec,
    check_card,
    condition_prototype_text,
    preprocessing_spec,
    resolve_device,
)
from models.symptoms.context import ConText, ContextRules
from models.symptoms.encoder import SentenceEncoder, encoder_info
from models.symptoms.knowledge import KnowledgeBase
from models.symptoms.synthetic import GENERATOR_ID, generate_notes

MODEL_NAME = "symptoms-minilm"
DEMO_VERSION = "0.1.0-demo"
DEFAULT_EVAL_NOTES = Path(__file__).resolve().parent / "data" / "eval_notes.yaml"

_L2 = 1e-3
_EVIDENCE_DROPOUT = 0.3
_EMBED_BATCH = 256

_OPTIMIZER = (
    f"full-batch L-BFGS (strong Wolfe), cross-entropy + {_L2} * |W - W_prior|^2 on the linear head"
)

Progress = Callable[[str], None]


class TrainingDataError(ValueError):
    """A training file cannot be used; the message names the row and what to fix."""


# --- evaluation notes and metrics ---------------------------------------------------------


@dataclass(frozen=True)
class EvalNote:
    """A labelled note: its text and the condition ids counted as correct."""

    id: str
    text: str
    expected: tuple[str, ...]
    split: str = "development"

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError(f"evaluation note {self.id!r} is empty")
        if not self.expected:
            raise ValueError(f"evaluation note {self.id!r} names no expected condition")


def load_eval_notes(
    path: Path = DEFAULT_EVAL_NOTES, kb: KnowledgeBase | None = None
) -> tuple[EvalNote, ...]:
    """Read labelled notes (``notes: [{id, expected: [...], text}]``), checking every id."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("notes"), list):
        raise ValueError(f"{Path(path).name} must hold a mapping with a list of notes")
    known = set((kb or KnowledgeBase.from_yaml()).condition_ids)
    notes = []
    for i, item in enumerate(data["notes"]):
        if not isinstance(item, dict):
            raise ValueError(f"notes[{i}] must be a mapping")
        expected = item.get("expected")
        if isinstance(expected, str):
            expected = [expected]
        if not isinstance(expected, list) or not all(isinstance(e, str) for e in expected):
            raise ValueError(f"notes[{i}].expected must be a condition id or a list of them")
        unknown = [e for e in expected if e not in known]
        if unknown:
            raise ValueError(f"notes[{i}] expects unknown conditions {unknown}")
        split = str(item.get("split", "development"))
        if split not in ("development", "held-out"):
            raise ValueError(f"notes[{i}].split must be 'development' or 'held-out'")
        notes.append(
            EvalNote(str(item.get("id", i)), str(item.get("text", "")), tuple(expected), split)
        )
    ids = [n.id for n in notes]
    if len(set(ids)) != len(ids):
        raise ValueError("evaluation note ids must be unique")
    return tuple(notes)


def _ece(probs: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    if len(probs) == 0:
        return 0.0
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (probs > lo) & (probs <= hi)
        if inside.any():
            gap = probs[inside].mean() - correct[inside].float().mean()
            total += float(inside.float().mean() * gap.abs())
    return total


def rank_metrics(
    probabilities: torch.Tensor, expected: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Top-1/top-3 accuracy, mean top-1 confidence and its calibration error."""
    n = len(expected)
    if n == 0:
        return {"n": 0, "top1": 0.0, "top3": 0.0, "mean_confidence": 0.0, "ece": 0.0}
    order = probabilities.argsort(dim=1, descending=True)
    top1 = torch.tensor([int(order[i, 0]) in set(expected[i]) for i in range(n)])
    top3 = torch.tensor([bool(set(order[i, :3].tolist()) & set(expected[i])) for i in range(n)])
    confidence = probabilities.max(dim=1).values
    return {
        "n": n,
        "top1": round(float(top1.float().mean()), 4),
        "top3": round(float(top3.float().mean()), 4),
        "mean_confidence": round(float(confidence.mean()), 4),
        "ece": round(_ece(confidence, top1), 4),
    }


def _by_split(
    probabilities: torch.Tensor, expected: Sequence[Sequence[int]], splits: Sequence[str]
) -> dict[str, Any]:
    """:func:`rank_metrics` over all notes, plus the same for each split under ``by_split``."""
    result: dict[str, Any] = rank_metrics(probabilities, expected)
    result["by_split"] = {
        name: rank_metrics(
            probabilities[[i for i, s in enumerate(splits) if s == name]],
            [e for e, s in zip(expected, splits, strict=True) if s == name],
        )
        for name in sorted(set(splits))
    }
    return result


def evaluate_notes(
    analyzer: SymptomAnalyzer, notes: Sequence[EvalNote | tuple[str, Sequence[str]]]
) -> dict[str, Any]:
    """Top-1 and top-3 accuracy (and calibration) of ``analyzer`` on labelled notes.

    ``notes`` are :class:`EvalNote` or ``(text, expected condition ids)`` pairs. A note counts
    as correct at k when any expected condition is among the k most probable. The result gives
    ``n``, ``top1``, ``top3``, ``mean_confidence``, ``ece``, the same per split under
    ``by_split``, and under ``ranks`` the rank of the best expected condition for each note id.
    """
    items = [
        n if isinstance(n, EvalNote) else EvalNote(str(i), n[0], tuple(n[1]))
        for i, n in enumerate(notes)
    ]
    index = {c: i for i, c in enumerate(analyzer.kb.condition_ids)}
    for note in items:
        unknown = [e for e in note.expected if e not in index]
        if unknown:
            raise ValueError(f"note {note.id!r} expects unknown conditions {unknown}")
    evidence = [analyzer.featurizer.read(n.text) for n in items]
    probs = torch.softmax(analyzer.logits(evidence) / analyzer.temperature, dim=-1)
    expected = [[index[e] for e in n.expected] for n in items]
    result = _by_split(probs, expected, [n.split for n in items])
    order = probs.argsort(dim=1, descending=True).tolist()
    result["ranks"] = {
        n.id: min(order[i].index(j) for j in expected[i]) + 1 for i, n in enumerate(items)
    }
    return result


# --- fitting ------------------------------------------------------------------------------


@dataclass
class _Features:
    embedding: torch.Tensor
    kb: torch.Tensor


def _featurize(
    featurizer: NoteFeaturizer,
    encoder: SentenceEncoder,
    texts: Sequence[str],
    report: Progress,
    what: str,
) -> _Features:
    evidence = [featurizer.read(t) for t in texts]
    chunks = []
    for start in range(0, len(evidence), _EMBED_BATCH):
        chunks.append(
            encoder.embed([e.asserted_text for e in evidence[start : start + _EMBED_BATCH]])
        )
        report(f"encoded {min(start + _EMBED_BATCH, len(evidence))}/{len(evidence)} {what}")
    embedding = torch.cat(chunks) if chunks else torch.zeros(0, 384)
    kb = torch.stack([e.kb_features for e in evidence]) if evidence else torch.zeros(0)
    return _Features(embedding, kb)


def _fit(
    head: SymptomHead,
    data: _Features,
    labels: torch.Tensor,
    iterations: int,
    seed: int,
    prior: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Fit the head by full-batch L-BFGS; return the loss before and after.

    The objective is convex: cross-entropy plus ``_L2 * |W - W_prior|^2`` on the linear
    weights, where ``W_prior`` is zero for a new head and the base model's weights when
    fine-tuning (a Gaussian prior centred on the base model). Evidence dropout: for a random
    ``_EVIDENCE_DROPOUT`` share of the notes the knowledge-base features are zeroed, as if no
    term had matched, so the encoder part learns to rank conditions on its own for notes whose
    wording the knowledge base does not cover.
    """
    generator = torch.Generator().manual_seed(seed)
    keep = (torch.rand(len(labels), generator=generator) >= _EVIDENCE_DROPOUT).float()
    kb = data.kb * keep.view(-1, 1, 1)
    w_prior = prior["linear.weight"] if prior is not None else torch.zeros_like(head.linear.weight)
    params = [*head.linear.parameters(), head.evidence]
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(data.embedding, kb), labels)
        loss = loss + _L2 * (head.linear.weight - w_prior).pow(2).sum()
        loss.backward()
        return loss

    head.train()
    with torch.no_grad():
        first = F.cross_entropy(head(data.embedding, data.kb), labels).item()
    optimizer.step(objective)
    head.eval()
    with torch.no_grad():
        last = F.cross_entropy(head(data.embedding, data.kb), labels).item()
    return first, last


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (golden section)."""
    if len(labels) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return round(math.exp((lo + hi) / 2), 4)


@dataclass
class _Setup:
    kb: KnowledgeBase
    rules: ContextRules
    featurizer: NoteFeaturizer
    encoder: SentenceEncoder


def _setup(device: str) -> _Setup:
    kb = KnowledgeBase.from_yaml()
    rules = ContextRules.from_yaml()
    return _Setup(
        kb,
        rules,
        NoteFeaturizer(kb, ConText(rules)),
        SentenceEncoder.shared(resolve_device(device)),
    )


def _calibrate_and_write(
    setup: _Setup,
    head: SymptomHead,
    out_dir: Path,
    *,
    held_out: _Features,
    held_out_labels: torch.Tensor,
    held_out_source: str,
    name: str,
    version: str,
    demo: bool,
    training: dict[str, JsonValue],
    eval_notes: Sequence[EvalNote],
    report: Progress,
) -> Path:
    with torch.inference_mode():
        held_logits = head(held_out.embedding, held_out.kb)
    temperature = fit_temperature(held_logits, held_out_labels)
    expected = [[int(y)] for y in held_out_labels]
    before = rank_metrics(torch.softmax(held_logits, dim=-1), expected)
    after = rank_metrics(torch.softmax(held_logits / temperature, dim=-1), expected)
    metrics: dict[str, JsonValue] = {
        "held_out": {
            "source": held_out_source,
            **after,
            "nll_before_calibration": round(
                float(F.cross_entropy(held_logits, held_out_labels)), 4
            ),
            "nll_after_calibration": round(
                float(F.cross_entropy(held_logits / temperature, held_out_labels)), 4
            ),
            "ece_before_calibration": before["ece"],
        },
        "temperature": temperature,
    }
    if eval_notes:
        index = {c: i for i, c in enumerate(setup.kb.condition_ids)}
        feats = _featurize(
            setup.featurizer,
            setup.encoder,
            [n.text for n in eval_notes],
            report,
            "evaluation notes",
        )
        with torch.inference_mode():
            probs = torch.softmax(head(feats.embedding, feats.kb) / temperature, dim=-1)
        metrics["eval_notes"] = {
            "file": DEFAULT_EVAL_NOTES.name,
            **_by_split(
                probs,
                [[index[e] for e in n.expected] for n in eval_notes],
                [n.split for n in eval_notes],
            ),
        }
    info = setup.encoder.info
    draft = ModelCardDraft(
        name=name,
        version=version,
        task=TASK,
        labels=tuple(LabelSpec.from_coded(c.coded_label) for c in setup.kb.conditions),
        input=INPUT_SPEC,
        preprocessing=preprocessing_spec(setup.kb, setup.rules),
        architecture=architecture_spec(setup.kb, info, temperature),
        training={
            **training,
            "knowledge_base_sources": list(setup.kb.sources),
            "torch": torch.__version__,
        },
        metrics=metrics,
        demo=demo,
    )
    write_model_dir(Path(out_dir), draft, head.state_dict())
    summary = metrics.get("eval_notes") or metrics["held_out"]
    assert isinstance(summary, dict)
    report(
        f"wrote {name} {version}: temperature {temperature}, top-1 {summary['top1']}, "
        f"top-3 {summary['top3']}"
    )
    return Path(out_dir)


def _new_head(setup: _Setup, report: Progress) -> SymptomHead:
    head = SymptomHead(len(setup.kb.conditions))
    texts = [condition_prototype_text(c, setup.kb) for c in setup.kb.conditions]
    head.prototypes.copy_(setup.encoder.embed(texts))
    report("encoded condition prototypes")
    return head


def train_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    notes_per_condition: int = 16,
    calibration_per_condition: int = 4,
    epochs: int = 200,
    device: str = "cpu",
    evaluate: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Train the demo symptom model on generated notes and write it to ``out_dir``.

    ``notes_per_condition`` generated notes per condition train the head; separately generated,
    harder ``calibration_per_condition`` notes per condition fit the temperature. With
    ``evaluate`` the card also records top-1/top-3 accuracy on ``data/eval_notes.yaml``.
    Returns ``out_dir`` (card: name ``symptoms-minilm``, version ``0.1.0-demo``, ``demo`` true).
    """
    if notes_per_condition < 1 or calibration_per_condition < 1 or epochs < 1:
        raise ValueError(
            "notes_per_condition, calibration_per_condition and epochs must be positive"
        )
    report = progress or (lambda _msg: None)
    started = time.perf_counter()
    setup = _setup(device)
    kb = setup.kb
    train_notes = generate_notes(kb, notes_per_condition, seed)
    calib_notes = generate_notes(kb, calibration_per_condition, seed + 1, hard=True)
    index = {c: i for i, c in enumerate(kb.condition_ids)}
    train = _featurize(
        setup.featurizer, setup.encoder, [n.text for n in train_notes], report, "training notes"
    )
    calib = _featurize(
        setup.featurizer, setup.encoder, [n.text for n in calib_notes], report, "calibration notes"
    )
    head = _new_head(setup, report)
    labels = torch.tensor([index[n.condition_id] for n in train_notes])
    first, last = _fit(head, train, labels, epochs, seed)
    report(f"trained head: loss {first:.3f} -> {last:.3f}")
    training: dict[str, JsonValue] = {
        "data": "generated clinical notes only (no patient data)",
        "generator": GENERATOR_ID,
        "notes_per_condition": notes_per_condition,
        "calibration_notes_per_condition": calibration_per_condition,
        "train_count": len(train_notes),
        "epochs": epochs,
        "seed": seed,
        "loss": "cross-entropy",
        "optimizer": _OPTIMIZER,
        "evidence_dropout": _EVIDENCE_DROPOUT,
        "final_loss": round(last, 4),
        "encoder_frozen": True,
        "evidence_coefficients": {
            name: round(float(v), 4)
            for name, v in zip(EVIDENCE_FEATURES, head.evidence.detach().tolist(), strict=True)
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    return _calibrate_and_write(
        setup,
        head,
        out_dir,
        held_out=calib,
        held_out_labels=torch.tensor([index[n.condition_id] for n in calib_notes]),
        held_out_source=f"generated ({GENERATOR_ID}, hard)",
        name=MODEL_NAME,
        version=DEMO_VERSION,
        demo=True,
        training=training,
        eval_notes=load_eval_notes(kb=kb) if evaluate else (),
        report=report,
    )


def read_training_csv(csv_path: Path, kb: KnowledgeBase) -> list[tuple[str, str]]:
    """Rows ``(note, condition id)`` of a training CSV; :class:`TrainingDataError` on bad input."""
    path = Path(csv_path)
    if not path.is_file():
        raise TrainingDataError(f"training file {path.name!r} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "note" not in header or "label" not in header:
                raise TrainingDataError(
                    f"{path.name} must have a header row with columns 'note' and 'label', "
                    f"found {reader.fieldnames}"
                )
            rows = []
            unknown: list[str] = []
            for line, raw in enumerate(reader, start=2):
                record = {(k or "").strip().lower(): (v or "") for k, v in raw.items()}
                note, label = record.get("note", "").strip(), record.get("label", "").strip()
                if not note:
                    raise TrainingDataError(f"{path.name} line {line}: the note is empty")
                condition = kb.resolve_label(label)
                if condition is None:
                    unknown.append(f"line {line}: {label!r}")
                    continue
                rows.append((note, condition.id))
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{path.name} is not UTF-8 text") from exc
    except csv.Error as exc:
        raise TrainingDataError(f"{path.name} is not a valid CSV file: {exc}") from exc
    if unknown:
        shown = "; ".join(unknown[:5]) + ("; ..." if len(unknown) > 5 else "")
        raise TrainingDataError(
            f"{path.name}: {len(unknown)} labels are not a condition id or ICD-10-CM code of "
            f"knowledge base {kb.version} ({shown}). Use ids from conditions.yaml, e.g. "
            f"{kb.conditions[0].id!r} or {kb.conditions[0].icd10cm.code!r}"
        )
    if len(rows) < 2:
        raise TrainingDataError(
            f"{path.name} holds {len(rows)} labelled notes; at least 2 are needed"
        )
    return rows


def train_head_from_csv(
    csv_path: Path,
    out_dir: Path,
    *,
    base_dir: Path | None = None,
    epochs: int = 200,
    seed: int = 0,
    generated_per_condition: int = 6,
    validation_fraction: float = 0.2,
    calibration_per_condition: int = 2,
    name: str = MODEL_NAME,
    version: str = "1.0.0",
    device: str = "cpu",
    evaluate: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Train the head on a CSV of ``note,label`` rows and write a model directory.

    ``label`` is a condition id of the knowledge base or its ICD-10-CM code. With ``base_dir``
    training starts from that model's head (it must match this knowledge base, rules and
    encoder). ``generated_per_condition`` generated notes per condition are mixed in (0: none).
    When the CSV has at least 20 rows, ``validation_fraction`` of them is held out to fit the
    temperature and report accuracy; otherwise ``calibration_per_condition`` generated hard
    notes per condition are used for that. With ``evaluate`` the card also records accuracy on
    ``data/eval_notes.yaml``. The model is not marked demo: it was trained on the user's data.
    Raises :class:`TrainingDataError` for a bad CSV and :class:`ModelLoadError` for a bad base.
    """
    if calibration_per_condition < 1:
        raise ValueError("calibration_per_condition must be positive")
    if epochs < 1 or generated_per_condition < 0 or not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            "epochs must be positive, generated_per_condition >= 0, 0 < validation_fraction < 1"
        )
    report = progress or (lambda _msg: None)
    started = time.perf_counter()
    rows = read_training_csv(Path(csv_path), KnowledgeBase.from_yaml())
    setup = _setup(device)
    kb = setup.kb
    csv_sha = hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()
    index = {c: i for i, c in enumerate(kb.condition_ids)}
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * validation_fraction) if len(rows) >= 20 else 0
    val_rows = [rows[i] for i in order[:n_val]]
    train_rows = [rows[i] for i in order[n_val:]]
    generated = generate_notes(kb, generated_per_condition, seed) if generated_per_condition else []
    texts = [r[0] for r in train_rows] + [g.text for g in generated]
    labels = torch.tensor(
        [index[r[1]] for r in train_rows] + [index[g.condition_id] for g in generated]
    )
    train = _featurize(setup.featurizer, setup.encoder, texts, report, "training notes")
    if base_dir is not None:
        base_card = read_model_card(Path(base_dir))
        check_card(base_card, kb, setup.rules, encoder_info())
        head = SymptomHead(len(kb.conditions))
        base_state = load_weights(Path(base_dir), base_card)
        head.load_state_dict(base_state, strict=True)
        prior: dict[str, torch.Tensor] | None = {k: v.clone() for k, v in base_state.items()}
        base: JsonValue = {
            "name": base_card.name,
            "version": base_card.version,
            "weights_sha256": base_card.weights.sha256,
        }
    else:
        head = _new_head(setup, report)
        prior, base = None, None
    first, last = _fit(head, train, labels, epochs, seed, prior)
    report(f"trained head: loss {first:.3f} -> {last:.3f}")
    if val_rows:
        held = _featurize(
            setup.featurizer, setup.encoder, [r[0] for r in val_rows], report, "validation notes"
        )
        held_labels = torch.tensor([index[r[1]] for r in val_rows])
        source = f"{n_val} held-out CSV rows"
    else:
        calib = generate_notes(kb, calibration_per_condition, seed + 1, hard=True)
        held = _featurize(
            setup.featurizer, setup.encoder, [n.text for n in calib], report, "calibration notes"
        )
        held_labels = torch.tensor([index[n.condition_id] for n in calib])
        source = f"generated ({GENERATOR_ID}, hard); the CSV has fewer than 20 rows"
    training: dict[str, JsonValue] = {
        "data": "user CSV" + (" plus generated notes" if generated else ""),
        "csv_sha256": csv_sha,
        "csv_rows": len(rows),
        "csv_train_rows": len(train_rows),
        "csv_conditions": len({r[1] for r in rows}),
        "generator": GENERATOR_ID if generated else None,
        "generated_per_condition": generated_per_condition,
        "base_model": base,
        "epochs": epochs,
        "seed": seed,
        "loss": "cross-entropy",
        "optimizer": _OPTIMIZER,
        "evidence_dropout": _EVIDENCE_DROPOUT,
        "final_loss": round(last, 4),
        "encoder_frozen": True,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return _calibrate_and_write(
        setup,
        head,
        out_dir,
        held_out=held,
        held_out_labels=held_labels,
        held_out_source=source,
        name=name,
        version=version,
        demo=False,
        training=training,
        eval_notes=load_eval_notes(kb=kb) if evaluate else (),
        report=report,
    )


__all__ = [
    "DEMO_VERSION",
    "MODEL_NAME",
    "EvalNote",
    "ModelLoadError",
    "TrainingDataError",
    "evaluate_notes",
    "fit_temperature",
    "load_eval_notes",
    "rank_metrics",
    "read_training_csv",
    "train_demo",
    "train_head_from_csv",
]
