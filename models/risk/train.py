"""Train the demo risk model on a simulated cohort, and evaluate a risk model against the
published equations on held-out simulated patients.

The demo model exists so the risk pipeline runs end to end without patient data: it learns the
Pooled Cohort Equations and the Framingham Offspring diabetes model from patients simulated by
:mod:`models.risk.cohort`, and its card says ``demo: true``. It must never be used on patients.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from pydantic import JsonValue
from scipy.stats import rankdata

from models.card import LabelSpec, ModelCardDraft, read_model_card, write_model_dir
from models.risk.cohort import COHORT_ID, Cohort, simulate_cohort
from models.risk.features import FEATURE_NAMES, FEATURES
from models.risk.mlp import ARCHITECTURE, OUTCOMES, RiskMLP
from models.risk.predict import (
    HORIZON_YEARS,
    INPUT_SPEC,
    PREPROCESSING_ID,
    RISK_LABELS,
    TASK,
    RiskModel,
)

MODEL_NAME = "risk-mlp"
MODEL_VERSION = "0.1.0-demo"

_VAL_FRACTION = 0.2
_LEARNING_RATE = 2e-3
_WEIGHT_DECAY = 1e-4  # L2 penalty through Adam's weight_decay (added to the gradient)
_MAX_ROW_MISSING_RATE = 0.3
_QUANTILE_POINTS = 21

REFERENCES: dict[str, str] = {
    "cvd_10y": "Pooled Cohort Equations, Goff et al., Circulation 2014;129(25 Suppl 2):S49-S73 "
    "(white/other equations by sex)",
    "diabetes_8y": "Framingham Offspring simple clinical model, Wilson et al., Arch Intern Med "
    "2007;167(10):1068-1074",
}

FloatArray = npt.NDArray[np.float64]


# --- metrics ----------------------------------------------------------------------------------


def auc(scores: FloatArray, events: FloatArray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    y = np.asarray(events) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibration_fit(probabilities: FloatArray, events: FloatArray) -> tuple[float, float]:
    """Logistic recalibration ``logit P(event) = a + b * logit(p)``: returns (a, b).

    A calibrated model has intercept a = 0 and slope b = 1; b < 1 means predictions too extreme.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1.0 - 1e-6)
    y = np.asarray(events, dtype=np.float64)
    x = np.log(p / (1.0 - p))
    design = np.stack([np.ones_like(x), x], axis=1)
    beta = np.array([0.0, 1.0])
    for _ in range(50):  # Newton-Raphson on the logistic log-likelihood
        mu = 1.0 / (1.0 + np.exp(-(design @ beta)))
        w = mu * (1.0 - mu)
        hessian = design.T @ (design * w[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, design.T @ (y - mu))
        beta = beta + step
        if np.abs(step).max() < 1e-8:
            break
    return float(beta[0]), float(beta[1])


@dataclass(frozen=True)
class CalibrationBin:
    """One decile of predicted risk: mean predicted, observed event rate, patients."""

    predicted: float
    observed: float
    n: int


@dataclass(frozen=True)
class OutcomeEvaluation:
    """How one outcome's predictions compare with simulated outcomes and with the equation."""

    outcome: str
    horizon_years: int
    reference_equation: str
    n: int
    events: int
    auc: float
    auc_equation: float
    brier: float
    brier_equation: float
    calibration_intercept: float
    calibration_slope: float
    mean_predicted: float
    observed_rate: float
    mean_abs_difference_from_equation: float
    bins: tuple[CalibrationBin, ...]


def evaluate_outcome(
    outcome: str, predicted: FloatArray, equation: FloatArray, events: FloatArray
) -> OutcomeEvaluation:
    """Discrimination, calibration and agreement of ``predicted`` for one outcome."""
    intercept, slope = calibration_fit(predicted, events)
    order = np.argsort(predicted, kind="stable")
    bins = tuple(
        CalibrationBin(
            predicted=round(float(predicted[idx].mean()), 4),
            observed=round(float(events[idx].mean()), 4),
            n=len(idx),
        )
        for idx in np.array_split(order, 10)
        if len(idx)
    )
    return OutcomeEvaluation(
        outcome=outcome,
        horizon_years=HORIZON_YEARS[outcome],
        reference_equation=REFERENCES[outcome],
        n=len(events),
        events=int(events.sum()),
        auc=round(auc(predicted, events), 4),
        auc_equation=round(auc(equation, events), 4),
        brier=round(float(np.mean((predicted - events) ** 2)), 5),
        brier_equation=round(float(np.mean((equation - events) ** 2)), 5),
        calibration_intercept=round(intercept, 4),
        calibration_slope=round(slope, 4),
        mean_predicted=round(float(predicted.mean()), 4),
        observed_rate=round(float(events.mean()), 4),
        mean_abs_difference_from_equation=round(float(np.abs(predicted - equation).mean()), 4),
        bins=bins,
    )


def _outcome_arrays(cohort: Cohort, k: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(defined rows mask, equation probability, event) of outcome ``k``."""
    if OUTCOMES[k] == "cvd_10y":
        return np.ones(len(cohort), dtype=bool), cohort.cvd_probability, cohort.cvd_event
    defined = ~np.isnan(cohort.diabetes_event)
    return defined, cohort.diabetes_probability, cohort.diabetes_event


# --- training ---------------------------------------------------------------------------------


def _mask_randomly(values: FloatArray, rng: np.random.Generator, max_rate: float) -> FloatArray:
    """Hide features at random: each row at its own rate drawn from U(0, max_rate)."""
    rates = rng.uniform(0.0, max_rate, size=(values.shape[0], 1))
    hidden = rng.random(values.shape) < rates
    return np.where(hidden, np.nan, values)


def _imputation_spec(train_features: FloatArray) -> dict[str, JsonValue]:
    spec: dict[str, JsonValue] = {}
    for j, feature in enumerate(FEATURES):
        column = train_features[:, j]
        if feature.binary:
            spec[feature.name] = {"prevalence": round(float(column.mean()), 4)}
        else:
            quantiles = np.quantile(column, np.linspace(0.0, 1.0, _QUANTILE_POINTS))
            spec[feature.name] = {"quantiles": [round(float(q), 3) for q in quantiles]}
    return spec


def _weighted_loss(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor
) -> torch.Tensor:
    """Class-weighted BCE averaged per outcome over rows where the outcome is defined."""
    defined = ~torch.isnan(targets)
    safe = torch.where(defined, targets, torch.zeros_like(targets))
    losses = F.binary_cross_entropy_with_logits(
        logits, safe, pos_weight=pos_weight, reduction="none"
    )
    losses = losses * defined
    per_outcome = losses.sum(dim=0) / defined.sum(dim=0).clamp(min=1)
    return per_outcome.mean()


def train_demo(
    model_dir: Path,
    *,
    seed: int = 0,
    n_patients: int = 80000,
    epochs: int = 30,
    batch_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train the demo risk model on a simulated cohort and write it to ``model_dir``.

    80 % of the cohort trains (features hidden at random so the network learns the missing
    indicators), 20 % is held out; the epoch with the lowest held-out log-loss is kept. The card
    (``risk-mlp`` ``0.1.0-demo``, ``demo`` true) reports held-out AUC and calibration of both
    outcomes next to the equations'. Returns ``model_dir``.
    """
    if n_patients < 100:
        raise ValueError("n_patients must be at least 100")
    if epochs < 1 or batch_size < 2:
        raise ValueError("epochs must be positive and batch_size at least 2")
    report = progress or (lambda _msg: None)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    # A network this small runs fastest on one thread (no thread hand-off per layer).
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng([seed, 7])
        cohort = simulate_cohort(n_patients, seed, purpose="train")
        order = rng.permutation(n_patients)
        n_val = max(1, round(n_patients * _VAL_FRACTION))
        val_idx, train_idx = order[:n_val], order[n_val:]
        targets = np.stack([cohort.cvd_event, cohort.diabetes_event], axis=1)
        x_train, y_train = cohort.features[train_idx], targets[train_idx]
        x_val = cohort.features[val_idx]

        positives = np.nansum(y_train, axis=0)
        defined = (~np.isnan(y_train)).sum(axis=0)
        pos_weight = (defined - positives) / np.maximum(positives, 1.0)

        network = RiskMLP()
        network.feature_mean.copy_(torch.from_numpy(x_train.mean(axis=0)).float())
        network.feature_scale.copy_(torch.from_numpy(x_train.std(axis=0) + 1e-6).float())
        network.logit_offset.copy_(torch.from_numpy(np.log(pos_weight)).float())
        pos_weight_t = torch.from_numpy(pos_weight).float()

        optimizer = torch.optim.Adam(
            network.parameters(), lr=_LEARNING_RATE, weight_decay=_WEIGHT_DECAY
        )
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=steps_per_epoch * epochs
        )
        val_x = torch.from_numpy(x_val).float()
        val_y = torch.from_numpy(targets[val_idx]).float()
        best_loss, best_epoch = math.inf, 0
        best_state: dict[str, torch.Tensor] = {}
        history: list[JsonValue] = []
        y_train_t = torch.from_numpy(y_train).float()
        for epoch in range(1, epochs + 1):
            network.train()
            perm = torch.from_numpy(rng.permutation(len(x_train)))
            # A fresh random masking of the whole training set each epoch.
            x_epoch = torch.from_numpy(_mask_randomly(x_train, rng, _MAX_ROW_MISSING_RATE))
            encoded = network.encode(x_epoch.float())
            loss_sum = 0.0
            for start in range(0, len(perm), batch_size):
                idx = perm[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = _weighted_loss(network(encoded[idx]), y_train_t[idx], pos_weight_t)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(idx)
            network.eval()
            with torch.inference_mode():
                logits = network.calibrated_logits(val_x)
                val_loss = float(_weighted_loss(logits, val_y, torch.ones(len(OUTCOMES))))
            history.append(
                {
                    "epoch": epoch,
                    "train_weighted_loss": round(loss_sum / len(x_train), 5),
                    "val_log_loss": round(val_loss, 5),
                }
            )
            report(f"epoch {epoch}/{epochs}: held-out log-loss {val_loss:.4f}")
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(network.state_dict())

        network.load_state_dict(best_state)
        network.eval()
        with torch.inference_mode():
            val_prob = torch.sigmoid(network.calibrated_logits(val_x)).double().numpy()
        metrics: dict[str, JsonValue] = {"held_out_patients": int(n_val)}
        val_cohort = Cohort(
            features=cohort.features[val_idx],
            cvd_probability=cohort.cvd_probability[val_idx],
            cvd_event=cohort.cvd_event[val_idx],
            diabetes_probability=cohort.diabetes_probability[val_idx],
            diabetes_event=cohort.diabetes_event[val_idx],
            triglycerides=cohort.triglycerides[val_idx],
            parental_history=cohort.parental_history[val_idx],
        )
        for k, outcome in enumerate(OUTCOMES):
            rows, equation, events = _outcome_arrays(val_cohort, k)
            result = evaluate_outcome(outcome, val_prob[rows, k], equation[rows], events[rows])
            summary = asdict(result)
            summary.pop("bins")
            metrics[outcome] = summary

        seconds = round(time.perf_counter() - started, 1)
        draft = ModelCardDraft(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            task=TASK,
            labels=tuple(LabelSpec.from_coded(label) for label in RISK_LABELS),
            input=INPUT_SPEC,
            preprocessing={
                "id": PREPROCESSING_ID,
                "missing": "value 0 after standardisation (the cohort mean) plus a missing "
                "indicator per feature; confidence from 64 imputations drawn from the "
                "training distribution below",
                "training_range": {f.name: list(f.training_range) for f in FEATURES},
                "imputation": _imputation_spec(x_train),
            },
            architecture={
                **ARCHITECTURE,
                "horizons_years": dict(HORIZON_YEARS),
                "calibration": "logit_offset = ln(pos_weight) buffer subtracted at inference",
            },
            training={
                "data": "simulated patients only (no patient data)",
                "cohort": COHORT_ID,
                "outcomes_drawn_from": dict(REFERENCES),
                "n_patients": n_patients,
                "train_count": len(train_idx),
                "val_count": int(n_val),
                "epochs": epochs,
                "best_epoch": best_epoch,
                "seed": seed,
                "batch_size": batch_size,
                "loss": "class-weighted binary cross-entropy (pos_weight = negatives/positives)",
                "pos_weight": {
                    o: round(float(w), 3) for o, w in zip(OUTCOMES, pos_weight, strict=True)
                },
                "optimizer": f"Adam (lr {_LEARNING_RATE}, L2 weight decay {_WEIGHT_DECAY})",
                "lr_schedule": "cosine annealing",
                "missing_augmentation": f"features hidden per row at a rate ~ U(0, "
                f"{_MAX_ROW_MISSING_RATE})",
                "history": history,
                "seconds": seconds,
                "torch": torch.__version__,
            },
            metrics=metrics,
            demo=True,
        )
        write_model_dir(Path(model_dir), draft, best_state)
        report(f"wrote {MODEL_NAME} {MODEL_VERSION} in {seconds:.0f} s")
        return Path(model_dir)
    finally:
        torch.set_num_threads(previous_threads)


# --- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskEvaluation:
    """A risk model judged on simulated patients it has not seen."""

    model: str
    version: str
    weights_sha256: str
    demo: bool
    n_patients: int
    seed: int
    missing_rate: float
    outcomes: tuple[OutcomeEvaluation, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def evaluate(
    model_dir: Path,
    *,
    n_patients: int = 20000,
    seed: int = 1,
    missing_rate: float = 0.0,
    device: str = "cpu",
) -> RiskEvaluation:
    """Evaluate a risk model directory on a freshly simulated held-out cohort.

    The cohort comes from the ``"evaluate"`` random stream, so it never repeats a training
    cohort. With ``missing_rate`` > 0 each feature except age and sex is hidden at that rate, to
    show how the model degrades. Each outcome reports the model's AUC against the simulated
    outcomes next to the AUC of the equation that generated them (the reference; for diabetes it
    also uses triglycerides and parental history, which the model never sees), Brier scores,
    logistic calibration intercept/slope and decile calibration bins.
    """
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError("missing_rate must be in [0, 1)")
    model = RiskModel.load(Path(model_dir), device=device)
    card = read_model_card(Path(model_dir))
    cohort = simulate_cohort(n_patients, seed, purpose="evaluate")
    features = cohort.features.copy()
    if missing_rate > 0:
        rng = np.random.default_rng([seed, 11])
        hidden = rng.random(features.shape) < missing_rate
        hidden[:, [FEATURE_NAMES.index("age"), FEATURE_NAMES.index("sex_male")]] = False
        features = np.where(hidden, np.nan, features)
    probabilities = model.predict_values(features)
    results = []
    for k, outcome in enumerate(OUTCOMES):
        rows, equation, events = _outcome_arrays(cohort, k)
        results.append(
            evaluate_outcome(outcome, probabilities[rows, k], equation[rows], events[rows])
        )
    return RiskEvaluation(
        model=card.name,
        version=card.version,
        weights_sha256=card.weights.sha256,
        demo=card.demo,
        n_patients=n_patients,
        seed=seed,
        missing_rate=missing_rate,
        outcomes=tuple(results),
    )
