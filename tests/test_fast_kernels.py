"""The fused Level 2 kernels against plain numpy: medians, statistics, persistence, bad
pixels, and the block-wise application that feeds them."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numba
import numpy as np
import pytest
import xarray as xr

from sphx import flags as F
from sphx.blocks import apply_blocks
from sphx.kernels import persistence
from sphx.kernels.select import median
from sphx.kernels.statistics import image_statistics
from sphx.level2.bad_pixels import bad_pixel_map
from sphx.testing import raise_if_dask_computes


@numba.njit
def _compiled_median(a):
    return median(a)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 101, 256, 257, 2040, 2041, 16383, 16384, 16385, 100_000, 100_001])
@pytest.mark.parametrize("kind", ["normal", "ties", "negative", "constant", "outliers", "wide"])
def test_median_is_exact(n, kind):
    # sizes around each method's threshold (selection, histogram selection, radix); the
    # histogram's range comes from a sample, so outliers and wide ranges test its edges
    rng = np.random.default_rng(n)
    outliers = rng.normal(1.8, 0.1, n)
    outliers[::17], outliers[5::29] = 1e30, -np.inf
    a = {"normal": rng.normal(100.0, 1.0, n), "ties": rng.integers(-3, 3, n).astype(float),
         "negative": -rng.exponential(1.0, n), "constant": np.full(n, 2.5), "outliers": outliers,
         "wide": np.exp(rng.normal(0.0, 30.0, n))}[kind]
    for dtype in (np.float32, np.float64):
        x = a.astype(dtype)
        before = x.copy()
        expected = np.median(x.astype(np.float64))
        assert median(x) == expected
        assert _compiled_median(x) == expected
        np.testing.assert_array_equal(x, before)  # the input is left as it was


def test_median_of_nothing_is_nan():
    assert np.isnan(median(np.zeros(0, np.float32)))
    assert np.isnan(_compiled_median(np.zeros(0, np.float32)))


def test_statistics_count_flags_with_and_without_bad_bits():
    rng = np.random.default_rng(1)
    image = rng.normal(5.0, 2.0, (300, 200)).astype(np.float32)
    image[rng.random(image.shape) < 0.01] = np.nan
    flags = np.zeros(image.shape, np.uint32)
    for bit in (F.Flag.TRANSIENT, F.Flag.PERSIST, F.Flag.HOT, F.Flag.SOURCE):
        flags[rng.random(image.shape) < 0.05] |= np.uint32(bit)
    bad, without = np.uint32(F.mask("HOT", "TRANSIENT")), np.uint32(F.mask("HOT"))
    bits = np.array([f.bit for f in F.REGISTRY], dtype=np.int64)
    n, mean, med, std, lo, hi, counts, counts_without = image_statistics(image, flags, bad, bits, without)
    good = image[((flags & bad) == 0) & np.isfinite(image)]
    assert n == good.size and mean == pytest.approx(good.mean(dtype=np.float64), rel=1e-9)
    assert med == np.median(good.astype(np.float64)) and (lo, hi) == (good.min(), good.max())
    mad = np.median(np.abs(good - np.float32(med)).astype(np.float64))
    assert std == pytest.approx(1.482602218505602 * mad, rel=1e-12)
    for k, b in enumerate(bits):
        carries = (flags & np.uint32(1 << int(b))) != 0
        assert counts[k] == carries.sum()
        assert counts_without[k] == (carries & ((flags & without) == 0)).sum()


def test_one_pass_persistence_equals_release_then_capture():
    rng = np.random.default_rng(2)
    k, shape = 3, (64, 48)
    taus, fractions = np.array([10.0, 300.0, 5000.0]), np.array([0.002, 0.001, 0.0005])
    state = (rng.exponential(200.0, (k, *shape))).astype(np.float32)
    rate = rng.exponential(50.0, shape).astype(np.float32)
    flags = np.zeros(shape, np.uint32)
    rate[:5] = np.nan  # no slope: saturated (flagged OVERFLOW) or just missing
    flags[:3] = np.uint32(F.Flag.OVERFLOW)
    density = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    saturation = np.full(shape, 2e5, np.float32)
    saturation[10:12] = 1e3  # fluence capped there
    gap, texp = 120.0, 114.0
    new, current, new_flags = persistence.expose(
        state, rate, flags, density=density, saturation=saturation, gap=gap, exposure=texp, taus=taus,
        fractions=fractions, saturated_bits=int(F.Flag.OVERFLOW), threshold=0.1, persist_bit=int(F.Flag.PERSIST))

    ref = state.copy()
    expected_current = persistence.release(ref, gap=gap, exposure=texp, taus=taus)
    fluence = np.where(np.isfinite(rate), np.minimum(rate * texp, saturation),
                       np.where(flags & np.uint32(F.Flag.OVERFLOW), saturation, 0.0)).astype(np.float32)
    persistence.capture(ref, fluence, fractions=fractions, density=density)
    np.testing.assert_array_equal(new, ref)
    np.testing.assert_array_equal(current, expected_current)
    np.testing.assert_array_equal(new_flags, flags | np.where(expected_current > 0.1, np.uint32(F.Flag.PERSIST), 0))
    assert 0 < ((new_flags & np.uint32(F.Flag.PERSIST)) != 0).mean() < 1
    np.testing.assert_array_equal(state, state.copy())  # the input state is kept
    with pytest.raises(ValueError, match="time order"):
        persistence.expose(state, rate, flags, density=density, saturation=saturation, gap=-1.0, exposure=texp,
                           taus=taus, fractions=fractions, saturated_bits=0, threshold=0.1, persist_bit=0)


def _numpy_bad_pixel_map(nonfunc, dichroic, dark, abs_gain, *, hot_factor, cold_fraction, cold_box):
    """The definition in plain numpy (module docstring of sphx.level2.bad_pixels)."""
    out = np.zeros(dark.shape, np.uint32)
    with np.errstate(divide="ignore"):
        response = 1.0 / abs_gain.astype(np.float64)
    dead = (nonfunc != 0) | ~np.isfinite(response) | (response <= 0)
    out[dead] |= np.uint32(F.Flag.NONFUNC)
    out[dichroic != 0] |= np.uint32(F.Flag.DICHROIC)
    out[~dead & (dark > hot_factor * np.nanmedian(dark[~dead]))] |= np.uint32(F.Flag.HOT)
    response[dead] = np.nan
    ny, nx = dark.shape
    local = np.full(dark.shape, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN populations
        for i in range(0, ny, cold_box):
            for j in range(0, nx, cold_box):
                block, kind = response[i:i + cold_box, j:j + cold_box], dichroic[i:i + cold_box, j:j + cold_box] != 0
                for population in (kind, ~kind):
                    local[i:i + cold_box, j:j + cold_box][population] = np.nanmedian(block[population])
    with np.errstate(invalid="ignore"):
        out[(response < cold_fraction * local) & ~dead] |= np.uint32(F.Flag.COLD)
    return out


def test_bad_pixel_map_matches_its_numpy_definition():
    rng = np.random.default_rng(3)
    shape = (130, 100)  # blocks cut at the edges
    gain = rng.normal(1.0, 0.05, shape).astype(np.float32)
    gain[rng.random(shape) < 0.01] *= 4.0  # cold
    gain[0, :5] = np.inf
    gain[1, :5] = 0.0
    gain[2, :3] = -1.0
    dark = rng.exponential(0.01, shape).astype(np.float32)
    dark[rng.random(shape) < 0.01] = 1.0  # hot
    dark[3, :2] = np.nan
    nonfunc = (rng.random(shape) < 0.01).astype(np.uint8)
    dichroic = np.zeros(shape, np.uint8)
    dichroic[40:60, 20:90] = 1
    gain[40:60, 20:90] *= 2.0  # dichroic pixels see half the light
    options = {"hot_factor": 10.0, "cold_fraction": 0.5, "cold_box": 32}
    ours = bad_pixel_map(nonfunc, dichroic, dark, gain, **options)
    np.testing.assert_array_equal(ours, _numpy_bad_pixel_map(nonfunc, dichroic, dark, gain, **options))
    for bit in ("NONFUNC", "HOT", "COLD", "DICHROIC"):
        assert ((ours & np.uint32(F.Flag[bit])) != 0).sum() > 0, bit


def _kernel(image, offset, *, scale):
    """(image * scale + offset, per-image sum), recording the blocks it was given."""
    _kernel.seen.append(image)
    return image * scale + offset[..., None, None], image.sum(axis=(-2, -1))


def test_apply_blocks_matches_apply_ufunc_and_passes_blocks_uncopied():
    rng = np.random.default_rng(4)
    image = xr.DataArray(rng.normal(size=(2, 3, 8, 6)), dims=("band", "obs", "y", "x"))
    offset = xr.DataArray(rng.normal(size=2), dims=("band",))
    options = {"input_core_dims": [["y", "x"], []], "output_core_dims": [["y", "x"], []],
               "kwargs": {"scale": 2.0}}
    _kernel.seen = []
    eager = apply_blocks(_kernel, image, offset, output_dtypes=[float, float], **options)
    lazy_in = image.chunk({"band": 1, "obs": 1}).persist()
    with raise_if_dask_computes():
        lazy = apply_blocks(_kernel, lazy_in, offset.chunk({"band": 1}), output_dtypes=[float, float], **options)
    assert lazy[0].data.numblocks == (2, 3, 1, 1) and lazy[1].data.numblocks == (2, 3)
    _kernel.seen = []
    with dask.config.set(scheduler="sync"):
        got = [x.compute() for x in lazy]
    seen = list(_kernel.seen)
    reference = xr.apply_ufunc(_kernel, image, offset, **options)
    for ours, eager_out, ref in zip(got, eager, reference, strict=True):
        xr.testing.assert_identical(ours, ref)
        xr.testing.assert_identical(eager_out, ref)
    # every block reached the kernel as the persisted block itself, not a copy
    blocks = [b for b in lazy_in.data.__dask_graph__().values() if isinstance(b, np.ndarray)]
    assert len(seen) == 2 * 6
    assert all(any(np.shares_memory(block, b) for b in blocks) for block in seen)


def test_apply_blocks_makes_core_dimensions_one_chunk():
    image = xr.DataArray(da.ones((2, 8, 6), chunks=(1, 4, 3)), dims=("obs", "y", "x"))
    total = apply_blocks(lambda a: a.sum(axis=(-2, -1)), image, input_core_dims=[["y", "x"]],
                         output_dtypes=[float])
    np.testing.assert_array_equal(total.values, [48.0, 48.0])


def test_lifted_numba_kernels_travel_to_distributed_workers():
    import cloudpickle

    from sphx.blocks import per_image

    lifted = cloudpickle.loads(cloudpickle.dumps(per_image(numba.njit(lambda a: a.sum()))))
    assert lifted(np.arange(24, dtype=np.float32).reshape(2, 3, 4)).tolist() == [66.0, 210.0]
