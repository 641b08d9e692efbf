"""The simulator's instrument model: ramp noise, non-linearity, persistence, optics, detectors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from sphx import flags
from sphx.instrument import SPHEREX, SPHEREX_SMALL
from sphx.kernels import persistence
from sphx.kernels.nonlinearity import full_well, measured_rate, nonlinear_charge, true_rate
from sphx.kernels.ramp import ols_weights, slope_variance
from sphx.simulate import optics
from sphx.simulate.config import DetectorConfig
from sphx.simulate.detector import make_detector
from sphx.wcs import focal_plane_wcs

DT = SPHEREX.frame_time
FIRST, LAST = SPHEREX.n_discarded_frames, SPHEREX.n_frames - 1


# --- sample-up-the-ramp --------------------------------------------------------------
@pytest.mark.parametrize(("rate", "read_noise"), [(0.5, 10.0), (20.0, 12.0), (300.0, 8.0)])
def test_slope_variance_matches_monte_carlo_ramps(rate, read_noise):
    rng = np.random.default_rng(1)
    n_ramps = 40000
    t = np.arange(SPHEREX.n_frames) * DT
    q = np.cumsum(rng.poisson(rate * DT, (n_ramps, t.size)), axis=1).astype(float)
    reads = q + rng.normal(0, read_noise, q.shape)
    w = ols_weights(FIRST, LAST, frame_time=DT)
    slopes = reads[:, FIRST:] @ w
    predicted = slope_variance(rate, read_noise, n_frames=LAST - FIRST + 1, frame_time=DT)
    assert slopes.mean() == pytest.approx(rate, abs=4 * np.sqrt(predicted / n_ramps))
    # the variance of a variance estimate from N samples is 2 var^2 / N: 0.7 % here
    assert slopes.var() / predicted == pytest.approx(1.0, abs=0.025)


def test_ols_weights_recover_a_line():
    w = ols_weights(FIRST, LAST, frame_time=DT)
    t = np.arange(FIRST, LAST + 1) * DT
    assert w @ (3.0 + 7.5 * t) == pytest.approx(7.5)
    with pytest.raises(ValueError, match="two frames"):
        ols_weights(5, 5, frame_time=DT)


# --- non-linearity --------------------------------------------------------------------
PARS = {"q_nl": 8000.0, "b1": -8e-6, "b2": 6e-11, "b3": -5e-16}


def _ramp_slope(rate, limit=np.inf):
    t = np.arange(FIRST, LAST + 1) * DT
    q = nonlinear_charge(rate * t, PARS["q_nl"], PARS["b1"], PARS["b2"], PARS["b3"])
    ok = q < limit
    stop = np.argmin(ok) if not ok.all() else ok.size
    return (np.polyfit(t[:stop], q[:stop], 1)[0] if stop >= 2 else np.nan), stop


def test_nonlinearity_is_identity_below_onset_and_compresses_above():
    rates = np.array([[0.0, 10.0, 60.0, 100.0, 200.0, 250.0]])
    m, used = measured_rate(rates, **{k: np.full(rates.shape, v) for k, v in PARS.items()})
    linear = rates * LAST * DT <= PARS["q_nl"]
    assert np.array_equal(m[linear], rates[linear])
    assert np.all(m[~linear] < rates[~linear])
    assert np.all(used == LAST - FIRST + 1)
    for r, got in zip(rates.ravel(), m.ravel(), strict=True):
        assert got == pytest.approx(_ramp_slope(r)[0], rel=1e-10)


def test_reported_charge_saturates_at_the_full_well():
    q = np.linspace(0.0, 3e5, 3001)
    g = nonlinear_charge(q, *PARS.values())
    assert np.all(np.diff(g) >= 0) and g[0] == 0.0
    d = np.linspace(0.0, 2e5, 400001)
    peak = PARS["q_nl"] + d * (1 + d * (PARS["b1"] + d * (PARS["b2"] + d * PARS["b3"])))
    assert float(full_well(*PARS.values())) == pytest.approx(peak.max(), rel=1e-9)
    assert g[-1] == pytest.approx(peak.max(), rel=1e-9)


def test_nonlinearity_inverts_exactly():
    rates = np.linspace(1.0, 240.0, 200)[None, :]
    pars = {k: np.full(rates.shape, v) for k, v in PARS.items()}
    m, _ = measured_rate(rates, **pars)
    assert np.allclose(true_rate(m, **pars), rates, rtol=1e-9)


def test_overflow_truncates_the_fit():
    limit = 20000.0
    rates = np.array([[150.0, 400.0, 5000.0, 1e6]])
    pars = {k: np.full(rates.shape, v) for k, v in PARS.items()}
    m, used = measured_rate(rates, **pars, limit=limit)
    for r, got, n in zip(rates.ravel(), m.ravel(), used.ravel(), strict=True):
        expect, stop = _ramp_slope(r, limit)
        assert n == stop
        if n >= 2:
            assert got == pytest.approx(expect, rel=1e-9)
        else:
            assert np.isnan(got)
    assert used[0, 0] == LAST - FIRST + 1 and used[0, 1] < LAST - FIRST + 1


# --- persistence ------------------------------------------------------------------------
def test_persistence_decays_as_injected():
    taus = np.array([60.0, 600.0, 6000.0])
    fractions = np.array([5e-4, 3e-4, 2e-4])
    density = np.array([[1.0, 2.0]])
    state = np.zeros((3, 1, 2))
    texp, gap = 113.58, 7.0
    assert np.all(persistence.release(state, gap=gap, exposure=texp, taus=taus) == 0)
    q0 = np.array([[30000.0, 30000.0]])
    persistence.capture(state, q0, fractions=fractions, density=density)
    assert np.allclose(state[:, 0, 1], fractions * 2 * 30000)
    since = 0.0
    previous = np.inf
    for _ in range(6):
        current = persistence.release(state, gap=gap, exposure=texp, taus=taus)
        expected = (fractions[:, None] * density[0] * q0[0] * np.exp(-(since + gap) / taus[:, None])
                    * (1 - np.exp(-texp / taus[:, None]))).sum(axis=0) / texp
        assert np.allclose(current[0], expected, rtol=1e-12)
        assert np.all(current[0] < previous)
        previous = current[0]
        since += gap + texp
        persistence.capture(state, np.zeros((1, 2)), fractions=fractions, density=density)  # darkness
    with pytest.raises(ValueError, match="time order"):
        persistence.release(state, gap=-1.0, exposure=texp, taus=taus)


# --- optics -------------------------------------------------------------------------------
def test_psf_integrates_to_one_at_every_zone_and_wavelength():
    for band in SPHEREX.band_numbers:
        cwave, _ = optics.spectral_maps(SPHEREX, band)
        cube = optics.psf_cube(SPHEREX, cwave)
        assert cube.shape == (121, 101, 101)
        assert np.allclose(cube.sum(axis=(1, 2)), 1.0, atol=1e-4)
        # the PSF sits in the stamp centre (CRPIX 51 in the archive files)
        yy, xx = np.mgrid[0:101, 0:101]
        total = cube.sum(axis=(1, 2), dtype=np.float64)
        assert np.allclose((cube * xx).sum(axis=(1, 2)) / total, 50.0, atol=1e-5)
        assert np.allclose((cube * yy).sum(axis=(1, 2)) / total, 50.0, atol=1e-5)


@pytest.mark.parametrize(("lam", "fwhm"), [(0.75, 4.61), (4.81, 6.73)])
def test_psf_fwhm_matches_the_prelaunch_values(lam, fwhm):
    assert optics.psf_fwhm(lam) == pytest.approx(fwhm, abs=0.01)
    # the FWHM of the rendered two-Gaussian profile, measured on a fine grid at the centre
    sx, _ = optics.psf_sigmas(lam, 1019.5, 1019.5, instrument=SPHEREX)
    r = np.linspace(0, 10, 100001) * sx
    f, s = optics.WING_FRACTION, optics.WING_SCALE
    prof = (1 - f) * np.exp(-0.5 * (r / sx) ** 2) + f / s**2 * np.exp(-0.5 * (r / (s * sx)) ** 2)
    measured = 2 * r[np.argmin(np.abs(prof - prof[0] / 2))] * SPHEREX.pixel_scale
    assert measured == pytest.approx(fwhm, abs=0.01)


def test_psf_grows_toward_the_field_edges():
    c = SPHEREX.n_active / 2 - 0.5
    sx0, sy0 = optics.psf_sigmas(2.0, c, c, instrument=SPHEREX)
    sx1, sy1 = optics.psf_sigmas(2.0, 0.0, 2039.0, instrument=SPHEREX)
    assert sx1 / sx0 == pytest.approx(1.1, abs=1e-3) and sy1 / sy0 == pytest.approx(1.1, abs=1e-3)


def test_rendered_source_conserves_flux_and_matches_direct_integration():
    image = np.zeros((40, 40))
    optics.render_point_sources(image, np.array([19.3]), np.array([20.6]), np.array([1000.0]),
                                np.array([0.9]), np.array([1.1]))
    assert image.sum() == pytest.approx(1000.0, rel=1e-6)
    f, s = optics.WING_FRACTION, optics.WING_SCALE

    def psf(y, x):
        g = lambda d, sig: np.exp(-0.5 * (d / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)
        return 1000.0 * ((1 - f) * g(x - 19.3, 0.9) * g(y - 20.6, 1.1) + f * g(x - 19.3, 0.9 * s) * g(y - 20.6, 1.1 * s))

    for j, i in [(20, 19), (21, 20), (24, 15)]:
        direct, _ = integrate.dblquad(psf, i - 0.5, i + 0.5, j - 0.5, j + 0.5)
        assert image[j, i] == pytest.approx(direct, rel=1e-6)


def test_spectral_maps_follow_the_linear_variable_filter():
    inst = SPHEREX
    for band in inst.band_numbers:
        b = inst.band(band)
        cwave, cband = optics.spectral_maps(inst, band)
        centre = cwave[:, inst.n_active // 2]
        assert np.all(np.diff(centre) < 0)  # longest wavelength at the bottom
        assert centre[0] <= b.wavelength_max and centre[-1] >= b.wavelength_min
        assert centre[0] == pytest.approx(b.wavelength_max, rel=1e-3)
        assert np.allclose(cband, cwave / b.resolving_power, rtol=1e-6)
        # iso-wavelength lines are bowed: the edge column reaches a row's wavelength ~12 rows earlier
        row = 1000
        edge_row = np.argmin(np.abs(cwave[:, 0] - cwave[row, inst.n_active // 2]))
        assert row - edge_row == pytest.approx(optics.LVF_CURVATURE * inst.n_active, abs=1.5)


def test_focal_plane_geometry_and_distortion():
    inst = SPHEREX
    for band in inst.band_numbers:
        fp = optics.focal_plane(inst, band)
        w = focal_plane_wcs(ra=120.0, dec=-30.0, pa=20.0, offset=fp.offset, rotation=fp.rotation,
                            pixel_scale=inst.pixel_scale, n_pixels=inst.n_active, sip=fp.sip)
        centre = w.pixel_to_world(1019.5, 1019.5)
        from astropy.coordinates import SkyCoord

        sep = centre.separation(SkyCoord(120.0, -30.0, unit="deg")).deg
        # offsets are gnomonic (tangent-plane) coordinates about the boresight
        assert sep == pytest.approx(np.rad2deg(np.arctan(np.deg2rad(np.hypot(*fp.offset)))), rel=1e-6)
        # the SIP inverse (AP, BP) agrees with the forward distortion to 0.01 pixel
        g = np.linspace(0, inst.n_active - 1, 15)
        xx, yy = np.meshgrid(g, g)
        ra, dec = w.all_pix2world(xx, yy, 0)
        fx, fy = w.wcs_world2pix(ra, dec, 0)  # linear part only
        big_u, big_v = fx - (w.wcs.crpix[0] - 1), fy - (w.wcs.crpix[1] - 1)

        def poly(c, big_u=big_u, big_v=big_v):
            return sum(c[p, q] * big_u**p * big_v**q for p in range(c.shape[0]) for q in range(c.shape[1]))

        u = big_u + poly(fp.sip["ap"]) + w.wcs.crpix[0] - 1
        v = big_v + poly(fp.sip["bp"]) + w.wcs.crpix[1] - 1
        assert np.max(np.hypot(u - xx, v - yy)) < 0.01
        # the distortion is a pixel or two at the corners
        assert 0.3 < np.max(np.hypot(fx - xx, fy - yy)) < 4
    # dichroic partners see the same sky to a few arcsec
    d1, d4 = optics.focal_plane(inst, 1), optics.focal_plane(inst, 4)
    assert np.hypot(d1.offset[0] - d4.offset[0], d1.offset[1] - d4.offset[1]) * 3600 < 5


def test_solid_angle_map_matches_pixel_corner_polygons():
    inst = SPHEREX_SMALL
    fp = optics.focal_plane(inst, 2)
    w = focal_plane_wcs(ra=30.0, dec=60.0, pa=0.0, offset=fp.offset, rotation=fp.rotation,
                        pixel_scale=inst.pixel_scale, n_pixels=inst.n_active, sip=fp.sip)
    sapm = optics.solid_angle_map(w, inst.n_active)
    assert np.median(sapm) == pytest.approx(inst.pixel_scale**2, rel=2e-3)
    for y, x in [(0, 0), (120, 77), (247, 247)]:
        corners = np.array([[x - 0.5, y - 0.5], [x + 0.5, y - 0.5], [x + 0.5, y + 0.5], [x - 0.5, y + 0.5]])
        ra, dec = w.all_pix2world(corners[:, 0], corners[:, 1], 0)
        # planar area in a tangent plane at the pixel (small pixels: exact to ~1e-8)
        e = (ra - ra.mean()) * np.cos(np.deg2rad(dec.mean())) * 3600
        nrt = (dec - dec.mean()) * 3600
        area = 0.5 * abs(np.dot(e, np.roll(nrt, 1)) - np.dot(nrt, np.roll(e, 1)))
        assert sapm[y, x] == pytest.approx(area, rel=1e-4)


# --- detectors ---------------------------------------------------------------------------
def test_detector_properties_and_masks():
    cfg = DetectorConfig(hot_fraction=0.002, cold_fraction=0.002, nonfunc_fraction=0.003)
    det = make_detector(SPHEREX_SMALL, 3, cfg, np.random.default_rng(5))
    n = SPHEREX_SMALL.n_active**2
    for name, frac in (("HOT", 0.002), ("COLD", 0.002), ("NONFUNC", 0.003)):
        count = np.count_nonzero(det.masks & np.uint32(flags.Flag[name]))
        assert abs(count - frac * n) < 5 * np.sqrt(frac * n)
    hot = (det.masks & np.uint32(flags.Flag.HOT)) != 0
    assert det.dark[hot].min() > 10 * np.median(det.dark)
    assert np.all(det.flat[det.dead] == 0)
    dichroic = (det.masks & np.uint32(flags.Flag.DICHROIC)) != 0
    assert dichroic.any() and det.flat[dichroic].max() < 0.5 * 1.1
    assert not (make_detector(SPHEREX_SMALL, 2, cfg, np.random.default_rng(5)).masks & np.uint32(flags.Flag.DICHROIC)).any()
    # Qmax is where the slope of g falls to 0.7, beyond the onset
    d = det.q_max.astype(float) - det.q_nl
    slope = 1 + d * (2 * det.b1 + d * (3 * det.b2 + d * 4 * det.b3))
    assert np.all(d > 0) and np.allclose(slope, 0.7, atol=1e-3)
    assert det.gain.shape == (32,) and np.all((det.gain >= 1.0) & (det.gain <= 1.4))
    assert det.fullsample.shape[1] == 2 and len(det.fullsample) >= 4


@pytest.mark.parametrize("overflow_adu", [25000.0, 40000.0])
def test_every_pixel_trips_the_overflow_before_its_full_well(overflow_adu):
    # A ramp that reaches its full well and is not stopped by the on-board overflow
    # first gives a slope that passes for a fainter, valid one. The previous draws (the
    # polynomial bending back past its turnover, full wells from 28 000 electrons) left
    # 1.4 % of the truly non-linear pixels of a survey unflagged, at -3600 to +0.99 times
    # their value. 40 000 adu (56 000 electrons at the highest gain) is above every drawn
    # full well: there the non-linearity is stretched.
    cfg = DetectorConfig(overflow_adu=overflow_adu)
    det = make_detector(SPHEREX_SMALL, 1, cfg, np.random.default_rng(2))
    limit = np.full(det.q_nl.shape, overflow_adu * det.gain.max())
    pars = (det.q_nl, det.b1, det.b2, det.b3)
    # the polynomial's largest value past the onset, on a grid of 100 electrons
    b = [np.asarray(a, np.float64)[..., None] for a in pars[1:]]
    full = np.zeros(det.q_nl.shape)
    for d in np.split(np.arange(0.0, 2e5, 100.0), 20):
        full = np.maximum(full, (d * (1 + d * (b[0] + d * (b[1] + d * b[2])))).max(axis=-1))
    assert np.all(det.q_nl + full > limit)
    rates = np.geomspace(10.0, 1e5, 60)
    slopes = np.array([measured_rate(np.full(det.q_nl.shape, r), *pars, limit=limit) for r in rates])
    whole = slopes[:, 1] == LAST - FIRST + 1  # not flagged OVERFLOW
    assert whole[0].all() and not whole[-1].any() and np.all(whole[1:] <= whole[:-1])
    # every slope fitted over the whole ramp belongs to exactly one current
    assert np.all(np.diff(slopes[:, 0], axis=0)[whole[1:]] > 0)
