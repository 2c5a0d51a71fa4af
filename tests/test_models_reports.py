"""Evaluation metrics and report files: values checked by hand and against brute force."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from models.reports import (
    PNG_SIGNATURE,
    ClassScores,
    classification_metrics,
    confusion_matrix,
    precision_recall_f1,
    roc_auc,
    roc_curve,
    write_confusion_png,
    write_json,
    write_roc_png,
)


def _pairwise_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), by enumerating all pairs."""
    pos = scores[positive]
    neg = scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_confusion_matrix_counts_truth_by_row() -> None:
    truth = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 0, 2]
    assert confusion_matrix(truth, pred, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 0], 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], 3)


def test_precision_recall_f1_by_hand() -> None:
    matrix = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    normal, pneumonia, absent = precision_recall_f1(matrix)
    assert normal.precision == pytest.approx(5 / 7)
    assert normal.recall == pytest.approx(5 / 6)
    assert normal.f1 == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert (pneumonia.precision, pneumonia.recall, pneumonia.support) == (0.75, 0.6, 5)
    # A class never true and never predicted scores 0, as with zero_division=0.
    assert absent == ClassScores(0.0, 0.0, 0.0, 0)


def test_roc_extremes_and_ties() -> None:
    truth = np.array([0, 0, 1, 1], dtype=bool)
    assert roc_auc(truth, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(truth, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(truth, [0.5, 0.5, 0.5, 0.5]) == 0.5
    curve = roc_curve(truth, [0.1, 0.4, 0.35, 0.8])
    assert curve.auc == pytest.approx(0.75)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0, 0, 1, 1)
    assert curve.thresholds[0] == np.inf
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)


def test_roc_auc_equals_pairwise_probability_with_ties() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        truth = rng.random(40) < 0.4
        truth[:2] = (True, False)
        scores = np.round(rng.random(40), 1)  # coarse: many ties across classes
        assert roc_auc(truth, scores) == pytest.approx(_pairwise_auc(truth, scores), abs=1e-12)


def test_roc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="positive and negative"):
        roc_curve([True, True], [0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        roc_curve([True, False], [np.nan, 0.3])


def test_classification_metrics() -> None:
    truth = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.3, 0.6, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.5, 0.4, 0.1],
        ]
    )
    metrics = classification_metrics(truth, probs, ("normal", "pneumonia", "lung_cancer"))
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.confusion.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert metrics.roc[2] is None  # no lung cancer in the set: its AUC is undefined
    assert metrics.roc[0] is not None
    assert metrics.roc[0].auc == pytest.approx(_pairwise_auc(truth == 0, probs[:, 0]))
    assert metrics.macro_roc_auc == pytest.approx(
        (metrics.roc[0].auc + metrics.roc[1].auc) / 2  # type: ignore[union-attr]
    )
    assert metrics.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)

    summary = metrics.to_dict()
    assert summary["accuracy"] == pytest.approx(0.6667)
    assert summary["per_class"]["lung_cancer"]["roc_auc"] is None
    assert summary["per_class"]["normal"]["support"] == 3
    assert summary["confusion_matrix"]["labels"] == ["normal", "pneumonia", "lung_cancer"]
    assert set(summary["macro"]) == {"precision", "recall", "f1", "roc_auc"}
    json.dumps(summary, allow_nan=False)

    with pytest.raises(ValueError, match="shape"):
        classification_metrics(truth, probs[:, :2], ("normal", "pneumonia", "lung_cancer"))


def test_png_and_json_writers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    probs[np.arange(60), truth] += 0.5
    metrics = classification_metrics(truth, probs / probs.sum(1, keepdims=True), ("a", "b", "c"))

    roc = write_roc_png(tmp_path / "plots" / "roc.png", dict(zip("abc", metrics.roc, strict=True)))
    confusion = write_confusion_png(tmp_path / "plots" / "confusion.png", metrics.confusion, "abc")
    for path in (roc, confusion):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.std() > 0.05
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["confusion.png", "roc.png"]
    with pytest.raises(ValueError, match="class names"):
        write_confusion_png(tmp_path / "bad.png", metrics.confusion, ["a", "b"])

    report = write_json(tmp_path / "report.json", {"accuracy": metrics.accuracy})
    assert json.loads(report.read_text(encoding="utf-8")) == {"accuracy": metrics.accuracy}
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"accuracy": float("nan")})
