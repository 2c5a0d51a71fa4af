"""Published risk equations: the reference the demo risk model is simulated from and judged by.

**10-year hard ASCVD risk -- the Pooled Cohort Equations (PCE).**
Goff DC Jr, Lloyd-Jones DM, Bennett G, et al. 2013 ACC/AHA Guideline on the Assessment of
Cardiovascular Risk. Circulation. 2014;129(25 Suppl 2):S49-S73 (published online 2013),
Table A ("Equation Parameters of the Pooled Cohort Equations for Estimation of 10-Year Risk of
Hard ASCVD") with the worked example for a 55-year-old (total cholesterol 213 mg/dL, HDL
50 mg/dL, untreated systolic 120 mm Hg, non-smoker, non-diabetic): 2.1 % white women, 3.0 %
African-American women, 5.3 % white men, 6.1 % African-American men.

    risk = 1 - S10 ** exp(sum(coefficient * value) - mean)

Valid for ages 40-79, total cholesterol 130-320 mg/dL, HDL 20-100 mg/dL, systolic 90-200 mm Hg.
Hard ASCVD = non-fatal myocardial infarction, coronary heart disease death, fatal or non-fatal
stroke. The guideline uses the white equations for races other than African-American.

**8-year risk of incident type 2 diabetes -- Framingham Offspring simple clinical model.**
Wilson PWF, Meigs JB, Sullivan L, Fox CS, Nathan DM, D'Agostino RB Sr. Prediction of incident
diabetes mellitus in middle-aged adults: the Framingham Offspring Study. Arch Intern Med.
2007;167(10):1068-1074. Logistic model with the regression coefficients published by the
Framingham Heart Study for this model (diabetes, 8-year risk). It applies to adults without
diabetes; its fasting-glucose term covers 100-125 mg/dL (impaired fasting glucose). The
horizon is 8 years, not 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ArrayLike = float | npt.ArrayLike


class PceGroup(StrEnum):
    """The four race-sex groups of the Pooled Cohort Equations."""

    WHITE_FEMALE = "white_female"
    AFRICAN_AMERICAN_FEMALE = "african_american_female"
    WHITE_MALE = "white_male"
    AFRICAN_AMERICAN_MALE = "african_american_male"


@dataclass(frozen=True)
class PceCoefficients:
    """One column of Goff et al. 2013, Table A (0 where the table says N/A)."""

    ln_age: float
    ln_age_squared: float
    ln_total_cholesterol: float
    ln_age_x_ln_total_cholesterol: float
    ln_hdl: float
    ln_age_x_ln_hdl: float
    ln_treated_sbp: float
    ln_age_x_ln_treated_sbp: float
    ln_untreated_sbp: float
    ln_age_x_ln_untreated_sbp: float
    current_smoker: float
    ln_age_x_current_smoker: float
    diabetes: float
    baseline_survival: float
    mean_sum: float


PCE_COEFFICIENTS: dict[PceGroup, PceCoefficients] = {
    PceGroup.WHITE_FEMALE: PceCoefficients(
        ln_age=-29.799,
        ln_age_squared=4.884,
        ln_total_cholesterol=13.540,
        ln_age_x_ln_total_cholesterol=-3.114,
        ln_hdl=-13.578,
        ln_age_x_ln_hdl=3.149,
        ln_treated_sbp=2.019,
        ln_age_x_ln_treated_sbp=0.0,
        ln_untreated_sbp=1.957,
        ln_age_x_ln_untreated_sbp=0.0,
        current_smoker=7.574,
        ln_age_x_current_smoker=-1.665,
        diabetes=0.661,
        baseline_survival=0.9665,
        mean_sum=-29.18,
    ),
    PceGroup.AFRICAN_AMERICAN_FEMALE: PceCoefficients(
        ln_age=17.114,
        ln_age_squared=0.0,
        ln_total_cholesterol=0.940,
        ln_age_x_ln_total_cholesterol=0.0,
        ln_hdl=-18.920,
        ln_age_x_ln_hdl=4.475,
        ln_treated_sbp=29.291,
        ln_age_x_ln_treated_sbp=-6.432,
        ln_untreated_sbp=27.820,
        ln_age_x_ln_untreated_sbp=-6.087,
        current_smoker=0.691,
        ln_age_x_current_smoker=0.0,
        diabetes=0.874,
        baseline_survival=0.9533,
        mean_sum=86.61,
    ),
    PceGroup.WHITE_MALE: PceCoefficients(
        ln_age=12.344,
        ln_age_squared=0.0,
        ln_total_cholesterol=11.853,
        ln_age_x_ln_total_cholesterol=-2.664,
        ln_hdl=-7.990,
        ln_age_x_ln_hdl=1.769,
        ln_treated_sbp=1.797,
        ln_age_x_ln_treated_sbp=0.0,
        ln_untreated_sbp=1.764,
        ln_age_x_ln_untreated_sbp=0.0,
        current_smoker=7.837,
        ln_age_x_current_smoker=-1.795,
        diabetes=0.658,
        baseline_survival=0.9144,
        mean_sum=61.18,
    ),
    PceGroup.AFRICAN_AMERICAN_MALE: PceCoefficients(
        ln_age=2.469,
        ln_age_squared=0.0,
        ln_total_cholesterol=0.302,
        ln_age_x_ln_total_cholesterol=0.0,
        ln_hdl=-0.307,
        ln_age_x_ln_hdl=0.0,
        ln_treated_sbp=1.916,
        ln_age_x_ln_treated_sbp=0.0,
        ln_untreated_sbp=1.809,
        ln_age_x_ln_untreated_sbp=0.0,
        current_smoker=0.549,
        ln_age_x_current_smoker=0.0,
        diabetes=0.645,
        baseline_survival=0.8954,
        mean_sum=19.54,
    ),
}

#: The domain the equations were derived on; inputs outside it are refused.
PCE_VALID_RANGES: dict[str, tuple[float, float]] = {
    "age": (40.0, 79.0),
    "total_cholesterol": (130.0, 320.0),
    "hdl_cholesterol": (20.0, 100.0),
    "sbp": (90.0, 200.0),
}


def _check_range(name: str, values: FloatArray) -> None:
    lo, hi = PCE_VALID_RANGES[name]
    if np.any(values < lo) or np.any(values > hi) or not np.all(np.isfinite(values)):
        raise ValueError(
            f"{name} outside the Pooled Cohort Equations' range {lo:g}-{hi:g}: the equations "
            "were not derived there"
        )


def pce_sum(
    group: PceGroup,
    *,
    age: ArrayLike,
    total_cholesterol: ArrayLike,
    hdl_cholesterol: ArrayLike,
    sbp: ArrayLike,
    bp_treated: ArrayLike,
    current_smoker: ArrayLike,
    diabetes: ArrayLike,
) -> FloatArray:
    """The individual sum (coefficient x value) of one PCE group (array-valued)."""
    c = PCE_COEFFICIENTS[PceGroup(group)]
    arrays = {
        "age": np.asarray(age, dtype=np.float64),
        "total_cholesterol": np.asarray(total_cholesterol, dtype=np.float64),
        "hdl_cholesterol": np.asarray(hdl_cholesterol, dtype=np.float64),
        "sbp": np.asarray(sbp, dtype=np.float64),
    }
    for name, values in arrays.items():
        _check_range(name, values)
    ln_age = np.log(arrays["age"])
    ln_tc = np.log(arrays["total_cholesterol"])
    ln_hdl = np.log(arrays["hdl_cholesterol"])
    ln_sbp = np.log(arrays["sbp"])
    treated = np.asarray(bp_treated, dtype=np.float64)
    smoker = np.asarray(current_smoker, dtype=np.float64)
    diabetic = np.asarray(diabetes, dtype=np.float64)
    sbp_term = (
        treated * (c.ln_treated_sbp + c.ln_age_x_ln_treated_sbp * ln_age) * ln_sbp
        + (1.0 - treated) * (c.ln_untreated_sbp + c.ln_age_x_ln_untreated_sbp * ln_age) * ln_sbp
    )
    total = (
        c.ln_age * ln_age
        + c.ln_age_squared * ln_age**2
        + c.ln_total_cholesterol * ln_tc
        + c.ln_age_x_ln_total_cholesterol * ln_age * ln_tc
        + c.ln_hdl * ln_hdl
        + c.ln_age_x_ln_hdl * ln_age * ln_hdl
        + sbp_term
        + c.current_smoker * smoker
        + c.ln_age_x_current_smoker * ln_age * smoker
        + c.diabetes * diabetic
    )
    return np.asarray(total, dtype=np.float64)


def pce_ten_year_risk(
    group: PceGroup,
    *,
    age: ArrayLike,
    total_cholesterol: ArrayLike,
    hdl_cholesterol: ArrayLike,
    sbp: ArrayLike,
    bp_treated: ArrayLike,
    current_smoker: ArrayLike,
    diabetes: ArrayLike,
) -> FloatArray:
    """10-year risk of a first hard ASCVD event (0-1) by the Pooled Cohort Equations.

    Units: years, mg/dL, mm Hg; binary inputs 0/1. Raises :class:`ValueError` outside
    :data:`PCE_VALID_RANGES`.
    """
    c = PCE_COEFFICIENTS[PceGroup(group)]
    individual = pce_sum(
        group,
        age=age,
        total_cholesterol=total_cholesterol,
        hdl_cholesterol=hdl_cholesterol,
        sbp=sbp,
        bp_treated=bp_treated,
        current_smoker=current_smoker,
        diabetes=diabetes,
    )
    return np.asarray(1.0 - c.baseline_survival ** np.exp(individual - c.mean_sum))


@dataclass(frozen=True)
class FraminghamDiabetesCoefficients:
    """Logistic coefficients of the Framingham Offspring simple clinical model (8-year)."""

    intercept: float = -5.517
    age_50_to_64: float = -0.018
    age_65_and_over: float = -0.081
    male: float = -0.010
    parental_history: float = 0.565
    bmi_25_to_29_9: float = 0.301
    bmi_30_and_over: float = 0.920
    bp_130_85_or_treated: float = 0.498
    low_hdl: float = 0.944  # < 40 mg/dL in men, < 50 mg/dL in women
    triglycerides_150_and_over: float = 0.575
    fasting_glucose_100_to_125: float = 1.980


FRAMINGHAM_DIABETES = FraminghamDiabetesCoefficients()
FRAMINGHAM_DIABETES_HORIZON_YEARS = 8


def framingham_diabetes_risk(
    *,
    age: ArrayLike,
    male: ArrayLike,
    bmi: ArrayLike,
    sbp: ArrayLike,
    dbp: ArrayLike,
    bp_treated: ArrayLike,
    hdl_cholesterol: ArrayLike,
    triglycerides: ArrayLike,
    fasting_glucose: ArrayLike,
    parental_history: ArrayLike,
) -> FloatArray:
    """8-year risk of incident diabetes (0-1), Wilson et al. 2007 simple clinical model.

    For adults without diabetes (fasting glucose < 126 mg/dL). Units: years, kg/m2, mm Hg,
    mg/dL; binary inputs 0/1.
    """
    c = FRAMINGHAM_DIABETES
    age_a = np.asarray(age, dtype=np.float64)
    male_a = np.asarray(male, dtype=np.float64)
    bmi_a = np.asarray(bmi, dtype=np.float64)
    hdl_a = np.asarray(hdl_cholesterol, dtype=np.float64)
    glucose = np.asarray(fasting_glucose, dtype=np.float64)
    if np.any(glucose >= 126.0):
        raise ValueError("the Framingham diabetes model applies to fasting glucose < 126 mg/dL")
    high_bp = (np.asarray(sbp) >= 130.0) | (np.asarray(dbp) >= 85.0) | (np.asarray(bp_treated) > 0)
    low_hdl = np.where(male_a > 0, hdl_a < 40.0, hdl_a < 50.0)
    logit = (
        c.intercept
        + c.age_50_to_64 * ((age_a >= 50.0) & (age_a < 65.0))
        + c.age_65_and_over * (age_a >= 65.0)
        + c.male * male_a
        + c.parental_history * np.asarray(parental_history, dtype=np.float64)
        + c.bmi_25_to_29_9 * ((bmi_a >= 25.0) & (bmi_a < 30.0))
        + c.bmi_30_and_over * (bmi_a >= 30.0)
        + c.bp_130_85_or_treated * high_bp
        + c.low_hdl * low_hdl
        + c.triglycerides_150_and_over * (np.asarray(triglycerides, dtype=np.float64) >= 150.0)
        + c.fasting_glucose_100_to_125 * (glucose >= 100.0)
    )
    return np.asarray(1.0 / (1.0 + np.exp(-logit)))
