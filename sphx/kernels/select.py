"""Exact medians of large float arrays in linear time (numba).

``np.partition`` (introselect) moves the data around and costs about 40 ms for a
2040 x 2040 image. A median is an order statistic, and float32 bit patterns sort like
integers once the sign is folded in, so two counting passes find it exactly: a histogram
of the upper 16 bits locates the bucket of the wanted rank, a histogram of the lower 16
bits of that bucket's members gives the value. Both passes stream the data once and leave
it in place (about 3 ms each on that image). Smaller arrays and other dtypes go through
histogram selection (:func:`_histogram_select`: the same idea on the value range, a few
branch-free passes) and, below a few hundred values, Hoare's selection on a copy.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["median"]

_RADIX_MIN = 16384  # below this, partitioning is as fast and needs no histograms
_HALF = 65536
_HISTOGRAM_MIN = 256  # above this, histogram selection beats partitioning
_BINS = 64
_SAMPLE = 32


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


@numba.njit(nogil=True, cache=True, inline="always")
def _bin(x, lo, scale):
    # clamped as a float first: int() of a value beyond the int64 range is undefined
    return int(min(max((x - lo) * scale, 0.0), _BINS - 1.0))


@numba.njit(nogil=True, cache=True)
def _histogram_select(a, k, work):
    """The ``k``-th smallest of ``a`` (left unchanged; ``work`` as large as ``a``).

    Counts the values in ``_BINS`` bins of a range (values beyond it in the end bins:
    binning is monotonic, so ranks hold), keeps the bin holding rank ``k`` (copied to
    ``work``) and repeats on it, then selects among the few left. The first range spans
    the middle three quarters of a sample of ``a``; later ones the extremes of what is
    left. Every pass is branch-free, where a partition's comparisons on noisy data
    mispredict about half the time: about 3x faster from ~500 values.
    """
    counts = np.empty(_BINS, np.int64)
    src = a
    n = a.size
    sampled = False
    while n > _BINS // 2:
        if not sampled and n > 8 * _SAMPLE:
            sampled = True
            sample = np.empty(_SAMPLE)
            step = n // _SAMPLE
            for q in range(_SAMPLE):
                sample[q] = src[q * step]
            sample.sort()
            lo, hi = sample[_SAMPLE // 8], sample[_SAMPLE - 1 - _SAMPLE // 8]
            if not hi > lo:
                continue  # a sample of equal values: the extremes instead
        else:
            lo = hi = src[0]
            for p in range(1, n):
                lo = min(lo, src[p])
                hi = max(hi, src[p])
            if not hi > lo:
                return lo
        scale = _BINS / (hi - lo)
        if not scale < np.inf:
            break
        counts[:] = 0
        for p in range(n):
            counts[_bin(src[p], lo, scale)] += 1
        b, below = _bucket(counts, k)
        if counts[b] == n:
            break
        k -= below
        m = 0
        for p in range(n):  # in place when src is work: m <= p
            x = src[p]
            work[m] = x
            m += _bin(x, lo, scale) == b
        src = work
        n = m
    if src is not work:
        work[:n] = src[:n]
    return _select_inplace(work[:n], k)


@numba.njit(nogil=True, cache=True)
def _partition_median(a):
    # numba's np.partition is several times slower than this on small and large arrays
    n = a.size
    if n > _HISTOGRAM_MIN:
        v = np.float64(_histogram_select(a, n // 2, np.empty_like(a)))
        if n % 2 == 0:  # the lower middle: the largest value below v, or v if fewer than n/2 are below it
            lower, below = -np.inf, 0
            for p in range(n):
                if a[p] < v:
                    below += 1
                    lower = max(lower, np.float64(a[p]))
            v = 0.5 * (v + (lower if below == n // 2 else v))
        return v
    work = a.copy()
    v = np.float64(_select_inplace(work, n // 2))
    if n % 2 == 0:  # the lower middle is the largest of the lower half
        v = 0.5 * (v + np.float64(np.max(work[: n // 2])))
    return v


def median(a):
    """Median of a 1-D array without NaN (float64, the middle pair averaged in float64;
    NaN when empty).

    Exact: float32 arrays of at least 16384 elements by radix selection, others by
    histogram selection or, below 256 values, selection on a copy; ``a`` is not changed. Callable from numba-compiled code and
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
