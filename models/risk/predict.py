"""Load a risk model directory and turn one patient's features into coded risk predictions.

Each :class:`RiskPrediction` carries what a FHIR RiskAssessment needs (outcome code,
probability, horizon, basis references, rationale) plus the model's provenance.

Missing features are explicit. The point prediction feeds the network each missing feature as
"missing" (value = cohort mean, indicator 1; the network was trained with features masked at
random, so it learned what to expect then). The stated **confidence** says how much the missing
features could move that prediction: each missing feature is drawn 64 times from the training
cohort's distribution (stored in the card), the network is run on every completed vector, and
with w the 10-90 % width of the resulting log-odds, ``confidence = exp(-w / 2)`` -- 1.0 when
nothing is missing, 0.61 when the odds could vary e^1-fold, 0.37 for e^2-fold. A missing feature
the prediction barely depends on lowers it little. ``interval`` is the matching 10-90 % range of
probabilities. Features outside the training range are clipped to it and named. The rationale
names the features that raised and lowered the risk most, each measured against the training
cohort's mean value of that feature.

The outcome is refused (:class:`InsufficientFeaturesError`) without age and sex: the equations
behind the model are age- and sex-specific and nothing else stands in for them. The diabetes
outcome is left out for a patient who already has diabetes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.card import ModelCard, ModelLoadError, load_weights, read_model_card
from models.provenance import CodedLabel, ModelProvenance
from models.risk.features import FEATURE_BY_NAME, FEATURE_NAMES, FEATURES, RiskFeatures
from models.risk.mlp import ARCHITECTURE, OUTCOMES, RiskMLP

TASK = "risk-scoring"
PREPROCESSING_ID = "carebridge.risk.features/1"

CVD_10Y = CodedLabel("cvd_10y", "49601007", "SCT", "Disorder of cardiovascular system")
DIABETES_8Y = CodedLabel("diabetes_8y", "73211009", "SCT", "Diabetes mellitus")
#: Outcome labels in network output order.
RISK_LABELS: tuple[CodedLabel, CodedLabel] = (CVD_10Y, DIABETES_8Y)
HORIZON_YEARS: dict[str, int] = {"cvd_10y": 10, "diabetes_8y": 8}
OUTCOME_TEXT: dict[str, str] = {
    "cvd_10y": "10-year risk of a first hard atherosclerotic cardiovascular event "
    "(myocardial infarction, coronary death or stroke)",
    "diabetes_8y": "8-year risk of developing diabetes",
}
REQUIRED_FEATURES: tuple[str, ...] = ("age", "sex_male")
N_IMPUTATIONS = 64
_IMPUTATION_SEED = 20130612

INPUT_SPEC: dict[str, Any] = {
    "features": list(FEATURE_NAMES),
    "units": {spec.name: spec.unit for spec in FEATURES},
    "source": "FHIR R4 Observation/Patient/Condition/MedicationStatement, see models.risk.features",
}

if tuple(label.name for label in RISK_LABELS) != OUTCOMES:  # pragma: no cover
    raise RuntimeError("network outputs and risk labels disagree")

FloatArray = npt.NDArray[np.float64]


class InsufficientFeaturesError(ValueError):
    """The features cannot support a risk prediction (age or sex unknown)."""


@dataclass(frozen=True)
class FeatureContribution:
    """How much one present feature moved the log-odds, against the cohort's mean value."""

    feature: str
    description: str
    delta_log_odds: float


@dataclass(frozen=True)
class RiskPrediction:
    """One outcome's predicted risk for one patient, ready for a FHIR RiskAssessment."""

    outcome: CodedLabel
    probability: float
    horizon_years: int
    confidence: float
    interval: tuple[float, float]
    missing_features: tuple[str, ...]
    basis: tuple[str, ...]
    rationale: str
    contributions: tuple[FeatureContribution, ...]
    outside_training_range: tuple[str, ...]
    provenance: ModelProvenance

    def __post_init__(self) -> None:
        for name in ("probability", "confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or math.isnan(value):
                raise ValueError(f"RiskPrediction.{name} must be within [0, 1], got {value}")
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("RiskPrediction.interval must be ordered within [0, 1]")
        if self.horizon_years < 1:
            raise ValueError("RiskPrediction.horizon_years must be positive")
        unknown = set(self.missing_features) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown missing features {sorted(unknown)}")


def check_card(card: ModelCard) -> None:
    """Raise :class:`ModelLoadError` unless ``card`` is a risk model this code can run."""
    problems: list[str] = []
    if card.task != TASK:
        problems.append(f"task is {card.task!r}, expected {TASK!r}")
    if card.coded_labels != RISK_LABELS:
        got = [(label.name, label.code_value) for label in card.labels]
        problems.append(f"labels are {got}, expected cvd_10y/49601007, diabetes_8y/73211009")
    if card.input.get("features") != list(FEATURE_NAMES):
        problems.append(f"input features are {card.input.get('features')}")
    if card.preprocessing.get("id") != PREPROCESSING_ID:
        problems.append(f"preprocessing id is {card.preprocessing.get('id')!r}")
    arch = {k: card.architecture.get(k) for k in ARCHITECTURE}
    if arch != ARCHITECTURE:
        problems.append(f"architecture is {arch}, expected {ARCHITECTURE}")
    imputation = card.preprocessing.get("imputation")
    if not isinstance(imputation, dict) or set(imputation) != set(FEATURE_NAMES):
        problems.append("preprocessing.imputation must describe every feature")
    if problems:
        raise ModelLoadError(
            f"model {card.name} {card.version} is not a risk model this worker can run: "
            f"{'; '.join(problems)}. Use a model directory written by models.risk.train"
        )


def _describe(name: str, value: float) -> str:
    spec = FEATURE_BY_NAME[name]
    if spec.binary:
        yes, no = {
            "sex_male": ("male", "female"),
            "current_smoker": ("current smoker", "not a current smoker"),
            "diabetes": ("diabetes", "no diabetes"),
            "bp_treated": ("on antihypertensive treatment", "no antihypertensive treatment"),
        }[name]
        return yes if value >= 0.5 else no
    return f"{spec.display} {value:.3g} {spec.unit}"


def _percent(p: float) -> str:
    return f"{100.0 * p:.1f} %"


class RiskModel:
    """A loaded risk model, ready to predict."""

    def __init__(self, network: RiskMLP, card: ModelCard, device: torch.device) -> None:
        """Wrap a network whose weights match ``card``; prefer :meth:`load`."""
        self.network = network.to(device).eval()
        self.card = card
        self.provenance: ModelProvenance = card.provenance
        self.device = device
        # check_card has made sure this is a dict describing every feature.
        self._imputation: dict[str, Any] = dict(card.preprocessing["imputation"])  # type: ignore[arg-type]
        self._low = np.array([s.training_range[0] for s in FEATURES])
        self._high = np.array([s.training_range[1] for s in FEATURES])

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu") -> RiskModel:
        """Read and check the card, verify the weights' sha256, load them.

        Raises :class:`ModelLoadError` saying what is wrong and what to do.
        """
        card = read_model_card(Path(model_dir))
        check_card(card)
        try:
            resolved = torch.device(device if device != "auto" else "cpu")
        except RuntimeError as exc:
            raise ModelLoadError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from exc
        if device == "auto" and torch.cuda.is_available():
            resolved = torch.device("cuda")
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but no CUDA device is available")
        state = load_weights(Path(model_dir), card, map_location="cpu")
        network = RiskMLP()
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"weights of model {card.name} {card.version} do not fit the network named by "
                "its card: write the model directory again with models.risk.train"
            ) from exc
        return cls(network, card, resolved)

    # -- batch interface ----------------------------------------------------------------------

    def _clip(self, values: FloatArray) -> FloatArray:
        return np.where(np.isnan(values), np.nan, np.clip(values, self._low, self._high))

    def log_odds(self, values: npt.ArrayLike) -> FloatArray:
        """Calibrated log-odds (N, 2) of raw feature rows (N, 12), NaN marking missing."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"expected feature rows of shape (N, {len(FEATURE_NAMES)})")
        if np.isinf(arr).any():
            raise ValueError("feature rows hold infinite values")
        out: list[FloatArray] = []
        with torch.inference_mode():
            for start in range(0, len(arr), 8192):
                chunk = torch.from_numpy(self._clip(arr[start : start + 8192])).float()
                logits = self.network.calibrated_logits(chunk.to(self.device))
                out.append(logits.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(OUTCOMES)))

    def predict_values(self, values: npt.ArrayLike) -> FloatArray:
        """Probabilities (N, 2) of raw feature rows (N, 12), NaN marking missing."""
        return np.asarray(1.0 / (1.0 + np.exp(-self.log_odds(values))))

    # -- one patient --------------------------------------------------------------------------

    def _imputations(self, row: FloatArray, missing: list[str]) -> FloatArray:
        rng = np.random.default_rng(_IMPUTATION_SEED)
        batch = np.repeat(row[None, :], N_IMPUTATIONS, axis=0)
        for name in missing:
            j = FEATURE_NAMES.index(name)
            spec = self._imputation[name]
            if FEATURE_BY_NAME[name].binary:
                batch[:, j] = (rng.random(N_IMPUTATIONS) < float(spec["prevalence"])).astype(
                    np.float64
                )
            else:
                quantiles = np.asarray(spec["quantiles"], dtype=np.float64)
                grid = np.linspace(0.0, 1.0, len(quantiles))
                batch[:, j] = np.interp(rng.random(N_IMPUTATIONS), grid, quantiles)
        return batch

    def predict(self, features: RiskFeatures) -> list[RiskPrediction]:
        """Predict every applicable outcome for one patient.

        Raises :class:`InsufficientFeaturesError` when age or sex is missing.
        """
        lacking = [name for name in REQUIRED_FEATURES if name not in features.values]
        if lacking:
            raise InsufficientFeaturesError(
                f"cannot assess risk without {', '.join(lacking)}: the underlying equations "
                "are age- and sex-specific"
            )
        row = np.array([features.values.get(n, np.nan) for n in FEATURE_NAMES], dtype=np.float64)
        outside = tuple(
            name
            for j, name in enumerate(FEATURE_NAMES)
            if not np.isnan(row[j]) and not self._low[j] <= row[j] <= self._high[j]
        )
        missing = [n for n in FEATURE_NAMES if n not in features.values]
        base = self.log_odds(row[None, :])[0]

        # Contribution of each present feature: its value against the training cohort's mean.
        present = [n for n in FEATURE_NAMES if n in features.values]
        cohort_mean = self.network.feature_mean.double().cpu().numpy()
        occluded = np.repeat(row[None, :], len(present), axis=0)
        for i, name in enumerate(present):
            j = FEATURE_NAMES.index(name)
            occluded[i, j] = cohort_mean[j]
        occluded_logits = self.log_odds(occluded) if present else np.zeros((0, 2))

        diabetic = features.values.get("diabetes") == 1.0
        predictions: list[RiskPrediction] = []
        for k, label in enumerate(self.card.coded_labels):
            outcome = label.name
            if outcome == "diabetes_8y" and diabetic:
                continue  # incident diabetes is not a question for a patient who has it
            uncertain = list(missing)
            ensemble_row = row.copy()
            assumption = ""
            if outcome == "diabetes_8y" and "diabetes" in uncertain:
                # The prediction is conditional on no diabetes now; do not impute it.
                uncertain.remove("diabetes")
                ensemble_row[FEATURE_NAMES.index("diabetes")] = 0.0
                assumption = " Assumes the patient does not have diabetes now."
            probability = float(1.0 / (1.0 + math.exp(-base[k])))
            if uncertain:
                draws = self.log_odds(self._imputations(ensemble_row, uncertain))[:, k]
                lo_logit, hi_logit = np.quantile(draws, [0.1, 0.9])
                width = float(hi_logit - lo_logit)
                confidence = math.exp(-width / 2.0)
                low = float(1.0 / (1.0 + math.exp(-lo_logit)))
                high = float(1.0 / (1.0 + math.exp(-hi_logit)))
                interval = (min(low, probability), max(high, probability))
            else:
                confidence, interval = 1.0, (probability, probability)
            contributions = tuple(
                sorted(
                    (
                        FeatureContribution(
                            feature=name,
                            description=_describe(name, features.values[name]),
                            delta_log_odds=float(base[k] - occluded_logits[i, k]),
                        )
                        for i, name in enumerate(present)
                    ),
                    key=lambda c: -abs(c.delta_log_odds),
                )
            )
            predictions.append(
                RiskPrediction(
                    outcome=label,
                    probability=probability,
                    horizon_years=HORIZON_YEARS[outcome],
                    confidence=float(min(1.0, confidence)),
                    interval=interval,
                    missing_features=tuple(missing),
                    basis=tuple(features.basis),
                    rationale=self._rationale(
                        outcome,
                        probability,
                        interval,
                        confidence,
                        contributions,
                        missing,
                        outside,
                        features,
                        assumption,
                    ),
                    contributions=contributions,
                    outside_training_range=outside,
                    provenance=self.provenance,
                )
            )
        return predictions

    def _rationale(
        self,
        outcome: str,
        probability: float,
        interval: tuple[float, float],
        confidence: float,
        contributions: tuple[FeatureContribution, ...],
        missing: list[str],
        outside: tuple[str, ...],
        features: RiskFeatures,
        assumption: str,
    ) -> str:
        parts = [f"{OUTCOME_TEXT[outcome][0].upper()}{OUTCOME_TEXT[outcome][1:]}: "]
        parts.append(_percent(probability))
        if missing:
            parts.append(
                f" (between {_percent(interval[0])} and {_percent(interval[1])} over plausible "
                f"values of the missing features; confidence {confidence:.2f})."
            )
        else:
            parts.append(" (all features present; confidence 1.00).")
        raised = [c.description for c in contributions if c.delta_log_odds > 0.05][:3]
        lowered = [c.description for c in contributions if c.delta_log_odds < -0.05][:2]
        if raised:
            parts.append(f" Raised most by: {', '.join(raised)}.")
        if lowered:
            parts.append(f" Lowered by: {', '.join(lowered)}.")
        if missing:
            shown = ", ".join(FEATURE_BY_NAME[n].display for n in missing)
            parts.append(f" Missing: {shown}.")
        if outside:
            shown = ", ".join(FEATURE_BY_NAME[n].display for n in outside)
            parts.append(f" Outside the range the model was trained on (clipped): {shown}.")
        for note in features.notes:
            parts.append(f" Note: {note}.")
        parts.append(assumption)
        if self.provenance.demo:
            parts.append(" Demo model trained on simulated patients only: not for clinical use.")
        return "".join(parts)
