"""Chest X-ray classifier: normal / pneumonia / lung cancer from one frontal radiograph.

A MONAI ResNet-18 (2D, one input channel, 224x224, stride-2 stem) trained with cross-entropy.
:class:`CxrClassifier` loads a model directory (see :mod:`models.card`), refuses one that was
made for another task, label set, input or preprocessing, and predicts coded labels. A MONAI
bundle directory or a TorchScript file is accepted in its place (see :mod:`models.bundle`): it
must take the same 1x224x224 input, preprocessed here, and return one score per class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.networks.nets import resnet18

from models.bundle import ModelExpectation, is_external_model, load_external_model
from models.card import ModelCard, ModelLoadError, load_weights, read_model_card
from models.cxr.preprocess import PREPROCESSING_ID, PREPROCESSING_SPEC, preprocess_datasets
from models.device import resolve_device
from models.provenance import CodedLabel, ModelProvenance

NORMAL = CodedLabel("normal", "17621005", "SCT", "Normal")
PNEUMONIA = CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia")
LUNG_CANCER = CodedLabel("lung_cancer", "363358000", "SCT", "Malignant tumor of lung")

#: Output classes in network output order.
CXR_LABELS: tuple[CodedLabel, CodedLabel, CodedLabel] = (NORMAL, PNEUMONIA, LUNG_CANCER)

TASK = "classification"
INPUT_SIZE = 224
INPUT_SPEC: dict[str, Any] = {"channels": 1, "size": [INPUT_SIZE, INPUT_SIZE]}
ARCHITECTURE: dict[str, Any] = {
    "family": "monai.networks.nets.resnet18",
    "spatial_dims": 2,
    "n_input_channels": 1,
    "num_classes": len(CXR_LABELS),
    "conv1_t_size": 7,
    "conv1_t_stride": 2,
}

#: What the chest X-ray pipeline feeds a model and reads back; external models must fit it.
CXR_EXPECTATION = ModelExpectation(
    task=TASK,
    channels=1,
    spatial_size=(INPUT_SIZE, INPUT_SIZE),
    labels=CXR_LABELS,
    preprocessing=PREPROCESSING_SPEC,
    output="classes",
)


def build_network() -> torch.nn.Module:
    """Return an untrained network of the architecture in :data:`ARCHITECTURE`."""
    return resnet18(
        spatial_dims=2,
        n_input_channels=1,
        num_classes=len(CXR_LABELS),
        conv1_t_size=7,
        conv1_t_stride=2,
    )


@dataclass(frozen=True)
class ClassificationResult:
    """The most probable label of one image and the probability of every label."""

    label: CodedLabel
    probability: float
    probabilities: dict[str, float]


def check_card(card: ModelCard) -> None:
    """Raise :class:`ModelLoadError` unless ``card`` describes a model this code can run."""
    problems: list[str] = []
    if card.task != TASK:
        problems.append(f"task is {card.task!r}, expected {TASK!r}")
    if card.coded_labels != CXR_LABELS:
        got = [(label.name, label.code_value) for label in card.labels]
        want = [(label.name, label.code_value) for label in CXR_LABELS]
        problems.append(f"labels are {got}, expected {want} in that order")
    if card.input != INPUT_SPEC:
        problems.append(f"input is {card.input}, expected {INPUT_SPEC}")
    if card.preprocessing.get("id") != PREPROCESSING_ID:
        problems.append(
            f"preprocessing id is {card.preprocessing.get('id')!r}, expected {PREPROCESSING_ID!r}"
        )
    arch = {k: card.architecture.get(k) for k in ARCHITECTURE}
    if arch != ARCHITECTURE:
        problems.append(f"architecture is {arch}, expected {ARCHITECTURE}")
    if problems:
        raise ModelLoadError(
            f"model {card.name} {card.version} is not a chest X-ray classifier this worker can "
            f"run: {'; '.join(problems)}. Configure the right pipeline for it or use a model "
            "directory written by models.cxr.train"
        )


class CxrClassifier:
    """A loaded chest X-ray classifier, ready to predict."""

    def __init__(
        self,
        network: torch.nn.Module,
        card: ModelCard,
        device: torch.device,
        batch_size: int = 16,
        *,
        returns_probabilities: bool = False,
    ) -> None:
        """Wrap a network whose weights match ``card``; prefer :meth:`load`.

        The network's outputs are class scores in the order of ``card.labels``: logits, or
        probabilities when ``returns_probabilities`` (a network that ends in a softmax).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.network = network.to(device).eval()
        self.card = card
        self.labels: tuple[CodedLabel, ...] = card.coded_labels
        self.provenance: ModelProvenance = card.provenance
        self.device = device
        self.batch_size = batch_size
        self.returns_probabilities = returns_probabilities

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu", batch_size: int = 16) -> CxrClassifier:
        """Load a model directory: read and check its card, verify the weights' sha256, load them.

        ``model_dir`` may also be a MONAI bundle directory (``configs/`` and
        ``models/model.pt`` or ``models/model.ts``) or a TorchScript file: those are loaded by
        :func:`models.bundle.load_external_model` against :data:`CXR_EXPECTATION`.
        ``device`` is ``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"auto"`` (CUDA when available).
        Raises :class:`ModelLoadError` saying what is wrong and what to do.
        """
        path = Path(model_dir)
        if path.is_file() or is_external_model(path):
            resolved = resolve_device(device)
            loaded = load_external_model(path, CXR_EXPECTATION, resolved)
            return cls(
                loaded.network,
                loaded.card,
                resolved,
                batch_size=batch_size,
                returns_probabilities=loaded.returns_probabilities,
            )
        card = read_model_card(path)
        check_card(card)
        resolved = resolve_device(device)
        state = load_weights(Path(model_dir), card, map_location="cpu")
        network = build_network()
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"weights of model {card.name} {card.version} do not fit the network named by "
                "its card: write the model directory again with models.cxr.train"
            ) from exc
        return cls(network, card, resolved, batch_size=batch_size)

    def predict_datasets(self, datasets: Sequence[pydicom.Dataset]) -> list[ClassificationResult]:
        """Classify DICOM images (one result each, in order); see ``image_from_dataset``."""
        if not datasets:
            return []
        return self.predict_arrays(preprocess_datasets(datasets, INPUT_SIZE))

    def predict_arrays(self, batch: np.ndarray) -> list[ClassificationResult]:
        """Classify preprocessed images, shape (N, 1, 224, 224) or (N, 224, 224), in [0, 1]."""
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4 or arr.shape[1:] != (1, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"expected a batch of shape (N, 1, {INPUT_SIZE}, {INPUT_SIZE}), got {batch.shape}"
            )
        if not np.isfinite(arr).all():
            raise ValueError("input batch holds NaN or infinite values")
        probs = self._probabilities(arr)
        results = []
        for row in probs:
            best = int(np.argmax(row))
            results.append(
                ClassificationResult(
                    label=self.labels[best],
                    probability=float(row[best]),
                    probabilities={
                        label.name: float(p) for label, p in zip(self.labels, row, strict=True)
                    },
                )
            )
        return results

    def _probabilities(self, arr: np.ndarray) -> np.ndarray:
        out: list[np.ndarray] = []
        use_amp = self.device.type == "cuda"
        with torch.inference_mode():
            for start in range(0, len(arr), self.batch_size):
                x = torch.from_numpy(arr[start : start + self.batch_size]).to(self.device)
                amp = (
                    torch.autocast(device_type="cuda", dtype=torch.float16)
                    if use_amp
                    else contextlib.nullcontext()
                )
                with amp:
                    scores = self.network(x)
                # External networks may return (N, K, 1, 1); the loader checked the shape.
                scores = scores.float().reshape(scores.shape[0], -1)
                if not self.returns_probabilities:
                    scores = torch.softmax(scores, dim=1)
                out.append(scores.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)
