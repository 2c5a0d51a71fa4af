"""Train the demo chest X-ray classifier on generated radiographs.

The demo model exists so the whole pipeline can run end to end without patient data or
downloads. It is trained only on images from :mod:`models.cxr.synthetic`, rendered to DICOM and
preprocessed through exactly the functions used at inference, and its card says ``demo: true``.
It must never be used on patients.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import monai
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import JsonValue

from models.card import LabelSpec, ModelCard, ModelCardDraft, write_model_dir
from models.cxr.classifier import (
    ARCHITECTURE,
    CXR_LABELS,
    INPUT_SIZE,
    INPUT_SPEC,
    TASK,
    build_network,
)
from models.cxr.preprocess import PREPROCESSING_SPEC, preprocess_dataset
from models.cxr.synthetic import CLASSES, GENERATOR_ID, make_cxr_dataset

MODEL_NAME = "cxr-resnet18"
MODEL_VERSION = "0.1.0-demo"

#: Image shapes drawn for training (rows, columns): mostly square, some portrait/landscape.
_SHAPES: tuple[tuple[int, int], ...] = ((512, 512), (512, 512), (512, 512), (512, 416), (416, 512))
_VAL_FRACTION = 0.2
_LEARNING_RATE = 3e-4
_WEIGHT_DECAY = 1e-4

if tuple(label.name for label in CXR_LABELS) != CLASSES:  # pragma: no cover
    raise RuntimeError("generator classes and classifier labels disagree")


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware where the platform tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _generate(
    images_per_class: int, seed: int, progress: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``images_per_class`` images of each class as model inputs (float16) and labels."""
    total = images_per_class * len(CLASSES)
    images = np.empty((total, 1, INPUT_SIZE, INPUT_SIZE), dtype=np.float16)
    labels = np.empty(total, dtype=np.int64)
    k = 0
    for class_index, name in enumerate(CLASSES):
        for i in range(images_per_class):
            rng = np.random.default_rng([seed, class_index, i])
            shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
            photometric = "MONOCHROME1" if rng.random() < 0.2 else "MONOCHROME2"
            ds = make_cxr_dataset(
                name,
                rng,
                patient_name="SYNTHETIC^TRAINING",
                patient_id="SYNTHETIC",
                study_uid="2.25.1",
                series_uid="2.25.2",
                sop_uid="2.25.3",
                photometric=photometric,
                shape=shape,
            )
            images[k] = preprocess_dataset(ds, INPUT_SIZE)
            labels[k] = class_index
            k += 1
        progress(f"generated {images_per_class} {name} images")
    return images, labels


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: about 20% of each class for validation (at least one)."""
    rng = np.random.default_rng([seed, 99])
    train_idx: list[int] = []
    val_idx: list[int] = []
    for class_index in range(len(CLASSES)):
        idx = np.flatnonzero(labels == class_index)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * _VAL_FRACTION))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return np.array(sorted(train_idx)), np.array(sorted(val_idx))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: flip, small rotation/scale/shift, contrast, gamma and noise."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    angle = uniform(-5.0, 5.0) * (math.pi / 180.0)
    scale = uniform(0.96, 1.04)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-0.03, 0.03)], dim=1),
            torch.stack([sin * flip, cos, uniform(-0.03, 0.03)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = uniform(0.95, 1.05).view(n, 1, 1, 1)
    bias = uniform(-0.03, 0.03).view(n, 1, 1, 1)
    gamma = uniform(0.9, 1.1).view(n, 1, 1, 1)
    x = (x.clamp(0.0, 1.0) ** gamma) * gain + bias
    noise = uniform(0.0, 0.01).view(n, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * noise
    return x.clamp(0.0, 1.0)


def _evaluate(
    network: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and confusion matrix (rows = truth) on a held-out set."""
    network.eval()
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    loss_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size].astype(np.float32))
            y = torch.from_numpy(labels[start : start + batch_size])
            logits = network(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=1).numpy()
            np.add.at(confusion, (y.numpy(), pred), 1)
    return loss_sum / max(1, len(images)), confusion


def train_demo(
    model_dir: Path,
    *,
    images_per_class: int = 200,
    epochs: int = 6,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> ModelCard:
    """Train the demo classifier on generated radiographs and write it to ``model_dir``.

    Images are generated with fixed seeds, rendered as DICOM and preprocessed exactly as at
    inference; 20% of each class is held out. The network is trained with cross-entropy and
    Adam (one-cycle learning-rate schedule) under light augmentation; the epoch with the best
    validation accuracy is kept. Returns the card written (name ``cxr-resnet18``, version
    ``0.1.0-demo``, ``demo`` true) with the validation accuracy and per-class recall.
    """
    if images_per_class < 2:
        raise ValueError("images_per_class must be at least 2 (one for training, one held out)")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be positive")
    report = progress or (lambda _msg: None)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_usable_cpus())
    try:
        torch.manual_seed(seed)
        images, labels = _generate(images_per_class, seed, report)
        generation_s = time.perf_counter() - started
        train_idx, val_idx = _split(labels, seed)
        x_train, y_train = images[train_idx], labels[train_idx]
        x_val, y_val = images[val_idx], labels[val_idx]

        network = build_network()
        optimizer = torch.optim.Adam(
            network.parameters(), lr=_LEARNING_RATE, weight_decay=_WEIGHT_DECAY
        )
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=_LEARNING_RATE,
            total_steps=steps_per_epoch * epochs,
            pct_start=0.15,
        )
        gen = torch.Generator().manual_seed(seed)
        best: tuple[float, float] = (-1.0, math.inf)  # (accuracy, loss)
        best_state: dict[str, torch.Tensor] = {}
        best_epoch = 0
        best_confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
        history: list[JsonValue] = []
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            network.train()
            order = torch.randperm(len(x_train), generator=gen).numpy()
            loss_sum = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                if len(idx) < 2:  # BatchNorm needs more than one sample
                    continue
                x = _augment(torch.from_numpy(x_train[idx].astype(np.float32)), gen)
                y = torch.from_numpy(y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(network(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(idx)
            val_loss, confusion = _evaluate(network, x_val, y_val, batch_size)
            accuracy = float(np.trace(confusion) / max(1, confusion.sum()))
            seconds = time.perf_counter() - epoch_start
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": round(loss_sum / len(x_train), 4),
                    "val_loss": round(val_loss, 4),
                    "val_accuracy": round(accuracy, 4),
                    "seconds": round(seconds, 1),
                }
            )
            report(
                f"epoch {epoch}/{epochs}: train loss {loss_sum / len(x_train):.3f}, "
                f"val loss {val_loss:.3f}, val accuracy {accuracy:.3f} ({seconds:.0f} s)"
            )
            if (accuracy, -val_loss) > (best[0], -best[1]):
                best = (accuracy, val_loss)
                best_state = copy.deepcopy(network.state_dict())
                best_epoch = epoch
                best_confusion = confusion

        recall: dict[str, JsonValue] = {
            name: round(float(best_confusion[i, i] / max(1, best_confusion[i].sum())), 4)
            for i, name in enumerate(CLASSES)
        }
        confusion_rows: list[JsonValue] = [[int(v) for v in row] for row in best_confusion]
        draft = ModelCardDraft(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            task=TASK,
            labels=tuple(LabelSpec.from_coded(label) for label in CXR_LABELS),
            input=INPUT_SPEC,
            preprocessing=PREPROCESSING_SPEC,
            architecture=ARCHITECTURE,
            training={
                "data": "generated chest radiographs only (no patient data)",
                "generator": GENERATOR_ID,
                "images_per_class": images_per_class,
                "train_count": len(x_train),
                "val_count": len(x_val),
                "val_fraction": _VAL_FRACTION,
                "epochs": epochs,
                "best_epoch": best_epoch,
                "seed": seed,
                "batch_size": batch_size,
                "loss": "cross-entropy",
                "optimizer": f"Adam (lr {_LEARNING_RATE}, weight decay {_WEIGHT_DECAY})",
                "lr_schedule": "one-cycle",
                "augmentation": "flip, rotation +-5 deg, scale +-4%, shift +-3%, contrast +-5%, "
                "gamma 0.9-1.1, gaussian noise sd <= 0.01",
                "history": history,
                "generation_seconds": round(generation_s, 1),
                "seconds": round(time.perf_counter() - started, 1),
                "torch": torch.__version__,
                "monai": monai.__version__,
            },
            metrics={
                "val_accuracy": round(best[0], 4),
                "val_loss": round(best[1], 4),
                "val_recall": recall,
                "val_confusion": confusion_rows,
            },
            demo=True,
        )
        card = write_model_dir(Path(model_dir), draft, best_state)
        report(f"wrote {MODEL_NAME} {MODEL_VERSION}: val accuracy {best[0]:.3f}")
        return card
    finally:
        torch.set_num_threads(previous_threads)
