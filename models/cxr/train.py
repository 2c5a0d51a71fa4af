"""Train the chest X-ray classifier: the demo model on generated radiographs, or a user's model.

:func:`train_demo` exists so the whole pipeline can run end to end without patient data or
downloads. It is trained only on images from :mod:`models.cxr.synthetic`, rendered to DICOM and
preprocessed through exactly the functions used at inference, and its card says ``demo: true``.
It must never be used on patients.

:func:`train_from_folder` trains on the user's own labelled images: a folder of DICOM (or NIfTI)
files and a CSV naming each file's class, optionally starting from an existing model directory
(transfer learning). Both share one training loop: MONAI augmentation of the preprocessed
224x224 inputs, class-weighted cross-entropy, Adam with a one-cycle learning rate, fixed seeds,
BatchNorm statistics re-estimated on training images before each validation (without it a
briefly trained network scores near chance in eval mode), and the epoch with the best
validation accuracy (ties: a loss lower by more than 1e-4) kept; training stops early after
``patience`` epochs without such an improvement.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import monai
import monai.data
import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)
from pydantic import JsonValue
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from models.card import (
    LabelSpec,
    ModelCard,
    ModelCardDraft,
    ModelLoadError,
    load_weights,
    read_model_card,
    write_model_dir,
)
from models.cxr.classifier import (
    ARCHITECTURE,
    CXR_LABELS,
    INPUT_SIZE,
    INPUT_SPEC,
    TASK,
    build_network,
    check_card,
)
from models.cxr.preprocess import (
    PREPROCESSING_SPEC,
    preprocess_dataset,
    robust_window,
    to_model_input,
)
from models.cxr.synthetic import CLASSES, GENERATOR_ID, make_cxr_dataset

MODEL_NAME = "cxr-resnet18"
MODEL_VERSION = "0.1.0-demo"

#: Image shapes drawn for generated images (rows, columns): mostly square, some portrait/landscape.
_SHAPES: tuple[tuple[int, int], ...] = ((512, 512), (512, 512), (512, 512), (512, 416), (416, 512))
_VAL_FRACTION = 0.2
_LEARNING_RATE = 3e-4
_WEIGHT_DECAY = 1e-4
# Entropy prefix of the held-out generated stream: its seed sequences never equal training's.
_HELD_OUT_STREAM = 0x48454C44
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_BN_IMAGES = 128
_MIN_LOSS_DELTA = 1e-4
_MAX_LISTED_PROBLEMS = 25

AUGMENTATION = (
    "MONAI: RandFlip left-right (p 0.5); RandAffine rotation +-5 deg, scaling +-4%, shift +-3% "
    "(p 0.8, one resampling); RandScaleIntensity +-5% and RandShiftIntensity +-0.03 (p 0.5 each); "
    "RandGaussianNoise sd 0.01 (p 0.5); clipped to [0, 1]"
)

BATCHNORM_STATISTICS = (
    f"re-estimated as exact averages over up to {_BN_IMAGES} unaugmented training images "
    "after every epoch"
)

if tuple(label.name for label in CXR_LABELS) != CLASSES:  # pragma: no cover
    raise RuntimeError("generator classes and classifier labels disagree")


class TrainingDataError(ValueError):
    """The labelled data cannot be used; ``problems`` lists each bad row or file."""

    def __init__(self, summary: str, problems: Sequence[str]) -> None:
        """Build the message from ``summary`` and the first problems (all kept in ``problems``)."""
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:_MAX_LISTED_PROBLEMS])
        more = len(self.problems) - _MAX_LISTED_PROBLEMS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{summary}\n{shown}{tail}" if self.problems else summary)


# --- progress -------------------------------------------------------------------------------


class _Progress:
    """Rich progress bars and epoch lines on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool, log: Callable[[str], None] | None = None) -> None:
        self._bars: Progress | None = None
        self._log = log
        if enabled:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if self._bars is None:
            yield self
            return
        with self._bars:
            yield self

    def task(self, description: str, total: int) -> TaskID | None:
        return self._bars.add_task(description, total=total) if self._bars is not None else None

    def advance(self, task: TaskID | None, steps: int = 1) -> None:
        if self._bars is not None and task is not None:
            self._bars.advance(task, steps)

    def done(self, task: TaskID | None) -> None:
        if self._bars is not None and task is not None:
            self._bars.remove_task(task)

    def line(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
        if self._bars is not None:
            self._bars.console.print(message)


# --- data -----------------------------------------------------------------------------------


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware where the platform tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def generate_model_inputs(
    images_per_class: int,
    seed: int,
    *,
    held_out: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate images of each class as model inputs (N, 1, 224, 224) float16, and class indices.

    Each image is rendered as a DICOM dataset and preprocessed exactly as at inference.
    ``held_out`` draws from a stream disjoint from training's for the same ``seed``, so an
    evaluation never sees a training image.
    """
    if images_per_class < 1:
        raise ValueError("images_per_class must be positive")
    total = images_per_class * len(CLASSES)
    images = np.empty((total, 1, INPUT_SIZE, INPUT_SIZE), dtype=np.float16)
    labels = np.empty(total, dtype=np.int64)
    k = 0
    for class_index, name in enumerate(CLASSES):
        for i in range(images_per_class):
            entropy = (
                [_HELD_OUT_STREAM, seed, class_index, i] if held_out else [seed, class_index, i]
            )
            rng = np.random.default_rng(entropy)
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
        if progress is not None:
            progress(f"generated {images_per_class} {name} images")
    return images, labels


@dataclass(frozen=True)
class LabelledFolder:
    """Preprocessed images of a labelled folder, their class indices and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    files: tuple[str, ...]
    formats: dict[str, int]
    labels_csv_sha256: str

    def __post_init__(self) -> None:
        n = len(self.files)
        if self.images.shape != (n, 1, INPUT_SIZE, INPUT_SIZE) or self.labels.shape != (n,):
            raise ValueError("images, labels and files must describe the same images")


def _label_index(raw: str) -> int | None:
    key = raw.strip().lower().replace(" ", "_").replace("-", "_")
    return CLASSES.index(key) if key in CLASSES else None


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(_NIFTI_SUFFIXES)


def nifti_model_input(path: Path) -> np.ndarray:
    """A 2D NIfTI radiograph as model input (1, 224, 224) in [0, 1].

    The image is reoriented to RAS+ and shown as a radiologist reads a frontal film: superior (or
    anterior) at the top, the patient's right on the image's left. Having no window, it is
    scaled by the robust percentile window, like a DICOM image without VOI. Raises
    :class:`ValueError` for anything but one 2D image.
    """
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"not a NIfTI-1/2 image ({type(img).__name__})")
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    plane_axes = [axis for axis, size in enumerate(data.shape) if size > 1]
    if len(plane_axes) != 2 or data.ndim > 4:
        raise ValueError(f"expected one 2D image, got array shape {data.shape}")
    plane = data.reshape(data.shape[plane_axes[0]], data.shape[plane_axes[1]])
    if not np.isfinite(plane).all():
        raise ValueError("image holds NaN or infinite values")
    # plane[i, j]: i towards patient right (or anterior), j towards superior (or anterior).
    display = plane.T[::-1, ::-1]
    return to_model_input(robust_window(np.ascontiguousarray(display)), INPUT_SIZE)


def _model_input(path: Path) -> np.ndarray:
    if _is_nifti(path.name):
        return nifti_model_input(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise ValueError("not a DICOM file (no DICM preamble) nor NIfTI (.nii/.nii.gz)") from exc
    return preprocess_dataset(ds, INPUT_SIZE)


def read_labelled_folder(
    data_dir: Path, labels_csv: Path, *, progress: bool = False
) -> LabelledFolder:
    """Read a CSV of ``file,label`` rows and preprocess every listed image of ``data_dir``.

    ``file`` is a path relative to ``data_dir`` (DICOM, or NIfTI ``.nii``/``.nii.gz``); ``label``
    is ``normal``, ``pneumonia`` or ``lung_cancer`` (case, spaces and hyphens ignored). Other
    columns are ignored, as are blank rows. Raises :class:`TrainingDataError` listing every bad
    row: unknown label, missing file, a path outside ``data_dir``, a file listed twice, or a file
    that is not a usable greyscale 2D image.
    """
    data_dir = Path(data_dir)
    labels_csv = Path(labels_csv)
    if not data_dir.is_dir():
        raise TrainingDataError(f"data folder {data_dir.name!r} does not exist", [])
    try:
        raw = labels_csv.read_bytes()
    except OSError as exc:
        raise TrainingDataError(f"cannot read labels CSV {labels_csv.name!r}: {exc}", []) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"labels CSV {labels_csv.name!r} is not UTF-8 text", []) from exc
    reader = csv.DictReader(text.splitlines())
    columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
    if "file" not in columns or "label" not in columns:
        raise TrainingDataError(
            f"labels CSV {labels_csv.name!r} needs a header row with columns 'file' and 'label', "
            f"got {list(reader.fieldnames or [])}",
            [],
        )
    root = data_dir.resolve()
    problems: list[str] = []
    rows: list[tuple[int, str, Path, int]] = []
    seen: dict[str, int] = {}
    for record in reader:
        line = reader.line_num
        file_text = (record.get(columns["file"]) or "").strip()
        label_text = (record.get(columns["label"]) or "").strip()
        if not file_text and not label_text:
            continue
        index = _label_index(label_text)
        if index is None:
            problems.append(
                f"line {line}: unknown label {label_text!r} for {file_text!r} "
                f"(expected one of {', '.join(CLASSES)})"
            )
        relative = Path(file_text)
        if not file_text:
            problems.append(f"line {line}: no file given")
            continue
        if relative.is_absolute() or ".." in relative.parts:
            problems.append(f"line {line}: {file_text!r} must be a path inside the data folder")
            continue
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            problems.append(f"line {line}: {file_text!r} leads outside the data folder")
            continue
        if not path.is_file():
            problems.append(f"line {line}: file {file_text!r} not found")
            continue
        key = relative.as_posix()
        if key in seen:
            problems.append(f"line {line}: {file_text!r} is listed twice (also line {seen[key]})")
            continue
        seen[key] = line
        if index is not None:
            rows.append((line, key, path, index))
    if not rows and not problems:
        problems.append("no labelled images listed")

    images = np.empty((len(rows), 1, INPUT_SIZE, INPUT_SIZE), dtype=np.float16)
    labels = np.empty(len(rows), dtype=np.int64)
    formats = {"dicom": 0, "nifti": 0}
    bars = _Progress(progress)
    with bars.running():
        task = bars.task("reading images", len(rows))
        for k, (line, key, path, index) in enumerate(rows):
            try:
                images[k] = _model_input(path)
            except Exception as exc:  # any decoding failure is a bad row to list, not a crash
                problems.append(f"line {line}: {key!r} is not a usable image: {exc}")
            labels[k] = index
            formats["nifti" if _is_nifti(path.name) else "dicom"] += 1
            bars.advance(task)
    if problems:
        raise TrainingDataError(
            f"labels CSV {labels_csv.name!r}: {len(problems)} problem(s); fix these rows:",
            problems,
        )
    return LabelledFolder(
        images=images,
        labels=labels,
        files=tuple(key for _, key, _, _ in rows),
        formats=formats,
        labels_csv_sha256=hashlib.sha256(raw).hexdigest(),
    )


def _split(labels: np.ndarray, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``val_fraction`` of each class for validation (at least one)."""
    rng = np.random.default_rng([seed, 99])
    train_idx: list[int] = []
    val_idx: list[int] = []
    for class_index in range(len(CLASSES)):
        idx = np.flatnonzero(labels == class_index)
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return np.array(sorted(train_idx), dtype=np.int64), np.array(sorted(val_idx), dtype=np.int64)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights ``n / (K * n_k)``: each class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    if (counts == 0).any():
        missing = [CLASSES[k] for k in np.flatnonzero(counts == 0)]
        raise ValueError(f"no training images of class(es) {missing}")
    return (counts.sum() / (len(CLASSES) * counts)).astype(np.float32)


# --- the training loop ------------------------------------------------------------------------


def make_augmentation(seed: int) -> Compose:
    """The training augmentation (see :data:`AUGMENTATION`), seeded for reproducibility.

    Rotation, scaling and shift are one ``RandAffine`` so each image is resampled only once.
    """
    shift = 0.03 * INPUT_SIZE
    transforms = Compose(
        [
            RandFlip(prob=0.5, spatial_axis=1),
            RandAffine(
                prob=0.8,
                rotate_range=math.radians(5.0),
                scale_range=0.04,
                translate_range=(shift, shift),
                spatial_size=(INPUT_SIZE, INPUT_SIZE),
                padding_mode="zeros",
                cache_grid=True,
            ),
            RandScaleIntensity(factors=0.05, prob=0.5),
            RandShiftIntensity(offsets=0.03, prob=0.5),
            RandGaussianNoise(prob=0.5, std=0.01),
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


@dataclass
class _FitResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    accuracy: float
    loss: float
    confusion: np.ndarray
    history: list[JsonValue]
    epochs_run: int
    stopped_early: bool


def _evaluate(
    network: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    weights: torch.Tensor | None = None,
) -> tuple[float, np.ndarray]:
    """Mean (class-weighted) cross-entropy and confusion matrix (rows = truth) on held-out data."""
    network.eval()
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    loss_sum = 0.0
    weight_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size].astype(np.float32))
            y = torch.from_numpy(labels[start : start + batch_size])
            logits = network(x)
            loss_sum += float(F.cross_entropy(logits, y, weight=weights, reduction="sum"))
            weight_sum += float(weights[y].sum()) if weights is not None else len(y)
            pred = logits.argmax(dim=1).numpy()
            np.add.at(confusion, (y.numpy(), pred), 1)
    return loss_sum / max(1e-12, weight_sum), confusion


def _recalibrate_batchnorm(
    network: torch.nn.Module, images: np.ndarray, batch_size: int, limit: int = _BN_IMAGES
) -> None:
    """Re-estimate BatchNorm statistics as exact averages over (up to ``limit``) training images.

    The running averages lag behind weights that Adam moves quickly, so a briefly trained
    network scores near chance in eval mode although it fits the training data ("precise BN").
    """
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    network.train()
    step = max(2, batch_size)
    with torch.no_grad():
        for start in range(0, min(len(images), limit), step):
            batch = images[start : min(start + step, limit)]
            if len(batch) > 1:
                network(torch.from_numpy(batch.astype(np.float32)))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _fit(
    network: torch.nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    patience: int | None,
    seed: int,
    learning_rate: float,
    weights: np.ndarray,
    bars: _Progress,
) -> _FitResult:
    x_train, y_train = train
    x_val, y_val = val
    weight_t = torch.from_numpy(weights)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=_WEIGHT_DECAY)
    steps_per_epoch = max(1, math.ceil(len(x_train) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps_per_epoch * epochs, pct_start=0.15
    )
    augment = make_augmentation(seed)
    gen = torch.Generator().manual_seed(seed)
    # A fixed, class-mixed subset of the training images for re-estimating BatchNorm statistics.
    x_bn = x_train[np.random.default_rng([seed, 7]).permutation(len(x_train))[:_BN_IMAGES]]
    best_accuracy, best_loss = -1.0, math.inf
    result = _FitResult({}, 0, 0.0, math.inf, np.zeros((3, 3), np.int64), [], 0, False)
    since_best = 0
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        network.train()
        order = torch.randperm(len(x_train), generator=gen).numpy()
        loss_sum = 0.0
        seen = 0
        task = bars.task(f"epoch {epoch}/{epochs}", steps_per_epoch)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            bars.advance(task)
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            with _one_thread():
                x = torch.stack(
                    [
                        torch.as_tensor(augment(torch.from_numpy(x_train[i].astype(np.float32))))
                        for i in idx
                    ]
                ).clamp_(0.0, 1.0)
            y = torch.from_numpy(y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(network(x), y, weight=weight_t)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        bars.done(task)
        _recalibrate_batchnorm(network, x_bn, batch_size)
        val_loss, confusion = _evaluate(network, x_val, y_val, batch_size, weight_t)
        accuracy = float(np.trace(confusion) / max(1, confusion.sum()))
        seconds = time.perf_counter() - epoch_start
        train_loss = loss_sum / max(1, seen)
        result.history.append(
            {
                "epoch": epoch,
                "train_loss": round(train_loss, 4),
                "val_loss": round(val_loss, 4),
                "val_accuracy": round(accuracy, 4),
                "seconds": round(seconds, 1),
            }
        )
        result.epochs_run = epoch
        bars.line(
            f"epoch {epoch}/{epochs}: train loss {train_loss:.3f}, "
            f"val loss {val_loss:.3f}, val accuracy {accuracy:.3f} ({seconds:.0f} s)"
        )
        # Better: higher accuracy, or the same accuracy and a loss lower by more than noise.
        if accuracy > best_accuracy or (
            accuracy == best_accuracy and val_loss < best_loss - _MIN_LOSS_DELTA
        ):
            best_accuracy, best_loss = accuracy, val_loss
            result.state = copy.deepcopy(network.state_dict())
            result.best_epoch = epoch
            result.accuracy, result.loss, result.confusion = accuracy, val_loss, confusion
            since_best = 0
        else:
            since_best += 1
            if patience is not None and since_best >= patience and epoch < epochs:
                result.stopped_early = True
                bars.line(f"stopping early: no improvement for {patience} epochs")
                break
    return result


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small per-image tensor ops on one thread.

    Multi-threaded, each tiny op pays the thread pool's wake-up and spin-wait: on a busy 2-core
    machine per-image augmentation took 30x the CPU time with two threads that it took with one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _training_context(seed: int) -> Iterator[None]:
    """Torch threads capped at the usable CPUs, a fixed torch seed, plain tensors from MONAI.

    Torch defaults to one thread per core of the host, more than a container may use; an
    explicit lower setting (``torch.set_num_threads``, ``OMP_NUM_THREADS``) is kept. All is
    restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    previous_meta = monai.data.get_track_meta()
    torch.set_num_threads(min(previous_threads, _usable_cpus()))
    monai.data.set_track_meta(False)  # metadata is not needed here and costs time per sample
    torch.manual_seed(seed)
    try:
        yield
    finally:
        monai.data.set_track_meta(previous_meta)
        torch.set_num_threads(previous_threads)


def _validation_metrics(fit: _FitResult) -> dict[str, JsonValue]:
    recall: dict[str, JsonValue] = {
        name: round(float(fit.confusion[i, i] / max(1, fit.confusion[i].sum())), 4)
        for i, name in enumerate(CLASSES)
    }
    return {
        "val_accuracy": round(fit.accuracy, 4),
        "val_loss": round(fit.loss, 4),
        "val_recall": recall,
        "val_confusion": [[int(v) for v in row] for row in fit.confusion],
    }


def _check_options(epochs: int, batch_size: int) -> None:
    if epochs < 1 or batch_size < 2:
        raise ValueError("epochs must be positive and batch_size at least 2")


# --- entry points -----------------------------------------------------------------------------


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
    Adam (one-cycle learning-rate schedule) under MONAI augmentation for all ``epochs``; the
    epoch with the best validation accuracy is kept. ``progress`` receives one line per step.
    Returns the card written (name ``cxr-resnet18``, version ``0.1.0-demo``, ``demo`` true) with
    the validation accuracy and per-class recall.
    """
    if images_per_class < 2:
        raise ValueError("images_per_class must be at least 2 (one for training, one held out)")
    _check_options(epochs, batch_size)
    report = progress or (lambda _msg: None)
    started = time.perf_counter()
    with _training_context(seed):
        images, labels = generate_model_inputs(images_per_class, seed, progress=report)
        generation_s = time.perf_counter() - started
        train_idx, val_idx = _split(labels, seed, _VAL_FRACTION)
        fit = _fit(
            build_network(),
            (images[train_idx], labels[train_idx]),
            (images[val_idx], labels[val_idx]),
            epochs=epochs,
            batch_size=batch_size,
            patience=None,
            seed=seed,
            learning_rate=_LEARNING_RATE,
            weights=class_weights(labels[train_idx]),
            bars=_Progress(False, report),
        )
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
            "train_count": len(train_idx),
            "val_count": len(val_idx),
            "val_fraction": _VAL_FRACTION,
            "epochs": epochs,
            "best_epoch": fit.best_epoch,
            "seed": seed,
            "batch_size": batch_size,
            "loss": "cross-entropy",
            "optimizer": f"Adam (lr {_LEARNING_RATE}, weight decay {_WEIGHT_DECAY})",
            "lr_schedule": "one-cycle",
            "augmentation": AUGMENTATION,
            "batchnorm_statistics": BATCHNORM_STATISTICS,
            "history": fit.history,
            "generation_seconds": round(generation_s, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
        metrics=_validation_metrics(fit),
        demo=True,
    )
    card = write_model_dir(Path(model_dir), draft, fit.state)
    report(f"wrote {MODEL_NAME} {MODEL_VERSION}: val accuracy {fit.accuracy:.3f}")
    return card


def _initial_state(
    init_from: Path | None,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, JsonValue] | None]:
    """The checked weights of the model to start from, and how the new card names it."""
    if init_from is None:
        return None, None
    card = read_model_card(Path(init_from))
    check_card(card)
    state = load_weights(Path(init_from), card, map_location="cpu")
    try:
        build_network().load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"weights of model {card.name} {card.version} do not fit the chest X-ray network"
        ) from exc
    return state, {
        "name": card.name,
        "version": card.version,
        "device_uid": card.device_uid,
        "weights_sha256": card.weights.sha256,
        "demo": card.demo,
    }


def train_from_folder(
    data_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    init_from: Path | None = None,
    epochs: int = 30,
    batch_size: int = 16,
    patience: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
    learning_rate: float = _LEARNING_RATE,
    name: str = MODEL_NAME,
    version: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the chest X-ray classifier on a labelled folder and write a model directory.

    ``labels_csv`` has a header with ``file`` (relative to ``data_dir``; DICOM or NIfTI) and
    ``label`` (normal / pneumonia / lung_cancer); see :func:`read_labelled_folder`, whose
    :class:`TrainingDataError` lists every bad row. Each class needs at least two images (one for
    training, one for validation); ``val_fraction`` of each class is held out. ``init_from`` is
    an existing chest X-ray model directory to start from (transfer learning; its card and
    weights digest are checked, and it is named in the new card). Training uses class-weighted
    cross-entropy, Adam with a one-cycle schedule over ``epochs``, MONAI augmentation, fixed
    seeds, and stops after ``patience`` epochs without a better validation result; the best
    epoch is kept. ``progress`` shows rich progress bars on stderr; ``log`` receives one line
    per epoch. ``version`` defaults to the UTC time of training. Returns ``out_dir``.
    """
    _check_options(epochs, batch_size)
    if not learning_rate > 0.0:
        raise ValueError("learning_rate must be positive")
    if patience < 1:
        raise ValueError("patience must be at least 1 epoch")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    out_dir = Path(out_dir)
    if init_from is not None and out_dir.resolve() == Path(init_from).resolve():
        raise ValueError(
            "out_dir is the init_from model directory: write the new model to another directory"
        )
    started = time.perf_counter()
    when = datetime.now(UTC)
    initial, source = _initial_state(init_from)
    folder = read_labelled_folder(data_dir, labels_csv, progress=progress)
    counts = np.bincount(folder.labels, minlength=len(CLASSES))
    short = [f"{CLASSES[k]} ({int(counts[k])})" for k in range(len(CLASSES)) if counts[k] < 2]
    if short:
        raise TrainingDataError(
            "every class needs at least two labelled images (one to train on, one to validate "
            "with); too few of:",
            short,
        )
    train_idx, val_idx = _split(folder.labels, seed, val_fraction)
    weights = class_weights(folder.labels[train_idx])
    bars = _Progress(progress, log)
    with _training_context(seed), bars.running():
        network = build_network()  # seeded: the same initial weights on every run
        if initial is not None:
            network.load_state_dict(initial, strict=True)
        fit = _fit(
            network,
            (folder.images[train_idx], folder.labels[train_idx]),
            (folder.images[val_idx], folder.labels[val_idx]),
            epochs=epochs,
            batch_size=batch_size,
            patience=patience,
            seed=seed,
            learning_rate=learning_rate,
            weights=weights,
            bars=bars,
        )
    per_class: dict[str, JsonValue] = {CLASSES[k]: int(counts[k]) for k in range(len(CLASSES))}
    formats: dict[str, JsonValue] = dict(folder.formats)
    draft = ModelCardDraft(
        name=name,
        version=version or when.strftime("%Y.%m.%d-%H%M%S"),
        task=TASK,
        labels=tuple(LabelSpec.from_coded(label) for label in CXR_LABELS),
        input=INPUT_SPEC,
        preprocessing=PREPROCESSING_SPEC,
        architecture=ARCHITECTURE,
        training={
            "data": "labelled images from a folder",
            "labels_csv": Path(labels_csv).name,
            "labels_csv_sha256": folder.labels_csv_sha256,
            "image_count": len(folder.files),
            "per_class": per_class,
            "formats": formats,
            "train_count": len(train_idx),
            "val_count": len(val_idx),
            "val_fraction": val_fraction,
            "init_from": source,
            "epochs": epochs,
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            "stopped_early": fit.stopped_early,
            "patience": patience,
            "seed": seed,
            "batch_size": batch_size,
            "loss": "class-weighted cross-entropy",
            "class_weights": {CLASSES[k]: round(float(w), 4) for k, w in enumerate(weights)},
            "optimizer": f"Adam (lr {learning_rate}, weight decay {_WEIGHT_DECAY})",
            "lr_schedule": "one-cycle",
            "augmentation": AUGMENTATION,
            "batchnorm_statistics": BATCHNORM_STATISTICS,
            "history": fit.history,
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
            "monai": monai.__version__,
        },
        metrics=_validation_metrics(fit),
        demo=False,
    )
    write_model_dir(out_dir, draft, fit.state)
    bars.line(f"wrote {name} {draft.version}: val accuracy {fit.accuracy:.3f}")
    return out_dir
