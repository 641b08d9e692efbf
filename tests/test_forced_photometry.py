"""Forced PSF photometry kernel against injected truth, photutils and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from sphx.kernels.photometry import PHOT_STATUS, forced_photometry, template_bank
from sphx.simulate.optics import psf_plane, render_point_sources

SIGMA = 0.4  # core width [native pixel]: undersampled, as SPHEREx


def _psf_plane(sigma: float, size: int = 101, over: int = 10) -> np.ndarray:
    return psf_plane(sigma, sigma, size=size, oversampling=over)


@pytest.fixture(scope="module")
def bank():
    return template_bank(_psf_plane(SIGMA)[None], oversampling=10)


def _scene(rng, n, x, y, flux):
    image = np.zeros((n, n))
    render_point_sources(image, x, y, flux, np.full(x.size, SIGMA), np.full(x.size, SIGMA))
    return image


def _fit(image, x, y, bank, **kw):
    n = image.shape[0]
    return forced_photometry(image, np.ones((n, n)), np.zeros((n, n), np.uint32), x, y,
                             np.zeros(x.size, np.int64), bank, **kw)


def test_templates_are_block_sums_and_noiseless_fluxes_exact(bank):
    psf = _psf_plane(SIGMA)
    # at an aligned offset (m = 0: the source at n + 0.05), native pixel d holds the
    # oversampled bins k = 10 d + 45 .. 10 d + 54
    t = bank.templates[0, 1, 1]
    for d in (-2, 0, 1):
        ky = kx = slice(10 * d + 45, 10 * d + 55)
        assert t[d - bank.d_min, d - bank.d_min] == pytest.approx(psf[ky, kx].sum(), rel=1e-12)
    assert np.allclose(bank.templates.sum(axis=(-1, -2)), psf.sum())
    # against the simulator's analytic pixel integrals at random sub-pixel positions
    rng = np.random.default_rng(0)
    x, y = 20 + 30 * np.arange(36) % 180 + rng.uniform(0, 1, 36), 20 + 30 * (np.arange(36) // 6) + rng.uniform(0, 1, 36)
    flux = rng.uniform(100, 1000, 36)
    res = _fit(_scene(rng, 220, x, y, flux), x, y, bank)
    assert np.max(np.abs(res["flux"] / flux - 1)) < 2e-4  # linear interpolation: 5e-3


def test_isolated_sources_have_unit_pulls():
    rng = np.random.default_rng(2)
    bank = template_bank(_psf_plane(SIGMA)[None], oversampling=10)
    n, count = 400, 900
    x, y = rng.uniform(8, n - 8, count), rng.uniform(8, n - 8, count)
    flux = 10 ** rng.uniform(1.3, 3.5, count)
    truth = _scene(rng, n, x, y, flux)
    dist, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    isolated = dist[:, 1] > 8
    pulls, chi2 = [], []
    for _ in range(40):  # the median's own scatter is ~0.012 over 40 noise draws
        res = _fit(truth + rng.normal(0, 1, truth.shape), x, y, bank)
        pulls.append(((res["flux"] - flux) / res["flux_error"])[isolated])
        chi2.append(np.nanmedian(res["chi2"]))
    pulls = np.concatenate(pulls)
    assert pulls.size > 10000
    assert abs(np.std(pulls) - 1) < 0.05
    assert abs(np.median(pulls)) < 0.05
    assert 0.9 < np.median(chi2) < 1.1


def test_blended_pairs_need_the_full_covariance(bank):
    rng = np.random.default_rng(3)
    m = 300
    cx = 16 + (np.arange(m) % 20) * 24.0 + rng.uniform(-2, 2, m)
    cy = 16 + (np.arange(m) // 20) * 24.0 + rng.uniform(-2, 2, m)
    angle, sep = rng.uniform(0, 2 * np.pi, m), rng.uniform(0.3, 1.0, m)  # closer than a pixel
    x, y = np.r_[cx, cx + sep * np.cos(angle)], np.r_[cy, cy + sep * np.sin(angle)]
    flux = np.r_[np.full(m, 300.0), np.full(m, 200.0)]
    truth = _scene(rng, 496, x, y, flux)
    full, diag = [], []
    for _ in range(6):
        res = _fit(truth + rng.normal(0, 1, truth.shape), x, y, bank)
        full.append((res["flux"] - flux) / res["flux_error"])
        diag.append((res["flux"] - flux) / res["flux_error_diag"])
    assert np.all(res["n_blend"] == 1)
    assert np.std(full) <= 1.1
    assert np.std(diag) > 1.3  # the Fisher diagonal underestimates blended errors
    # the partner is reported, with a negative covariance (fluxes trade off)
    assert np.all(res["neighbour"][:m, 0] == np.arange(m, 2 * m))
    assert np.all(res["neighbour_cov"][:m, 0] < 0)


def test_agrees_with_photutils_psf_photometry(bank):
    from astropy.table import Table
    from photutils.psf import ImagePSF, PSFPhotometry

    rng = np.random.default_rng(4)
    n = 160
    g = np.arange(36)
    x, y = 15 + 25 * (g % 6) + rng.uniform(0, 1, 36), 15 + 25 * (g // 6) + rng.uniform(0, 1, 36)
    flux = rng.uniform(2e3, 2e4, 36)
    image = _scene(rng, n, x, y, flux) + rng.normal(0, 1, (n, n))
    ours = _fit(image, x, y, bank)
    # photutils wants the effective PSF: each sample the native-pixel integral centred
    # there, i.e. the oversampled cube summed over 10 x 10 boxes (centre 50 - 4.5)
    psf = _psf_plane(SIGMA)
    c = np.cumsum(np.cumsum(np.pad(psf, ((1, 0), (1, 0))), 0), 1)
    epsf = c[10:, 10:] - c[:-10, 10:] - c[10:, :-10] + c[:-10, :-10]
    model = ImagePSF(epsf, oversampling=10, origin=(45.5, 45.5))
    model.x_0.fixed = True
    model.y_0.fixed = True
    phot = PSFPhotometry(model, fit_shape=(15, 15), aperture_radius=3)
    table = phot(image, error=np.ones((n, n)), init_params=Table({"x_0": x, "y_0": y, "flux": flux}))
    theirs = np.asarray(table["flux_fit"])
    assert np.max(np.abs(ours["flux"] / theirs - 1)) < 0.005
    assert np.allclose(np.asarray(table["x_fit"]), x)  # positions stayed fixed


def test_bad_input_gives_flagged_measurements(bank):
    rng = np.random.default_rng(5)
    n = 60
    x = np.array([30.2, -5.0, 2.0, 40.3, 15.1, np.nan, 45.0])
    y = np.array([30.4, 10.0, 30.0, 12.6, 45.5, 5.0, 45.0])
    flux = np.full(x.size, 500.0)
    image = _scene(rng, n, np.nan_to_num(x), y, flux) + rng.normal(0, 1, (n, n))
    weight = np.ones((n, n))
    flags = np.zeros((n, n), np.uint32)
    image[12:14, 40:42] = np.nan  # NaN pixels under source 3
    flags[45, 15] = 1 << 10  # HOT under source 4
    weight[40:51, 40:51] = 0.0  # source 6 entirely masked
    zone = np.zeros(x.size, np.int64)
    zone[0] = -1  # no PSF zone for source 0
    res = forced_photometry(image, weight, flags, x, y, zone, bank)
    status = res["status"]
    assert status[0] & PHOT_STATUS["NO_PSF"] and np.isnan(res["flux"][0])
    assert status[1] & PHOT_STATUS["OUTSIDE"] and np.isnan(res["flux"][1])
    assert status[5] & PHOT_STATUS["OUTSIDE"] and np.isnan(res["flux"][5])
    assert status[2] & PHOT_STATUS["EDGE"] and np.isfinite(res["flux"][2])
    assert status[3] & PHOT_STATUS["MASKED_PIXELS"] and status[3] & PHOT_STATUS["CENTER_MASKED"]
    assert res["flux"][3] == pytest.approx(500, rel=0.1)
    assert res["flags"][4] & (1 << 10)
    assert status[6] & PHOT_STATUS["NO_DATA"] and np.isnan(res["flux"][6])
    with pytest.raises(ValueError, match="weight has shape"):
        forced_photometry(image, weight[:10], flags, x, y, zone, bank)
    with pytest.raises(ValueError, match="zone index 5"):
        forced_photometry(image, weight, flags, x, y, np.full(x.size, 5), bank)


def test_local_backgrounds_match_photutils_on_each_cutout():
    from photutils.background import Background2D, SExtractorBackground, StdBackgroundRMS

    from sphx.kernels.photometry import local_backgrounds

    rng = np.random.default_rng(6)
    n = 80
    image = 3.0 + 0.02 * np.arange(n)[None, :] + rng.normal(0, 1, (n, n))
    mask = rng.random((n, n)) < 0.3  # source pixels
    image[mask] += 50.0
    x, y = rng.uniform(8, n - 9, 20), rng.uniform(8, n - 9, 20)
    ours, ours_var = local_backgrounds(image, mask, x, y, half_size=7)
    assert np.all((ours_var > 0.5 / 225) & (ours_var < 5 / 100))  # ~k / n for unit noise
    for k in range(x.size):
        cx, cy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        window = (slice(cy - 7, cy + 8), slice(cx - 7, cx + 8))
        bkg = Background2D(image[window], (15, 15), mask=mask[window], filter_size=1, exclude_percentile=99,
                           bkg_estimator=SExtractorBackground(), bkg_rms_estimator=StdBackgroundRMS())
        assert ours[k] == pytest.approx(float(bkg.background_mesh[0, 0]), rel=1e-6)
    # the pedestal of a cutout is subtracted before its fit
    bank = template_bank(_psf_plane(SIGMA)[None], oversampling=10)
    xs, ys = np.array([30.3, 60.7]), np.array([40.2, 20.6])
    scene = _scene(rng, 96, xs, ys, np.array([400.0, 400.0])) + 5.0
    res = forced_photometry(scene, np.ones((96, 96)), np.zeros((96, 96), np.uint32), xs, ys, np.zeros(2, np.int64),
                            bank, pedestal=np.array([5.0, 5.0]))
    assert np.allclose(res["flux"], 400.0, rtol=1e-3)
    with pytest.raises(ValueError, match="pedestal has shape"):
        forced_photometry(scene, np.ones((96, 96)), np.zeros((96, 96), np.uint32), xs, ys, np.zeros(2, np.int64),
                          bank, pedestal=np.zeros(3))
