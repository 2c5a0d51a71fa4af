"""A simulated cohort: correlated risk factors, outcomes drawn from the published equations.

The demo risk model is trained and judged only on patients made here; no patient data is used.
Risk factors are drawn so that their relations look like an adult primary-prevention population
aged 40-79 (roughly NHANES-like means and spreads), not to reproduce any survey exactly:

* age ~ Uniform(40, 79) years; sex male with probability 0.5.
* BMI: log-normal around 28.5 kg/m2 (log-sd 0.18), rising slightly with age; 16-60.
* current smoking: probability 20 % at 40 falling to 10 % at 79.
* diabetes (prevalent): logistic in age, BMI and sex (about 13 % overall).
* fasting glucose: 92 mg/dL + 0.12 per year over 40 + 0.9 per kg/m2 over 28 (sd 9), kept below
  126 without diabetes; around 150 (sd 35) with diabetes.
* HbA1c = 2.0 + 0.036 x fasting glucose (%), sd 0.35 (0.7 with diabetes): the line through the
  ADA thresholds (126 mg/dL <-> 6.5 %).
* systolic pressure: 118 + 0.55 per year over 40 + 0.8 per kg/m2 over 28 + 4 if male (sd 15);
  antihypertensive treatment more likely the higher it is, and lowers it by 10 mm Hg.
* diastolic pressure: 0.35 x systolic + 32, lower with age (sd 7).
* total cholesterol ~ 200 mg/dL (sd 38), 8 lower in men; HDL ~ 56 (sd 13), 10 lower in men,
  lower with BMI and smoking.
* not given to the model, only to the diabetes equation: triglycerides (log-normal, higher with
  BMI, lower with HDL) and parental history of diabetes (25 %). The equation's AUC is therefore
  an upper reference the model cannot quite reach.

Outcomes: a 10-year hard ASCVD event ~ Bernoulli(PCE, white/other equations of the patient's
sex: race is not a model input); incident diabetes within 8 years ~ Bernoulli(Framingham
Offspring model) for patients without diabetes, undefined (NaN) for those who have it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.risk.equations import (
    PCE_VALID_RANGES,
    PceGroup,
    framingham_diabetes_risk,
    pce_ten_year_risk,
)
from models.risk.features import FEATURE_NAMES

COHORT_ID = "carebridge.risk.cohort/1"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Cohort:
    """Simulated patients: features (n x 12, :data:`FEATURE_NAMES` order) and outcomes."""

    features: FloatArray
    cvd_probability: FloatArray
    cvd_event: FloatArray
    diabetes_probability: FloatArray  # NaN where diabetes is already present
    diabetes_event: FloatArray  # NaN where diabetes is already present
    triglycerides: FloatArray
    parental_history: FloatArray

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.shape != (n, len(FEATURE_NAMES)):
            raise ValueError(f"features must be (n, {len(FEATURE_NAMES)})")
        for name in ("cvd_probability", "cvd_event", "diabetes_probability", "diabetes_event"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have one value per patient")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def column(self, name: str) -> FloatArray:
        """One feature of every patient."""
        return self.features[:, FEATURE_NAMES.index(name)]


def _sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


#: Independent random streams, so an evaluation cohort never repeats a training cohort.
PURPOSES: dict[str, int] = {"train": 0, "evaluate": 1}


def simulate_cohort(n_patients: int, seed: int, purpose: str = "train") -> Cohort:
    """Simulate ``n_patients`` patients (see the module docstring).

    Deterministic in (``seed``, ``purpose``); the ``"train"`` and ``"evaluate"`` streams are
    independent even for the same seed.
    """
    if n_patients < 1:
        raise ValueError("n_patients must be positive")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {sorted(PURPOSES)}, got {purpose!r}")
    rng = np.random.default_rng([seed, 20130612, PURPOSES[purpose]])
    n = n_patients
    age = rng.uniform(40.0, 79.0, n)
    male = (rng.random(n) < 0.5).astype(np.float64)
    bmi = np.clip(np.exp(np.log(28.5) + 0.002 * (age - 55.0) + rng.normal(0.0, 0.18, n)), 16, 60)
    smoker = (rng.random(n) < 0.20 - 0.10 * (age - 40.0) / 39.0).astype(np.float64)
    diabetes = (
        rng.random(n) < _sigmoid(-2.6 + 0.045 * (age - 55.0) + 0.10 * (bmi - 28.5) + 0.2 * male)
    ).astype(np.float64)

    glucose_normal = np.clip(
        92.0 + 0.12 * (age - 40.0) + 0.9 * (bmi - 28.0) + rng.normal(0.0, 9.0, n), 65.0, 125.0
    )
    glucose_diabetic = np.clip(rng.normal(150.0, 35.0, n), 90.0, 350.0)
    glucose = np.where(diabetes > 0, glucose_diabetic, glucose_normal)
    a1c_noise = np.where(diabetes > 0, 0.7, 0.35) * rng.standard_normal(n)
    hba1c = np.clip(2.0 + 0.036 * glucose + a1c_noise, 4.0, 14.0)
    # Without diabetes both markers stay below the ADA thresholds, as a diagnosis would follow.
    hba1c = np.where(diabetes > 0, hba1c, np.minimum(hba1c, 6.4))

    sbp_untreated = 118.0 + 0.55 * (age - 40.0) + 0.8 * (bmi - 28.0) + 4.0 * male
    sbp_untreated = sbp_untreated + rng.normal(0.0, 15.0, n)
    treated = (
        rng.random(n)
        < _sigmoid(-1.2 + 0.06 * (sbp_untreated - 135.0) + 0.04 * (age - 55.0) + 0.5 * diabetes)
    ).astype(np.float64)
    lo, hi = PCE_VALID_RANGES["sbp"]
    sbp = np.clip(sbp_untreated - 10.0 * treated, lo, hi)
    dbp = np.clip(0.35 * sbp + 32.0 - 0.15 * (age - 55.0) + rng.normal(0.0, 7.0, n), 50, 120)
    dbp = np.minimum(dbp, sbp - 10.0)

    lo, hi = PCE_VALID_RANGES["total_cholesterol"]
    total_chol = np.clip(200.0 - 8.0 * male + 0.6 * (bmi - 28.0) + rng.normal(0.0, 38.0, n), lo, hi)
    lo, hi = PCE_VALID_RANGES["hdl_cholesterol"]
    hdl = np.clip(
        56.0 - 10.0 * male - 0.9 * (bmi - 28.0) - 3.0 * smoker + rng.normal(0.0, 13.0, n), lo, hi
    )
    triglycerides = np.exp(
        np.log(130.0) + 0.02 * (bmi - 28.0) - 0.012 * (hdl - 50.0) + rng.normal(0.0, 0.4, n)
    )
    parental = (rng.random(n) < 0.25).astype(np.float64)

    cvd_p = np.empty(n)
    for sex_value, group in ((0.0, PceGroup.WHITE_FEMALE), (1.0, PceGroup.WHITE_MALE)):
        rows = male == sex_value
        cvd_p[rows] = pce_ten_year_risk(
            group,
            age=age[rows],
            total_cholesterol=total_chol[rows],
            hdl_cholesterol=hdl[rows],
            sbp=sbp[rows],
            bp_treated=treated[rows],
            current_smoker=smoker[rows],
            diabetes=diabetes[rows],
        )
    cvd_event = (rng.random(n) < cvd_p).astype(np.float64)

    dm_p = np.full(n, np.nan)
    healthy = diabetes == 0
    dm_p[healthy] = framingham_diabetes_risk(
        age=age[healthy],
        male=male[healthy],
        bmi=bmi[healthy],
        sbp=sbp[healthy],
        dbp=dbp[healthy],
        bp_treated=treated[healthy],
        hdl_cholesterol=hdl[healthy],
        triglycerides=triglycerides[healthy],
        fasting_glucose=glucose[healthy],
        parental_history=parental[healthy],
    )
    dm_draw = rng.random(n)
    dm_event = np.where(healthy, (dm_draw < np.nan_to_num(dm_p)).astype(np.float64), np.nan)

    columns = {
        "age": age,
        "sex_male": male,
        "bmi": bmi,
        "sbp": sbp,
        "dbp": dbp,
        "total_cholesterol": total_chol,
        "hdl_cholesterol": hdl,
        "hba1c": hba1c,
        "fasting_glucose": glucose,
        "current_smoker": smoker,
        "diabetes": diabetes,
        "bp_treated": treated,
    }
    features = np.stack([columns[name] for name in FEATURE_NAMES], axis=1).astype(np.float64)
    return Cohort(
        features=features,
        cvd_probability=cvd_p,
        cvd_event=cvd_event,
        diabetes_probability=dm_p,
        diabetes_event=dm_event,
        triglycerides=triglycerides,
        parental_history=parental,
    )
