"""Statistics of integer images from their histogram of stored levels (numpy only).

An integer image takes few distinct values; what is elementwise, or a rank statistic,
can be computed once per level and weighted by the level's count, with the same
result as on every pixel.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_LUT_LEVELS", "level_index", "percentiles_of_levels", "stored_levels"]

#: Largest stored-value range mapped through a lookup table instead of pixel by pixel.
MAX_LUT_LEVELS = 2**17


def stored_levels(stored: np.ndarray) -> tuple[int, int] | None:
    """``(base, levels)`` of an integer image: its lowest stored level and how many it spans.

    ``base`` is 0 for unsigned pixels (their index is the value itself) and the minimum for
    signed ones. ``None`` where the pixels are not integers, there are none, or they span
    more than :data:`MAX_LUT_LEVELS` levels (a table would cost more than it saves).
    """
    if stored.dtype.kind not in "iu" or stored.size == 0:
        return None
    base = 0 if stored.dtype.kind == "u" else int(stored.min())
    levels = int(stored.max()) - base + 1
    if levels > MAX_LUT_LEVELS:
        return None
    return base, levels


def level_index(stored: np.ndarray, base: int, levels: int) -> np.ndarray:
    """``stored - base`` as the narrowest unsigned integers that hold ``levels`` levels."""
    if base == 0 and stored.dtype.kind == "u":
        return stored
    if stored.dtype.itemsize <= 2 and levels <= 2 ** (8 * stored.dtype.itemsize):
        # Same-width unsigned arithmetic wraps modulo 2**bits; the difference lies in
        # [0, levels), so the wrapped difference is the exact one.
        unsigned = np.dtype(f"u{stored.dtype.itemsize}")
        return np.subtract(stored.view(unsigned), np.array(base).astype(unsigned), dtype=unsigned)
    return (stored.astype(np.int64) - base).astype(np.int32)


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
