"""Chest radiograph preprocessing, shared by training and inference.

``image_from_dataset`` turns a single-frame greyscale DICOM image into display-oriented values in
[0, 1] (0 = black, as a radiologist would see it); ``to_model_input`` fits that image into the
network's square input without distorting it. Training renders its generated images through
exactly these two functions, so the model sees at inference what it saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_modality_lut, apply_voi_lut

#: Identifier of this preprocessing, recorded in model cards and checked when a model loads.
PREPROCESSING_ID = "carebridge.cxr.preprocess/1"

#: Percentiles of the robust window used when a dataset has neither VOI LUT nor window.
ROBUST_WINDOW_PERCENTILES = (0.5, 99.5)

#: The card's description of this preprocessing.
PREPROCESSING_SPEC: dict[str, Any] = {
    "id": PREPROCESSING_ID,
    "steps": [
        "modality LUT (Rescale Slope/Intercept or Modality LUT Sequence)",
        "VOI LUT Sequence, else Window Center/Width (first), else robust percentile window",
        "invert MONOCHROME1",
        "aspect-preserving resize of the longer side (bilinear, antialiased)",
        "centred zero padding to a square",
    ],
    "robust_window_percentiles": list(ROBUST_WINDOW_PERCENTILES),
    "value_range": [0.0, 1.0],
}

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def _check_single_frame_greyscale(ds: pydicom.Dataset) -> str:
    if "PixelData" not in ds:
        raise ValueError("dataset has no Pixel Data (7FE0,0010): it is not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(f"dataset is multi-frame ({frames} frames): one 2D radiograph is expected")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in _GREYSCALE:
        raise ValueError(
            f"dataset is not greyscale (Photometric Interpretation {photometric or 'missing'!r}, "
            f"{samples} samples per pixel): MONOCHROME1 or MONOCHROME2 is expected"
        )
    return photometric


def _window_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Output range of the windowing step, found by windowing two extreme input values."""
    probe = np.array([-1e30, 1e30], dtype=np.float64)
    with np.errstate(over="ignore"):
        out = apply_voi_lut(probe, ds, index=0, prefer_lut=False)
    return float(out[0]), float(out[1])


def _lut_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Output range of the first VOI LUT, found by passing every mapped input through it."""
    item = ds.VOILUTSequence[0]
    entries = int(item.LUTDescriptor[0]) or 2**16
    first = int(item.LUTDescriptor[1])
    probe = np.arange(first, first + entries, dtype=np.int64)
    out = apply_voi_lut(probe, ds, index=0, prefer_lut=True)
    return float(out.min()), float(out.max())


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds: pydicom.Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = (values.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_window(values: np.ndarray) -> np.ndarray:
    """Scale ``values`` to [0, 1] between their 0.5th and 99.5th percentiles (clipped)."""
    lo, hi = np.percentile(values, ROBUST_WINDOW_PERCENTILES)
    return _scale(values, float(lo), float(hi))


#: Largest stored-value range mapped through a lookup table instead of pixel by pixel.
_MAX_LUT_LEVELS = 2**17


def percentiles_of_levels(
    levels: np.ndarray, counts: np.ndarray, percentiles: tuple[float, ...]
) -> tuple[float, ...]:
    """``np.percentile`` (method "linear") of the values ``levels[i]`` taken ``counts[i]`` times.

    The same result as ``np.percentile`` on the full array, from its histogram: the two
    order statistics around each virtual index are looked up in the cumulative counts
    and interpolated with numpy's own formula (``numpy.lib._function_base_impl._lerp``).
    """
    order = np.argsort(levels, kind="stable")
    ranked = levels[order]
    cumulative = np.cumsum(counts[order])
    n = int(cumulative[-1])
    quantiles = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    virtual = (n - 1) * quantiles
    previous = np.clip(np.floor(virtual), 0, n - 1).astype(np.intp)
    following = np.clip(previous + 1, 0, n - 1)
    following[virtual >= n - 1] = n - 1
    gamma = virtual - np.floor(virtual)
    # The k-th smallest value (0-based) is the first level whose cumulative count > k.
    a = ranked[np.searchsorted(cumulative, previous, side="right")]
    b = ranked[np.searchsorted(cumulative, following, side="right")]
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return tuple(float(v) for v in out)


def _finish(image: np.ndarray, photometric: str) -> np.ndarray:
    image = np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return np.ascontiguousarray(image, dtype=np.float32)


def _robust_window_by_levels(
    stored: np.ndarray, ds: pydicom.Dataset, photometric: str
) -> np.ndarray | None:
    """The robust-window path of :func:`image_from_dataset` through a lookup table.

    Integer pixels take few distinct values: the modality LUT, the percentiles (from a
    histogram, see :func:`percentiles_of_levels`), the window and the inversion are
    applied to each stored level once and the image is one table lookup. Every step is
    elementwise, so the result equals the pixel-by-pixel one. ``None`` where the pixels
    are not integers or span too many levels.
    """
    if stored.dtype.kind not in "iu" or stored.size == 0:
        return None
    base = 0 if stored.dtype.kind == "u" else int(stored.min())
    top = int(stored.max())
    if top - base + 1 > _MAX_LUT_LEVELS:
        return None
    index = stored if base == 0 else stored.astype(np.int64) - base
    counts = np.bincount(index.ravel(), minlength=top - base + 1)
    levels = apply_modality_lut(np.arange(base, top + 1).astype(stored.dtype), ds)
    present = counts > 0
    lo, hi = percentiles_of_levels(levels[present], counts[present], ROBUST_WINDOW_PERCENTILES)
    table = _finish(_scale(levels, lo, hi), photometric)
    return table[index]


def image_from_dataset(ds: pydicom.Dataset) -> np.ndarray:
    """Return a single-frame greyscale DICOM image as float32 (rows, columns) in [0, 1].

    Steps: the modality LUT (Rescale Slope/Intercept or Modality LUT Sequence); then the first
    VOI LUT, else the first Window Center/Width (honouring VOI LUT Function), else a robust
    window between the 0.5th and 99.5th percentiles; finally MONOCHROME1 is inverted so that
    1 is always white. Presentation LUT Shape is not applied on top of that: for MONOCHROME1 its
    INVERSE describes the same inversion. Raises :class:`ValueError` for missing pixel data,
    multi-frame or colour images, or pixel data that cannot be decoded.
    """
    photometric = _check_single_frame_greyscale(ds)
    try:
        stored = ds.pixel_array
    except Exception as exc:
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ValueError(
            f"cannot decode the pixel data (transfer syntax {tsuid}): {type(exc).__name__}"
        ) from exc
    if stored.ndim != 2:
        raise ValueError(f"expected a 2D pixel array, got shape {stored.shape}")

    if not _has_voi_lut(ds) and not _has_window(ds):
        by_levels = _robust_window_by_levels(stored, ds, photometric)
        if by_levels is not None:
            return by_levels

    values = apply_modality_lut(stored, ds)
    if _has_voi_lut(ds):
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)
        lo, hi = _lut_output_range(ds)
        windowed = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
        image = (windowed - lo) / (hi - lo) if hi > lo else np.zeros_like(windowed)
    elif _has_window(ds):
        lo, hi = _window_output_range(ds)
        windowed = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        image = ((windowed - lo) / (hi - lo)).astype(np.float32)
    else:
        image = robust_window(values)
    return _finish(image, photometric)


def to_model_input(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Fit a (H, W) image into a float32 (1, size, size) array without distorting it.

    The longer side is resized to ``size`` (bilinear with antialiasing, so downscaling averages
    like area interpolation) and the shorter side is centred with zero padding.
    """
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 2D image, got shape {image.shape}")
    if size < 1:
        raise ValueError("size must be positive")
    h, w = image.shape
    scale = size / max(h, w)
    new_h = max(1, min(size, round(h * scale)))
    new_w = max(1, min(size, round(w * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if (new_h, new_w) != (h, w):
        tensor = F.interpolate(
            tensor, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
    out = np.zeros((1, size, size), dtype=np.float32)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    out[0, top : top + new_h, left : left + new_w] = tensor[0, 0].numpy()
    return out


def preprocess_dataset(ds: pydicom.Dataset, size: int = 224) -> np.ndarray:
    """``to_model_input(image_from_dataset(ds), size)``: the whole path from DICOM to network."""
    return to_model_input(image_from_dataset(ds), size)


def preprocess_datasets(datasets: Sequence[pydicom.Dataset], size: int = 224) -> np.ndarray:
    """:func:`preprocess_dataset` of each dataset, stacked as (N, 1, size, size) float32.

    The images of a study go through in parallel threads, as many as torch's (numpy's
    histogram and lookup and torch's resize release the GIL). Raises what
    :func:`preprocess_dataset` raises for the first image that fails.
    """
    if not datasets:
        return np.zeros((0, 1, size, size), dtype=np.float32)
    workers = min(len(datasets), max(1, torch.get_num_threads()))
    if workers == 1:
        return np.stack([preprocess_dataset(ds, size) for ds in datasets])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(partial(preprocess_dataset, size=size), datasets)))
