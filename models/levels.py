"""Statistics of integer images from their histogram of stored levels (numpy only).

An integer image takes few distinct values; what is elementwise, or a rank statistic,
can be computed once per level and weighted by the level's count, with the same
result as on every pixel.
"""

from __future__ import annotations

import numpy as np

__all__ = ["percentiles_of_levels"]


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
