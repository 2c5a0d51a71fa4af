"""Measurements of a segmented organ: volume (mL) and mean attenuation (HU).

Both work on a mask in the geometry it was drawn in: ``volume_ml`` multiplies the number of
voxels by the voxel volume, so the spacing must be that of the mask's grid (for a
:class:`~models.segmentation.volume.CtVolume`, its ``spacing``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MM3_PER_ML = 1000.0


def _check_mask(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"mask must be a 3-D array (z, y, x), got shape {arr.shape}")
    return arr


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of the non-zero voxels of ``mask`` in millilitres.

    ``spacing`` is the voxel size (z, y, x) in mm. An empty mask measures 0.0.
    """
    arr = _check_mask(mask)
    if len(spacing) != 3:
        raise ValueError(f"spacing must hold three values (z, y, x) in mm, got {spacing!r}")
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    if not np.isfinite(voxel_mm3) or voxel_mm3 <= 0:
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return int(np.count_nonzero(arr)) * voxel_mm3 / _MM3_PER_ML


def mean_hu(hu: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``hu`` over the non-zero voxels of ``mask`` (same shape).

    Raises :class:`ValueError` when the shapes differ or the mask is empty (a mean of nothing
    has no value to report).
    """
    arr = _check_mask(mask)
    values = np.asarray(hu)
    if values.shape != arr.shape:
        raise ValueError(f"hu shape {values.shape} differs from mask shape {arr.shape}")
    # Slice by slice: no mask-sized copy and no copy of the selected values (a liver, or
    # a whole volume, can hold tens of millions of voxels); float64 accumulation.
    total = 0.0
    count = 0
    for plane, plane_mask in zip(values, arr, strict=True):
        selected = plane_mask if plane_mask.dtype == np.bool_ else plane_mask != 0
        n = int(np.count_nonzero(selected))
        if n == 0:
            continue
        count += n
        chosen = plane if n == selected.size else plane[selected]
        total += float(np.sum(chosen, dtype=np.float64))
    if count == 0:
        raise ValueError("mask is empty: there is no mean HU to measure")
    return total / count
