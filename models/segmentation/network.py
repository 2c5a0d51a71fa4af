"""The liver network: MONAI's 3-D ``UNet`` (background / liver), described by the model card.

The seed design's own 3-D U-Net concatenated decoder tensors with encoder tensors of another
resolution; MONAI's ``UNet`` has correct skip connections at every level and residual units, so
the card names it and its hyper-parameters, and :func:`build_network` rebuilds exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import UNet

FAMILY = "monai.networks.nets.UNet"

#: The demo network: small channels so it trains in minutes on two CPU cores.
DEMO_ARCHITECTURE: dict[str, Any] = {
    "family": FAMILY,
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "norm": "instance",
}

_NORMS = ("instance", "batch")


def check_architecture(architecture: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``architecture`` for this code (an empty list when nothing)."""
    problems: list[str] = []
    if architecture.get("family") != FAMILY:
        problems.append(f"family is {architecture.get('family')!r}, expected {FAMILY!r}")
        return problems
    for key, want in (("spatial_dims", 3), ("in_channels", 1), ("out_channels", 2)):
        if architecture.get(key) != want:
            problems.append(f"{key} is {architecture.get(key)!r}, expected {want}")
    channels = architecture.get("channels")
    strides = architecture.get("strides")
    if (
        not isinstance(channels, list)
        or len(channels) < 2
        or not all(isinstance(c, int) and c > 0 for c in channels)
    ):
        problems.append(f"channels must list at least two positive integers, got {channels!r}")
    elif (
        not isinstance(strides, list)
        or len(strides) != len(channels) - 1
        or not all(isinstance(s, int) and s in (1, 2) for s in strides)
    ):
        problems.append(f"strides must list {len(channels) - 1} values of 1 or 2, got {strides!r}")
    res = architecture.get("num_res_units")
    if not isinstance(res, int) or res < 0:
        problems.append(f"num_res_units must be a non-negative integer, got {res!r}")
    if architecture.get("norm") not in _NORMS:
        problems.append(f"norm must be one of {_NORMS}, got {architecture.get('norm')!r}")
    return problems


def downsampling(architecture: Mapping[str, Any]) -> int:
    """Total stride of the encoder: ROI sizes must be multiples of it."""
    total = 1
    for stride in architecture.get("strides", []):
        total *= int(stride)
    return total


def build_network(architecture: Mapping[str, Any] = DEMO_ARCHITECTURE) -> torch.nn.Module:
    """An untrained network of ``architecture`` (raises :class:`ValueError` when invalid)."""
    problems = check_architecture(architecture)
    if problems:
        raise ValueError(f"invalid liver network architecture: {'; '.join(problems)}")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=tuple(architecture["channels"]),
        strides=tuple(architecture["strides"]),
        num_res_units=int(architecture["num_res_units"]),
        norm=str(architecture["norm"]),
    )
