"""Symptom analysis: ConText, knowledge base, generated notes, training, loading and ranking."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.card import CARD_FILE, ModelLoadError, read_model_card
from models.symptoms import ConText, ContextRules, KnowledgeBase, SymptomAnalyzer
from models.symptoms.analyzer import TASK, MentionStatus, NoteFeaturizer
from models.symptoms.encoder import ENCODER_PACKAGE, encoder_info
from models.symptoms.knowledge import (
    DEFAULT_KB_PATH,
    MEASURED_FINDINGS,
    TargetKind,
    is_valid_icd10cm,
    is_valid_sctid,
)
from models.symptoms.synthetic import generate_notes
from models.symptoms.train import (
    DEMO_VERSION,
    MODEL_NAME,
    TrainingDataError,
    evaluate_notes,
    fit_temperature,
    load_eval_notes,
    train_demo,
    train_head_from_csv,
)

# Top-3 accuracy of the tiny test model (2 generated notes per condition, 100 iterations) on
# all evaluation notes measured 0.97 (held-out split 0.92); the thresholds leave a margin for
# platform differences.
EVAL_TOP3_THRESHOLD = 0.90
HELD_OUT_TOP3_THRESHOLD = 0.80


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.from_yaml()


@pytest.fixture(scope="module")
def featurizer(kb: KnowledgeBase) -> NoteFeaturizer:
    return NoteFeaturizer(kb, ConText.default())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("symptoms") / "model"
    return train_demo(
        out, notes_per_condition=2, calibration_per_condition=1, epochs=100, evaluate=False
    )


@pytest.fixture(scope="module")
def analyzer(model_dir: Path) -> SymptomAnalyzer:
    return SymptomAnalyzer.load(model_dir)


def _card_json(model_dir: Path) -> dict[str, Any]:
    """The card as plain JSON, for reading nested entries."""
    data: dict[str, Any] = json.loads((model_dir / CARD_FILE).read_text())
    return data


def _status(featurizer: NoteFeaturizer, text: str, ref: str) -> MentionStatus:
    found = [m for m in featurizer.read(text).mentions if m.ref == ref]
    assert found, f"{ref} not found in {text!r}"
    return found[0].status


# --- ConText --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref", "status"),
    [
        ("Patient denies fever.", "fever", MentionStatus.NEGATED),
        ("No chest pain.", "chest_pain", MentionStatus.NEGATED),
        ("Negative for cough.", "cough", MentionStatus.NEGATED),
        ("Afebrile.", "fever", MentionStatus.NEGATED),
        ("T 36.9, HR 72.", "tachycardia", MentionStatus.NEGATED),
        ("T 38.9", "fever", MentionStatus.AFFIRMED),
        ("SpO2 86% on room air", "hypoxia", MentionStatus.AFFIRMED),
        ("Mother had breast cancer.", "breast_cancer", MentionStatus.FAMILY),
        ("Breast cancer in her mother.", "breast_cancer", MentionStatus.FAMILY),
        ("History of pneumonia.", "pneumonia", MentionStatus.HISTORICAL),
        ("Kidney stones in the past.", "kidney_stone", MentionStatus.HISTORICAL),
        ("Return if fever develops.", "fever", MentionStatus.HYPOTHETICAL),
        ("Rule out pneumonia.", "pneumonia", MentionStatus.POSSIBLE),
        ("Denies fever but reports cough.", "cough", MentionStatus.AFFIRMED),
        ("3-day history of cough.", "cough", MentionStatus.AFFIRMED),
        ("Vomiting in the past 2 days.", "vomiting", MentionStatus.AFFIRMED),
        ("Brought in by mother for fever.", "fever", MentionStatus.AFFIRMED),
        ("Pt not eating, has fever.", "fever", MentionStatus.AFFIRMED),
        ("Chest pain? No. Cough? Yes.", "chest_pain", MentionStatus.NEGATED),
        ("Chest pain? No. Cough? Yes.", "cough", MentionStatus.AFFIRMED),
        ("Husband tested positive for COVID.", "covid19", MentionStatus.FAMILY),
        ("Hay fever since childhood.", "allergic_rhinitis", MentionStatus.AFFIRMED),
    ],
)
def test_context_status(
    featurizer: NoteFeaturizer, text: str, ref: str, status: MentionStatus
) -> None:
    assert _status(featurizer, text, ref) is status


def test_denied_finding_is_not_evidence(featurizer: NoteFeaturizer) -> None:
    evidence = featurizer.read("Denies fever, chills or chest pain. Reports dysuria.")
    affirmed = {m.ref for m in evidence.mentions if m.affirmed}
    assert affirmed == {"dysuria"}
    # What the encoder reads asserts nothing that was denied.
    assert "fever" not in evidence.asserted_text and "dysuria" in evidence.asserted_text


def test_hay_fever_is_not_a_fever(featurizer: NoteFeaturizer) -> None:
    refs = {m.ref for m in featurizer.read("Hay fever every spring.").mentions}
    assert "fever" not in refs


def test_family_history_section(featurizer: NoteFeaturizer) -> None:
    text = "Family history:\nMother: breast cancer\nFather: MI\n\nHPI: cough and fever for 3 days."
    mentions = featurizer.read(text).mentions
    status = {m.ref: m.status for m in mentions}
    assert status["breast_cancer"] is MentionStatus.FAMILY
    assert status["acute_myocardial_infarction"] is MentionStatus.FAMILY
    assert status["cough"] is MentionStatus.AFFIRMED and status["fever"] is MentionStatus.AFFIRMED


def test_mentions_carry_offsets(featurizer: NoteFeaturizer) -> None:
    text = "Temp 38.5 today. Dr. Lee notes a productive cough.\nNo rash."
    mentions = featurizer.read(text).mentions
    for m in mentions:
        assert text[m.start : m.end] == m.text
        assert m.sentence_start <= m.start < m.end <= m.sentence_end
    cough = next(m for m in mentions if m.ref == "productive_cough")
    # The abbreviation and the decimal do not end the sentence.
    assert text[cough.sentence_start : cough.sentence_end] == "Dr. Lee notes a productive cough."


def test_sentences_split_wrapped_prose_as_one(kb: KnowledgeBase) -> None:
    context = ConText.default()
    text = "The patient reports a headache that began this morning\nand denies fever or vomiting."
    assert len(context.sentences(text)) == 1


def test_context_rules_validation(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "triggers": [
                    {
                        "category": "NEGATED_EXISTENCE",
                        "direction": "FORWARD",
                        "phrases": ["no"],
                    }
                ],
                "pseudo": ["no"],
            }
        )
    )
    with pytest.raises(ValueError, match="defined twice"):
        ContextRules.from_yaml(path)
    path.write_text(
        yaml.safe_dump(
            {"triggers": [{"category": "MAYBE", "direction": "FORWARD", "phrases": ["x"]}]}
        )
    )
    with pytest.raises(ValueError, match="unknown category"):
        ContextRules.from_yaml(path)


# --- knowledge base ---------------------------------------------------------------------------


def test_knowledge_base_is_complete_and_well_formed(kb: KnowledgeBase) -> None:
    assert len(kb.conditions) >= 60
    ids = kb.condition_ids
    assert len(set(ids)) == len(ids)
    for condition in kb.conditions:
        assert is_valid_icd10cm(condition.icd10cm.code), condition.id
        assert is_valid_sctid(condition.snomed.code), condition.id
        assert condition.icd10cm.display and condition.snomed.display
        assert len(condition.findings) >= 3, condition.id
        for fid in condition.findings:
            assert kb.findings[fid].terms, fid
    assert len({c.icd10cm.code for c in kb.conditions}) == len(kb.conditions)
    assert all(f in kb.findings for f in MEASURED_FINDINGS)
    assert any("ICD-10-CM" in s for s in kb.sources)
    assert any("SNOMED CT" in s for s in kb.sources)
    assert any("MedlinePlus" in s for s in kb.sources)
    header = DEFAULT_KB_PATH.read_text().split("version:")[0]
    assert "ICD-10-CM" in header and "SNOMED CT" in header and "MedlinePlus" in header


def test_known_codes(kb: KnowledgeBase) -> None:
    pneumonia = kb.condition("pneumonia")
    assert (pneumonia.icd10cm.code, pneumonia.snomed.code) == ("J18.9", "233604007")
    assert kb.resolve_label("j18.9") == pneumonia
    assert kb.resolve_label("PNEUMONIA") == pneumonia
    assert kb.resolve_label("Z99.99") is None
    assert is_valid_sctid("233604007") and not is_valid_sctid("233604008")
    assert not is_valid_icd10cm("J18.") and is_valid_icd10cm("T78.2XXA")


def test_knowledge_base_errors_name_the_problem(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_KB_PATH.read_text())
    data["conditions"][0]["findings"].append("not_a_finding")
    path = tmp_path / "kb.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="not_a_finding"):
        KnowledgeBase.from_yaml(path)
    data = yaml.safe_load(DEFAULT_KB_PATH.read_text())
    data["conditions"][0]["snomed"]["code"] = "233604008"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="Verhoeff"):
        KnowledgeBase.from_yaml(path)


def test_generated_notes_are_reproducible_and_read_back(
    kb: KnowledgeBase, featurizer: NoteFeaturizer
) -> None:
    notes = generate_notes(kb, 2, seed=5)
    assert notes == generate_notes(kb, 2, seed=5)
    assert len(notes) == 2 * len(kb.conditions)
    # The knowledge-base score alone ranks the written-for condition first for most notes:
    # generator, matcher and ConText agree.
    index = {c: i for i, c in enumerate(kb.condition_ids)}
    hits = sum(
        int(featurizer.read(n.text).kb_features[0].argmax()) == index[n.condition_id] for n in notes
    )
    assert hits / len(notes) > 0.7


def test_fit_temperature_recovers_scale() -> None:
    import torch

    torch.manual_seed(0)
    true_logits = torch.randn(4000, 5) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)


# --- the trained model ------------------------------------------------------------------------


def test_card_records_model(model_dir: Path, kb: KnowledgeBase) -> None:
    card = read_model_card(model_dir)
    assert (card.name, card.version, card.task, card.demo) == (MODEL_NAME, DEMO_VERSION, TASK, True)
    assert [label.name for label in card.labels] == list(kb.condition_ids)
    assert card.labels[0].coding_scheme == "SCT"
    raw = _card_json(model_dir)
    assert raw["preprocessing"]["knowledge_base"]["sha256"] == kb.sha256
    encoder = raw["architecture"]["encoder"]
    assert encoder["package"] == ENCODER_PACKAGE
    assert encoder["weights_sha256"] == encoder_info().weights_sha256
    assert raw["architecture"]["calibration"]["temperature"] == raw["metrics"]["temperature"]
    assert raw["metrics"]["held_out"]["n"] == len(kb.conditions)


CLEAR_NOTES = [
    (
        "Burning with urination, frequency and urgency for two days. No fever, no flank pain.",
        "urinary_tract_infection",
    ),
    (
        "Crushing chest pressure radiating to the left arm with diaphoresis and nausea.",
        "acute_myocardial_infarction",
    ),
    ("Sudden worst headache of her life, vomiting and a stiff neck.", "subarachnoid_hemorrhage"),
    (
        "Wheezing and chest tightness, using rescue inhaler more. Speaking in short sentences.",
        "asthma_exacerbation",
    ),
    ("Red hot swollen big toe overnight, cannot bear the sheet.", "gout"),
]


@pytest.mark.parametrize(("text", "expected"), CLEAR_NOTES)
def test_clear_notes_rank_expected_condition_top3(
    analyzer: SymptomAnalyzer, text: str, expected: str
) -> None:
    result = analyzer.analyze(text)
    assert expected in [c.condition_id for c in result.conditions[:3]]


def test_negation_changes_the_ranking(analyzer: SymptomAnalyzer) -> None:
    positive = analyzer.analyze("Crushing chest pressure radiating to the left arm, sweating.")
    assert positive.top.condition_id == "acute_myocardial_infarction"
    denied = analyzer.analyze(
        "Denies chest pressure, left arm pain or sweating. Reports dysuria and urinary frequency."
    )
    assert "acute_myocardial_infarction" not in [c.condition_id for c in denied.conditions[:3]]
    assert denied.top.condition_id == "urinary_tract_infection"


def test_result_is_coded_and_calibrated(
    analyzer: SymptomAnalyzer, model_dir: Path, kb: KnowledgeBase
) -> None:
    text = "68M with fever, productive cough and pleuritic chest pain. Crackles at the right base."
    result = analyzer.analyze(text, top_k=5)
    assert len(result.conditions) == 5 and result.has_evidence
    confidences = [c.confidence for c in result.conditions]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in confidences)
    for ranked in result.conditions:
        condition = kb.condition(ranked.condition_id)
        assert (ranked.icd10cm, ranked.snomed) == (condition.icd10cm, condition.snomed)
        for m in ranked.evidence:
            assert m.affirmed and text[m.start : m.end] == m.text
            assert m.ref in condition.findings or (
                m.kind is TargetKind.CONDITION and m.ref == condition.id
            )
    card = read_model_card(model_dir)
    assert result.provenance == card.provenance and result.provenance.demo
    assert result.provenance.weights_sha256 == card.weights.sha256
    assert result.encoder_sha256 == encoder_info().weights_sha256
    assert result.knowledge_base_sha256 == kb.sha256
    assert result.temperature == _card_json(model_dir)["architecture"]["calibration"]["temperature"]


def test_analyze_many_matches_analyze(analyzer: SymptomAnalyzer) -> None:
    texts = [t for t, _ in CLEAR_NOTES[:3]]
    many = analyzer.analyze_many(texts)
    for text, result in zip(texts, many, strict=True):
        single = analyzer.analyze(text)
        assert [c.condition_id for c in result.conditions] == [
            c.condition_id for c in single.conditions
        ]
        assert result.conditions[0].confidence == pytest.approx(
            single.conditions[0].confidence, abs=1e-4
        )


def test_note_text_is_not_logged(
    analyzer: SymptomAnalyzer, caplog: pytest.LogCaptureFixture
) -> None:
    text = "Zebulon reports crushing chest pressure."
    with caplog.at_level(logging.DEBUG):
        analyzer.analyze(text)
    assert not any("Zebulon" in r.getMessage() for r in caplog.records)


def test_eval_notes_top3(analyzer: SymptomAnalyzer, kb: KnowledgeBase) -> None:
    notes = load_eval_notes(kb=kb)
    assert len(notes) >= 30
    metrics = evaluate_notes(analyzer, notes)
    assert metrics["n"] == len(notes)
    assert metrics["top3"] >= EVAL_TOP3_THRESHOLD, metrics
    assert metrics["by_split"]["held-out"]["top3"] >= HELD_OUT_TOP3_THRESHOLD, metrics
    assert metrics["top1"] <= metrics["top3"]


# --- loading refuses what it cannot trust ----------------------------------------------------


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(model_dir, target)
    return target


def test_corrupt_weights_refused(model_dir: Path, tmp_path: Path) -> None:
    target = _copy(model_dir, tmp_path)
    weights = target / read_model_card(target).weights.file
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="sha256"):
        SymptomAnalyzer.load(target)


def test_knowledge_base_mismatch_refused(model_dir: Path, kb: KnowledgeBase) -> None:
    other = dataclasses.replace(kb, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="knowledge base"):
        SymptomAnalyzer.load(model_dir, knowledge_base=other)


def test_encoder_mismatch_refused(model_dir: Path, tmp_path: Path) -> None:
    target = _copy(model_dir, tmp_path)
    card = json.loads((target / CARD_FILE).read_text())
    card["architecture"]["encoder"]["weights_sha256"] = "1" * 64
    (target / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="encoder"):
        SymptomAnalyzer.load(target)


def test_wrong_task_refused(model_dir: Path, tmp_path: Path) -> None:
    target = _copy(model_dir, tmp_path)
    card = json.loads((target / CARD_FILE).read_text())
    card["task"] = "classification"
    (target / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="task"):
        SymptomAnalyzer.load(target)


# --- training from a CSV ---------------------------------------------------------------------


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notes.csv"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,diagnosis\nfever,pneumonia\n", "columns 'note' and 'label'"),
        (
            "note,label\nfever and cough,pneumonia\nburning urine,not_a_condition\n",
            "line 3: 'not_a_condition'",
        ),
        ("note,label\n,pneumonia\nfever,pneumonia\n", "line 2: the note is empty"),
        ("note,label\nfever and cough,pneumonia\n", "at least 2"),
    ],
)
def test_train_csv_errors(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(TrainingDataError, match=message):
        train_head_from_csv(_csv(tmp_path, content), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="does not exist"):
        train_head_from_csv(tmp_path / "absent.csv", tmp_path / "out")


def test_train_csv_from_base(model_dir: Path, tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "note,label\n"
        '"Fever, productive cough and crackles at the left base.",pneumonia\n'
        '"Dysuria and frequency, no fever.",N39.0\n'
        '"Barking cough and stridor at night.",croup\n',
    )
    out = train_head_from_csv(
        path,
        tmp_path / "csv-model",
        base_dir=model_dir,
        epochs=30,
        generated_per_condition=0,
        calibration_per_condition=1,
        evaluate=False,
    )
    card = read_model_card(out)
    assert card.demo is False
    training = _card_json(out)["training"]
    assert training["csv_rows"] == 3 and training["csv_conditions"] == 3
    assert training["base_model"]["weights_sha256"] == read_model_card(model_dir).weights.sha256
    analyzer = SymptomAnalyzer.load(out)
    assert analyzer.analyze("Barking cough and stridor.").top.condition_id == "croup"
