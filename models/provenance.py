"""Typed provenance of a model: what every output must say about the model that made it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

# Namespace for deterministic Device UIDs: one UID per (model name, version), stable across hosts.
_DEVICE_NAMESPACE = uuid.UUID("8f5d1a3e-5b0c-4c2e-9a57-3c1f6d0b7e21")


def device_uid_for(name: str, version: str) -> str:
    """Return the DICOM Device UID (2.25 form) of one model version."""
    return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, f'{name}@{version}').int}"


@dataclass(frozen=True)
class CodedLabel:
    """A class label with its code, e.g. pneumonia = SCT 233604007."""

    name: str
    code_value: str
    coding_scheme: str
    code_meaning: str

    def __post_init__(self) -> None:
        for field in ("name", "code_value", "coding_scheme", "code_meaning"):
            if not getattr(self, field):
                raise ValueError(f"CodedLabel.{field} must not be empty")


@dataclass(frozen=True)
class ModelProvenance:
    """Which model, version and weights produced an output (IHE AIR Contributing Equipment)."""

    name: str
    version: str
    device_uid: str
    weights_sha256: str
    manufacturer: str = "carebridge"
    demo: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("ModelProvenance needs a model name and version")
        if len(self.weights_sha256) != 64:
            raise ValueError("ModelProvenance.weights_sha256 must be a hex sha256 digest")
        if not self.device_uid or len(self.device_uid) > 64:
            raise ValueError("ModelProvenance.device_uid must be a UID of at most 64 characters")
