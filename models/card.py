"""The model directory format shared by every pipeline.

A model directory holds exactly two things that matter:

* ``model-card.json`` -- a :class:`ModelCard`: what the model is (name, version, Device UID),
  what it does (task, coded labels, input shape, preprocessing), how it was made (architecture,
  training summary, metrics, whether it was trained on generated data) and which weights file
  belongs to it, with that file's sha256 digest;
* the weights file named by the card (``weights.pt`` by default), a ``torch.save``'d state dict.

Nothing is loaded unless the weights file's digest equals the one in the card, and weights are
always read with ``torch.load(..., weights_only=True)`` so a weights file can never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import torch
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from models.provenance import CodedLabel, ModelProvenance, device_uid_for

CARD_FILE = "model-card.json"
DEFAULT_WEIGHTS_FILE = "weights.pt"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CHUNK = 1 << 20


class ModelLoadError(Exception):
    """A model directory cannot be used; the message says what is wrong and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class LabelSpec(_Strict):
    """One output class of a model and its code (e.g. pneumonia = SCT 233604007)."""

    name: str = Field(min_length=1)
    code_value: str = Field(min_length=1)
    coding_scheme: str = Field(min_length=1)
    code_meaning: str = Field(min_length=1)

    @classmethod
    def from_coded(cls, label: CodedLabel) -> LabelSpec:
        """Build a label spec from a :class:`CodedLabel`."""
        return cls(
            name=label.name,
            code_value=label.code_value,
            coding_scheme=label.coding_scheme,
            code_meaning=label.code_meaning,
        )

    def coded(self) -> CodedLabel:
        """Return this label as a :class:`CodedLabel`."""
        return CodedLabel(self.name, self.code_value, self.coding_scheme, self.code_meaning)


def _check_file_name(value: str) -> str:
    if value in (".", "..") or "/" in value or "\\" in value or "\x00" in value:
        raise ValueError(
            f"weights file must be a plain file name inside the model directory, got {value!r}"
        )
    if value == CARD_FILE:
        raise ValueError(f"weights file must not be named {CARD_FILE}")
    return value


class WeightsSpec(_Strict):
    """The weights file of a model directory and its sha256 digest."""

    file: str = Field(min_length=1)
    sha256: str

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        return _check_file_name(value)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError("weights.sha256 must be 64 lowercase hexadecimal characters")
        return value


class ModelCardDraft(_Strict):
    """Everything a :class:`ModelCard` says except what :func:`write_model_dir` fills in.

    The Device UID is derived from name and version (:func:`device_uid_for`), the weights digest
    is computed from the file actually written, and ``created`` is the time of writing.
    """

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    task: str = Field(min_length=1)
    labels: tuple[LabelSpec, ...]
    input: dict[str, JsonValue]
    preprocessing: dict[str, JsonValue]
    architecture: dict[str, JsonValue]
    training: dict[str, JsonValue]
    metrics: dict[str, JsonValue]
    demo: StrictBool
    manufacturer: str = Field(default="carebridge", min_length=1, max_length=64)
    weights_file: str = DEFAULT_WEIGHTS_FILE

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value: tuple[LabelSpec, ...]) -> tuple[LabelSpec, ...]:
        return _check_labels(value)

    @field_validator("weights_file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        return _check_file_name(value)


def _check_labels(value: tuple[LabelSpec, ...]) -> tuple[LabelSpec, ...]:
    if not value:
        raise ValueError("labels must list at least one class")
    names = [label.name for label in value]
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique, got {names}")
    return value


class ModelCard(_Strict):
    """The content of ``model-card.json``; unknown and missing keys are refused.

    Constructing one with bad values raises :class:`ValueError` (pydantic's ``ValidationError``)
    whose message names each offending field.
    """

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    device_uid: str = Field(min_length=1, max_length=64)
    task: str = Field(min_length=1)
    labels: tuple[LabelSpec, ...]
    input: dict[str, JsonValue]
    preprocessing: dict[str, JsonValue]
    weights: WeightsSpec
    architecture: dict[str, JsonValue]
    training: dict[str, JsonValue]
    metrics: dict[str, JsonValue]
    demo: StrictBool
    manufacturer: str = Field(min_length=1, max_length=64)
    created: AwareDatetime

    @field_validator("device_uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        if not _UID_RE.match(value):
            raise ValueError(f"device_uid must be a DICOM UID (digits and dots), got {value!r}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, value: tuple[LabelSpec, ...]) -> tuple[LabelSpec, ...]:
        return _check_labels(value)

    @model_validator(mode="after")
    def _architecture_family(self) -> ModelCard:
        family = self.architecture.get("family")
        if not isinstance(family, str) or not family:
            raise ValueError('architecture must name its "family", e.g. a MONAI network')
        return self

    @property
    def provenance(self) -> ModelProvenance:
        """What every output of this model must say about the model that made it."""
        return ModelProvenance(
            name=self.name,
            version=self.version,
            device_uid=self.device_uid,
            weights_sha256=self.weights.sha256,
            manufacturer=self.manufacturer,
            demo=self.demo,
        )

    @property
    def coded_labels(self) -> tuple[CodedLabel, ...]:
        """The labels, in output order, as :class:`CodedLabel`."""
        return tuple(label.coded() for label in self.labels)

    def to_json(self) -> str:
        """Serialise the card as ``model-card.json`` content (UTF-8 JSON, sorted keys)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def _validation_summary(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "card"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def read_model_card(model_dir: Path) -> ModelCard:
    """Read and validate ``model_dir/model-card.json``.

    Raises :class:`ModelLoadError` when the file is missing, is not JSON, or is not a valid card.
    """
    card_path = Path(model_dir) / CARD_FILE
    try:
        raw = card_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(
            f"{CARD_FILE} not found in model directory {Path(model_dir).name!r}: "
            "point the worker at a directory written by write_model_dir (or train one)"
        ) from None
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read {CARD_FILE} of model directory {Path(model_dir).name!r}: {exc}"
        ) from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            f"{CARD_FILE} of model directory {Path(model_dir).name!r} is not valid JSON "
            f"(line {exc.lineno}): restore it or write the model directory again"
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{CARD_FILE} must hold a JSON object")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(
            f"{CARD_FILE} of model directory {Path(model_dir).name!r} is not a valid model card "
            f"({_validation_summary(exc)}): fix the card or write the model directory again"
        ) from exc


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_path(model_dir: Path, card: ModelCard) -> Path:
    path = Path(model_dir) / card.weights.file
    if not path.is_file():
        raise ModelLoadError(
            f"weights file {card.weights.file!r} named by {CARD_FILE} of model "
            f"{card.name} {card.version} is missing (expected sha256 {card.weights.sha256}): "
            "copy the weights file into the model directory or write it again"
        )
    return path


def _mismatch(card: ModelCard, actual: str) -> ModelLoadError:
    return ModelLoadError(
        f"weights file {card.weights.file!r} of model {card.name} {card.version} does not match "
        f"its card: card sha256 {card.weights.sha256}, file sha256 {actual}. The file is corrupt "
        "or belongs to another model: restore the right file or write the model directory again"
    )


def verify_weights(model_dir: Path, card: ModelCard) -> Path:
    """Stream the weights file's sha256 and compare it with the card; return the file's path.

    Raises :class:`ModelLoadError` naming both digests when they differ, or when the file is
    missing.
    """
    path = _weights_path(model_dir, card)
    actual = _sha256_file(path)
    if actual != card.weights.sha256:
        raise _mismatch(card, actual)
    return path


def load_weights(
    model_dir: Path, card: ModelCard, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Verify and load the state dict of a model directory (``weights_only=True``).

    The file is read once; the digest is checked on exactly the bytes that are deserialised.
    """
    path = _weights_path(model_dir, card)
    blob = path.read_bytes()
    actual = hashlib.sha256(blob).hexdigest()
    if actual != card.weights.sha256:
        raise _mismatch(card, actual)
    try:
        state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"weights file {card.weights.file!r} of model {card.name} {card.version} cannot be "
            f"loaded as a plain state dict ({type(exc).__name__}): write the model directory "
            "again with write_model_dir"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(
            f"weights file {card.weights.file!r} of model {card.name} {card.version} does not "
            "hold a state dict of tensors: write the model directory again with write_model_dir"
        )
    return state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via ``write(fileobj)`` to a temp file beside ``target``, fsync, then rename."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_model_dir(
    model_dir: Path, draft: ModelCardDraft, state_dict: Mapping[str, torch.Tensor]
) -> ModelCard:
    """Write the weights and then the card of a model directory, each atomically.

    The weights are ``torch.save``'d to a temporary file, fsync'd and renamed into place; the
    digest in the card is computed from the file as written. The Device UID comes from
    :func:`device_uid_for` and ``created`` is now (UTC). Returns the card written.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    weights_path = model_dir / draft.weights_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    _atomic_write(weights_path, lambda fh: torch.save(tensors, fh))
    sha = _sha256_file(weights_path)
    fields = draft.model_dump(exclude={"weights_file"})
    card = ModelCard(
        **fields,
        device_uid=device_uid_for(draft.name, draft.version),
        weights=WeightsSpec(file=draft.weights_file, sha256=sha),
        created=datetime.now(UTC).replace(microsecond=0),
    )
    text = card.to_json().encode("utf-8")
    _atomic_write(model_dir / CARD_FILE, lambda fh: fh.write(text))
    return card


def list_model_dirs(models_dir: Path) -> list[tuple[Path, ModelCard | ModelLoadError]]:
    """List each immediate subdirectory of ``models_dir`` that holds a ``model-card.json``.

    Each entry is the directory and either its card or the :class:`ModelLoadError` that reading
    it raised (an invalid card, or a weights file that is missing). Digests are not checked here;
    :func:`verify_weights` does that when a model is loaded. Sorted by directory name.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    found: list[tuple[Path, ModelCard | ModelLoadError]] = []
    for sub in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if not (sub / CARD_FILE).is_file():
            continue
        try:
            card = read_model_card(sub)
            _weights_path(sub, card)
        except ModelLoadError as exc:
            found.append((sub, exc))
        else:
            found.append((sub, card))
    return found
