"""Evaluation metrics and report files shared by every pipeline: pure compute and file writing.

Everything here is computed with numpy (no scikit-learn), from arrays the caller already has:

* :func:`confusion_matrix` -- counts, rows = true class, columns = predicted class;
* :func:`precision_recall_f1` -- per-class precision, recall, F1 and support from a confusion
  matrix (0.0 where a ratio has no denominator, as in scikit-learn's ``zero_division=0``);
* :func:`roc_curve` / :func:`roc_auc` -- one ROC curve (one class against the rest) and its area
  by the trapezoidal rule, with tied scores forming one step, which equals the Mann-Whitney U
  statistic with mid-ranks;
* :func:`classification_metrics` -- all of the above for a multi-class classifier from true
  class indices and predicted probabilities.

The writers (:func:`write_roc_png`, :func:`write_confusion_png`, :func:`write_json`) write each
file atomically (temporary file, fsync, rename). Plots use matplotlib's Agg canvas directly, never
``pyplot``, so they hold no global state and work in worker processes without a display.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: The eight bytes every PNG file starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _as_index_array(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> np.ndarray:
    """Count (true, predicted) pairs: an int64 (n_classes, n_classes) matrix, rows = truth."""
    if n_classes < 1:
        raise ValueError("n_classes must be positive")
    truth = _as_index_array(y_true, "y_true")
    pred = _as_index_array(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length ({truth.size} vs {pred.size})")
    for name, arr in (("y_true", truth), ("y_pred", pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise ValueError(f"{name} holds class indices outside 0..{n_classes - 1}")
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (truth, pred), 1)
    return counts


@dataclass(frozen=True)
class ClassScores:
    """Precision, recall, F1 and support (number of true cases) of one class."""

    precision: float
    recall: float
    f1: float
    support: int

    def __post_init__(self) -> None:
        for field in ("precision", "recall", "f1"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ClassScores.{field} must be in [0, 1], got {value}")
        if self.support < 0:
            raise ValueError("ClassScores.support must not be negative")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0


def precision_recall_f1(confusion: np.ndarray) -> list[ClassScores]:
    """Per-class scores from a confusion matrix (rows = truth); 0.0 where undefined."""
    matrix = np.asarray(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    scores = []
    for k in range(matrix.shape[0]):
        tp = float(matrix[k, k])
        predicted = float(matrix[:, k].sum())
        actual = float(matrix[k].sum())
        precision = _ratio(tp, predicted)
        recall = _ratio(tp, actual)
        f1 = _ratio(2 * precision * recall, precision + recall)
        scores.append(ClassScores(precision, recall, f1, int(actual)))
    return scores


@dataclass(frozen=True)
class RocCurve:
    """A ROC curve: false and true positive rates at decreasing score thresholds, and its area.

    The first point is (0, 0) at threshold +inf; the last is (1, 1).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float

    def __post_init__(self) -> None:
        if not (self.fpr.shape == self.tpr.shape == self.thresholds.shape) or self.fpr.ndim != 1:
            raise ValueError("fpr, tpr and thresholds must be 1-D arrays of the same length")
        if not 0.0 <= self.auc <= 1.0:
            raise ValueError(f"auc must be in [0, 1], got {self.auc}")


def roc_curve(
    positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> RocCurve:
    """ROC curve of ``scores`` for the binary truth ``positive`` (one class against the rest).

    Raises :class:`ValueError` when all cases are positive or all negative (the curve is then
    undefined) or when scores are not finite.
    """
    truth = np.asarray(positive, dtype=bool)
    values = np.asarray(scores, dtype=np.float64)
    if truth.ndim != 1 or truth.shape != values.shape:
        raise ValueError("positive and scores must be 1-D and of the same length")
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite")
    n_pos = int(truth.sum())
    n_neg = int(truth.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"a ROC curve needs positive and negative cases, got {n_pos} positive and "
            f"{n_neg} negative"
        )
    order = np.argsort(-values, kind="mergesort")
    sorted_scores = values[order]
    sorted_truth = truth[order]
    # The last index of each run of equal scores: ties move the curve in one diagonal step.
    last_of_run = np.flatnonzero(np.diff(sorted_scores) != 0)
    ends = np.concatenate([last_of_run, [sorted_truth.size - 1]])
    tps = np.cumsum(sorted_truth)[ends].astype(np.float64)
    fps = (ends + 1).astype(np.float64) - tps
    tpr = np.concatenate([[0.0], tps / n_pos])
    fpr = np.concatenate([[0.0], fps / n_neg])
    thresholds = np.concatenate([[np.inf], sorted_scores[ends]])
    auc = float(np.trapezoid(tpr, fpr))
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=min(1.0, max(0.0, auc)))


def roc_auc(positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of :func:`roc_curve` (same errors)."""
    return roc_curve(positive, scores).auc


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of a multi-class classifier on one labelled set.

    ``roc`` holds one one-vs-rest curve per class, ``None`` for a class that is absent from the
    set or is the only class present (its AUC is undefined). Macro averages are unweighted means
    over all classes; ``macro_roc_auc`` is the mean over the classes whose AUC is defined.
    """

    class_names: tuple[str, ...]
    count: int
    accuracy: float
    confusion: np.ndarray
    per_class: tuple[ClassScores, ...]
    roc: tuple[RocCurve | None, ...]

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if k < 1 or len(set(self.class_names)) != k:
            raise ValueError("class_names must be unique and non-empty")
        if self.confusion.shape != (k, k) or len(self.per_class) != k or len(self.roc) != k:
            raise ValueError("confusion, per_class and roc must cover every class")
        if int(self.confusion.sum()) != self.count:
            raise ValueError("count must equal the number of cases in the confusion matrix")

    @property
    def macro_precision(self) -> float:
        """Unweighted mean of the per-class precisions."""
        return float(np.mean([s.precision for s in self.per_class]))

    @property
    def macro_recall(self) -> float:
        """Unweighted mean of the per-class recalls."""
        return float(np.mean([s.recall for s in self.per_class]))

    @property
    def macro_f1(self) -> float:
        """Unweighted mean of the per-class F1 scores."""
        return float(np.mean([s.f1 for s in self.per_class]))

    @property
    def macro_roc_auc(self) -> float | None:
        """Mean one-vs-rest AUC over the classes where it is defined; ``None`` if none is."""
        aucs = [curve.auc for curve in self.roc if curve is not None]
        return float(np.mean(aucs)) if aucs else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: accuracy, per-class scores and AUC, macro averages, confusion."""

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(float(value), 4)

        return {
            "count": self.count,
            "accuracy": rounded(self.accuracy),
            "per_class": {
                name: {
                    "precision": rounded(scores.precision),
                    "recall": rounded(scores.recall),
                    "f1": rounded(scores.f1),
                    "support": scores.support,
                    "roc_auc": rounded(curve.auc) if curve is not None else None,
                }
                for name, scores, curve in zip(
                    self.class_names, self.per_class, self.roc, strict=True
                )
            },
            "macro": {
                "precision": rounded(self.macro_precision),
                "recall": rounded(self.macro_recall),
                "f1": rounded(self.macro_f1),
                "roc_auc": rounded(self.macro_roc_auc),
            },
            "confusion_matrix": {
                "rows": "true class",
                "columns": "predicted class",
                "labels": list(self.class_names),
                "counts": [[int(v) for v in row] for row in self.confusion],
            },
        }


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> ClassificationMetrics:
    """Metrics of predicted class probabilities (N, K) against true class indices (N,).

    The predicted class is the most probable one. Raises :class:`ValueError` on shape mismatches,
    an empty set, or non-finite probabilities.
    """
    names = tuple(class_names)
    probs = np.asarray(probabilities, dtype=np.float64)
    truth = _as_index_array(y_true, "y_true")
    if probs.ndim != 2 or probs.shape != (truth.size, len(names)):
        raise ValueError(
            f"probabilities must have shape ({truth.size}, {len(names)}), got {probs.shape}"
        )
    if truth.size == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite")
    pred = probs.argmax(axis=1)
    confusion = confusion_matrix(truth, pred, len(names))
    curves: list[RocCurve | None] = []
    for k in range(len(names)):
        positive = truth == k
        if positive.all() or not positive.any():
            curves.append(None)
        else:
            curves.append(roc_curve(positive, probs[:, k]))
    return ClassificationMetrics(
        class_names=names,
        count=int(truth.size),
        accuracy=float(np.trace(confusion) / truth.size),
        confusion=confusion,
        per_class=tuple(precision_recall_f1(confusion)),
        roc=tuple(curves),
    )


# --- files ---------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented UTF-8 JSON (NaN refused), atomically; return the path."""
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return _write_atomic(path, text.encode("utf-8"))


def _png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" text chunk: the same figure gives the same bytes on every matplotlib.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def write_roc_png(
    path: Path, curves: Mapping[str, RocCurve | None], title: str = "ROC curves (one vs rest)"
) -> Path:
    """Plot one ROC curve per class (AUC in the legend) and the chance diagonal into a PNG.

    Classes whose curve is ``None`` are listed in the legend as "AUC undefined".
    """
    fig = Figure(figsize=(6.0, 5.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=1.0, label="chance")
    for name, curve in curves.items():
        if curve is None:
            ax.plot([], [], linestyle="none", label=f"{name} (AUC undefined: one class only)")
        else:
            # Straight segments between points: tied scores make a diagonal, as the AUC counts them.
            ax.plot(
                curve.fpr,
                curve.tpr,
                linewidth=1.8,
                label=f"{name} (AUC {curve.auc:.3f})",
            )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _write_atomic(path, _png_bytes(fig))


def write_confusion_png(
    path: Path,
    confusion: np.ndarray,
    class_names: Sequence[str],
    title: str = "Confusion matrix",
) -> Path:
    """Plot a confusion matrix (rows = true, columns = predicted) with counts and row percent."""
    matrix = np.asarray(confusion, dtype=np.int64)
    names = list(class_names)
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"confusion shape {matrix.shape} does not fit {len(names)} class names")
    row_sums = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    side = max(4.5, 1.3 * len(names) + 2.0)
    fig = Figure(figsize=(side, side * 0.9), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(len(names)):
        for j in range(len(names)):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{100.0 * share[i, j]:.0f}%",
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} (n = {int(matrix.sum())})")
    fig.tight_layout()
    return _write_atomic(path, _png_bytes(fig))
