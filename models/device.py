"""Where a model runs: the DEVICE setting (``auto``, ``cpu``, ``cuda``...) as a torch device."""

from __future__ import annotations

import torch

from models.card import ModelLoadError


def resolve_device(device: str) -> torch.device:
    """Map ``"auto"`` to CUDA when available, else CPU; refuse CUDA when there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'auto'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} requested but no CUDA device is available: use 'cpu' or 'auto'"
        )
    return resolved
