"""Per-image statistics of good pixels and per-bit flag counts (numba)."""

from __future__ import annotations

import numba
import numpy as np

from .select import median

__all__ = ["count_bits_without", "finite_median_std", "image_statistics", "image_statistics_stack"]

_ROBUST = 1.482602218505602  # MAD to standard deviation for a normal distribution
# De Bruijn lookup of the lowest set bit: visits only the bits a pixel carries (SOURCE
# alone is set on 40-70 % of real pixels, so a loop over all 32 bits doubles the cost).
_DEBRUIJN = np.uint64(0x077CB531)
_BIT_OF = np.array([0, 1, 28, 2, 29, 14, 24, 3, 30, 22, 20, 15, 25, 17, 4, 8,
                    31, 27, 13, 23, 21, 19, 16, 7, 26, 12, 18, 6, 11, 5, 10, 9], dtype=np.int64)


@numba.njit(nogil=True, cache=True)
def image_statistics(image, flags, bad, bits, without):
    """Statistics of one image.

    Parameters
    ----------
    image : (ny, nx) float array
    flags : (ny, nx) uint32 array
    bad : uint32
        Pixels with any of these bits (or not finite) are excluded from the statistics.
    bits : (nbits,) int64 array
        Bit numbers to count.
    without : uint32
        For ``counts_without``: only pixels carrying none of these bits count.

    Returns
    -------
    npix, mean, median, robust_std, minimum, maximum, counts, counts_without
        ``robust_std`` is 1.4826 x the median absolute deviation; NaN when no pixel is
        good. ``counts[k]`` is the number of pixels carrying bit ``bits[k]``,
        ``counts_without[k]`` the number of those that carry none of ``without``.
    """
    good = np.empty(image.size, image.dtype)
    per_bit = np.zeros(32, np.int64)
    per_bit_without = np.zeros(32, np.int64)
    n = 0
    total = 0.0
    lo, hi = np.inf, -np.inf
    # one pass over the pixels: the good values, their sum and range, and the flag bits
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            v, f = image[i, j], flags[i, j]
            if (f & bad) == 0 and np.isfinite(v):
                good[n] = v
                n += 1
                total += v
                lo, hi = min(lo, v), max(hi, v)
            if f:
                _count_bits(per_bit, f)
                if (f & without) == 0:
                    _count_bits(per_bit_without, f)
    counts = np.empty(bits.size, np.int64)
    counts_without = np.empty(bits.size, np.int64)
    for k in range(bits.size):
        counts[k] = per_bit[bits[k]]
        counts_without[k] = per_bit_without[bits[k]]
    if n == 0:
        return 0, np.nan, np.nan, np.nan, np.nan, np.nan, counts, counts_without
    vals = good[:n]
    med = median(vals)
    # deviations stay in the image dtype (radix selection on float32), overwriting the values
    centre = vals.dtype.type(med)
    for k in range(n):
        vals[k] = abs(vals[k] - centre)
    mad = median(vals)
    return n, total / n, med, _ROBUST * mad, np.float64(lo), np.float64(hi), counts, counts_without


@numba.njit(inline="always")
def _count_bits(per_bit, f0):
    f = np.uint64(f0)
    while f:
        low = f & (~f + np.uint64(1))
        per_bit[_BIT_OF[((low * _DEBRUIJN) >> np.uint64(27)) & np.uint64(31)]] += 1
        f ^= low


def image_statistics_stack(image: np.ndarray, flags: np.ndarray, *, bad: int, bits: np.ndarray, without: int = 0):
    """:func:`image_statistics` over the leading dimensions of ``(..., ny, nx)`` stacks."""
    lead = image.shape[:-2]
    out = [np.empty(lead, np.int64)] + [np.empty(lead, np.float64) for _ in range(5)]
    out += [np.empty((*lead, bits.size), np.int64) for _ in range(2)]
    for idx in np.ndindex(*lead):
        res = image_statistics(image[idx], flags[idx], np.uint32(bad), bits, np.uint32(without))
        for o, r in zip(out, res, strict=True):
            o[idx] = r
    return tuple(out)


@numba.njit(nogil=True, cache=True)
def count_bits_without(flags, bits, without):
    """Number of pixels carrying bit ``bits[k]`` and none of the ``without`` bits.

    Parameters
    ----------
    flags : uint32 array
    bits : (nbits,) int64 array
        Bit numbers.
    without : uint32
    """
    per_bit = np.zeros(32, np.int64)
    want = np.uint32(0)
    for b in bits:
        want |= np.uint32(1) << np.uint32(b)
    for f in flags.ravel():
        g = f & want
        if g and (f & without) == 0:
            _count_bits(per_bit, g)
    counts = np.empty(bits.size, np.int64)
    for k in range(bits.size):
        counts[k] = per_bit[bits[k]]
    return counts


@numba.njit(nogil=True, cache=True)
def finite_median_std(values):
    """Median and standard deviation (ddof 0) of the finite values (NaN when none)."""
    flat = values.ravel()
    good = np.empty(flat.size, flat.dtype)
    n = 0
    total = 0.0
    for v in flat:
        if np.isfinite(v):
            good[n] = v
            n += 1
            total += v
    if n == 0:
        return np.nan, np.nan
    mean = total / n
    ss = 0.0
    for k in range(n):
        ss += (good[k] - mean) ** 2
    return median(good[:n]), np.sqrt(ss / n)
