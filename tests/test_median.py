"""The NaN-aware median filter of outlier detection (sphx.kernels.median)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi

from sphx.kernels.median import _sorting_network, _window_network, median_filter


def brute_nanmedian(image: np.ndarray, size: int) -> np.ndarray:
    """np.nanmedian of every window of the half-sample mirrored image."""
    r = size // 2
    padded = np.pad(image, r, mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        return np.nanmedian(windows, axis=(-2, -1)).astype(image.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 7), (7, 3), (4, 4), (37, 53), (64, 61)])
@pytest.mark.parametrize("size", [1, 3, 5, 7, 9])
def test_equals_scipy_on_finite_images(shape, size, dtype):
    image = np.random.default_rng(sum(shape) + size).normal(100.0, 10.0, shape).astype(dtype)
    result = median_filter(image, size=size)
    assert result.dtype == dtype
    assert result.shape == shape
    # windows wider than the image see it mirrored more than once, as in scipy
    np.testing.assert_array_equal(result, ndi.median_filter(image, size=size, mode="reflect"))


@pytest.mark.parametrize("size", [3, 5, 7, 11])
def test_equals_scipy_with_many_ties(size):
    # values 0..3 put many equal values in each window: the selection networks must not
    # depend on values being distinct
    image = np.random.default_rng(size).integers(0, 4, (120, 97)).astype(np.float32)
    image[5:9, 20:60] = 2.0
    image[60:66, :] = -np.inf
    image[:50, 40:46] = np.inf
    expected = ndi.median_filter(image, size=size, mode="reflect")
    np.testing.assert_array_equal(median_filter(image, size=size), expected)
    assert len(np.unique(expected)) == 6  # -inf, 0..3 and inf all occur as medians


def _block_image(blocks: np.ndarray) -> np.ndarray:
    """Tile (n, s, s) blocks into one image; the window centred on a block is that block."""
    n, s, _ = blocks.shape
    per_row = int(np.ceil(np.sqrt(n)))
    padded = np.zeros((per_row * per_row, s, s), blocks.dtype)
    padded[:n] = blocks
    return padded.reshape(per_row, per_row, s, s).transpose(0, 2, 1, 3).reshape(per_row * s, per_row * s)


def _block_centres(image: np.ndarray, n: int, s: int) -> np.ndarray:
    return image[s // 2::s, s // 2::s].ravel()[:n]


def test_every_3x3_window_of_zeros_and_ones():
    # min/max networks commute with thresholds, so being right on all 2^9 windows of
    # zeros and ones proves the 3x3 network right on all inputs (0-1 principle)
    blocks = np.array(list(itertools.product([0.0, 1.0], repeat=9)), np.float32).reshape(-1, 3, 3)
    centres = _block_centres(median_filter(_block_image(blocks), size=3), len(blocks), 3)
    np.testing.assert_array_equal(centres, (blocks.sum(axis=(1, 2)) >= 5).astype(np.float32))
    assert centres.sum() == 256


def test_every_column_sorted_5x5_window_of_zeros_and_ones():
    # the 5x5 selection after the column sort, on all 6^5 column-sorted 0-1 windows (and
    # so on all windows, by the 0-1 principle), then columns in random order
    ones = np.array(list(itertools.product(range(6), repeat=5)))  # ones per column
    blocks = (np.arange(5)[None, :, None] >= 5 - ones[:, None, :]).astype(np.float64)
    rng = np.random.default_rng(5)
    shuffled = rng.permuted(blocks, axis=1)
    for b in (blocks, shuffled, (rng.random((4000, 5, 5)) < 0.5).astype(np.float64)):
        centres = _block_centres(median_filter(_block_image(b), size=5), len(b), 5)
        np.testing.assert_array_equal(centres, (b.sum(axis=(1, 2)) >= 13).astype(np.float64))
    assert len(blocks) == 7776


@pytest.mark.parametrize("size", [3, 5, 7, 9])
def test_every_sorted_window_of_zeros_and_ones(size):
    # Each path sorts the columns and then the rows of a window (sorting networks, checked
    # below and above) before selecting the median from the sorted window. A 0-1 window
    # with sorted rows and columns is a staircase, one per non-decreasing sequence of
    # ones per row; right on all C(2 size, size) of them means the selection is right for
    # every window (0-1 principle), including the rare ones random data never produces.
    ones = np.array(list(itertools.combinations_with_replacement(range(size + 1), size)))
    blocks = (np.arange(size)[None, None, :] >= size - ones[:, :, None]).astype(np.float32)
    centres = _block_centres(median_filter(_block_image(blocks), size=size), len(blocks), size)
    np.testing.assert_array_equal(centres, (ones.sum(axis=1) > size * size // 2).astype(np.float32))
    assert len(blocks) == {3: 20, 5: 252, 7: 3432, 9: 48620}[size]


def _apply(ops: np.ndarray, wires: np.ndarray) -> None:
    for a, b, what in ops:
        low, high = wires[a] & wires[b], wires[a] | wires[b]
        if what & 1:
            wires[a] = low
        if what & 2:
            wires[b] = high


@pytest.mark.parametrize("size", [3, 5, 7, 9, 11])
def test_window_network_selects_the_median(size):
    # the networks of the general path, on 0-1 windows (one wire a row, one window a
    # column): every staircase (sorted rows and columns) up to 9 x 9, and random windows
    column_ops, inputs, ops, full_ops, out_wire = _window_network(size)
    n = size * size
    rng = np.random.default_rng(size)
    random = rng.random((n, 20000)) < rng.uniform(0.3, 0.7, 20000)
    sets = [random]
    if size <= 9:
        ones = np.array(list(itertools.combinations_with_replacement(range(size + 1), size)))
        sets.append((np.arange(size)[None, None, :] >= size - ones[:, :, None]).reshape(len(ones), n).T.copy())
    for windows in sets:
        expected = windows.sum(axis=0) > n // 2
        raw = windows.copy()
        _apply(full_ops, raw)
        np.testing.assert_array_equal(raw[out_wire], expected)
        # the window network proper starts from sorted columns, read through ``inputs``
        sorted_columns = np.sort(windows.reshape(size, size, -1), axis=0)
        wires = np.zeros_like(windows)
        for wire, i, j in inputs:
            wires[wire] = sorted_columns[i, j]
        _apply(ops, wires)
        np.testing.assert_array_equal(wires[out_wire], expected)
    assert len(column_ops) == len(_sorting_network(size))
    assert len(full_ops) == size * len(column_ops) + len(ops)  # every column sort is needed
    assert (ops[:, 2] != 3).sum() >= size  # pruning left one-sided compare-exchanges


@pytest.mark.parametrize("n", [2, 3, 5, 7, 9, 12])
def test_sorting_network_sorts_every_zero_one_input(n):
    values = np.array(list(itertools.product([False, True], repeat=n))).T.copy()
    pairs = _sorting_network(n)
    for a, b in pairs:
        assert a < b
        values[a], values[b] = values[a] & values[b], values[a] | values[b]
    assert (values[:-1] <= values[1:]).all()
    assert len(pairs) == {2: 1, 3: 3, 5: 9, 7: 16, 9: 28, 12: 42}[n]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_nan_pixels_are_ignored(size, dtype):
    rng = np.random.default_rng(size)
    image = rng.normal(0.0, 1.0, (45, 38)).astype(dtype)
    image[rng.random(image.shape) < 0.15] = np.nan
    image[10:20, 5:17] = np.nan  # windows with no finite value, and few
    image[:, -3:][rng.random((45, 3)) < 0.6] = np.nan  # NaN at the mirrored edge
    image[30, 30] = np.inf
    image[31, 2] = -np.inf
    result = median_filter(image, size=size)
    expected = brute_nanmedian(image, size)
    np.testing.assert_array_equal(result, expected)  # NaN where expected is NaN
    if size >= 3:
        all_nan = np.isnan(expected).sum()
        assert all_nan >= (10 - size + 1) * (12 - size + 1)
        # some windows hold an even number of finite values: their median is a mean
        even = np.isfinite(np.lib.stride_tricks.sliding_window_view(
            np.pad(image, size // 2, mode="symmetric"), (size, size))).sum(axis=(-2, -1)) % 2 == 0
        assert (even & ~np.isnan(expected)).sum() > 100


@pytest.mark.parametrize("size", [3, 5, 7])
def test_few_nan_in_a_wide_image(size):
    # NaN-free stretches of a row are skipped 64 padded columns at a time: put NaN on
    # both sides of those block edges, at the image edges and in a run of its own
    image = np.random.default_rng(size).normal(size=(40, 300)).astype(np.float32)
    for y, x in [(0, 0), (5, 60), (5, 61), (9, 62), (20, 63), (21, 64), (22, 65), (30, 126), (30, 127),
                 (39, 299), (12, 200), (13, 200), (14, 200)]:
        image[y, x] = np.nan
    image[25, 150:230] = np.nan  # more windows in one row than the queue holds
    result = median_filter(image, size=size)
    np.testing.assert_array_equal(result, brute_nanmedian(image, size))
    np.testing.assert_array_equal(result[35:38, 70:120], ndi.median_filter(image, size=size)[35:38, 70:120])


def test_even_count_takes_mean_of_middle_values():
    image = np.full((5, 5), np.nan, np.float32)
    image[1, 1], image[2, 3], image[3, 2], image[4, 4] = 1.0, 2.0, 4.0, 100.0
    result = median_filter(image, size=3)
    assert result[2, 2] == 2.0  # finite values 1, 2, 4
    assert result[2, 3] == 3.0  # 2 and 4: their mean
    assert result[3, 3] == 4.0  # 2, 4, 100
    assert result[4, 4] == 100.0  # the edge mirrors (4, 4) into the window four times
    assert np.isnan(result[0, 4])  # nothing finite


def test_out_argument_and_in_place():
    image = np.random.default_rng(1).normal(size=(40, 30)).astype(np.float32)
    image[3, 4] = np.nan
    expected = median_filter(image, size=5)
    out = np.empty_like(image)
    assert median_filter(image, size=5, out=out) is out
    np.testing.assert_array_equal(out, expected)
    fortran = np.empty(image.shape, np.float32, order="F")
    np.testing.assert_array_equal(median_filter(image, size=5, out=fortran), expected)
    copy = image.copy()
    assert median_filter(copy, size=5, out=copy) is copy
    np.testing.assert_array_equal(copy, expected)


def test_non_contiguous_read_only_and_foreign_byte_order_input():
    image = np.random.default_rng(2).normal(size=(30, 40))
    expected = ndi.median_filter(image.T, size=5)
    np.testing.assert_array_equal(median_filter(image.T, size=5), expected)
    swapped = image.T.astype(">f8")
    result = median_filter(swapped, size=5)
    assert result.dtype == np.float64 and result.dtype.isnative
    np.testing.assert_array_equal(result, expected)
    frozen = image.astype(np.float32)
    frozen[3, 3] = np.nan
    frozen.flags.writeable = False  # as dask and xarray often hand them over
    np.testing.assert_array_equal(median_filter(frozen, size=5), brute_nanmedian(frozen, 5))


def test_bad_arguments_raise():
    image = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="2-D"):
        median_filter(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(TypeError, match="int32"):
        median_filter(np.zeros((8, 8), np.int32))
    for size in (0, 2, -3, 4.0, True):
        with pytest.raises(ValueError, match="odd window size"):
            median_filter(image, size=size)
    with pytest.raises(ValueError, match="float32"):
        median_filter(image, out=np.zeros((8, 8), np.float64))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        median_filter(image, out=np.zeros((8, 9), np.float32))
    frozen = np.zeros((8, 8), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        median_filter(image, out=frozen)
    assert median_filter(np.zeros((0, 5), np.float32)).shape == (0, 5)
