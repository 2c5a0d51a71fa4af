"""Evaluation of a liver model on labelled cases: Dice, HD95 and an overlay picture.

Each case goes through the whole inference path (:class:`LiverSegmenter.segment`), and the
mask it returns is compared with the truth on the case's own grid: Dice and the 95th
percentile Hausdorff distance in mm (both from :mod:`monai.metrics`, HD95 with the volume's
spacing), plus the volumes. The report is a JSON-able dict; an axial slice with the predicted
and true outlines can be written as a PNG.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from models.segmentation import LIVER
from models.segmentation.data import LabelledCase
from models.segmentation.infer import LiverSegmenter
from models.segmentation.measure import volume_ml

#: Display window of the overlay picture (abdominal soft tissue).
OVERLAY_WINDOW = (-160.0, 240.0)


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to their union's bounding box plus a 2-voxel margin."""
    union = (pred != 0) | (truth != 0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(0, int(idx[0]) - 2), int(idx[-1]) + 3))
    where = (box[0], box[1], box[2])
    return pred[where], truth[where]


def dice_hd95(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float | None]:
    """Dice and HD95 (mm) of two binary masks of the same shape.

    Two empty masks agree perfectly (Dice 1.0, HD95 0.0); when exactly one is empty Dice is 0.0
    and HD95 is ``None`` (undefined).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    has_pred, has_truth = bool(np.any(pred)), bool(np.any(truth))
    if not has_pred and not has_truth:
        return 1.0, 0.0
    if not has_pred or not has_truth:
        return 0.0, None
    p, t = _crop_to_union(pred, truth)

    def onehot(mask: np.ndarray) -> torch.Tensor:
        fg = torch.from_numpy(np.ascontiguousarray(mask != 0))
        return torch.stack([~fg, fg])[None].float()

    y_pred, y = onehot(p), onehot(t)
    dice = float(compute_dice(y_pred, y, include_background=False)[0, 0])
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument.
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(
            compute_hausdorff_distance(
                y_pred,
                y,
                include_background=False,
                percentile=95,
                spacing=[float(s) for s in spacing],
            )[0, 0]
        )
    return dice, (hd95 if math.isfinite(hd95) else None)


def write_overlay_png(
    hu: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None,
    spacing: Sequence[float],
    path: Path,
    title: str = "",
) -> int:
    """Write the axial slice with the most liver (truth, else prediction) with outlines; return k.

    Prediction in red, truth in green, the slice in an abdominal window; rendered with
    matplotlib's Agg backend (no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    reference = truth if truth is not None and np.any(truth) else pred
    k = int(np.argmax(np.count_nonzero(reference, axis=(1, 2))))
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(
        np.clip(hu[k], *OVERLAY_WINDOW),
        cmap="gray",
        vmin=OVERLAY_WINDOW[0],
        vmax=OVERLAY_WINDOW[1],
        aspect=float(spacing[1]) / float(spacing[2]),
        interpolation="nearest",
    )
    handles = []
    if np.any(pred[k]):
        ax.contour(pred[k], levels=[0.5], colors="red", linewidths=1.2)
        handles.append(Line2D([0], [0], color="red", label="model"))
    if truth is not None and np.any(truth[k]):
        ax.contour(truth[k], levels=[0.5], colors="lime", linewidths=1.0, linestyles="dashed")
        handles.append(Line2D([0], [0], color="lime", linestyle="dashed", label="truth"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(f"{title} (slice {k + 1})" if title else f"slice {k + 1}", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return k


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def evaluate_liver(
    model_dir: Path,
    cases: Iterable[LabelledCase],
    *,
    png_path: Path | None = None,
    device: str = "cpu",
    sw_batch_size: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Segment each case with the model in ``model_dir`` and compare with its truth.

    Returns a JSON-able report: the model (name, version, Device UID, weights sha256, demo), per
    case Dice, HD95 (mm), predicted and true volume (mL) and seconds, and their means (Dice
    also minimum). With ``png_path`` the first case's overlay is written there and named in
    the report. Cases are consumed one at a time.
    """
    report_fn = progress or (lambda _msg: None)
    segmenter = LiverSegmenter.load(Path(model_dir), device=device, sw_batch_size=sw_batch_size)
    rows: list[dict[str, Any]] = []
    overlay: str | None = None
    for case in cases:
        start = time.perf_counter()
        result = segmenter.segment(case.volume)
        seconds = time.perf_counter() - start
        dice, hd95 = dice_hd95(result.mask, case.mask, case.volume.spacing)
        rows.append(
            {
                "case": case.name,
                "dice": round(dice, 4),
                "hd95_mm": None if hd95 is None else round(hd95, 2),
                "volume_ml": round(result.volume_ml, 1),
                "true_volume_ml": round(volume_ml(case.mask, case.volume.spacing), 1),
                "seconds": round(seconds, 2),
            }
        )
        if png_path is not None and overlay is None:
            write_overlay_png(
                case.volume.hu,
                result.mask,
                case.mask,
                case.volume.spacing,
                Path(png_path),
                title=f"{case.name}: Dice {dice:.3f}",
            )
            overlay = Path(png_path).name
        shown = "undefined" if hd95 is None else f"{hd95:.1f} mm"
        report_fn(f"{case.name}: Dice {dice:.3f}, HD95 {shown}")
    if not rows:
        raise ValueError("no cases to evaluate")
    dices = [float(r["dice"]) for r in rows]
    hds = [float(r["hd95_mm"]) for r in rows if r["hd95_mm"] is not None]
    card = segmenter.card
    return {
        "model": {
            "name": card.name,
            "version": card.version,
            "device_uid": card.device_uid,
            "weights_sha256": card.weights.sha256,
            "demo": card.demo,
        },
        "task": "segmentation",
        "label": {
            "name": LIVER.name,
            "code_value": LIVER.code_value,
            "coding_scheme": LIVER.coding_scheme,
            "code_meaning": LIVER.code_meaning,
        },
        "cases": rows,
        "n_cases": len(rows),
        "dice_mean": _mean(dices),
        "dice_min": round(min(dices), 4),
        "hd95_mm_mean": None if not hds else round(float(np.mean(hds)), 2),
        "hd95_undefined": len(rows) - len(hds),
        "overlay_png": overlay,
    }
