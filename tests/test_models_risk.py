"""Risk scoring: published equations, FHIR feature extraction, tiny training, prediction."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.card import CARD_FILE, ModelLoadError, read_model_card
from models.risk import (
    CVD_10Y,
    DIABETES_8Y,
    InsufficientFeaturesError,
    RiskFeatures,
    RiskModel,
    extract_features,
)
from models.risk.cohort import simulate_cohort
from models.risk.equations import PceGroup, framingham_diabetes_risk, pce_ten_year_risk
from models.risk.train import MODEL_NAME, MODEL_VERSION, evaluate, train_demo

AT = datetime(2024, 6, 1, tzinfo=UTC)


def quantity(rid: str, loinc: str, value: float, unit: str, when: str = "2024-01-10") -> dict:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit},
    }


def blood_pressure(rid: str, sbp: float, dbp: float, when: str = "2024-01-10") -> dict:
    def component(code: str, value: float) -> dict:
        return {
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueQuantity": {
                "value": value,
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }

    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "effectiveDateTime": when,
        "component": [component("8480-6", sbp), component("8462-4", dbp)],
    }


def smoking(rid: str, snomed: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
        "effectiveDateTime": "2024-01-10",
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": snomed}]},
    }


PATIENT = {"resourceType": "Patient", "id": "pat-1", "gender": "male", "birthDate": "1966-03-01"}


def full_record() -> list[dict[str, Any]]:
    return [
        quantity("tc", "2093-3", 213, "mg/dL"),
        quantity("hdl", "2085-9", 50, "mg/dL"),
        blood_pressure("bp", 138, 86),
        quantity("bmi", "39156-5", 27.5, "kg/m2"),
        quantity("a1c", "4548-4", 5.6, "%"),
        quantity("fpg", "1558-6", 98, "mg/dL"),
        smoking("smk", "8517006"),
    ]


# --- equations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "published_percent"),
    [
        (PceGroup.WHITE_FEMALE, 2.1),
        (PceGroup.AFRICAN_AMERICAN_FEMALE, 3.0),
        (PceGroup.WHITE_MALE, 5.3),
        (PceGroup.AFRICAN_AMERICAN_MALE, 6.1),
    ],
)
def test_pooled_cohort_equations_reproduce_the_guideline_worked_example(
    group: PceGroup, published_percent: float
) -> None:
    # Goff et al. 2013, Table A: age 55, TC 213, HDL 50, untreated SBP 120, non-smoker, no DM.
    risk = pce_ten_year_risk(
        group,
        age=55,
        total_cholesterol=213,
        hdl_cholesterol=50,
        sbp=120,
        bp_treated=0,
        current_smoker=0,
        diabetes=0,
    )
    assert abs(100 * float(risk) - published_percent) < 0.1


def test_pooled_cohort_equations_refuse_ages_they_were_not_derived_on() -> None:
    with pytest.raises(ValueError, match="age"):
        pce_ten_year_risk(
            PceGroup.WHITE_MALE,
            age=30,
            total_cholesterol=200,
            hdl_cholesterol=50,
            sbp=120,
            bp_treated=0,
            current_smoker=0,
            diabetes=0,
        )


@pytest.mark.parametrize(
    ("factors", "points_table_percent"),
    [
        # Wilson et al. 2007 points score: glucose 100-126 = 10 pts -> 3 %; + BMI >= 30 (5) ->
        # 15 pts -> 7 %; glucose + low HDL (5) + BP (2) -> 17 pts -> 11 %.
        ({"fasting_glucose": 110}, 3.0),
        ({"fasting_glucose": 110, "bmi": 32}, 7.0),
        ({"fasting_glucose": 110, "hdl_cholesterol": 35, "sbp": 140}, 11.0),
    ],
)
def test_framingham_diabetes_model_agrees_with_its_points_table(
    factors: dict[str, float], points_table_percent: float
) -> None:
    inputs: dict[str, float] = {
        "age": 45, "male": 1, "bmi": 23, "sbp": 118, "dbp": 75, "bp_treated": 0,
        "hdl_cholesterol": 55, "triglycerides": 100, "fasting_glucose": 90, "parental_history": 0,
    }  # fmt: skip
    inputs.update(factors)
    risk = float(framingham_diabetes_risk(**inputs))
    assert abs(100 * risk - points_table_percent) < 1.0


def test_simulated_cohort_is_deterministic_and_keeps_training_and_evaluation_apart() -> None:
    a = simulate_cohort(500, 3)
    b = simulate_cohort(500, 3)
    held_out = simulate_cohort(500, 3, purpose="evaluate")
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, held_out.features)
    # Outcomes are drawn from the equations: observed rate close to the mean probability.
    big = simulate_cohort(20000, 0)
    assert abs(big.cvd_event.mean() - big.cvd_probability.mean()) < 0.01
    defined = ~np.isnan(big.diabetes_event)
    assert np.isnan(big.diabetes_event[big.column("diabetes") == 1]).all()
    assert abs(big.diabetes_event[defined].mean() - big.diabetes_probability[defined].mean()) < 0.01


# --- feature extraction ---------------------------------------------------------------------


def test_features_are_read_from_loinc_observations_with_unit_conversion() -> None:
    observations = [
        quantity("tc", "2093-3", 5.5, "mmol/L"),
        quantity("hdl", "14646-4", 1.3, "mmol/L"),
        quantity("a1c", "59261-8", 39, "mmol/mol"),
        quantity("fpg", "14771-0", 5.4, "mmol/L"),
        quantity("wt", "29463-7", 176, "[lb_av]"),
        quantity("ht", "8302-2", 70, "[in_i]"),
        blood_pressure("bp", 132, 84),
        smoking("smk", "449868002"),
    ]
    medication = {
        "resourceType": "MedicationStatement",
        "id": "med-1",
        "status": "active",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.whocc.no/atc", "code": "C09AA03"}]
        },
    }
    features = extract_features(
        observations, patient=PATIENT, conditions=[], at=AT, medications=[medication]
    )
    v = features.values
    assert v["total_cholesterol"] == pytest.approx(5.5 * 38.67, rel=1e-4)
    assert v["hdl_cholesterol"] == pytest.approx(1.3 * 38.67, rel=1e-4)
    assert v["hba1c"] == pytest.approx(0.09148 * 39 + 2.152, rel=1e-4)
    assert v["fasting_glucose"] == pytest.approx(5.4 * 18.016, rel=1e-4)
    assert v["bmi"] == pytest.approx(25.25, abs=0.05)  # 176 lb, 70 in
    assert (v["sbp"], v["dbp"]) == (132, 84)
    assert v["current_smoker"] == 1 and v["sex_male"] == 1 and v["bp_treated"] == 1
    assert v["diabetes"] == 0
    assert v["age"] == pytest.approx(58.25, abs=0.01)
    assert features.missing == frozenset()
    assert "Observation/bp" in features.basis and "MedicationStatement/med-1" in features.basis
    assert "Patient/pat-1" in features.basis
    assert any("computed from body weight and height" in n for n in features.notes)


def test_implausible_and_unusable_values_are_refused_with_a_reason() -> None:
    observations = [
        quantity("sbp-old", "8480-6", 128, "mm[Hg]", when="2023-05-01"),
        quantity("sbp-typo", "8480-6", 1280, "mm[Hg]", when="2024-01-01"),
        quantity("tc-unit", "2093-3", 213, "g/L"),
        {**quantity("hdl-prelim", "2085-9", 50, "mg/dL"), "status": "preliminary"},
        quantity("bmi-future", "39156-5", 27, "kg/m2", when="2030-01-01"),
    ]
    features = extract_features(observations, patient=PATIENT, at=AT)
    # The latest plausible value is used; the implausible newer one is not.
    assert features.values["sbp"] == 128
    reasons = {r.reference: r.reason for r in features.rejected}
    assert "implausible" in reasons["Observation/sbp-typo"]
    assert "unit 'g/L' not accepted" in reasons["Observation/tc-unit"]
    assert "preliminary" in reasons["Observation/hdl-prelim"]
    assert "after the assessment time" in reasons["Observation/bmi-future"]
    assert {"total_cholesterol", "hdl_cholesterol", "bmi"} <= features.missing
    assert "Observation/sbp-typo" not in features.basis


def test_latest_value_wins_and_history_decides_missing_versus_absent() -> None:
    observations = [
        quantity("tc-1", "2093-3", 240, "mg/dL", when="2022-01-01"),
        quantity("tc-2", "2093-3", 190, "mg/dL", when="2024-02-01"),
    ]
    unknown = extract_features(observations, patient=PATIENT, at=AT)
    assert unknown.values["total_cholesterol"] == 190
    assert unknown.sources["total_cholesterol"] == ("Observation/tc-2",)
    assert {"diabetes", "bp_treated"} <= unknown.missing  # history not supplied

    none_recorded = extract_features(
        observations, patient=PATIENT, conditions=[], medications=[], at=AT
    )
    assert none_recorded.values["diabetes"] == 0 and none_recorded.values["bp_treated"] == 0

    condition = {
        "resourceType": "Condition",
        "id": "dm",
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]},
    }
    diabetic = extract_features(observations, patient=PATIENT, conditions=[condition], at=AT)
    assert diabetic.values["diabetes"] == 1 and "Condition/dm" in diabetic.basis

    by_lab = extract_features(
        [*observations, quantity("a1c", "4548-4", 7.1, "%")], patient=PATIENT, at=AT
    )
    assert by_lab.values["diabetes"] == 1
    assert any("ADA threshold" in n for n in by_lab.notes)


def test_risk_features_validate_their_values() -> None:
    with pytest.raises(ValueError, match="unknown risk features"):
        RiskFeatures.from_values({"cholesterol": 200})
    with pytest.raises(ValueError, match="binary"):
        RiskFeatures.from_values({"current_smoker": 0.5})
    with pytest.raises(ValueError, match="plausible"):
        RiskFeatures.from_values({"sbp": 400})


# --- training, evaluation, prediction -------------------------------------------------------


@pytest.fixture(scope="module")
def risk_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("risk") / "risk-mlp"
    return train_demo(directory, seed=0, n_patients=12000, epochs=8)


def test_tiny_training_learns_the_equations_and_says_it_is_a_demo(risk_model_dir: Path) -> None:
    card = read_model_card(risk_model_dir)
    assert (card.name, card.version, card.task, card.demo) == (
        MODEL_NAME,
        MODEL_VERSION,
        "risk-scoring",
        True,
    )
    assert [(label.name, label.code_value) for label in card.labels] == [
        ("cvd_10y", "49601007"),
        ("diabetes_8y", "73211009"),
    ]
    assert "simulated" in str(card.training["data"])

    evaluation = evaluate(risk_model_dir, n_patients=10000, seed=5)
    by_outcome = {o.outcome: o for o in evaluation.outcomes}
    cvd, dm = by_outcome["cvd_10y"], by_outcome["diabetes_8y"]
    assert cvd.auc > 0.75 and cvd.auc_equation - cvd.auc < 0.03
    assert dm.auc > 0.72 and dm.auc_equation - dm.auc < 0.08
    for outcome in (cvd, dm):
        assert 0.75 < outcome.calibration_slope < 1.3
        assert abs(outcome.mean_predicted - outcome.observed_rate) < 0.02
        assert len(outcome.bins) == 10
    assert (cvd.horizon_years, dm.horizon_years) == (10, 8)
    json.dumps(evaluation.to_dict())  # the CLI writes it as JSON

    degraded = evaluate(risk_model_dir, n_patients=10000, seed=5, missing_rate=0.4)
    assert degraded.outcomes[0].auc > 0.7


def test_prediction_carries_provenance_basis_and_rationale(risk_model_dir: Path) -> None:
    model = RiskModel.load(risk_model_dir)
    features = extract_features(
        full_record(), patient=PATIENT, conditions=[], medications=[], at=AT
    )
    predictions = model.predict(features)
    assert [p.outcome for p in predictions] == [CVD_10Y, DIABETES_8Y]
    card = read_model_card(risk_model_dir)
    for prediction in predictions:
        assert prediction.provenance.weights_sha256 == card.weights.sha256
        assert prediction.provenance.device_uid == card.device_uid
        assert prediction.provenance.demo is True
        assert prediction.basis == features.basis
        assert "Observation/tc" in prediction.basis and "Patient/pat-1" in prediction.basis
        assert prediction.confidence == 1.0 and prediction.missing_features == ()
        assert 0.0 < prediction.probability < 1.0
        assert "not for clinical use" in prediction.rationale
    cvd = predictions[0]
    assert cvd.horizon_years == 10 and "10-year" in cvd.rationale
    assert {c.feature for c in cvd.contributions} >= {"age", "total_cholesterol"}


def test_missing_features_lower_the_stated_confidence(risk_model_dir: Path) -> None:
    model = RiskModel.load(risk_model_dir)
    complete = extract_features(
        full_record(), patient=PATIENT, conditions=[], medications=[], at=AT
    )
    no_lipids = extract_features(
        [o for o in full_record() if o["id"] not in ("tc", "hdl")],
        patient=PATIENT,
        conditions=[],
        medications=[],
        at=AT,
    )
    sparse = extract_features([], patient=PATIENT, at=AT)
    full_cvd = model.predict(complete)[0]
    lipid_cvd = model.predict(no_lipids)[0]
    sparse_cvd = model.predict(sparse)[0]
    assert full_cvd.confidence == 1.0
    assert lipid_cvd.confidence < 1.0
    assert sparse_cvd.confidence < lipid_cvd.confidence
    low, high = sparse_cvd.interval
    assert low <= sparse_cvd.probability <= high and high - low > 0.02
    assert lipid_cvd.missing_features == ("total_cholesterol", "hdl_cholesterol")
    assert "Missing: total cholesterol, HDL cholesterol" in lipid_cvd.rationale


def test_predictions_refused_without_age_or_sex_and_no_diabetes_risk_for_a_diabetic(
    risk_model_dir: Path,
) -> None:
    model = RiskModel.load(risk_model_dir)
    with pytest.raises(InsufficientFeaturesError, match="age"):
        model.predict(extract_features(full_record(), at=AT))
    diabetic = RiskFeatures.from_values(
        {"age": 60, "sex_male": 0, "diabetes": 1, "total_cholesterol": 200}
    )
    assert [p.outcome.name for p in model.predict(diabetic)] == ["cvd_10y"]
    old = RiskFeatures.from_values({"age": 90, "sex_male": 0})
    assert model.predict(old)[0].outside_training_range == ("age",)


def test_corrupt_or_foreign_weights_are_refused(risk_model_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(risk_model_dir, corrupt)
    weights = corrupt / "weights.pt"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="sha256"):
        RiskModel.load(corrupt)

    foreign = tmp_path / "foreign"
    shutil.copytree(risk_model_dir, foreign)
    card = json.loads((foreign / CARD_FILE).read_text())
    card["task"] = "classification"
    (foreign / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="risk-scoring"):
        RiskModel.load(foreign)
