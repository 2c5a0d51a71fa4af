"""Chest radiograph preprocessing, shared by training and inference.

``image_from_dataset`` turns a single-frame greyscale DICOM image into display-oriented values in
[0, 1] (0 = black, as a radiologist would see it); ``to_model_input`` fits that image into the
network's square input without distorting it. Training renders its generated images through
exactly these two functions, so the model sees at inference what it saw in training.

For integer pixels, ``image_from_dataset`` windows each stored level once and looks the image
up in that table (the same values as windowing pixel by pixel). :func:`preprocess_dataset`
gives bit for bit ``to_model_input(image_from_dataset(ds))`` without building the full-size
float image first: the table is applied to a band of rows at a time and each band resized
across its columns while it is still in cache, then the bands down the rows. That is what the
antialiased resize does anyway (columns, then rows, each output value from the same inputs
with the same weights), so the result is the same array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from models.levels import level_index, percentiles_of_levels, stored_levels

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


def _finish(image: np.ndarray, photometric: str) -> np.ndarray:
    image = np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return np.ascontiguousarray(image, dtype=np.float32)


@dataclass(frozen=True)
class _LevelLookup:
    """An image given as ``table[index]``: one float32 value per stored level.

    ``index`` is the (rows, columns) array of stored levels counted from the lowest one;
    every value lies in ``[0, len(table))``.
    """

    table: np.ndarray
    index: np.ndarray

    def image(self) -> np.ndarray:
        """The full-size float32 image."""
        return self.table[self.index]


def _level_counts(index: np.ndarray, levels: int) -> np.ndarray:
    """``np.bincount(index.ravel(), minlength=levels)`` for ``index`` values below ``levels``.

    Counted by torch: it takes 8- and 16-bit indices as they are, where numpy first widens
    every pixel to 64 bits (several times slower on a radiograph). The same integers.
    """
    flat = index.reshape(-1)
    if flat.dtype == np.uint8:
        values = torch.from_numpy(flat)
    elif flat.dtype == np.uint16 and levels <= 2**15:
        values = torch.from_numpy(flat.view(np.int16))  # all below 2**15: the same values
    else:
        values = torch.from_numpy(flat.astype(np.int32, copy=False))  # levels < 2**31
    return torch.bincount(values, minlength=levels).numpy()


def _voi_window(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality values through the first VOI LUT, else the first window, scaled to [0, 1].

    float32, not yet clipped; the dataset must have a VOI LUT or a window.
    """
    if _has_voi_lut(ds):
        if not np.issubdtype(values.dtype, np.integer):
            values = np.rint(values).astype(np.int64)
        lo, hi = _lut_output_range(ds)
        windowed = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
        return (windowed - lo) / (hi - lo) if hi > lo else np.zeros_like(windowed)
    lo, hi = _window_output_range(ds)
    windowed = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    return ((windowed - lo) / (hi - lo)).astype(np.float32)


def _level_lookup(stored: np.ndarray, ds: pydicom.Dataset, photometric: str) -> _LevelLookup | None:
    """:func:`image_from_dataset`'s image as a lookup table over the stored levels.

    Integer pixels take few distinct values: the modality LUT, the VOI LUT or window (or
    the robust window, its percentiles from a histogram, see
    :func:`percentiles_of_levels`) and the inversion are applied to each stored level
    once and the image is one table lookup. Every step is elementwise, with parameters
    from the dataset or the histogram, so the result equals the pixel-by-pixel one.
    ``None`` where the pixels are not integers or span too many levels.
    """
    span = stored_levels(stored)
    if span is None:
        return None
    base, levels = span
    index = level_index(stored, base, levels)
    values = apply_modality_lut(np.arange(base, base + levels).astype(stored.dtype), ds)
    if _has_voi_lut(ds) or _has_window(ds):
        table = _voi_window(values, ds)
    else:
        counts = _level_counts(index, levels)
        present = counts > 0
        lo, hi = percentiles_of_levels(values[present], counts[present], ROBUST_WINDOW_PERCENTILES)
        table = _scale(values, lo, hi)
    return _LevelLookup(_finish(table, photometric), index)


def image_from_dataset(ds: pydicom.Dataset) -> np.ndarray:
    """Return a single-frame greyscale DICOM image as float32 (rows, columns) in [0, 1].

    Steps: the modality LUT (Rescale Slope/Intercept or Modality LUT Sequence); then the first
    VOI LUT, else the first Window Center/Width (honouring VOI LUT Function), else a robust
    window between the 0.5th and 99.5th percentiles; finally MONOCHROME1 is inverted so that
    1 is always white. Presentation LUT Shape is not applied on top of that: for MONOCHROME1 its
    INVERSE describes the same inversion. Raises :class:`ValueError` for missing pixel data,
    multi-frame or colour images, or pixel data that cannot be decoded.
    """
    windowed = _windowed(ds)
    return windowed.image() if isinstance(windowed, _LevelLookup) else windowed


def _windowed(ds: pydicom.Dataset) -> np.ndarray | _LevelLookup:
    """:func:`image_from_dataset`'s image, as a lookup table where it is one."""
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

    lookup = _level_lookup(stored, ds, photometric)
    if lookup is not None:
        return lookup
    values = apply_modality_lut(stored, ds)
    if _has_voi_lut(ds) or _has_window(ds):
        image = _voi_window(values, ds)
    else:
        image = robust_window(values)
    return _finish(image, photometric)


def _fitted_size(shape: tuple[int, ...], size: int) -> tuple[int, int]:
    """(rows, columns) of a (H, W) image fitted into ``size`` x ``size``, aspect kept."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"expected a non-empty 2D image, got shape {shape}")
    if size < 1:
        raise ValueError("size must be positive")
    h, w = shape
    scale = size / max(h, w)
    return max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))


def _resize(tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear antialiased resize of a (1, 1, H, W) tensor (the one resize used here)."""
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)


def _padded(resized: np.ndarray, size: int) -> np.ndarray:
    """Centre a (h, w) image, h and w at most ``size``, in a zero (1, size, size) array."""
    new_h, new_w = resized.shape
    out = np.zeros((1, size, size), dtype=np.float32)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    out[0, top : top + new_h, left : left + new_w] = resized
    return out


def to_model_input(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Fit a (H, W) image into a float32 (1, size, size) array without distorting it.

    The longer side is resized to ``size`` (bilinear with antialiasing, so downscaling averages
    like area interpolation) and the shorter side is centred with zero padding.
    """
    new_h, new_w = _fitted_size(image.shape, size)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if (new_h, new_w) != image.shape:
        tensor = _resize(tensor, (new_h, new_w))
    return _padded(tensor[0, 0].numpy(), size)


#: Pixels per band of rows that :func:`_lookup_to_model_input` looks up at a time (1 MiB).
_BAND_PIXELS = 2**18


def _lookup_to_model_input(lookup: _LevelLookup, size: int) -> np.ndarray:
    """``to_model_input(lookup.image(), size)``, bit for bit, without the full-size image.

    The antialiased resize resamples the columns of every row, then the rows of that
    (H, new W) result; a dimension whose size does not change is left as it is. Here the
    table is applied to a band of rows at a time and the band's columns resampled at once
    (the same weights, the same inputs for every output value), then the rows of all bands.
    """
    index = lookup.index
    h, w = index.shape
    new_h, new_w = _fitted_size((h, w), size)
    if new_w == w:
        across = torch.from_numpy(lookup.image())[None, None]
    else:
        across = torch.empty((1, 1, h, new_w), dtype=torch.float32)
        rows = max(1, _BAND_PIXELS // w)
        band = np.empty((min(rows, h), w), dtype=np.float32)
        for top in range(0, h, rows):
            n = min(rows, h - top)
            # Every index lies in [0, len(table)): "wrap" is the identity, and lets numpy
            # write into ``band`` without the copy that the default "raise" makes.
            np.take(lookup.table, index[top : top + n], out=band[:n], mode="wrap")
            across[0, 0, top : top + n] = _resize(
                torch.from_numpy(band[:n])[None, None], (n, new_w)
            )[0, 0]
    resized = across if new_h == h else _resize(across, (new_h, new_w))
    return _padded(resized[0, 0].numpy(), size)


def preprocess_dataset(ds: pydicom.Dataset, size: int = 224) -> np.ndarray:
    """``to_model_input(image_from_dataset(ds), size)``: the whole path from DICOM to network.

    The same array, computed without the full-size float image where the window is a
    lookup table (see the module documentation).
    """
    windowed = _windowed(ds)
    if isinstance(windowed, _LevelLookup):
        return _lookup_to_model_input(windowed, size)
    return to_model_input(windowed, size)


@lru_cache(maxsize=4)
def _thread_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` preprocessing threads, started on first use.

    Starting threads (and their OpenMP teams) for every study cost about half a
    millisecond. ``pid`` is part of the key: a forked child has none of its parent's
    threads and gets a pool of its own.
    """
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-preprocess")


def preprocess_datasets(datasets: Sequence[pydicom.Dataset], size: int = 224) -> np.ndarray:
    """:func:`preprocess_dataset` of each dataset, stacked as (N, 1, size, size) float32.

    The images of a study go through in parallel threads, as many as torch's (torch's
    histogram and resize and numpy's lookup release the GIL), kept for the process.
    Raises what :func:`preprocess_dataset` raises for the first image that fails.
    """
    if not datasets:
        return np.zeros((0, 1, size, size), dtype=np.float32)
    workers = max(1, torch.get_num_threads())
    if workers == 1 or len(datasets) == 1:
        return np.stack([preprocess_dataset(ds, size) for ds in datasets])
    pool = _thread_pool(workers, os.getpid())
    return np.stack(list(pool.map(partial(preprocess_dataset, size=size), datasets)))
