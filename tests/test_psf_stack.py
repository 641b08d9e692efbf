"""Exposure-averaged PSF kernels: stacking stars on an oversampled grid, deconvolving the pixel."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.optimize
from scipy.ndimage import uniform_filter
from scipy.optimize import brentq
from scipy.special import ndtr

from sphx.kernels.psf_stack import (
    _core_halo_misfit,
    core_halo_planes,
    deconvolve_pixel,
    deconvolve_zones,
    effective_psf,
    fit_core_halo,
    psf_fwhm_2d,
    smooth_over_field,
    stack_grid_size,
    stack_stars,
)
from sphx.simulate.optics import WING_FRACTION, WING_SCALE, psf_plane, render_point_sources

O, HALF, P_SIZE = 10, 5, 101
S = stack_grid_size(half_size=HALF, oversampling=O)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _accumulators(n_zones: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n_zones, S, S)), np.zeros((n_zones, S, S))


def _star_grid(rng: np.random.Generator, n_side: int, spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """Stars on a grid, each jittered uniformly within its pixel (uniform sub-pixel phases)."""
    g = (np.arange(n_side) + 0.5) * spacing
    x, y = np.meshgrid(g, g)
    return x.ravel() + rng.uniform(-0.5, 0.5, x.size), y.ravel() + rng.uniform(-0.5, 0.5, x.size)


def _peak_fraction(sx: float, sy: float) -> float:
    """Fraction of a star's flux in its brightest pixel when centred on a pixel."""
    img = np.zeros((41, 41))
    render_point_sources(img, [20.0], [20.0], [1.0], [sx], [sy])
    return float(img.max())


def _errors(psf: np.ndarray, sx: float, sy: float) -> tuple[np.ndarray, float, float]:
    """(FWHM x, y relative errors, sum relative error, max |difference| / peak) against the truth."""
    truth = psf_plane(sx, sy, size=P_SIZE, oversampling=O)
    fwhm = np.array(psf_fwhm_2d(psf)) / np.array(psf_fwhm_2d(truth)) - 1
    return fwhm, psf.sum() / truth.sum() - 1, np.abs(psf - truth).max() / truth.max()


@functools.cache
def _noise_free_stack(sx: float, sy: float) -> tuple[np.ndarray, np.ndarray]:
    """40 000 noise-free stars streamed from four images into one accumulator."""
    rng = np.random.default_rng(11)
    sums, counts = _accumulators(1)
    for _ in range(4):
        x, y = _star_grid(rng, 100, 20)
        flux = rng.uniform(1e3, 1e4, x.size)
        img = np.zeros((2000, 2000))
        render_point_sources(img, x, y, flux, np.full(x.size, sx), np.full(x.size, sy))
        used = stack_stars(img, np.ones(img.shape, bool), x, y, flux, np.zeros(x.size), np.zeros(x.size, np.int64),
                           sums=sums, counts=counts)
        assert used == x.size
    return sums, counts


# --- 1. noise-free stars ------------------------------------------------------------------
@pytest.mark.parametrize(("sx", "sy"), [(0.70, 0.75), (1.30, 1.25)], ids=["undersampled", "wide"])
def test_noise_free_stack_recovers_the_optical_psf(sx, sy):
    sums, counts = _noise_free_stack(sx, sy)
    assert counts.min() > 50  # every bin sampled (~400 on average; edge bins are half bins)
    psf = deconvolve_pixel(sums, counts)
    assert psf.shape == (1, P_SIZE, P_SIZE)
    fwhm, flux, diff = _errors(psf[0], sx, sy)
    # measured: FWHM -0.09 % / -0.16 % (0.7 pixel), 0.00 % / +0.01 % (1.3 pixel); sum < 3e-4;
    # max |difference| 0.29 % and 0.02 % of the peak
    assert np.all(np.abs(fwhm) < 3e-3), fwhm
    assert abs(flux) < 5e-3, flux
    assert diff < 6e-3, diff
    # the peak sits on the centre bin, where template_bank expects it
    assert np.unravel_index(np.argmax(psf[0]), psf[0].shape) == (50, 50)


def test_empty_bins_are_filled():
    """A third of the bins without samples (as masked pixels or few stars leave them)."""
    sx, sy = 0.70, 0.75
    sums, counts = (a.copy() for a in _noise_free_stack(sx, sy))
    empty = np.random.default_rng(5).random(counts.shape) < 1 / 3
    sums[empty] = counts[empty] = 0.0
    psf = deconvolve_pixel(sums, counts)[0]
    fwhm, flux, diff = _errors(psf, sx, sy)
    # measured: FWHM -0.10 % / -0.37 %, max |difference| 0.34 % of the peak
    assert np.all(np.abs(fwhm) < 6e-3), fwhm
    assert abs(flux) < 5e-3, flux
    assert diff < 6e-3, diff


# --- 2. noisy stars, several zones ---------------------------------------------------------
ZONE_SIGMAS = [(0.70, 0.75), (0.90, 0.85), (1.30, 1.25)]
NOISE, SKY = 2.0, 50.0


@functools.cache
def _noisy_stack() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """~1000 stars per zone, peak S/N 100-300, a flat sky, 2 % of the pixels unusable.

    Also returns the stack of the squared samples (same accumulators, fed ``(image -
    sky)^2`` with norm ``flux^2``), for the scatter of the samples in each bin.
    """
    rng = np.random.default_rng(3)
    x, y = _star_grid(rng, 56, 20)
    zone = rng.integers(0, len(ZONE_SIGMAS), x.size)
    sig = np.array(ZONE_SIGMAS)[zone]
    peak = np.array([_peak_fraction(*s) for s in ZONE_SIGMAS])[zone]
    flux = rng.uniform(100, 300, x.size) * NOISE / peak
    img = np.full((1120, 1120), SKY)
    render_point_sources(img, x, y, flux, sig[:, 0], sig[:, 1])
    img += rng.normal(0.0, NOISE, img.shape)
    usable = rng.random(img.shape) > 0.02
    sky = np.full(x.size, SKY)
    sums, counts = _accumulators(len(ZONE_SIGMAS))
    used = stack_stars(img.astype(np.float32), usable, x, y, flux, sky, zone, sums=sums, counts=counts)
    assert used == x.size
    sums2, counts2 = _accumulators(len(ZONE_SIGMAS))
    stack_stars((img - SKY) ** 2, usable, x, y, flux**2, np.zeros(x.size), zone, sums=sums2, counts=counts2)
    np.testing.assert_array_equal(counts2, counts)
    return sums, counts, sums2, np.bincount(zone)


def test_noisy_zones_recover_their_widths():
    sums, counts, _, per_zone = _noisy_stack()
    assert per_zone.min() > 950
    psf = deconvolve_pixel(sums, counts)
    for plane, (sx, sy) in zip(psf, ZONE_SIGMAS, strict=True):
        fwhm, flux, diff = _errors(plane, sx, sy)
        # measured FWHM errors: (+0.50, +0.06), (+0.01, 0.00), (-0.02, +0.07) %; sums within
        # 0.05 %; max |difference| 0.61, 0.33, 0.13 % of the peak
        assert np.all(np.abs(fwhm) < 1e-2), (sx, sy, fwhm)
        assert abs(flux) < 1e-2, (sx, sy, flux)
        assert diff < 2.5e-2, (sx, sy, diff)


@functools.cache
def _sparse_narrow_stack(sx: float = 0.33, sy: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """64 stars of a band-1 width: more than half of the bins empty."""
    rng = np.random.default_rng(4)
    x, y = _star_grid(rng, 8, 20)
    flux = rng.uniform(100, 1000, x.size) * NOISE / _peak_fraction(sx, sy)
    img = np.full((160, 160), SKY)
    render_point_sources(img, x, y, flux, np.full(x.size, sx), np.full(x.size, sy))
    img += rng.normal(0.0, NOISE, img.shape)
    sums, counts = _accumulators(1)
    stack_stars(img, np.ones(img.shape, bool), x, y, flux, np.full(x.size, SKY), np.zeros(x.size, np.int64),
                sums=sums, counts=counts)
    return sums, counts


def test_sparse_stack_of_a_narrow_psf():
    sx, sy = 0.33, 0.35
    sums, counts = _sparse_narrow_stack(sx, sy)
    assert (counts == 0).mean() > 0.5
    fwhm, flux_error, _ = _errors(deconvolve_pixel(sums, counts)[0], sx, sy)
    # measured: +2.0 % / +1.7 %; the width that scales the smoothing was read off profiles
    # through the centre before, and came out at 1 pixel here: +42 % / +36 %
    assert np.all(np.abs(fwhm) < 0.05), fwhm
    assert abs(flux_error) < 0.02, flux_error


def test_core_halo_fit_recovers_the_simulated_profile():
    sums, counts = _noise_free_stack(0.70, 0.75)
    sx, sy, k, core, halo = fit_core_halo(sums[0], counts[0], oversampling=O)
    # measured: 0.7000, 0.7501, 2.4999, 0.8500, 0.1500
    np.testing.assert_allclose([sx, sy, k], [0.70, 0.75, WING_SCALE], rtol=2e-3)
    np.testing.assert_allclose([core, halo], [1 - WING_FRACTION, WING_FRACTION], atol=2e-3)
    grid = (np.arange(P_SIZE) - (P_SIZE - 1) / 2) / O
    plane = core_halo_planes(np.array([[sx, sy, k, core, halo]]), grid, oversampling=O)[0]
    truth = psf_plane(0.70, 0.75, size=P_SIZE, oversampling=O)
    assert np.abs(plane - truth).max() < 1e-3 * truth.max()
    assert np.isnan(fit_core_halo(sums[0], np.zeros_like(counts[0]), oversampling=O)).all()


def test_core_halo_fit_finds_scipys_minimum():
    # a noisy stack, started away from the answer: the compiled Nelder-Mead against scipy's
    sums, counts, _, _ = _noisy_stack()
    mine = fit_core_halo(sums[1], counts[1], oversampling=O, start=np.array([0.6, 0.6, 4.0]))
    d = (np.arange(S) - (S - 1) / 2) / O
    s, c = np.where(counts[1] > 0, sums[1], 0.0), np.where(counts[1] > 0, counts[1], 0.0)
    theirs = scipy.optimize.minimize(lambda p: _core_halo_misfit(p, d, s, c, 1 / (12 * O**2))[0],
                                     np.log([0.6, 0.6, 3.0]), method="Nelder-Mead",
                                     options={"xatol": 1e-7, "fatol": 1e-14, "maxiter": 10000})
    np.testing.assert_allclose(mine[:3], [*np.exp(theirs.x[:2]), 1 + np.exp(theirs.x[2])], rtol=1e-3)
    np.testing.assert_allclose(mine[:2], ZONE_SIGMAS[1], rtol=0.02)
    # a sparse stack: the fluxes stay non-negative (unconstrained, a halo as wide as the core
    # with fluxes of +49 and -48 fitted one), the core near the truth
    sparse = fit_core_halo(*(a[0] for a in _sparse_narrow_stack()), oversampling=O)
    assert np.all(sparse[3:] >= 0) and sparse[3] > 0.5
    np.testing.assert_allclose(sparse[:2], [0.33, 0.35], rtol=0.1)


def test_smooth_over_field_keeps_a_cubic_and_averages_noise():
    rng = np.random.default_rng(6)
    iy, ix = np.divmod(np.arange(121), 11)
    u, v = (ix - 5) / 5, (iy - 5) / 5
    truth = np.column_stack([1 + 0.3 * u**2 - 0.2 * u * v + 0.1 * v**3, 2 - u])
    weights = rng.uniform(0.5, 2.0, 121)
    weights[7] = 0.0  # a zone without stars gets the polynomial's value
    noisy = truth + rng.normal(size=truth.shape) / np.sqrt(weights[:, None] + 1e-9)
    noisy[7] = 1e6
    np.testing.assert_allclose(smooth_over_field(truth, weights, n_side=11, degree=3), truth, atol=1e-10)
    error = smooth_over_field(noisy, weights, n_side=11, degree=3) - truth
    # 10 terms from 120 zones: ~0.3 of one zone's noise (measured rms 0.26)
    assert np.sqrt((error**2).mean()) < 0.4
    # 4 zones cannot hold a cubic (10 terms): the degree drops until they are twice its terms
    few = np.zeros(121)
    few[[0, 10, 110, 120]] = 1.0
    np.testing.assert_allclose(smooth_over_field(truth, few, n_side=11, degree=3)[:, 0], truth[[0, 10, 110, 120], 0].mean())
    # a zone fitted to a wrong minimum is left out instead of bending the polynomial for all
    wrong = truth.copy()
    wrong[60] = [50.0, -40.0]
    np.testing.assert_allclose(smooth_over_field(wrong, weights, n_side=11, degree=3), truth, atol=1e-10)
    assert np.abs(smooth_over_field(wrong, weights, n_side=11, degree=3, clip=None) - truth).max() > 1
    with pytest.raises(ValueError, match="n_side"):
        smooth_over_field(truth, weights, n_side=10, degree=3)


def _field_of_zones(n_side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zones of a band-1-like PSF (core sigma ~0.33 pixel) whose widths grow toward the edges
    as the simulator's do, 900 stars each at peak S/N 100-1000: (sums, counts, sigmas)."""
    sums, counts = _accumulators(n_side * n_side)
    iy, ix = np.divmod(np.arange(n_side * n_side), n_side)
    u, v = (ix - (n_side - 1) / 2) / ((n_side - 1) / 2), (iy - (n_side - 1) / 2) / ((n_side - 1) / 2)
    sigmas = np.column_stack([0.33 * (1 + 0.1 * u**2), 0.33 * (1 + 0.1 * v**2) * (1 + 0.05 * v)])
    for z, (sx, sy) in enumerate(sigmas):
        x, y = _star_grid(rng, 30, 12)
        flux = rng.uniform(100, 1000, x.size) * NOISE / _peak_fraction(sx, sy)
        img = np.full((360, 360), SKY)
        render_point_sources(img, x, y, flux, np.full(x.size, sx), np.full(x.size, sy))
        img += rng.normal(0.0, NOISE, img.shape)
        stack_stars(img, np.ones(img.shape, bool), x, y, flux, np.full(x.size, SKY), np.full(x.size, z),
                    sums=sums, counts=counts)
    return sums, counts, sigmas


def test_zones_share_a_correction_to_a_model_smooth_over_the_field():
    sums, counts, sigmas = _field_of_zones(11, np.random.default_rng(9))
    together = deconvolve_zones(sums, counts, n_side=11, size=P_SIZE)
    some = np.arange(0, 121, 12)  # each zone alone: 11 of them (a deconvolution each)
    alone = deconvolve_pixel(sums[some], counts[some], iterations=2000)
    errors = {name: np.array([_errors(p, sx, sy)[0] for p, (sx, sy) in zip(psf, sigmas[zones], strict=True)])
              for name, psf, zones in (("together", together, slice(None)), ("alone", alone, some))}
    # measured FWHM error (x, y): together mean -0.2 / +0.4 %, rms 0.3 / 0.4 %, worst 0.6 / 0.7 %
    # (seeds 10 and 11: worst 0.4 / 0.2 % and 0.7 / 0.7 %); each zone alone rms ~3.5 %
    assert np.abs(errors["together"]).max() < 0.01, errors["together"]
    assert np.sqrt((errors["alone"] ** 2).mean()) > 3 * np.sqrt((errors["together"] ** 2).mean())
    assert np.all(np.abs(together.sum(axis=(1, 2)) - 1) < 0.01)
    empty = counts.copy()
    empty[3] = 0.0
    assert np.isnan(deconvolve_zones(sums, empty, n_side=11, size=P_SIZE)[3]).all()


@functools.cache
def _moffat_stack(fwhm: float, beta: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noise-free stack of a Moffat PSF, integrated numerically on a 0.01-pixel grid (outside
    the core + halo family), and the product's truth: (sums, counts, truth)."""
    fine = 10  # fine steps per stack bin
    x = np.arange(-7.0, 7.0 + 1e-9, 1.0 / (O * fine))
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    p = (1 + (x[:, None] ** 2 + x[None, :] ** 2) / alpha**2) ** -beta
    p /= p.sum()
    c = x.size // 2
    binned = uniform_filter(p, fine, mode="constant") * fine**2
    pick = c + (np.arange(P_SIZE) - (P_SIZE - 1) // 2) * fine
    truth = binned[np.ix_(pick, pick)]
    # the stack mean: the pixel integral, averaged over the offsets within a bin
    effective = uniform_filter(uniform_filter(p, O * fine, mode="constant"), fine, mode="constant") * (O * fine) ** 2
    pick = c + (np.arange(S) - (S - 1) // 2) * fine
    counts = np.full((1, S, S), 1000.0)  # as deep as the shared correction of ~100 zones' stacks
    return counts * effective[np.ix_(pick, pick)][None], counts, truth


def test_the_correction_carries_a_psf_outside_the_model():
    sums, counts, truth = _moffat_stack(0.8)
    params = fit_core_halo(sums[0], counts[0], oversampling=O)
    grid = (np.arange(P_SIZE) - (P_SIZE - 1) / 2) / O
    model = core_halo_planes(params, grid, oversampling=O)[0]
    psf = deconvolve_zones(sums, counts, n_side=1, size=P_SIZE)[0]
    fwhm_model, fwhm = (np.array(psf_fwhm_2d(p)) / np.array(psf_fwhm_2d(truth)) - 1 for p in (model, psf))
    # measured: the model alone +6.8 %, with the correction +0.6 % (+1.2 % from 100 samples
    # per bin, as deep as one zone's stack; at FWHM 1.6 pixel +0.1 %)
    assert np.all(fwhm_model > 0.04)
    assert np.all(np.abs(fwhm) < 0.01), fwhm


# --- 3. streaming and bookkeeping ----------------------------------------------------------
def test_halves_add_up_to_the_whole():
    rng = np.random.default_rng(8)
    x, y = _star_grid(rng, 20, 16)
    flux = rng.uniform(500, 2000, x.size)
    zone = rng.integers(0, 2, x.size)
    img = np.full((320, 320), 10.0)
    render_point_sources(img, x, y, flux, np.full(x.size, 0.8), np.full(x.size, 0.8))
    img += rng.normal(0, 1.0, img.shape)
    usable = np.ones(img.shape, bool)
    sky = np.full(x.size, 10.0)

    whole = _accumulators(2)
    n_whole = stack_stars(img, usable, x, y, flux, sky, zone, sums=whole[0], counts=whole[1])
    first, second = _accumulators(2), _accumulators(2)
    h = x.size // 2
    n1 = stack_stars(img, usable, x[:h], y[:h], flux[:h], sky[:h], zone[:h], sums=first[0], counts=first[1])
    n2 = stack_stars(img, usable, x[h:], y[h:], flux[h:], sky[h:], zone[h:], sums=second[0], counts=second[1])
    assert n1 + n2 == n_whole == x.size
    np.testing.assert_array_equal(first[1] + second[1], whole[1])
    # sums only differ by the order of the floating-point additions
    np.testing.assert_allclose(first[0] + second[0], whole[0], rtol=1e-12, atol=1e-15)
    # ... which may stop the conjugate gradients an iteration apart: within their tolerance
    psf = deconvolve_pixel(*whole)
    np.testing.assert_allclose(deconvolve_pixel(first[0] + second[0], first[1] + second[1]), psf, rtol=0,
                               atol=1e-5 * psf.max())


def test_bin_convention_and_skipped_pixels_and_stars():
    img = np.arange(40 * 40, dtype=np.float64).reshape(40, 40)
    usable = np.ones(img.shape, bool)
    x = np.array([10.23, 30.0, 20.0, -50.0, 0.2])
    y = np.array([20.0, 30.0, 10.0, 10.0, 0.4])
    norm = np.array([2.0, 1.0, 1.0, 1.0, 1.0])
    sky = np.array([100.0, 0.0, 0.0, 0.0, 0.0])
    zone = np.array([0, -1, 0, 0, 0])  # star 1 opted out; star 3 lies off the image
    usable[20, 11] = False
    img[21, 10] = np.nan
    sums, counts = _accumulators(1)
    used = stack_stars(img, usable, x, y, norm, sky, zone, sums=sums, counts=counts)
    assert used == 3
    c = (S - 1) // 2
    # star 0: pixel (20, 10) sits at d = (-0.23, 0) -> bins (c, c - 2)
    assert sums[0, c, c - 2] == pytest.approx((img[20, 10] - 100.0) / 2.0)
    assert counts[0, c, c - 2] == 1
    # its unusable neighbour (d = (0.77, 0) -> bin c + 8) and the NaN pixel below are skipped
    assert counts[0, c, c + 8] == 0
    assert counts[0, c + 10, c - 2] == 0
    # star 2 sits on a pixel centre: 121 pixels at whole-pixel offsets
    # star 4 is clipped by the image corner: pixels 0..5 on both axes = 36 pixels
    assert counts.sum() == 121 - 2 + 121 + 36
    assert counts[0, c, c] == 1  # only star 2 has a pixel at d = (0, 0)

    mean, n = effective_psf(sums, counts)
    assert np.isnan(mean[counts == 0]).all()
    np.testing.assert_allclose(mean[counts > 0], sums[counts > 0] / counts[counts > 0])
    np.testing.assert_array_equal(n, counts)

    with pytest.raises(ValueError, match="zone index"):
        stack_stars(img, usable, x, y, norm, sky, np.array([0, 0, 0, 0, 1]), sums=sums, counts=counts)
    with pytest.raises(ValueError, match="C-contiguous float64"):
        stack_stars(img, usable, x, y, norm, sky, zone, sums=sums[:, :-1], counts=counts)
    # a zone with no samples gives NaN, the others are unaffected
    planes = deconvolve_pixel(np.concatenate([sums, sums * 0]), np.concatenate([counts, counts * 0]))
    assert np.isnan(planes[1]).all() and np.isfinite(planes[0]).all()


def test_grid_size():
    assert stack_grid_size(half_size=5, oversampling=10) == 111
    assert stack_grid_size(half_size=3, oversampling=4) == 29
    # odd oversampling: one more bin keeps the grid odd and symmetric
    assert stack_grid_size(half_size=5, oversampling=9) == 101


# --- 4. the fit reproduces the stack -------------------------------------------------------
def _reconvolve(psf: np.ndarray) -> np.ndarray:
    """The pixel-convolved PSF on the stack bins that the cropped product fully covers.

    The pixel top-hat on the 0.1-pixel grid by the trapezoid rule, [0.5, 1 x 9, 0.5], plus
    the +-1/24 Euler-Maclaurin end terms that account for the averaging over each bin.
    """
    e = 1 / 24
    kern = np.array([-e, 0.5, 1 + e] + [1.0] * 7 + [1 + e, 0.5, -e])
    rows = np.apply_along_axis(np.convolve, 1, psf, kern, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kern, mode="valid")


def test_reconvolved_psf_fits_the_stack_within_the_noise():
    sums, counts, sums2, _ = _noisy_stack()
    psf = deconvolve_pixel(sums, counts)
    mean, _ = effective_psf(sums, counts)
    # scatter of the samples about their bin mean, pooled over 3x3 bins (it varies
    # smoothly), so that the error of the mean is known much better than from ~10 samples
    scatter = np.where(counts > 0, sums2 - counts * np.nan_to_num(mean) ** 2, 0.0)
    dof = np.maximum(counts - 1, 0)
    var = uniform_filter(scatter, size=(1, 3, 3)) / np.maximum(uniform_filter(dof, size=(1, 3, 3)), 1e-9)
    lo = (S - P_SIZE) // 2 + 6  # the kernel's half-width
    inner = np.s_[lo:S - lo, lo:S - lo]
    for z in range(len(ZONE_SIGMAS)):
        model = _reconvolve(psf[z])
        n = counts[z][inner]
        good = n >= 5
        chi = (model - mean[z][inner])[good] / np.sqrt(var[z][inner][good] / n[good])
        # measured: rms 0.98-0.99, |mean| < 0.02 over ~7700 bins per zone
        assert good.sum() > 7000
        assert 0.85 < np.sqrt(np.mean(chi**2)) < 1.05
        assert abs(chi.mean()) < 0.05
    # noise free: the stack is the model to a small fraction of its peak
    sums, counts = _noise_free_stack(0.70, 0.75)
    psf = deconvolve_pixel(sums, counts)[0]
    mean = effective_psf(sums, counts)[0][0][inner]
    # measured: 0.32 % of the peak (the spread of the offsets within each bin)
    assert np.abs(_reconvolve(psf) - mean).max() < 5e-3 * mean.max()


# --- 5. FWHM measurement ------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 0.7, 1.3])
@pytest.mark.parametrize("offset", [0.0, 0.037])
def test_fwhm_of_a_gaussian(sigma, offset):
    t = (np.arange(P_SIZE) - (P_SIZE - 1) / 2) / O
    gx = np.exp(-0.5 * ((t - offset) / sigma) ** 2)
    gy = np.exp(-0.5 * ((t + offset) / (1.2 * sigma)) ** 2)
    fx, fy = psf_fwhm_2d(np.outer(gy, gx), oversampling=O)
    # measured: < 2e-5 relative
    assert fx == pytest.approx(FWHM_PER_SIGMA * sigma, rel=1e-4)
    assert fy == pytest.approx(FWHM_PER_SIGMA * 1.2 * sigma, rel=1e-4)


def _fwhm_of_binned_profile(along: float, across: float) -> float:
    """FWHM along one axis of the core + wing profile integrated over 1/O-pixel bins, through
    the centre bin of the other axis (widths ``along``, ``across``), by root finding."""
    h = 0.5 / O

    def bin_integral(u: float, s: float) -> float:
        return ndtr((u + h) / s) - ndtr((u - h) / s)

    parts = [(1 - WING_FRACTION, 1.0), (WING_FRACTION, WING_SCALE)]

    def prof(u: float) -> float:
        return sum(f * bin_integral(0.0, across * k) * bin_integral(u, along * k) for f, k in parts)

    return 2 * brentq(lambda u: prof(u) - 0.5 * prof(0.0), 0.0, 10 * along, xtol=1e-12)


@pytest.mark.parametrize("sigma", [0.65, 1.3])
def test_fwhm_of_the_optics_psf(sigma):
    fx, fy = psf_fwhm_2d(psf_plane(sigma, 1.1 * sigma, size=P_SIZE, oversampling=O))
    # measured: < 1e-5 relative
    assert fx == pytest.approx(_fwhm_of_binned_profile(sigma, 1.1 * sigma), rel=1e-4)
    assert fy == pytest.approx(_fwhm_of_binned_profile(1.1 * sigma, sigma), rel=1e-4)
    # a 0.1 % wider PSF measures 0.1 % wider (less the fixed bin width's share)
    wider = psf_fwhm_2d(psf_plane(1.001 * sigma, 1.1 * 1.001 * sigma, size=P_SIZE, oversampling=O))
    np.testing.assert_allclose(np.array(wider) / np.array([fx, fy]), 1.001, atol=3e-5)
