"""Exact medians of large float arrays in linear time (numba).

``np.partition`` (introselect) moves the data around and costs about 40 ms for a
2040 x 2040 image. A median is an order statistic, and float32 bit patterns sort like
integers once the sign is folded in, so two counting passes find it exactly: a histogram
of the upper 16 bits locates the bucket of the wanted rank, a histogram of the lower 16
bits of that bucket's members gives the value. Both passes stream the data once and leave
it in place (about 3 ms each on that image). Small arrays and other dtypes go through
Hoare's selection on a copy.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["median"]

_RADIX_MIN = 16384  # below this, partitioning is as fast and needs no histograms
_HALF = 65536


@numba.njit(inline="always")
def _key(b):
    """Order-preserving uint32 key of float32 bits: negatives flipped, positives above them."""
    if b >> np.uint32(31):
        return ~b
    return b | np.uint32(0x80000000)


@numba.njit(nogil=True, cache=True)
def _float_of_key(k):
    b = np.empty(1, np.uint32)
    b[0] = k ^ np.uint32(0x80000000) if k >> np.uint32(31) else ~k
    return np.float64(b.view(np.float32)[0])


@numba.njit(nogil=True, cache=True)
def _bucket(hist, rank):
    """Index of the bucket holding ``rank`` and the number of entries before it."""
    below = 0
    for h in range(hist.size):
        if rank < below + hist[h]:
            return h, below
        below += hist[h]
    return hist.size - 1, below  # not reached for rank < total


@numba.njit(nogil=True, cache=True)
def _upper_histogram(bits):
    # Four interleaved histograms: neighbouring pixels of an image mostly share a bucket,
    # and one histogram would serialise on those repeated increments.
    hist = np.zeros((4, _HALF), np.int64)
    n4 = bits.size - bits.size % 4
    for i in range(0, n4, 4):
        hist[0, _key(bits[i]) >> np.uint32(16)] += 1
        hist[1, _key(bits[i + 1]) >> np.uint32(16)] += 1
        hist[2, _key(bits[i + 2]) >> np.uint32(16)] += 1
        hist[3, _key(bits[i + 3]) >> np.uint32(16)] += 1
    for i in range(n4, bits.size):
        hist[0, _key(bits[i]) >> np.uint32(16)] += 1
    return hist.sum(axis=0)


@numba.njit(nogil=True, cache=True)
def _lower_histogram(bits, bucket):
    # Branch-free: the median's bucket can hold any fraction of the pixels, and a
    # data-dependent branch on membership mispredicts; non-members count in a spare bin.
    hist = np.zeros((2, _HALF + 1), np.int64)
    for i in range(bits.size):
        k = _key(bits[i])
        member = k >> np.uint32(16) == bucket
        hist[i & 1, np.int64(k & np.uint32(0xFFFF)) if member else np.int64(_HALF)] += 1
    return hist[0, :_HALF] + hist[1, :_HALF]


@numba.njit(nogil=True, cache=True)
def _radix_median32(a):
    bits = a.view(np.uint32)
    n = bits.size
    upper = _upper_histogram(bits)
    total = 0.0
    h_prev = -1
    lower = upper
    for rank in range((n - 1) // 2, n // 2 + 1):  # the middle one or two ranks
        h, below = _bucket(upper, rank)
        if h != h_prev:  # the two middle ranks nearly always share a bucket
            lower = _lower_histogram(bits, np.uint32(h))
            h_prev = h
        low = _bucket(lower, rank - below)[0]
        total += _float_of_key((np.uint32(h) << np.uint32(16)) | np.uint32(low))
    return total / (n // 2 - (n - 1) // 2 + 1)


@numba.njit(nogil=True, cache=True)
def _select_inplace(a, k):
    """The ``k``-th smallest of ``a`` (Hoare's selection; reorders ``a``)."""
    lo, hi = 0, a.size - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:  # median of three as the pivot
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@numba.njit(nogil=True, cache=True)
def _partition_median(a):
    # numba's np.partition is several times slower than this on small and large arrays
    work = a.copy()
    n = work.size
    v = np.float64(_select_inplace(work, n // 2))
    if n % 2 == 0:  # the lower middle is the largest of the lower half
        v = 0.5 * (v + np.float64(np.max(work[: n // 2])))
    return v


def median(a):
    """Median of a 1-D array without NaN (float64, the middle pair averaged in float64;
    NaN when empty).

    Exact: float32 arrays of at least 16384 elements by radix selection, others by
    selection on a copy; ``a`` is not changed. Callable from numba-compiled code and
    from Python.
    """
    if a.size == 0:
        return np.nan
    a = np.ascontiguousarray(a)
    if a.dtype == np.float32 and a.size >= _RADIX_MIN:
        return float(_radix_median32(a))
    return float(_partition_median(a))


@overload(median, jit_options={"nogil": True})
def _median_overload(a):
    if isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C":
        def radix(a):  # pragma: no cover - compiled
            if a.size == 0:
                return np.nan
            return _radix_median32(a) if a.size >= _RADIX_MIN else _partition_median(a)

        return radix

    def partition(a):  # pragma: no cover - compiled
        return np.nan if a.size == 0 else _partition_median(a)

    return partition
