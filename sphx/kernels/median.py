"""NaN-aware 2-D median filter (numba), the background for outlier detection.

Level 2b "Detect Outlier Pixels" sigma-clips an image against a median-filtered copy of
itself. :func:`median_filter` gives the median of the ``size x size`` window centred on
each pixel, with the edges of :func:`scipy.ndimage.median_filter` (``mode="reflect"``:
the image is mirrored about its edge, ``d c b a | a b c d | d c b a``), so that on an
image without NaN both give the same numbers, bit for bit. NaN pixels are left out of
the windows they fall in, which scipy does not do.

How it is fast
--------------
Each output row first sorts every column of ``size`` pixels once (a sorting network
applied to whole rows, so LLVM vectorises it); the ``size`` horizontally adjacent
windows that contain a column share that sort. Then the median of each window is a
fixed, branch-free chain of minima and maxima (a selection network), again vectorised
along the row. Sorting the rows of a column-sorted window keeps its columns sorted, and
then the value in row ``i``, column ``j`` (0-based) has at least ``(i + 1)(j + 1)``
values of the window at or below it and ``(size - i)(size - j)`` at or above it, which
rules out all but a few values as the median:

* 3 x 3: the median is the median of the anti-diagonal (the largest of the smallest
  row, the middle of the middle row, the smallest of the largest row).
* 5 x 5: 13 values, on anti-diagonals 3, 4 and 5, are left, and the median is the
  median of (the largest of anti-diagonal 3, the median of anti-diagonal 4, the
  smallest of anti-diagonal 5).
* other sizes: the values left are sorted by a network built for the size (Batcher's
  odd-even merge sort, pruned to what the middle output needs), run wire by wire on
  blocks of windows.

Minima and maxima commute with thresholds, so a selection network that is right on
every window of zeros and ones is right on every window (the 0-1 principle); the tests
check all 0-1 windows with sorted rows and columns for each path.

NaN
---
NaN becomes +inf in the shared column sort (so the network never sees it) and the
windows holding NaN are redone afterwards. A window with ``m`` NaN and ``n = size**2 -
m`` finite values goes through the network twice, once with its NaN replaced by -inf,
+inf, -inf, ... and once by +inf, -inf, +inf, ...: the stand-ins pad the finite values
evenly on both sides, so the median of all ``size**2`` values is the median of the
finite ones; when ``n`` is even the two passes give the lower and the upper middle
value, and the result is their mean. These windows are queued and run through the
network in vectorised batches too.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

__all__ = ["median_filter"]


def median_filter(image: np.ndarray, *, size: int = 5, out: np.ndarray | None = None) -> np.ndarray:
    """Median of the ``size x size`` window around each pixel, ignoring NaN.

    Parameters
    ----------
    image : (ny, nx) float32 or float64 array
        The image, in any unit; the median has the same unit.
    size : int, optional
        Window width and height in pixels; odd and at least 1. Sizes 3 and 5 have
        dedicated fast paths; other sizes use a slower general one.
    out : (ny, nx) array of the result dtype, optional
        Where to write the result. It may be ``image`` itself.

    Returns
    -------
    (ny, nx) array
        The median filtered image, float32 for a float32 image and float64 for a
        float64 one (``out`` when given). Past the edges the window sees the image
        mirrored about its edge (``scipy.ndimage`` ``mode="reflect"``), so an image
        without NaN gives exactly ``scipy.ndimage.median_filter(image, size=size)``.
        NaN pixels are left out of a window: the result is the median of its finite
        values, the mean of the two middle ones when their number is even, and NaN when
        the window has none. Infinities count as values.

    Raises
    ------
    TypeError
        If ``image`` is not a floating-point array of 32 or 64 bits.
    ValueError
        If ``image`` is not 2-D, ``size`` is not a positive odd integer, or ``out`` does
        not have the shape and dtype of the result.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"median_filter needs a 2-D image, got {image.ndim} dimension(s) of shape {image.shape}")
    if image.dtype.kind != "f" or image.dtype.itemsize not in (4, 8):
        raise TypeError(f"median_filter needs a float32 or float64 image, got dtype {image.dtype}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1 or size % 2 == 0:
        raise ValueError(f"median_filter needs an odd window size >= 1, got size={size!r}")
    size = int(size)
    dtype = np.dtype(np.float32 if image.dtype.itemsize == 4 else np.float64)
    if out is None:
        out = np.empty(image.shape, dtype)
    elif not isinstance(out, np.ndarray) or out.shape != image.shape or out.dtype != dtype:
        got = f"shape {out.shape} dtype {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"median_filter out must be an array of shape {image.shape} and dtype {dtype}, got {got}")
    elif not out.flags.writeable:
        raise ValueError("median_filter out is read-only")
    if image.size == 0:
        return out
    src = np.ascontiguousarray(image, dtype=dtype)
    # Each output row reads ``size`` input rows, so writing into the image itself (or an
    # overlapping view) would feed already-filtered pixels to later rows: filter a copy.
    if np.may_share_memory(src, out):
        src = src.copy()
    # numba compiles read-only and writeable arrays apart: always hand it a read-only view
    src = src.view()
    src.flags.writeable = False
    dst = out if out.flags.c_contiguous else np.empty(image.shape, dtype)
    n_chunks = min(src.shape[0], 4 * numba.get_num_threads())  # row chunks, a few per thread
    posinf = dtype.type(np.inf)
    if size == 1:
        dst[...] = src
    elif size == 3:
        _median3(src, dst, n_chunks, posinf)
    elif size == 5:
        _median5(src, dst, n_chunks, posinf)
    else:
        _median_network(src, dst, n_chunks, posinf, size, *_window_network(size))
    if dst is not out:
        out[...] = dst
    return out


# --- the selection networks ------------------------------------------------------------


def _sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort on ``n`` wires as compare-exchange pairs ``(a, b)``,
    ``a < b``, that leave the smaller value on ``a`` (any ``n``, not only powers of 2)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


_MIN, _MAX = 1, 2


def _prune(pairs: list[tuple[int, int]], out_wire: int) -> np.ndarray:
    """The compare-exchanges that ``out_wire`` depends on (backwards liveness), as rows
    ``(a, b, what)``: the minimum goes to wire ``a`` if ``what & 1`` and the maximum to
    wire ``b`` if ``what & 2``; an output never read again is not computed."""
    live = {out_wire}
    ops = []
    for a, b in reversed(pairs):
        what = (_MIN if a in live else 0) | (_MAX if b in live else 0)
        if what:
            ops.append((a, b, what))
            live |= {a, b}
    return np.array(ops[::-1], np.int64).reshape(-1, 3)


@functools.cache
def _window_network(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Selection networks for the median of a ``size x size`` window.

    Wire ``i * size + j`` holds window row ``i``, column ``j``. Once the columns and then
    the rows are sorted, only the wires with ``(i + 1)(j + 1) <= k + 1`` and ``(size -
    i)(size - j) <= k + 1`` (``k = size**2 // 2``, the middle rank) can hold the median;
    the others split evenly below and above it, so the median is the middle value of
    these candidates, which a sorting network on them finds.

    Returns
    -------
    column_ops : (n, 2) int64
        The sorting network of one column of ``size`` values.
    inputs : (m, 3) int64
        ``(wire, i, j)``: the wires the window network reads, each starting as the
        ``i``-th smallest value of window column ``j``.
    ops : (q, 3) int64
        The window network on column-sorted wires, pruned as in :func:`_prune`.
    full_ops : (p, 3) int64
        The same with the column sorts in front: the median of a window of raw values.
    out_wire : int
        The wire that ends holding the median.
    """
    k = size * size // 2
    column = _sorting_network(size)
    rows = [(i * size + a, i * size + b) for i in range(size) for a, b in column]
    cand = [i * size + j for i in range(size) for j in range(size)
            if (i + 1) * (j + 1) <= k + 1 and (size - i) * (size - j) <= k + 1]
    select = [(cand[a], cand[b]) for a, b in _sorting_network(len(cand))]
    out_wire = cand[len(cand) // 2]
    ops = _prune(rows + select, out_wire)
    live = sorted(set(ops[:, :2].ravel().tolist()) | {out_wire})
    inputs = np.array([(w, w // size, w % size) for w in live], np.int64).reshape(-1, 3)
    columns = [(a * size + j, b * size + j) for j in range(size) for a, b in column]
    full_ops = _prune(columns + rows + select, out_wire)
    return np.array(column, np.int64).reshape(-1, 2), inputs, ops, full_ops, out_wire


_BLOCK = 256  # windows per block through a general network: its wires stay in L2 cache
# Windows holding NaN wait in a queue of this many (3 x 3 and 5 x 5; a compile-time
# constant, so that the batched networks vectorise), or of this many bytes (other sizes).
_QUEUE = 64
_QUEUE_BYTES = 32768


# --- scalar pieces ---------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _reflect(i, n):
    """Index ``i`` into a length-``n`` axis mirrored about its edges (half-sample)."""
    if 0 <= i < n:
        return i
    period = 2 * n
    i = i % period  # Python semantics: non-negative
    if i >= n:
        i = period - 1 - i
    return i


# The helpers below are inlined by numba itself: LLVM may leave calls to them in the
# row loops, which then do not vectorise. The compare-exchanges are written out rather
# than calling a shared one, as every nested inlining adds to the compile time.


@numba.njit(inline="always")
def _min(a, b):
    # an ``a < b`` select is exactly an x86 (v)minps; NaN never gets here
    return a if a < b else b  # noqa: FURB136


@numba.njit(inline="always")
def _max(a, b):
    return b if a < b else a  # noqa: FURB136


@numba.njit(inline="always")
def _med3(a, b, c):
    a, b = (a, b) if a < b else (b, a)
    b, c = (b, c) if b < c else (c, b)
    a, b = (a, b) if a < b else (b, a)
    return b


@numba.njit(inline="always")
def _sort3(a, b, c):
    a, b = (a, b) if a < b else (b, a)
    b, c = (b, c) if b < c else (c, b)
    a, b = (a, b) if a < b else (b, a)
    return a, b, c


@numba.njit(inline="always")
def _sort5(a, b, c, d, e):
    # a 9-comparator sorting network: callers use a few of its outputs and LLVM drops
    # the comparisons only the others needed
    a, b = (a, b) if a < b else (b, a)
    d, e = (d, e) if d < e else (e, d)
    c, e = (c, e) if c < e else (e, c)
    c, d = (c, d) if c < d else (d, c)
    a, d = (a, d) if a < d else (d, a)
    a, c = (a, c) if a < c else (c, a)
    b, e = (b, e) if b < e else (e, b)
    b, d = (b, d) if b < d else (d, b)
    b, c = (b, c) if b < c else (c, b)
    return a, b, c, d, e


@numba.njit(inline="always")  # so that LLVM vectorises the loops calling it
def _median3_sorted(c, x, step):
    """Median of the 3 x 3 window whose sorted columns are ``c[:, x + j * step]``."""
    high_of_low = _max(_max(c[0, x], c[0, x + step]), c[0, x + 2 * step])
    mid_of_mid = _med3(c[1, x], c[1, x + step], c[1, x + 2 * step])
    low_of_high = _min(_min(c[2, x], c[2, x + step]), c[2, x + 2 * step])
    return _med3(high_of_low, mid_of_mid, low_of_high)


@numba.njit(inline="always")  # so that LLVM vectorises the loops calling it
def _median5_sorted(c, x, step):
    """Median of the 5 x 5 window whose sorted columns are ``c[:, x + j * step]``."""
    x0, x1, x2, x3, x4 = x, x + step, x + 2 * step, x + 3 * step, x + 4 * step
    # sort the rows: m{i}{j} is the j-th smallest of row i; only those on anti-diagonals
    # 3-5 can be the median
    _, _, _, m03, m04 = _sort5(c[0, x0], c[0, x1], c[0, x2], c[0, x3], c[0, x4])
    _, _, m12, m13, m14 = _sort5(c[1, x0], c[1, x1], c[1, x2], c[1, x3], c[1, x4])
    _, m21, m22, m23, _ = _sort5(c[2, x0], c[2, x1], c[2, x2], c[2, x3], c[2, x4])
    m30, m31, m32, _, _ = _sort5(c[3, x0], c[3, x1], c[3, x2], c[3, x3], c[3, x4])
    m40, m41, _, _, _ = _sort5(c[4, x0], c[4, x1], c[4, x2], c[4, x3], c[4, x4])
    low = _max(_max(m03, m12), _max(m21, m30))
    _, _, mid, _, _ = _sort5(m04, m13, m22, m31, m40)
    high = _min(_min(m14, m23), _min(m32, m41))
    return _med3(low, mid, high)


@numba.njit(nogil=True, cache=True)
def _clean(v, posinf):
    return v if v == v else posinf  # noqa: PLR0124 (NaN test; np.isnan stops LLVM vectorising)


@numba.njit(nogil=True, cache=True)
def _nan(v):
    return np.int32(v != v)  # noqa: PLR0124


@numba.njit(nogil=True, cache=True)
def _run_network(work, n, ops):
    """Apply a pruned network (:func:`_prune`) to the windows ``work[:, :n]``, one wire
    a row, so that every compare-exchange is a vector loop over the windows."""
    for t in range(ops.shape[0]):
        lo = work[ops[t, 0]]
        hi = work[ops[t, 1]]
        what = ops[t, 2]
        if what == _MIN | _MAX:
            for x in range(n):
                a = lo[x]
                b = hi[x]
                lo[x] = _min(a, b)
                hi[x] = _max(a, b)
        elif what == _MIN:
            for x in range(n):
                lo[x] = _min(lo[x], hi[x])
        else:
            for x in range(n):
                hi[x] = _max(lo[x], hi[x])


# --- windows holding NaN ---------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _nan_queue(size, like):
    """Scratch for :func:`_queue_nan_windows`: the two copies of the queued windows (wire
    ``i * size + j`` x window, the dtype of ``like``), room for their two medians, and
    their row, column and NaN count. Its length is ``_QUEUE`` for sizes 3 and 5."""
    n = _QUEUE if size <= 5 else max(16, _QUEUE_BYTES // (2 * size * size * like.itemsize))
    return (np.empty((size * size, n), like.dtype), np.empty((size * size, n), like.dtype),
            np.empty(n, like.dtype), np.empty(n, like.dtype),
            np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64))


@numba.njit(nogil=True, cache=True)
def _queue_nan_windows(image, y, xr, nan_cols, size, queue, n_queued, start):
    """Queue the windows ``x >= start`` of output row ``y`` that hold NaN, until the
    queue is full or the row done; returns the queue length and the window to start
    from next time, -1 when the row is done.

    Each window is queued twice, its NaN replaced by -inf, +inf, ... and by +inf, -inf,
    ... (see the module docstring). ``xr`` maps padded columns to image columns and
    ``nan_cols`` counts the NaN of each padded column of the window rows.
    """
    work_a, work_b, _, _, where_y, where_x, n_nan = queue
    capacity = where_y.size
    ny, nx = image.shape
    # flat arrays and unsigned offsets: numba then skips its negative-index wraparound,
    # which otherwise costs more than the copy itself
    flat = image.reshape(-1)
    flat_a = work_a.reshape(-1)
    flat_b = work_b.reshape(-1)
    r = size // 2
    base = np.empty(size, np.uint64)
    for i in range(size):
        base[i] = _reflect(y - r + i, ny) * nx
    posinf = image.dtype.type(np.inf)
    width = nan_cols.size
    next_x = start  # the windows left of this one are queued already
    p = start  # window x holds padded columns x .. x + size - 1
    while p < width:
        if p % 64 == 0:
            # a row holds a handful of NaN: skip NaN-free stretches with a vector sum
            stop = min(p + 64, width)
            total = 0
            for q in range(p, stop):
                total += nan_cols[q]
            if total == 0:
                p = stop
                continue
        if nan_cols[p]:
            for x in range(max(next_x, p - size + 1), min(nx, p + 1)):
                t = n_queued
                count = 0
                stand_in = -posinf  # for the next NaN in work_a; work_b gets -stand_in
                for j in range(size):
                    col = np.uint64(xr[x + j])
                    count += nan_cols[x + j]
                    for i in range(size):
                        v = flat[base[i] + col]
                        o = np.uint64((i * size + j) * capacity + t)
                        nan = v != v  # noqa: PLR0124
                        flat_a[o] = stand_in if nan else v
                        flat_b[o] = -stand_in if nan else v
                        stand_in = -stand_in if nan else stand_in
                where_y[t] = y
                where_x[t] = x
                n_nan[t] = count
                n_queued += 1
                if n_queued == capacity:
                    return n_queued, x + 1
            next_x = max(next_x, min(nx, p + 1))
        p += 1
    return n_queued, -1


@numba.njit(nogil=True, cache=True)
def _write_nan_windows(out, size, queue, n):
    """Write the median of the ``n`` queued windows, from the medians of their two
    copies (the two middle values when their number of finite values is even)."""
    _, _, lower, upper, where_y, where_x, n_nan = queue
    for t in range(n):
        if n_nan[t] == size * size:
            value = np.nan
        elif lower[t] == upper[t]:
            value = lower[t]
        else:
            value = 0.5 * (np.float64(lower[t]) + np.float64(upper[t]))
        out[where_y[t], where_x[t]] = value


@numba.njit(nogil=True, cache=True)
def _flush5(out, queue, n):
    """Take the median of the ``n`` queued 5 x 5 windows."""
    work_a, work_b, lower, upper, _, _, _ = queue
    _queued_median5(work_a, n, lower)
    _queued_median5(work_b, n, upper)
    _write_nan_windows(out, 5, queue, n)


@numba.njit(nogil=True, cache=True)
def _queued_median5(work, n, result):
    """Median of the first ``n`` queued 5 x 5 windows (wire x window, ``_QUEUE`` windows)."""
    # viewed as (5, 5 * _QUEUE), window t's column j sits at j * _QUEUE + t
    c = work.reshape(5, 5 * _QUEUE)
    for j in range(5):
        for t in range(j * _QUEUE, j * _QUEUE + n):
            c[0, t], c[1, t], c[2, t], c[3, t], c[4, t] = _sort5(c[0, t], c[1, t], c[2, t], c[3, t], c[4, t])
    for t in range(n):
        result[t] = _median5_sorted(c, t, _QUEUE)


@numba.njit(nogil=True, cache=True)
def _flush3(out, queue, n):
    """Take the median of the ``n`` queued 3 x 3 windows."""
    work_a, work_b, lower, upper, _, _, _ = queue
    _queued_median3(work_a, n, lower)
    _queued_median3(work_b, n, upper)
    _write_nan_windows(out, 3, queue, n)


@numba.njit(nogil=True, cache=True)
def _queued_median3(work, n, result):
    """Median of the first ``n`` queued 3 x 3 windows (wire x window, ``_QUEUE`` windows)."""
    c = work.reshape(3, 3 * _QUEUE)
    for j in range(3):
        for t in range(j * _QUEUE, j * _QUEUE + n):
            c[0, t], c[1, t], c[2, t] = _sort3(c[0, t], c[1, t], c[2, t])
    for t in range(n):
        result[t] = _median3_sorted(c, t, _QUEUE)


@numba.njit(nogil=True, cache=True)
def _flush_network(out, size, full_ops, out_wire, queue, n):
    """Take the median of the ``n`` queued ``size x size`` windows."""
    work_a, work_b, lower, upper, _, _, _ = queue
    _run_network(work_a, n, full_ops)
    _run_network(work_b, n, full_ops)
    lower[:n] = work_a[out_wire, :n]
    upper[:n] = work_b[out_wire, :n]
    _write_nan_windows(out, size, queue, n)


# --- 5 x 5 -----------------------------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _median5(image, out, n_chunks, posinf):
    ny = image.shape[0]
    for chunk in numba.prange(n_chunks):
        c = np.int64(chunk)  # prange indices may be unsigned; keep the row arithmetic integer
        _rows5(image, out, c * ny // n_chunks, (c + 1) * ny // n_chunks, posinf)


@numba.njit(nogil=True, cache=True)
def _rows5(image, out, y_start, y_stop, posinf):
    ny, nx = image.shape
    xr = np.empty(nx + 4, np.int64)
    for p in range(nx + 4):
        xr[p] = _reflect(p - 2, nx)
    # cols[i, p]: i-th smallest of padded column p (image column xr[p]) of the 5 rows
    cols = np.empty((5, nx + 4), image.dtype)
    nan_cols = np.empty(nx + 4, np.int32)
    queue = _nan_queue(5, image)
    n_queued = np.int64(0)  # not a literal: one compiled flush, not two
    for y in range(y_start, y_stop):
        r0 = image[_reflect(y - 2, ny)]
        r1 = image[_reflect(y - 1, ny)]
        r2 = image[y]
        r3 = image[_reflect(y + 1, ny)]
        r4 = image[_reflect(y + 2, ny)]
        any_nan = 0
        for x in range(nx):
            v0, v1, v2, v3, v4 = r0[x], r1[x], r2[x], r3[x], r4[x]
            m = _nan(v0) + _nan(v1) + _nan(v2) + _nan(v3) + _nan(v4)
            nan_cols[x + 2] = m
            any_nan += m
            s0, s1, s2, s3, s4 = _sort5(_clean(v0, posinf), _clean(v1, posinf), _clean(v2, posinf),
                                        _clean(v3, posinf), _clean(v4, posinf))
            cols[0, x + 2] = s0
            cols[1, x + 2] = s1
            cols[2, x + 2] = s2
            cols[3, x + 2] = s3
            cols[4, x + 2] = s4
        for p in (0, 1, nx + 2, nx + 3):
            for i in range(5):
                cols[i, p] = cols[i, xr[p] + 2]
            nan_cols[p] = nan_cols[xr[p] + 2]
        out_row = out[y]
        for x in range(nx):
            out_row[x] = _median5_sorted(cols, x, 1)
        start = 0 if any_nan else -1
        while start >= 0:
            n_queued, start = _queue_nan_windows(image, y, xr, nan_cols, 5, queue, n_queued, start)
            if n_queued == _QUEUE:
                _flush5(out, queue, n_queued)
                n_queued = np.int64(0)
    _flush5(out, queue, n_queued)


# --- 3 x 3 -----------------------------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _median3(image, out, n_chunks, posinf):
    ny = image.shape[0]
    for chunk in numba.prange(n_chunks):
        c = np.int64(chunk)
        _rows3(image, out, c * ny // n_chunks, (c + 1) * ny // n_chunks, posinf)


@numba.njit(nogil=True, cache=True)
def _rows3(image, out, y_start, y_stop, posinf):
    ny, nx = image.shape
    xr = np.empty(nx + 2, np.int64)
    for p in range(nx + 2):
        xr[p] = _reflect(p - 1, nx)
    cols = np.empty((3, nx + 2), image.dtype)
    nan_cols = np.empty(nx + 2, np.int32)
    queue = _nan_queue(3, image)
    n_queued = np.int64(0)  # not a literal: one compiled flush, not two
    for y in range(y_start, y_stop):
        r0 = image[_reflect(y - 1, ny)]
        r1 = image[y]
        r2 = image[_reflect(y + 1, ny)]
        any_nan = 0
        for x in range(nx):
            v0, v1, v2 = r0[x], r1[x], r2[x]
            m = _nan(v0) + _nan(v1) + _nan(v2)
            nan_cols[x + 1] = m
            any_nan += m
            s0, s1, s2 = _sort3(_clean(v0, posinf), _clean(v1, posinf), _clean(v2, posinf))
            cols[0, x + 1] = s0
            cols[1, x + 1] = s1
            cols[2, x + 1] = s2
        for p in (0, nx + 1):
            for i in range(3):
                cols[i, p] = cols[i, xr[p] + 1]
            nan_cols[p] = nan_cols[xr[p] + 1]
        out_row = out[y]
        for x in range(nx):
            out_row[x] = _median3_sorted(cols, x, 1)
        start = 0 if any_nan else -1
        while start >= 0:
            n_queued, start = _queue_nan_windows(image, y, xr, nan_cols, 3, queue, n_queued, start)
            if n_queued == _QUEUE:
                _flush3(out, queue, n_queued)
                n_queued = np.int64(0)
    _flush3(out, queue, n_queued)


# --- any odd size ----------------------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _median_network(image, out, n_chunks, posinf, size, column_ops, inputs, ops, full_ops, out_wire):
    ny = image.shape[0]
    for chunk in numba.prange(n_chunks):
        c = np.int64(chunk)
        _rows_network(image, out, c * ny // n_chunks, (c + 1) * ny // n_chunks, posinf, size, column_ops, inputs,
                      ops, full_ops, out_wire)


@numba.njit(nogil=True, cache=True)
def _rows_network(image, out, y_start, y_stop, posinf, size, column_ops, inputs, ops, full_ops, out_wire):
    ny, nx = image.shape
    r = size // 2
    width = nx + 2 * r
    xr = np.empty(width, np.int64)
    for p in range(width):
        xr[p] = _reflect(p - r, nx)
    cols = np.empty((size, width), image.dtype)
    nan_cols = np.empty(width, np.int32)
    work = np.empty((size * size, _BLOCK), image.dtype)
    queue = _nan_queue(size, image)
    capacity = queue[4].size
    n_queued = np.int64(0)  # not a literal: one compiled flush, not two
    for y in range(y_start, y_stop):
        nan_cols[:] = 0
        for i in range(size):
            row = image[_reflect(y - r + i, ny)]
            level = cols[i]
            for x in range(nx):
                v = row[x]
                nan_cols[x + r] += _nan(v)
                level[x + r] = _clean(v, posinf)
        for t in range(column_ops.shape[0]):
            lo = cols[column_ops[t, 0]]
            hi = cols[column_ops[t, 1]]
            for x in range(r, r + nx):
                a = lo[x]
                b = hi[x]
                lo[x] = _min(a, b)
                hi[x] = _max(a, b)
        for p in range(width):
            if p < r or p >= r + nx:
                for i in range(size):
                    cols[i, p] = cols[i, xr[p] + r]
                nan_cols[p] = nan_cols[xr[p] + r]
        out_row = out[y]
        for x0 in range(0, nx, _BLOCK):
            n = min(_BLOCK, nx - x0)
            for t in range(inputs.shape[0]):
                dst = work[inputs[t, 0]]
                src = cols[inputs[t, 1]]
                j = x0 + inputs[t, 2]
                for x in range(n):
                    dst[x] = src[j + x]
            _run_network(work, n, ops)
            median = work[out_wire]
            for x in range(n):
                out_row[x0 + x] = median[x]
        start = 0 if nan_cols.any() else -1
        while start >= 0:
            n_queued, start = _queue_nan_windows(image, y, xr, nan_cols, size, queue, n_queued, start)
            if n_queued == capacity:
                _flush_network(out, size, full_ops, out_wire, queue, n_queued)
                n_queued = np.int64(0)
    _flush_network(out, size, full_ops, out_wire, queue, n_queued)
