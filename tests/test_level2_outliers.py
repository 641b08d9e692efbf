"""Detect Outlier Pixels (sphx.level2.outliers): particle hits are flagged, PSF-shaped peaks are not."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy.ndimage import maximum_filter, median_filter

from sphx import SPHEREX_SMALL
from sphx import flags as F
from sphx.cube import make_cube
from sphx.errors import CalibrationError, ConfigError, StepError
from sphx.level2.outliers import (
    OutlierConfig,
    _zone_lookup,
    detect_outliers,
    outlier_kernel,
    psf_sharpness,
    sharpness_table,
)
from sphx.level2.source_mask import paint_discs
from sphx.simulate.optics import psf_cube, psf_sigmas, psf_zone_centers, render_point_sources, spectral_maps
from sphx.testing import raise_if_dask_computes

INST = SPHEREX_SMALL
N = INST.n_active
EXCLUDE = int(F.mask(*OutlierConfig().exclude))
NEIGHBOURS = int(F.mask(*OutlierConfig().neighbours_of))
OUTLIER, SOURCE = np.uint32(F.Flag.OUTLIER), np.uint32(F.Flag.SOURCE)
OBSIDS = ["2025W51_1A_0001_1", "2025W51_1A_0001_2"]
NO_PSF_TEST = np.empty((3, 0))  # a table without zones: the significance test alone (the old behaviour)


def _zones():
    centres = psf_zone_centers(INST)
    zy, zx = np.meshgrid(centres, centres, indexing="ij")  # planes run x-fast, as in psf_cube
    return zx.ravel(), zy.ravel()


@pytest.fixture(scope="module")
def psf_of():
    """{band: (cwave map, average_psf planes, sharpness table)} of the simulated instrument."""
    out = {}
    for band in (1, 3, 6):
        cwave = spectral_maps(INST, band)[0]
        cube = psf_cube(INST, cwave)
        out[band] = cwave, cube, sharpness_table(cube, *_zones(), oversampling=INST.psf_oversampling)
    return out


def _render(cwave, x, y, flux):
    """Noise-free image of point sources with the simulator's PSF."""
    image = np.zeros((N, N))
    lam = cwave[np.rint(y).astype(int), np.rint(x).astype(int)].astype(np.float64)
    sx, sy = psf_sigmas(lam, x, y, instrument=INST)
    render_point_sources(image, x, y, flux, sx, sy)
    return image


def _peak_to_neighbours(image):
    """(excess over the 5x5 median) / (mean excess of the four edge neighbours) per pixel."""
    med = median_filter(image, size=5, mode="reflect")
    nb = np.full_like(image, np.nan)
    nb[1:-1, 1:-1] = (image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:]) / 4
    with np.errstate(divide="ignore", invalid="ignore"):
        return (image - med) / (nb - med), image - med


def _kernel(image, variance, flags, table, **options):
    return outlier_kernel(image, variance, flags, table, size=5, nsigma=5.0, two_sided=False, exclude=EXCLUDE,
                          saturated=int(F.mask("OVERFLOW")), **options)


# --- the sharpness limit ---------------------------------------------------------------------
@pytest.mark.parametrize("band", [1, 6])
def test_sharpness_limit_bounds_every_rendered_star_and_is_reached(psf_of, band):
    cwave, _, table = psf_of[band]
    limit, zx, zy = table
    rng = np.random.default_rng(band)
    gy, gx = np.mgrid[8:N - 8:12, 8:N - 8:12].astype(np.float64)
    worst = []
    for centred in (True, False):  # exactly on a pixel centre (the worst case), then anywhere
        x, y = gx.ravel(), gy.ravel()
        if not centred:
            x, y = x + rng.uniform(-0.5, 0.5, x.size), y + rng.uniform(-0.5, 0.5, x.size)
        ratio, excess = _peak_to_neighbours(_render(cwave, x, y, np.ones(x.size)))
        zone = np.argmin((zx[:, None, None] - np.arange(N)[None, None, :]) ** 2
                         + (zy[:, None, None] - np.arange(N)[None, :, None]) ** 2, axis=0)
        near = excess > 1e-3  # the pixels a star lights up (a pixel gets at most ~0.8 of the flux)
        worst.append(np.nanmax((ratio / limit[zone])[near]))
    # no star, wherever it falls, is sharper than the limit (0.1 %: the float32 planes and the
    # interpolated edge samples of the even oversampling), and centred ones reach it
    assert worst[0] <= 1.001 and worst[1] <= 1.001, worst
    assert worst[0] > 0.97, worst
    assert worst[1] < worst[0]
    # the undersampled short-wavelength PSF is the sharper one, but a hit (3 % of its charge in
    # each neighbour, ratio 33) is sharper than either
    assert 10 < psf_of[1][2][0].min() and psf_of[1][2][0].max() < 13
    assert 4 < psf_of[6][2][0].min() and psf_of[6][2][0].max() < 6


def test_sharpness_limit_of_simple_profiles(psf_of):
    over = 10
    size = 101
    delta = np.zeros((size, size))
    delta[50, 50] = 1.0  # all the light in one oversampled pixel: nothing in the neighbours
    assert psf_sharpness(delta, oversampling=over) == np.inf
    flat = np.ones((2, size, size))  # the same for a flat field, per plane: no excess anywhere
    np.testing.assert_array_equal(psf_sharpness(flat, oversampling=over), [0.0, 0.0])
    with pytest.raises(CalibrationError, match="smaller than the 5x5 median box"):
        psf_sharpness(np.ones((31, 31)), oversampling=over)
    # a zone takes the largest limit of the zones around it
    g = np.arange(3) * 10.0
    zy, zx = np.meshgrid(g, g, indexing="ij")
    cube = psf_of[1][1][[0, 1, 2, 11, 12, 13, 22, 23, 24]]  # the 3x3 zones of a corner
    own = psf_sharpness(cube, oversampling=over)
    table = sharpness_table(cube, zx.ravel(), zy.ravel(), oversampling=over)
    np.testing.assert_array_equal(table[1:], [zx.ravel(), zy.ravel()])
    assert table[0, 0] == own[[0, 1, 3, 4]].max() and table[0, 4] == own.max()


# --- the kernel ------------------------------------------------------------------------------
def _scene(cwave, seed):
    """Stars on a 16-pixel grid (peak S/N 3-300, anywhere in their pixel, SOURCE discs of 3
    pixels as the source mask paints them) and particle hits of 30-300 sigma (3 % of the
    charge in each edge neighbour, as the simulator shares it) between them; unit noise."""
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[8:N - 8:16, 8:N - 8:16]
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    peak = _render(cwave, x, y, np.ones(x.size))[np.rint(y).astype(int), np.rint(x).astype(int)]
    snr = 10 ** rng.uniform(np.log10(3.0), np.log10(300.0), x.size)
    stars = _render(cwave, x, y, snr / peak)
    hy, hx = gy[:-1, :-1].ravel() + 8, gx[:-1, :-1].ravel() + 8
    amp = rng.uniform(30.0, 300.0, hy.size)
    hits = np.zeros((N, N))
    hits[hy, hx] = amp
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        hits[hy + dy, hx + dx] += 0.03 * amp
    image = (5.0 + stars + hits + rng.standard_normal((N, N))).astype(np.float32)
    flags = np.zeros((N, N), np.uint32)
    paint_discs(flags, x, y, np.full(x.size, 3.0), SOURCE)
    return image, np.ones((N, N), np.float32), flags, stars, (hy, hx)


@pytest.mark.parametrize("band", [1, 3, 6])
def test_kernel_flags_hits_and_spares_psf_peaks(psf_of, band):
    cwave, _, table = psf_of[band]
    image, variance, flags, stars, (hy, hx) = _scene(cwave, seed=band)
    star = stars > 3.0  # pixels with a star signal above 3 sigma
    peaks = star & (stars == maximum_filter(stars, size=3))  # the stars' peak pixels
    assert star.sum() > 700 and peaks.sum() > 150
    out, width = _kernel(image, variance, flags, table)
    flagged = (out & OUTLIER) != 0
    assert flagged[hy, hx].all()
    assert (flagged & star).sum() <= 0.002 * star.sum(), (flagged & star).sum()
    faint = peaks & (stars < 50)  # peaks of S/N 3-50: where noise can mimic a hit
    assert (flagged & faint).sum() <= 0.01 * faint.sum(), ((flagged & faint).sum(), faint.sum())
    np.testing.assert_array_equal(out & ~OUTLIER, flags)  # other bits kept
    assert abs(width - 1.0) < 0.05
    # without the source mask the looser margin still spares nearly every star
    unmasked = (_kernel(image, variance, np.zeros_like(flags), table)[0] & OUTLIER) != 0
    assert unmasked[hy, hx].all()
    assert (unmasked & star).sum() <= 0.01 * star.sum(), (unmasked & star).sum()
    # the significance test alone (the old step) flags most of the stars: the bug this fixes
    plain = (_kernel(image, variance, flags, NO_PSF_TEST)[0] & OUTLIER) != 0
    assert plain[hy, hx].all()
    assert (plain & peaks & (stars > 10)).sum() > 0.95 * (peaks & (stars > 10)).sum()
    assert (plain & star).sum() > 0.5 * star.sum()


def test_kernel_saturated_neighbours_dips_and_margins(psf_of):
    cwave, _, table = psf_of[1]
    image = np.full((N, N), 10.0, np.float32)  # noise-free, so that every test below is exact
    variance = np.ones((N, N), np.float32)
    flags = np.zeros((N, N), np.uint32)
    image[50, 50] += 200.0  # a sharp spike...
    image[50, 100] += 200.0
    flags[50, 101] |= np.uint32(F.Flag.OVERFLOW)  # ...next to a saturated pixel, whose value is a lower bound
    image[150, 150] -= 50.0  # a dip
    image[200, 200] += 8.0  # a faint spike: 8 sigma, more than 1 but less than 2 sigma_t (5.9) in band 1
    image += _render(cwave, np.array([200.0]), np.array([100.0]), np.array([200.0])).astype(np.float32)
    assert image[100, 200] - 10.0 > 100.0  # a centred star of peak > 100 sigma
    hit = (_kernel(image, variance, flags, table)[0] & OUTLIER) != 0
    np.testing.assert_array_equal(np.argwhere(hit), [[50, 50], [200, 200]])
    assert (_kernel(image, variance, flags, NO_PSF_TEST)[0] & OUTLIER)[100, 200]  # the old test flags the star
    both = outlier_kernel(image, variance, flags, table, size=5, nsigma=5.0, two_sided=True, exclude=EXCLUDE,
                          saturated=int(F.mask("OVERFLOW")))[0]
    assert (both & OUTLIER)[150, 150]  # dips are judged on significance alone
    strict = _kernel(image, variance, flags, table, sharpness_nsigma=2.0)[0]
    assert (strict & OUTLIER)[50, 50] and not (strict & OUTLIER)[200, 200]
    on_source = flags.copy()
    on_source[190:211, 190:211] |= SOURCE  # the default margin on SOURCE pixels is 2 sigma_t
    assert not (_kernel(image, variance, on_source, table)[0] & OUTLIER)[200, 200]
    # without saturated flags the spike next to the flagged pixel is sharp again
    assert (outlier_kernel(image, variance, flags, table, size=5, nsigma=5.0, two_sided=False, exclude=EXCLUDE,
                           saturated=0)[0] & OUTLIER)[50, 100]


def test_kernel_flags_the_edge_neighbours_of_hits(psf_of):
    table = psf_of[1][2]
    image = np.full((N, N), 10.0, np.float32)
    variance = np.ones((N, N), np.float32)
    flags = np.zeros((N, N), np.uint32)
    image[50, 50] += 200.0  # a hit found here
    flags[120, 0] |= np.uint32(F.Flag.TRANSIENT)  # one found on board, at the edge
    out = _kernel(image, variance, flags, table, neighbours_of=NEIGHBOURS)[0]
    expected = {(50, 50), (49, 50), (51, 50), (50, 49), (50, 51), (119, 0), (121, 0), (120, 1)}
    assert {tuple(p) for p in np.argwhere(out & OUTLIER)} == expected
    assert out[120, 0] == F.Flag.TRANSIENT  # the seed keeps its own flag only
    np.testing.assert_array_equal(out & ~OUTLIER, flags)
    assert not (_kernel(image, variance, flags, table)[0] & OUTLIER)[49, 50]  # off by default in the kernel


def test_kernel_finds_each_pixels_zone(psf_of):
    cwave, _, table = psf_of[1]
    image, variance, flags, _, _ = _scene(cwave, seed=5)
    expected = _kernel(image, variance, flags, table)[0]
    assert _zone_lookup(table, 0, 0, N, N)[0].shape == (11, 11)  # a grid: nearest row and column
    scattered = table.copy()
    scattered[1, 0] += 1e-6  # no longer a grid: every zone is scanned, with the same outcome
    assert _zone_lookup(scattered, 0, 0, N, N)[0].size == 0
    np.testing.assert_array_equal(_kernel(image, variance, flags, scattered)[0], expected)
    shuffled = table[:, np.random.default_rng(0).permutation(table.shape[1])]
    np.testing.assert_array_equal(_kernel(image, variance, flags, shuffled)[0], expected)
    # zones are found from the active-frame position: pixel (i, j) is at (x0 + j, y0 + i)
    two = np.array([[np.inf, 1.0], [0.0, 200.0], [100.0, 100.0]])  # never sharp left of x = 100, always right
    spike = np.full((N, N), 10.0, np.float32)
    spike[100, 120] += 100.0
    ones, none = np.ones((N, N), np.float32), np.zeros((N, N), np.uint32)
    assert (_kernel(spike, ones, none, two)[0] & OUTLIER)[100, 120]
    assert not (_kernel(spike, ones, none, two, x0=-60)[0] & OUTLIER)[100, 120]


# --- the step --------------------------------------------------------------------------------
def _average_psf(psf_of, bands):
    zx, zy = _zones()
    offsets = (np.arange(INST.psf_size) - INST.psf_size // 2) * INST.pixel_scale / INST.psf_oversampling
    return xr.Dataset(
        {"PSF": (("band", "zone", "psf_y", "psf_x"), np.stack([psf_of[b][1] for b in bands]))},
        coords={"band": bands, "zone": np.arange(zx.size), "zone_x": ("zone", zx), "zone_y": ("zone", zy),
                "psf_y": offsets, "psf_x": offsets},
        attrs={"oversampling": INST.psf_oversampling})


def _cube(psf_of, bands, seed=0):
    images, flags = [], []
    for b in bands:
        for k in range(len(OBSIDS)):
            image, _, f, _, _ = _scene(psf_of[b][0], seed=10 * b + k)
            images.append(image)
            flags.append(f)
    shape = (len(bands), len(OBSIDS), N, N)
    ds = make_cube(np.reshape(images, shape), level="l2", obsid=OBSIDS, mjd_avg=[61027.2, 61027.21],
                   instrument=INST, bands=bands, flags=np.reshape(flags, shape),
                   variance=np.ones(shape, np.float32), zodi=np.zeros(shape, np.float32))
    return ds.chunk({"band": 1, "obs": 1})


def test_step_is_lazy_and_runs_the_kernel_per_image(psf_of):
    bands = [1, 6]
    ds = _cube(psf_of, bands)
    calib = {"average_psf": _average_psf(psf_of, bands).chunk({"band": 1})}
    with raise_if_dask_computes():
        out = detect_outliers(ds, calib=calib)
        bare = detect_outliers(ds, calib=calib, config={"neighbours_of": []})
        plain = detect_outliers(ds, calib=calib, config={"sharpness": False, "neighbours_of": []})
    assert out["FLAGS"].dtype == np.uint32 and out["outlier_pull_std"].dims == ("band", "obs")
    out, bare, plain = out.compute(), bare.compute(), plain.compute()
    for i, b in enumerate(bands):
        for j in range(len(OBSIDS)):
            args = [ds[v].values[i, j] for v in ("IMAGE", "VARIANCE", "FLAGS")]
            expected, width = _kernel(*args, psf_of[b][2], neighbours_of=NEIGHBOURS)
            np.testing.assert_array_equal(out["FLAGS"].values[i, j], expected)
            assert out["outlier_pull_std"].values[i, j] == width
            # sharpness off: the old step, a plain 5-sigma clip against the 5x5 median
            image, variance, _ = args
            pull = (image - median_filter(image, size=5, mode="reflect")) / np.sqrt(variance * (1 + np.pi / 50))
            np.testing.assert_array_equal((plain["FLAGS"].values[i, j] & OUTLIER) != 0, pull > 5.0)
    assert ((bare["FLAGS"].values & OUTLIER) != 0).sum() < 0.2 * ((plain["FLAGS"].values & OUTLIER) != 0).sum()


def test_step_takes_the_source_margin_everywhere_where_fine_astrometry_failed(psf_of):
    ds = _cube(psf_of, [1])
    ds["FLAGS"] = ds["FLAGS"] & np.uint32(~F.Flag.SOURCE & 0xFFFFFFFF)  # a mask that missed every star
    ds["finast"] = (("band", "obs"), np.array([[0, 4]], np.int32))
    calib = {"average_psf": _average_psf(psf_of, [1])}
    with raise_if_dask_computes():
        out = detect_outliers(ds, calib=calib)
    flags = out["FLAGS"].values
    table = psf_of[1][2]
    for j, margin in enumerate((1.0, 2.0)):
        args = [ds[v].values[0, j] for v in ("IMAGE", "VARIANCE", "FLAGS")]
        np.testing.assert_array_equal(flags[0, j], _kernel(*args, table, sharpness_nsigma=margin,
                                                           neighbours_of=NEIGHBOURS)[0])
    assert not np.array_equal(_kernel(*args, table, sharpness_nsigma=1.0)[0], flags[0, 1])


def test_step_errors(psf_of):
    ds = _cube(psf_of, [1])
    psf = _average_psf(psf_of, [1])
    with pytest.raises(CalibrationError, match="needs calibration product"):
        detect_outliers(ds, calib={})
    with pytest.raises(CalibrationError, match=r"no band\(s\) \[6\]"):
        detect_outliers(_cube(psf_of, [6]), calib={"average_psf": psf})
    with pytest.raises(CalibrationError, match="oversampling"):
        detect_outliers(ds, calib={"average_psf": psf.assign_attrs(oversampling=None)})
    with pytest.raises(StepError, match="contiguous"):
        detect_outliers(ds.isel(x=slice(0, None, 2)), calib={"average_psf": psf})
    with pytest.raises(ConfigError, match="sharpness_nsigma"):
        detect_outliers(ds, calib={"average_psf": psf}, config={"sharpness_nsigma": -1.0})
    with pytest.raises(ConfigError, match="saturated"):
        detect_outliers(ds, calib={"average_psf": psf}, config={"saturated": ["NOT_A_FLAG"]})
