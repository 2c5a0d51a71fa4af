"""The risk network: the seed design's deep MLP with explicit missing-value inputs.

Per the seed design (section 5): fully connected hidden layers between an input layer of patient
data and an output layer of disease probabilities, trained with cross-entropy and Adam, with
dropout and L2 regularisation against over-fitting and a class-weighted loss against class
imbalance. The seed gives no layer sizes; this network uses three hidden layers (64, 64, 32).

Input: for each of the 12 features its standardised value (0, the cohort mean, when missing)
followed by its missing indicator, 24 inputs. Output: two logits, 10-year hard ASCVD and 8-year
incident diabetes. Everything needed to turn raw features into calibrated probabilities lives in
the state dict, so it is covered by the weights' sha256: the standardisation (``feature_mean``,
``feature_scale``) and ``logit_offset`` = ln(pos_weight) of each output, which undoes the
class weighting (a loss weighted by w on positives shifts the optimal logit by ln w).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.risk.features import FEATURE_NAMES

#: Output order of the network.
OUTCOMES: tuple[str, str] = ("cvd_10y", "diabetes_8y")
HIDDEN: tuple[int, ...] = (64, 64, 32)
DROPOUT = 0.2
FAMILY = "carebridge.risk.RiskMLP"

ARCHITECTURE: dict[str, Any] = {
    "family": FAMILY,
    "inputs": 2 * len(FEATURE_NAMES),
    "input_layout": "standardised value then missing indicator, per feature",
    "hidden": list(HIDDEN),
    "activation": "relu",
    "dropout": DROPOUT,
    "outputs": list(OUTCOMES),
}


class RiskMLP(nn.Module):
    """Deep MLP: 24 inputs -> hidden ReLU layers with dropout -> one logit per outcome."""

    def __init__(
        self,
        n_features: int = len(FEATURE_NAMES),
        hidden: Sequence[int] = HIDDEN,
        dropout: float = DROPOUT,
        n_outputs: int = len(OUTCOMES),
    ) -> None:
        """Build an untrained network; the buffers start as identity standardisation."""
        super().__init__()
        if n_features < 1 or n_outputs < 1 or not hidden or min(hidden) < 1:
            raise ValueError("RiskMLP needs features, outputs and non-empty hidden layers")
        if not 0.0 <= dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        layers: list[nn.Module] = []
        width = 2 * n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.body = nn.Sequential(*layers)
        self.n_features = n_features
        self.feature_mean: torch.Tensor
        self.feature_scale: torch.Tensor
        self.logit_offset: torch.Tensor
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))
        self.register_buffer("logit_offset", torch.zeros(n_outputs))

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """(N, F) raw values with NaN for missing -> (N, 2F) standardised values + indicators."""
        if values.ndim != 2 or values.shape[1] != self.n_features:
            raise ValueError(f"expected values of shape (N, {self.n_features})")
        missing = torch.isnan(values)
        standardised = (values - self.feature_mean) / self.feature_scale
        standardised = torch.where(missing, torch.zeros_like(standardised), standardised)
        stacked = torch.stack([standardised, missing.to(standardised.dtype)], dim=2)
        return stacked.reshape(values.shape[0], 2 * self.n_features)

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        """Training logits (class-weighted scale) of encoded inputs."""
        return self.body(encoded)  # type: ignore[no-any-return]

    def calibrated_logits(self, values: torch.Tensor) -> torch.Tensor:
        """Log-odds of each outcome from raw values, with the class weighting undone."""
        return self.forward(self.encode(values)) - self.logit_offset
