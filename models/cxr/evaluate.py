"""Evaluate a chest X-ray classifier and write its report into the model directory.

:func:`evaluate_cxr` runs a model (a model directory, a MONAI bundle or a TorchScript file: all
that :meth:`CxrClassifier.load` accepts) on the user's labelled folder, or, when none is given,
on generated radiographs from a stream disjoint from the demo training's. It computes accuracy,
per-class precision, recall, F1 and one-vs-rest ROC AUC, their macro averages and the confusion
matrix (:mod:`models.reports`), and writes ``evaluation/report.json``, ``evaluation/roc.png`` and
``evaluation/confusion.png`` next to the weights. The report names the model and the digest of
the weights it measured, so a report left from older weights is recognisable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.cxr.classifier import CxrClassifier
from models.cxr.synthetic import CLASSES, GENERATOR_ID
from models.cxr.train import generate_model_inputs, read_labelled_folder
from models.reports import (
    ClassificationMetrics,
    classification_metrics,
    write_confusion_png,
    write_json,
    write_roc_png,
)

REPORT_DIR = "evaluation"
REPORT_FILE = "report.json"
ROC_FILE = "roc.png"
CONFUSION_FILE = "confusion.png"

#: Generated images per class when no labelled folder is given.
DEFAULT_GENERATED_PER_CLASS = 100


@dataclass(frozen=True)
class ClassificationReport:
    """The evaluation of one classifier on one labelled set, and the files written for it."""

    model: dict[str, Any]
    data: dict[str, Any]
    metrics: ClassificationMetrics
    created: datetime
    seconds: float
    report_dir: Path

    def __post_init__(self) -> None:
        if self.created.tzinfo is None:
            raise ValueError("ClassificationReport.created must be timezone-aware")

    @property
    def accuracy(self) -> float:
        """Share of images whose most probable class is the true one."""
        return self.metrics.accuracy

    @property
    def report_json(self) -> Path:
        """Where ``report.json`` was written."""
        return self.report_dir / REPORT_FILE

    @property
    def roc_png(self) -> Path:
        """Where the ROC curves were plotted."""
        return self.report_dir / ROC_FILE

    @property
    def confusion_png(self) -> Path:
        """Where the confusion matrix was plotted."""
        return self.report_dir / CONFUSION_FILE

    def to_dict(self) -> dict[str, Any]:
        """The content of ``report.json``."""
        return {
            "kind": "classification",
            "task": "chest X-ray classification",
            "created": self.created.isoformat(),
            "seconds": round(self.seconds, 1),
            "model": self.model,
            "data": self.data,
            **self.metrics.to_dict(),
            "plots": {"roc": ROC_FILE, "confusion": CONFUSION_FILE},
        }


def default_report_dir(model_path: Path) -> Path:
    """``<model_dir>/evaluation``; for a TorchScript file, ``<file name>-evaluation`` beside it."""
    model_path = Path(model_path)
    if model_path.is_file():
        return model_path.with_name(f"{model_path.name}-{REPORT_DIR}")
    return model_path / REPORT_DIR


def _probabilities_in_class_order(classifier: CxrClassifier, images: np.ndarray) -> np.ndarray:
    """Probabilities with columns in :data:`CLASSES` order, whatever the model's output order."""
    names = [label.name for label in classifier.labels]
    missing = [name for name in CLASSES if name not in names]
    if missing:
        raise ValueError(
            f"the model's classes {names} do not include {missing}: it cannot be evaluated "
            f"against labels {list(CLASSES)}"
        )
    results = classifier.predict_arrays(images.astype(np.float32))
    return np.array(
        [[result.probabilities[name] for name in CLASSES] for result in results],
        dtype=np.float64,
    )


def evaluate_cxr(
    model_dir: Path,
    data_dir: Path | None = None,
    labels_csv: Path | None = None,
    *,
    n_generated: int = DEFAULT_GENERATED_PER_CLASS,
    seed: int = 0,
    device: str = "cpu",
    report_dir: Path | None = None,
    progress: bool = False,
) -> ClassificationReport:
    """Evaluate the chest X-ray model at ``model_dir`` and write its report; return the report.

    With ``data_dir`` and ``labels_csv`` (a ``file,label`` CSV, see
    :func:`models.cxr.train.read_labelled_folder`) the user's images are used; with neither,
    ``n_generated`` generated images per class from the held-out stream of ``seed``. Files go to
    ``report_dir`` (default :func:`default_report_dir`). Raises
    :class:`~models.card.ModelLoadError` for a model that cannot be loaded and
    :class:`~models.cxr.train.TrainingDataError` for bad rows in the CSV.
    """
    if (data_dir is None) != (labels_csv is None):
        raise ValueError("give both data_dir and labels_csv, or neither (generated data)")
    if n_generated < 1:
        raise ValueError("n_generated must be positive")
    started = time.perf_counter()
    model_path = Path(model_dir)
    classifier = CxrClassifier.load(model_path, device=device)
    data: dict[str, Any]
    if data_dir is not None and labels_csv is not None:
        folder = read_labelled_folder(Path(data_dir), Path(labels_csv), progress=progress)
        images, labels = folder.images, folder.labels
        data = {
            "source": "labelled folder",
            "labels_csv": Path(labels_csv).name,
            "labels_csv_sha256": folder.labels_csv_sha256,
            "formats": folder.formats,
        }
    else:
        images, labels = generate_model_inputs(n_generated, seed, held_out=True)
        data = {
            "source": "generated (held out: a stream disjoint from training's)",
            "generator": GENERATOR_ID,
            "images_per_class": n_generated,
            "seed": seed,
        }
    data["count"] = len(labels)
    data["per_class"] = {name: int((labels == k).sum()) for k, name in enumerate(CLASSES)}
    probabilities = _probabilities_in_class_order(classifier, images)
    metrics = classification_metrics(labels, probabilities, CLASSES)

    card = classifier.card
    model = {
        "name": card.name,
        "version": card.version,
        "device_uid": card.device_uid,
        "weights_sha256": card.weights.sha256,
        "demo": card.demo,
        "path": model_path.name,
    }
    target = Path(report_dir) if report_dir is not None else default_report_dir(model_path)
    report = ClassificationReport(
        model=model,
        data=data,
        metrics=metrics,
        created=datetime.now(UTC).replace(microsecond=0),
        seconds=time.perf_counter() - started,
        report_dir=target,
    )
    title = f"{card.name} {card.version}"
    write_roc_png(
        report.roc_png,
        dict(zip(CLASSES, metrics.roc, strict=True)),
        title=f"ROC, one vs rest: {title}",
    )
    write_confusion_png(report.confusion_png, metrics.confusion, CLASSES, title=title)
    # The JSON goes last: its presence means the plots beside it belong to it.
    write_json(report.report_json, report.to_dict())
    return report
