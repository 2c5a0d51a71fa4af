"""External models as a pipeline's model: MONAI bundle directories and TorchScript files.

A pipeline's model is normally a carebridge model directory (:mod:`models.card`). This module
also accepts, wherever such a directory is expected:

* a **MONAI bundle directory** -- ``configs/`` (``metadata.json``, ``inference.json``) and the
  weights in ``models/``: ``models/model.ts`` (TorchScript) when present, else
  ``models/model.pt``, which may be TorchScript or a state dict. A state dict is loaded into the
  network that ``configs/inference.json`` declares as ``network_def``; carebridge instantiates
  that network only when its ``_target_`` names a network of ``monai.networks.nets`` and its
  arguments are plain values. Config expressions (``$...``, ``@...``, ``%...``) are never
  evaluated, because evaluating them runs arbitrary code: export such a network as TorchScript.
* a **TorchScript file** (``.ts``, ``.pt``, ``.pth``, ``.zip``), with the bundle metadata that
  MONAI's ``save_net_with_metadata`` embeds as the extra file ``metadata.json``, if any.

Nothing is downloaded, and a bundle's own pre- and post-processing is not run: the pipeline feeds
the network its own preprocessed input (the card's ``preprocessing``) and reads the raw outputs.

What the loaded model is (precedence, first found wins):

1. a carebridge ``model-card.json`` in the bundle directory: name, version, Device UID, labels
   with codes, manufacturer and demo flag all come from it. Its ``weights.file`` names a file in
   ``models/`` whose sha256 must match, its task and input must be the pipeline's.
2. the bundle metadata (``configs/metadata.json``, else the TorchScript's embedded one): ``name``
   and ``version``; the output ``channel_def`` may give the class order, by the pipeline's label
   names; ``authors`` becomes the manufacturer.
3. defaults: the directory or file name, version ``sha256-<first 12 hex digits>``, and the
   pipeline's labels in the pipeline's order.

Without a carebridge card the Device UID is derived from name, version and the weights' sha256,
so different weights under one name and version never share a Device UID. Every load hashes the
weights file; the provenance of every output carries that digest.

A model is refused with :class:`~models.card.ModelLoadError`, naming what differs, when the
metadata declares inputs (channels, spatial size) or outputs (number of classes) the pipeline
cannot use, or when a probe forward pass on a zero input of the pipeline's shape fails or returns
the wrong shape.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import monai.networks.nets
import torch
from pydantic import JsonValue

from models.card import (
    CARD_FILE,
    LabelSpec,
    ModelCard,
    ModelLoadError,
    WeightsSpec,
    read_model_card,
)
from models.provenance import CodedLabel, ModelProvenance, device_uid_for

#: File suffixes taken as a TorchScript file when a pipeline's model path is a file.
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".zip")

#: Weights of a bundle, in order of preference.
BUNDLE_WEIGHTS = ("model.ts", "model.pt")

_METADATA = "metadata.json"
_INFERENCE = "inference.json"
_NETWORK_MODULE = "monai.networks.nets"
_FACTOR_RE = re.compile(r"^\s*(\d+)\s*\*\s*n\s*$")
_MAX_TEXT = 64

Source = Literal["monai-bundle", "torchscript"]


@dataclass(frozen=True)
class ModelExpectation:
    """What a pipeline feeds its model and reads back; external models are checked against it.

    ``spatial_size`` is the input's spatial shape (e.g. ``(224, 224)``); ``labels`` are the
    pipeline's classes in its default output order; ``output`` says whether the network returns
    one score per class (``"classes"``: shape (N, K) or (N, K, 1, ...)) or a score map of the
    input's spatial size (``"segmentation"``: shape (N, K, *spatial_size)). With
    ``background``, channel 0 of a segmentation is the background and the labels follow it.
    """

    task: str
    channels: int
    spatial_size: tuple[int, ...]
    labels: tuple[CodedLabel, ...]
    preprocessing: dict[str, JsonValue]
    output: Literal["classes", "segmentation"] = "classes"
    background: bool = False

    def output_channels(self, n_labels: int) -> int:
        """Channels of the network's output for ``n_labels`` classes."""
        return n_labels + (1 if self.background else 0)

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("ModelExpectation.task must not be empty")
        if self.channels < 1:
            raise ValueError("ModelExpectation.channels must be positive")
        if not self.spatial_size or any(s < 1 for s in self.spatial_size):
            raise ValueError("ModelExpectation.spatial_size must list positive sizes")
        if not self.labels:
            raise ValueError("ModelExpectation.labels must list at least one class")
        if self.output not in ("classes", "segmentation"):
            raise ValueError("ModelExpectation.output must be 'classes' or 'segmentation'")

    @property
    def input_spec(self) -> dict[str, JsonValue]:
        """The card's ``input``, e.g. ``{"channels": 1, "size": [224, 224]}``."""
        return {"channels": self.channels, "size": list(self.spatial_size)}


@dataclass(frozen=True)
class LoadedModel:
    """An external model ready to run: the network (eval mode, on the device) and its card.

    ``card`` is the bundle's carebridge card, or one made from the bundle metadata (see the
    module docstring); its weights digest is that of the file actually loaded.
    ``returns_probabilities`` is true when the network already ends in a softmax (its probe output
    was non-negative and summed to one over the classes), so callers must not apply another.
    """

    network: torch.nn.Module
    card: ModelCard
    source: Source
    weights_path: Path
    returns_probabilities: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def provenance(self) -> ModelProvenance:
        """What every output of this model must say about the model that made it."""
        return self.card.provenance


def bundle_weights_path(bundle_dir: Path) -> Path | None:
    """The weights file of a MONAI bundle directory (``models/model.ts``, else ``model.pt``)."""
    for name in BUNDLE_WEIGHTS:
        candidate = Path(bundle_dir) / "models" / name
        if candidate.is_file():
            return candidate
    return None


def is_bundle_dir(path: Path) -> bool:
    """Whether ``path`` is laid out as a MONAI bundle (it has ``configs/``).

    Loading such a directory then says what is missing, e.g. the weights in ``models/``.
    """
    path = Path(path)
    return path.is_dir() and (path / "configs").is_dir()


def is_external_model(path: Path) -> bool:
    """Whether ``path`` is a MONAI bundle directory or a TorchScript file (by suffix)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in TORCHSCRIPT_SUFFIXES
    return is_bundle_dir(path)


@dataclass(frozen=True)
class ExternalModelSummary:
    """What ``carebridge models list`` says of a MONAI bundle or TorchScript file."""

    path: Path
    source: Source
    name: str
    version: str
    weights_sha256: str | None
    problem: str | None = None


def list_external_models(models_dir: Path) -> list[ExternalModelSummary]:
    """MONAI bundle directories (without a carebridge card) and TorchScript files directly
    in ``models_dir``: the name and version their metadata gives, and their weights' sha256.

    Nothing is loaded: whether a pipeline can use one (inputs, outputs, a probe forward
    pass) is checked when the pipeline loads it. Sorted by name.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    found: list[ExternalModelSummary] = []
    for path in sorted(models_dir.iterdir()):
        if path.is_dir() and not (path / CARD_FILE).is_file() and is_bundle_dir(path):
            found.append(_summarise_bundle(path))
        elif path.is_file() and path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
            found.append(_summarise_torchscript(path))
    return found


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _summary(
    path: Path, source: Source, metadata: dict[str, Any], sha: str | None, problem: str | None
) -> ExternalModelSummary:
    name = str(metadata.get("name") or (path.name if path.is_dir() else path.stem))
    version = str(metadata.get("version") or (f"sha256-{sha[:12]}" if sha else ""))
    return ExternalModelSummary(path, source, name[:_MAX_TEXT], version[:_MAX_TEXT], sha, problem)


def _summarise_bundle(path: Path) -> ExternalModelSummary:
    label = f"MONAI bundle {path.name!r}"
    metadata: dict[str, Any] = {}
    problem: str | None = None
    try:
        metadata = (
            _read_json_file(path / "configs" / _METADATA, f"configs/{_METADATA} of {label}") or {}
        )
    except ModelLoadError as exc:
        problem = str(exc)
    weights = bundle_weights_path(path)
    if weights is None:
        return _summary(
            path, "monai-bundle", metadata, None, problem or f"{label} has no models/model.*"
        )
    return _summary(path, "monai-bundle", metadata, _file_sha256(weights), problem)


def _summarise_torchscript(path: Path) -> ExternalModelSummary:
    metadata: dict[str, Any] = {}
    problem: str | None = None
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{_METADATA}")]
            if names:
                metadata = _parse_metadata(
                    archive.read(names[0]), f"the metadata embedded in {path.name!r}"
                )
    except (zipfile.BadZipFile, OSError):
        problem = f"{path.name!r} is not a TorchScript archive"
    except ModelLoadError as exc:
        problem = str(exc)
    return _summary(path, "torchscript", metadata, _file_sha256(path), problem)


def load_external_model(
    path: Path, expected: ModelExpectation, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a MONAI bundle directory or a TorchScript file as a model of ``expected``'s pipeline.

    The weights are hashed, loaded (TorchScript, or a state dict into the bundle's
    ``network_def``), checked against the metadata's declared inputs and outputs and against a
    probe forward pass, and moved to ``device``. Raises :class:`ModelLoadError` saying what is
    wrong and what to do.
    """
    path = Path(path)
    target = torch.device(device)
    if path.is_file():
        return _load_torchscript_file(path, expected, target)
    if path.is_dir():
        return _load_bundle(path, expected, target)
    raise ModelLoadError(
        f"model path {path.name!r} does not exist: point the pipeline at a model directory, "
        "a MONAI bundle directory or a TorchScript file"
    )


# --- loading -------------------------------------------------------------------------------


def _read_bytes(path: Path) -> tuple[bytes, str]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model weights {path.name!r}: {exc}") from exc
    return blob, hashlib.sha256(blob).hexdigest()


def _archive_kind(blob: bytes) -> Literal["torchscript", "state-dict"] | None:
    """TorchScript (a zip with ``constants.pkl`` and ``code/``), another torch zip, or neither."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError):
        return None
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "state-dict"


def _jit_load(blob: bytes, label: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    extra = {_METADATA: ""}
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated, but it is what MONAI bundles ship (model.ts).
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(blob), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(
            f"{label} cannot be loaded as TorchScript ({type(exc).__name__}): the file is corrupt "
            "or is not a TorchScript archive. Export the network with torch.jit.script or "
            "torch.jit.trace and torch.jit.save, or restore the file"
        ) from exc
    metadata: dict[str, Any] = {}
    raw = extra.get(_METADATA) or b""
    if raw:
        metadata = _parse_metadata(raw, f"the metadata embedded in {label}")
    return module, metadata


def _parse_metadata(raw: str | bytes, label: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{label} is not valid JSON: fix or remove it") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{label} must hold a JSON object")
    return data


def _read_json_file(path: Path, label: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {label}: {exc}") from exc
    return _parse_metadata(raw, label)


def _load_torchscript_file(
    path: Path, expected: ModelExpectation, device: torch.device
) -> LoadedModel:
    blob, sha = _read_bytes(path)
    network, metadata = _jit_load(blob, f"TorchScript file {path.name!r}")
    labels = _labels_from_metadata(metadata, expected, f"TorchScript file {path.name!r}")
    card = _card_from_metadata(
        metadata,
        expected,
        labels,
        default_name=path.stem,
        weights=path,
        sha=sha,
        architecture={"family": "torchscript", "format": "torchscript", "source": "file"},
    )
    n_out = expected.output_channels(len(card.labels))
    problems = _declared_problems(metadata, expected, n_out)
    _refuse_if(problems, card, f"TorchScript file {path.name!r}")
    network, softmaxed = _probe(network, expected, n_out, card, device)
    return LoadedModel(network, card, "torchscript", path, softmaxed, metadata)


def _load_bundle(path: Path, expected: ModelExpectation, device: torch.device) -> LoadedModel:
    label = f"MONAI bundle {path.name!r}"
    if not (path / "configs").is_dir():
        raise ModelLoadError(
            f"{path.name!r} is neither a carebridge model directory ({CARD_FILE}) nor a MONAI "
            "bundle (configs/ and models/model.pt or models/model.ts)"
        )
    metadata = _read_json_file(path / "configs" / _METADATA, f"configs/{_METADATA} of {label}")
    inference = _read_json_file(path / "configs" / _INFERENCE, f"configs/{_INFERENCE} of {label}")
    card: ModelCard | None = None
    if (path / CARD_FILE).is_file():
        card = read_model_card(path)
        weights = path / "models" / card.weights.file
        if not weights.is_file():
            raise ModelLoadError(
                f"{CARD_FILE} of {label} names weights file models/{card.weights.file}, which is "
                "missing: copy it into models/ or fix the card"
            )
    else:
        found = bundle_weights_path(path)
        if found is None:
            raise ModelLoadError(
                f"{label} has no weights: expected models/model.ts or models/model.pt"
            )
        weights = found
    blob, sha = _read_bytes(weights)
    if card is not None and sha != card.weights.sha256:
        raise ModelLoadError(
            f"weights file models/{card.weights.file} of {label} does not match its {CARD_FILE}: "
            f"card sha256 {card.weights.sha256}, file sha256 {sha}. The file is corrupt or "
            "belongs to another model: restore the right file or fix the card"
        )

    kind = _archive_kind(blob)
    has_network_def = isinstance((inference or {}).get("network_def"), dict)
    # A file that is no archive at all is corrupt unless a network_def says it is an old-style
    # state dict; loading it as TorchScript then gives the clearer message.
    if kind == "torchscript" or (kind is None and not has_network_def):
        network, embedded = _jit_load(blob, f"models/{weights.name} of {label}")
        fmt = "torchscript"
        family = "torchscript"
        metadata = metadata if metadata is not None else embedded
    else:
        network, family = _network_from_state_dict(blob, inference, f"models/{weights.name}", label)
        fmt = "state-dict"
    metadata = metadata or {}

    if card is None:
        labels = _labels_from_metadata(metadata, expected, label)
        card = _card_from_metadata(
            metadata,
            expected,
            labels,
            default_name=path.name,
            weights=weights,
            sha=sha,
            architecture={"family": family, "format": fmt, "source": "monai-bundle"},
        )
    n_out = expected.output_channels(len(card.labels))
    problems = _card_problems(card, expected) + _declared_problems(metadata, expected, n_out)
    _refuse_if(problems, card, label)
    network, softmaxed = _probe(network, expected, n_out, card, device)
    return LoadedModel(network, card, "monai-bundle", weights, softmaxed, metadata)


def _network_from_state_dict(
    blob: bytes, inference: dict[str, Any] | None, file_label: str, label: str
) -> tuple[torch.nn.Module, str]:
    """Instantiate ``network_def`` (a MONAI network with plain arguments) and load the weights."""
    if inference is None or not isinstance(inference.get("network_def"), dict):
        raise ModelLoadError(
            f"{file_label} of {label} is not TorchScript, and configs/{_INFERENCE} has no "
            "network_def to load it into: export the network as TorchScript (models/model.ts)"
        )
    network_def: dict[str, Any] = inference["network_def"]
    target = network_def.get("_target_")
    name = target.removeprefix(f"{_NETWORK_MODULE}.") if isinstance(target, str) else ""
    factory = getattr(monai.networks.nets, name, None) if name.isidentifier() else None
    if factory is None or not callable(factory):
        raise ModelLoadError(
            f"network_def of {label} names {target!r}, which is not a network of "
            f"{_NETWORK_MODULE}; carebridge instantiates only those from a config: export the "
            "network as TorchScript (models/model.ts)"
        )
    kwargs: dict[str, Any] = {}
    for key, value in network_def.items():
        if key in ("_target_", "_desc_"):
            continue
        if key.startswith("_") or _has_expression(value):
            raise ModelLoadError(
                f"network_def of {label} uses config syntax in {key!r}, which carebridge does not "
                "evaluate (it could run arbitrary code): write plain values, or export the "
                "network as TorchScript (models/model.ts)"
            )
        kwargs[key] = value
    try:
        network = factory(**kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"network_def of {label} cannot build {name} with its arguments "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{file_label} of {label} is neither TorchScript nor a loadable state dict "
            f"({type(exc).__name__}): the file is corrupt or of another format"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint saved as {"model": state_dict, ...}
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"{file_label} of {label} does not hold a state dict of tensors")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{file_label} of {label} does not fit the network_def {name}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return network, f"{_NETWORK_MODULE}.{name}"


def _has_expression(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return any(_has_expression(v) for v in value)
    if isinstance(value, dict):
        return any(str(k).startswith("_") or _has_expression(v) for k, v in value.items())
    return False


# --- what the model is ----------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value if v)
    if isinstance(value, str | int | float) and str(value).strip():
        return str(value).strip()[:_MAX_TEXT]
    return None


def _io_entry(section: Any, preferred: str, what: str) -> tuple[str, dict[str, Any]] | str | None:
    """The one declared input/output (``preferred`` key, else the only one), or a problem."""
    if not isinstance(section, dict) or not section:
        return None
    if isinstance(section.get(preferred), dict):
        return preferred, section[preferred]
    if len(section) == 1:
        key, value = next(iter(section.items()))
        if isinstance(value, dict):
            return str(key), value
    return f"metadata declares {len(section)} {what}s ({sorted(section)}), the pipeline uses one"


def _labels_from_metadata(
    metadata: dict[str, Any], expected: ModelExpectation, label: str
) -> tuple[CodedLabel, ...]:
    """The output order from the metadata's ``channel_def`` when it names the pipeline's labels
    (after channel 0, the background, when the pipeline's output has one)."""
    nd = metadata.get("network_data_format")
    entry = _io_entry(nd.get("outputs") if isinstance(nd, dict) else None, "pred", "output")
    if not isinstance(entry, tuple):
        return expected.labels
    channel_def = entry[1].get("channel_def")
    first = 1 if expected.background else 0
    if not isinstance(channel_def, dict) or len(channel_def) != len(expected.labels) + first:
        return expected.labels
    by_name = {lab.name.lower(): lab for lab in expected.labels}
    ordered: list[CodedLabel] = []
    for index in range(first, len(expected.labels) + first):
        name = channel_def.get(str(index))
        if not isinstance(name, str):
            return expected.labels
        key = name.strip().lower().replace(" ", "_")
        if key not in by_name:
            known = [lab.name for lab in expected.labels]
            raise ModelLoadError(
                f"{label} names output channel {index} {name!r}, which this pipeline does not "
                f"know (its classes are {known}): add a carebridge {CARD_FILE} to the bundle to "
                "give the classes and their codes"
            )
        ordered.append(by_name[key])
    if len({lab.name for lab in ordered}) != len(ordered):
        raise ModelLoadError(f"{label} names one class for two output channels in channel_def")
    return tuple(ordered)


def _card_from_metadata(
    metadata: dict[str, Any],
    expected: ModelExpectation,
    labels: tuple[CodedLabel, ...],
    *,
    default_name: str,
    weights: Path,
    sha: str,
    architecture: dict[str, JsonValue],
) -> ModelCard:
    name = _text(metadata.get("name")) or default_name[:_MAX_TEXT] or "external-model"
    version = _text(metadata.get("version")) or f"sha256-{sha[:12]}"
    summary: dict[str, JsonValue] = {
        key: _text(metadata.get(key))
        for key in ("description", "task", "monai_version", "pytorch_version", "license")
        if _text(metadata.get(key))
    }
    created = datetime.fromtimestamp(weights.stat().st_mtime, UTC).replace(microsecond=0)
    try:
        return ModelCard(
            name=name,
            version=version,
            device_uid=device_uid_for(name, f"{version}#{sha}"),
            task=expected.task,
            labels=tuple(LabelSpec.from_coded(lab) for lab in labels),
            input=expected.input_spec,
            preprocessing=expected.preprocessing,
            weights=WeightsSpec(file=weights.name, sha256=sha),
            architecture={**architecture, "bundle_metadata": summary},
            training={"data": "not stated by carebridge: see the model's own documentation"},
            metrics={},
            demo=False,
            manufacturer=_text(metadata.get("authors")) or "unknown",
            created=created,
        )
    except ValueError as exc:
        raise ModelLoadError(f"model {name!r}: its metadata cannot describe it: {exc}") from exc


def _card_problems(card: ModelCard, expected: ModelExpectation) -> list[str]:
    problems = []
    if card.task != expected.task:
        problems.append(f"task is {card.task!r}, expected {expected.task!r}")
    if card.input != expected.input_spec:
        problems.append(f"card input is {card.input}, expected {expected.input_spec}")
    return problems


def _declared_problems(
    metadata: dict[str, Any], expected: ModelExpectation, n_classes: int
) -> list[str]:
    """Differences between the metadata's ``network_data_format`` and the pipeline."""
    nd = metadata.get("network_data_format")
    if not isinstance(nd, dict):
        return []
    problems: list[str] = []
    entry = _io_entry(nd.get("inputs"), "image", "input")
    if isinstance(entry, str):
        problems.append(entry)
    elif entry is not None:
        key, spec = entry
        channels = spec.get("num_channels")
        if isinstance(channels, int) and channels != expected.channels:
            problems.append(
                f"input {key!r} has {channels} channels, the pipeline feeds {expected.channels}"
            )
        shape = spec.get("spatial_shape")
        if isinstance(shape, list):
            problems.extend(_shape_problems(key, shape, expected.spatial_size))
    entry = _io_entry(nd.get("outputs"), "pred", "output")
    if isinstance(entry, str):
        problems.append(entry)
    elif entry is not None:
        key, spec = entry
        channels = spec.get("num_channels")
        if isinstance(channels, int) and channels != n_classes:
            problems.append(
                f"output {key!r} has {channels} channels (classes), the pipeline needs {n_classes}"
            )
    return problems


def _shape_problems(key: str, declared: list[Any], size: tuple[int, ...]) -> list[str]:
    if len(declared) != len(size):
        return [
            f"input {key!r} is {len(declared)}-D (spatial shape {declared}), the pipeline feeds "
            f"{len(size)}-D {list(size)}"
        ]
    for axis, (want, have) in enumerate(zip(declared, size, strict=True)):
        if isinstance(want, int) and want != have:
            return [f"input {key!r} has spatial shape {declared}, the pipeline feeds {list(size)}"]
        match = _FACTOR_RE.match(want) if isinstance(want, str) else None
        if match and have % int(match.group(1)) != 0:
            return [
                f"input {key!r} needs axis {axis} to be a multiple of {match.group(1)} "
                f"({declared}), the pipeline feeds {list(size)}"
            ]
    return []


def _refuse_if(problems: list[str], card: ModelCard, label: str) -> None:
    if problems:
        raise ModelLoadError(
            f"{label} ({card.name} {card.version}) does not fit the {card.task} pipeline: "
            f"{'; '.join(problems)}"
        )


def _probe(
    network: torch.nn.Module,
    expected: ModelExpectation,
    n_classes: int,
    card: ModelCard,
    device: torch.device,
) -> tuple[torch.nn.Module, bool]:
    """Move to ``device``, run one zero input of the pipeline's shape, check the output's shape.

    Also tells whether the output is already a probability distribution over the classes.
    """
    shape = (1, expected.channels, *expected.spatial_size)
    network = network.to(device).eval()
    try:
        with torch.inference_mode():
            out = network(torch.zeros(shape, device=device))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(
            f"model {card.name} {card.version} does not run on the pipeline's input of shape "
            f"{list(shape)} ({type(exc).__name__}: {first[:300]})"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError(
            f"model {card.name} {card.version} returns {type(out).__name__}, expected one tensor"
        )
    got = list(out.shape)
    names = [lab.name for lab in card.labels]
    if expected.background:
        names = ["background", *names]
    if expected.output == "classes":
        ok = len(got) >= 2 and got[0] == 1 and got[1] == n_classes and all(s == 1 for s in got[2:])
        want = f"[1, {n_classes}]"
    else:
        ok = got == [1, n_classes, *expected.spatial_size]
        want = str([1, n_classes, *expected.spatial_size])
    if not ok:
        raise ModelLoadError(
            f"model {card.name} {card.version} returns shape {got} for an input of shape "
            f"{list(shape)}, the {card.task} pipeline needs {want} ({n_classes} classes: "
            f"{names})"
        )
    scores = out.detach().float()
    sums = scores.sum(dim=1)
    softmaxed = bool((scores >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4))
    return network, softmaxed
