"""Per-image statistics of good pixels and per-bit flag counts (numba)."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["image_statistics", "image_statistics_stack"]

_ROBUST = 1.482602218505602  # MAD to standard deviation for a normal distribution
# De Bruijn lookup of the lowest set bit: visits only the bits a pixel carries (SOURCE
# alone is set on 40-70 % of real pixels, so a loop over all 32 bits doubles the cost).
_DEBRUIJN = np.uint64(0x077CB531)
_BIT_OF = np.array([0, 1, 28, 2, 29, 14, 24, 3, 30, 22, 20, 15, 25, 17, 4, 8,
                    31, 27, 13, 23, 21, 19, 16, 7, 26, 12, 18, 6, 11, 5, 10, 9], dtype=np.int64)


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
    good = np.empty(ny * nx, image.dtype)
    n = 0
    total = 0.0
    for i in range(ny):
        for j in range(nx):
            v = image[i, j]
            if (flags[i, j] & bad) == 0 and np.isfinite(v):
                good[n] = v
                n += 1
                total += v
    per_bit = _bit_counts(flags)
    counts = np.empty(bits.size, np.int64)
    for k in range(bits.size):
        counts[k] = per_bit[bits[k]]
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan, np.nan, counts
    vals = good[:n]
    med = _median(vals)
    # Deviations stay in the image dtype: float64 would double the second partition's cost.
    mad = _median(np.abs(vals - vals.dtype.type(med)))
    return n, total / n, med, _ROBUST * mad, np.float64(vals.min()), np.float64(vals.max()), counts


@numba.njit(nogil=True, cache=True)
def _bit_counts(flags):
    per_bit = np.zeros(32, np.int64)
    for f0 in flags.ravel():
        f = np.uint64(f0)
        while f:
            low = f & (~f + np.uint64(1))
            per_bit[_BIT_OF[((low * _DEBRUIJN) >> np.uint64(27)) & np.uint64(31)]] += 1
            f ^= low
    return per_bit


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
