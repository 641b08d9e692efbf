"""Per-image statistics of good pixels and per-bit flag counts (numba)."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["image_statistics", "image_statistics_stack"]

_ROBUST = 1.482602218505602  # MAD to standard deviation for a normal distribution


@numba.njit(nogil=True, cache=True)
def image_statistics(image, flags, bad, bits):
    """Statistics of one image.

    Parameters
    ----------
    image : (ny, nx) float array
    flags : (ny, nx) uint32 array
    bad : uint32
        Pixels with any of these bits (or not finite) are excluded from the statistics.
    bits : (nbits,) int64 array
        Bit numbers to count.

    Returns
    -------
    npix, mean, median, robust_std, minimum, maximum, counts
        ``robust_std`` is 1.4826 x the median absolute deviation; NaN when no pixel is
        good. ``counts[k]`` is the number of pixels carrying bit ``bits[k]``.
    """
    ny, nx = image.shape
    good = np.empty(ny * nx, np.float32)
    per_bit = np.zeros(32, np.int64)
    n = 0
    total = 0.0
    lo = np.inf
    hi = -np.inf
    for i in range(ny):
        for j in range(nx):
            f = np.uint32(flags[i, j])
            if f:
                for b in range(32):
                    if (f >> b) & 1:
                        per_bit[b] += 1
            v = image[i, j]
            if (f & bad) == 0 and np.isfinite(v):
                good[n] = v
                n += 1
                total += v
                lo = min(lo, v)
                hi = max(hi, v)
    counts = np.empty(bits.size, np.int64)
    for k in range(bits.size):
        counts[k] = per_bit[bits[k]]
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan, np.nan, counts
    vals = good[:n]
    med = _median(vals)
    dev = np.abs(vals - med)
    mad = _median(dev)
    return n, total / n, med, _ROBUST * mad, lo, hi, counts


@numba.njit(nogil=True, cache=True)
def _median(a):
    n = a.size
    k = n // 2
    part = np.partition(a, k)
    if n % 2:
        return np.float64(part[k])
    return 0.5 * (np.float64(part[k]) + np.float64(np.max(part[:k])))


def image_statistics_stack(image: np.ndarray, flags: np.ndarray, *, bad: int, bits: np.ndarray):
    """:func:`image_statistics` over the leading dimensions of ``(..., ny, nx)`` stacks."""
    lead = image.shape[:-2]
    out = [np.empty(lead, np.int64)] + [np.empty(lead, np.float64) for _ in range(5)]
    counts = np.empty((*lead, bits.size), np.int64)
    bad = np.uint32(bad)
    for idx in np.ndindex(*lead):
        res = image_statistics(image[idx], flags[idx], bad, bits)
        for k in range(6):
            out[k][idx] = res[k]
        counts[idx] = res[6]
    return (*out, counts)
