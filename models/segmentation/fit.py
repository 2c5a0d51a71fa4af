"""The liver model's training loop, shared by the demo and by folder training.

Each labelled volume is rendered onto the model grid with exactly the preprocessing used at
inference (:func:`prepare_case`); every step crops a ROI around liver or background and augments
it with MONAI transforms (:func:`training_transforms`). The loss is Dice + cross-entropy, the
optimiser Adam with a cosine learning-rate decay; after every epoch the validation volumes are
segmented by sliding window and cleaned as at inference, and :func:`fit` stops once their mean
Dice has not improved for ``patience`` epochs, returning the best epoch's weights.

A left-right flip is deliberately not among the augmentations: the liver's side is what tells it
from the spleen, whose attenuation is much the same.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)
from pydantic import JsonValue

from models.segmentation.data import LabelledCase
from models.segmentation.infer import InputSpec, foreground_probability
from models.segmentation.preprocess import (
    THRESHOLD,
    clean_probability,
    prepare_image,
    prepare_mask,
)

WEIGHT_DECAY = 1e-5
_MIN_DELTA = 1e-4

AUGMENTATION = (
    "crop of input.roi_size around liver (2 of 3) or anywhere (1 of 3); rotation about the "
    "head-foot axis +-12 deg (p 0.3); zoom 0.9-1.1 (p 0.3); head-foot flip (p 0.15); intensity "
    "scale +-10% (p 0.5) and shift +-0.05 (p 0.5); gaussian noise sd 0.02 (p 0.3)"
)


@dataclass(frozen=True, eq=False)
class TrainingItem:
    """One labelled volume on the model grid, channel first."""

    name: str
    image: np.ndarray  # (1, z, y, x) float32 in [0, 1]
    label: np.ndarray  # (1, z, y, x) uint8


def prepare_case(case: LabelledCase, spec: InputSpec) -> TrainingItem:
    """Render a labelled case onto the model grid exactly as inference would."""
    image, geometry = prepare_image(case.volume, spec.spacing_mm, spec.hu_window)
    label = prepare_mask(case.mask, geometry) >= THRESHOLD
    return TrainingItem(case.name, image[None], label[None].astype(np.uint8))


def training_transforms(roi_size: Sequence[int]) -> Compose:
    """The MONAI augmentation chain applied to every training sample (see ``AUGMENTATION``)."""
    keys = ["image", "label"]
    roi = [int(r) for r in roi_size]
    return Compose(
        [
            SpatialPadd(keys, spatial_size=roi),
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=roi, pos=2, neg=1, num_samples=1
            ),
            # range_x turns about the first spatial axis (z): rotation in the axial plane.
            RandRotated(
                keys,
                range_x=math.radians(12.0),
                prob=0.3,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandZoomd(keys, min_zoom=0.9, max_zoom=1.1, prob=0.3, mode=("trilinear", "nearest")),
            RandFlipd(keys, spatial_axis=0, prob=0.15),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandGaussianNoised("image", std=0.02, prob=0.3),
        ]
    )


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


class Reporter:
    """Progress: messages to a callback and, optionally, a rich progress bar."""

    def __init__(self, message: Callable[[str], None] | None, bar: bool) -> None:
        self._message = message
        self._bar = bar
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Reporter:
        if self._bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, description: str, total: int) -> None:
        """Begin a counted stage (a new bar)."""
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total)

    def advance(self, description: str | None = None) -> None:
        """One unit of the current stage done."""
        if self._progress is not None and self._task is not None:
            if description is None:
                self._progress.advance(self._task)
            else:
                self._progress.update(self._task, advance=1, description=description)

    def say(self, text: str) -> None:
        """A message for the log (never carries patient data)."""
        if self._message is not None:
            self._message(text)
        elif self._progress is not None:
            self._progress.console.print(text)


@dataclass
class FitResult:
    """The best epoch of a run: its weights, number, validation Dice; and every epoch's log."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    val_dice: float
    history: list[JsonValue]


def _plain(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).as_subclass(torch.Tensor)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = float(np.count_nonzero(pred & truth))
    total = float(np.count_nonzero(pred) + np.count_nonzero(truth))
    return 1.0 if total == 0 else 2.0 * inter / total


def _validate(
    network: torch.nn.Module, items: Sequence[TrainingItem], spec: InputSpec, device: torch.device
) -> float:
    network.eval()
    scores = []
    for item in items:
        prob = foreground_probability(network, item.image[0], spec.roi_size, device=device)
        pred = clean_probability(prob) >= THRESHOLD
        scores.append(_dice(pred, item.label[0] != 0))
    return float(np.mean(scores))


def fit(
    network: torch.nn.Module,
    train_items: Sequence[TrainingItem],
    val_items: Sequence[TrainingItem],
    spec: InputSpec,
    *,
    epochs: int,
    patience: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    reporter: Reporter,
) -> FitResult:
    """Train ``network`` on ``train_items``; keep the epoch with the best validation Dice.

    An epoch visits every training item once, ``batch_size`` augmented crops per step; AMP is
    used on CUDA. Stops after ``epochs`` or when validation Dice has not improved (by 1e-4) for
    ``patience`` epochs. Fixed ``seed`` for crops, augmentation and order.
    """
    network.to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    steps = math.ceil(len(train_items) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * steps), eta_min=learning_rate * 0.05
    )
    transforms = training_transforms(spec.roi_size)
    transforms.set_random_state(seed)
    order_rng = np.random.default_rng(seed)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    best = FitResult(
        state=copy.deepcopy(network.state_dict()), best_epoch=0, val_dice=-1.0, history=[]
    )
    stale = 0
    reporter.start("training", epochs * steps)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        network.train()
        order = order_rng.permutation(len(train_items))
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            samples = []
            for index in order[start : start + batch_size]:
                item = train_items[int(index)]
                out = transforms({"image": item.image, "label": item.label})
                samples.append(out[0] if isinstance(out, list) else out)
            # Plain tensors: MONAI's MetaTensor would track metadata through every layer.
            x = torch.stack([_plain(s["image"]) for s in samples]).float().to(device)
            y = torch.stack([_plain(s["label"]) for s in samples]).float().to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", enabled=use_amp):
                loss = loss_fn(network(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.item()) * len(samples)
            reporter.advance(f"epoch {epoch}/{epochs}")
        val_dice = _validate(network, val_items, spec, device)
        seconds = time.perf_counter() - started
        train_loss = loss_sum / len(train_items)
        best.history.append(
            {
                "epoch": epoch,
                "train_loss": round(train_loss, 4),
                "val_dice": round(val_dice, 4),
                "seconds": round(seconds, 1),
            }
        )
        reporter.say(
            f"epoch {epoch}/{epochs}: train loss {train_loss:.3f}, val Dice {val_dice:.3f} "
            f"({seconds:.0f} s)"
        )
        if val_dice > best.val_dice + _MIN_DELTA:
            best.state = copy.deepcopy(network.state_dict())
            best.best_epoch = epoch
            best.val_dice = val_dice
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                reporter.say(f"early stop: no better val Dice for {patience} epochs")
                break
    return best


class ThreadScope:
    """Use every CPU this process may run on while training, then restore the setting."""

    def __enter__(self) -> None:
        self._previous = torch.get_num_threads()
        torch.set_num_threads(_usable_cpus())

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._previous)
