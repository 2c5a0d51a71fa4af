"""Risk scoring: 10-year cardiovascular and 8-year diabetes risk from vitals, labs and history.

A deep MLP (the seed design's disease-prediction network) over a documented feature vector read
from LOINC-coded FHIR Observations, with explicit missing-value handling that lowers the stated
confidence. Demo weights are trained on patients simulated from published risk equations.
"""

from models.risk.features import (
    FEATURE_NAMES,
    FEATURES,
    RejectedInput,
    RiskFeatures,
    extract_features,
)
from models.risk.predict import (
    CVD_10Y,
    DIABETES_8Y,
    RISK_LABELS,
    FeatureContribution,
    InsufficientFeaturesError,
    RiskModel,
    RiskPrediction,
)

__all__ = [
    "CVD_10Y",
    "DIABETES_8Y",
    "FEATURES",
    "FEATURE_NAMES",
    "RISK_LABELS",
    "FeatureContribution",
    "InsufficientFeaturesError",
    "RejectedInput",
    "RiskFeatures",
    "RiskModel",
    "RiskPrediction",
    "extract_features",
]
