"""Create Source Mask against the simulator's truth: recall, units, laziness, errors."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import xarray as xr
from scipy.special import erf

from sphx import flags, open_repository
from sphx.astrometry.catalog import catalog_array, interpolate_flux, pixels_at_epoch
from sphx.errors import CalibrationError, ConfigError, StepError
from sphx.kernels.ramp import slope_variance
from sphx.level2.source_mask import PROFILE_STEP, create_source_mask, pixel_solid_angle, psf_envelopes
from sphx.simulate.optics import WING_FRACTION, WING_SCALE, psf_sigmas
from sphx.testing import raise_if_dask_computes
from sphx.wcs import cube_wcs

SOURCE = int(flags.Flag.SOURCE)
PRODUCTS = ("spectral_wcs", "average_psf", "solid_angle_pixel_map")
THRESHOLD = 0.5
NOISE = 0.02  # [MJy / sr] flat noise of the single-image tests
DISC_1E5 = 24  # pixels flagged around a 1e5 uJy source there (as test_disc_radius_matches_the_psf_profile finds)


@pytest.fixture(scope="module")
def repo(survey_path):
    return open_repository(survey_path)


@pytest.fixture(scope="module")
def calib(repo):
    return {name: repo.open_calibration(name).compute() for name in PRODUCTS}


@pytest.fixture(scope="module")
def truth(repo):
    return repo.open_level("truth").compute()


@pytest.fixture(scope="module")
def l2(repo, truth):
    """An L2-like cube: true sky plus ramp noise, its VARIANCE [(MJy/sr)^2], truth FLAGS, ZODI and WCS."""
    inst = repo.instrument
    gain = repo.open_calibration("abs_gain_matrix")["ABS_GAIN"].values[:, None]  # MJy s / (electron sr)
    current = truth["IMAGE"].values / gain + repo.open_calibration("dark")["DARK"].values[:, None]  # e/s
    read_noise = np.broadcast_to(repo.open_calibration("readnoise_pars")["READNOISE"].values[:, None], current.shape)
    ok = np.isfinite(current)
    var_e = np.full(current.shape, np.nan)
    var_e[ok] = slope_variance(np.maximum(current[ok], 0.0), read_noise[ok].astype(np.float64),
                               n_frames=inst.n_frames - inst.n_discarded_frames, frame_time=inst.frame_time)
    variance = (var_e * gain**2).astype(np.float32)
    noise = np.random.default_rng(5).standard_normal(variance.shape).astype(np.float32) * np.sqrt(variance)
    ds = truth.drop_vars(["PERSIST"])
    ds["IMAGE"] = (truth["IMAGE"] + noise).assign_attrs(truth["IMAGE"].attrs)
    ds["VARIANCE"] = (truth["IMAGE"].dims, variance, {"units": "MJy2 / sr2"})
    return ds.chunk({"band": 1, "obs": 1})


@pytest.fixture(scope="module")
def refcat(repo):
    return repo.read_table("refcat")


@pytest.fixture(scope="module")
def masked(l2, calib, refcat):
    return create_source_mask(l2, calib=calib, tables={"refcat": refcat}, threshold=THRESHOLD).compute()


@pytest.fixture(scope="module")
def single(l2):
    """One image (band 1, first exposure) with a flat noise of NOISE and no flags."""
    ds = l2.isel(band=[0], obs=[0]).compute()
    ds["VARIANCE"] = xr.full_like(ds["VARIANCE"], NOISE**2)
    ds["FLAGS"] = xr.zeros_like(ds["FLAGS"])
    return ds


def _table(ra, dec, flux, *, pmra=0.0, pmdec=0.0, ref_epoch=2000.0) -> pa.Table:
    """A catalogue with the refcat columns the step reads: flat F_nu [uJy] at the four points."""
    ra, dec = np.atleast_1d(np.asarray(ra, np.float64)), np.atleast_1d(np.asarray(dec, np.float64))
    n = ra.size
    cols = {"source_id": np.arange(n), "ra": ra, "dec": dec, "ref_epoch": np.full(n, ref_epoch),
            "pmra": np.full(n, pmra), "pmdec": np.full(n, pmdec)}
    cols.update({k: np.full(n, flux, np.float32) for k in ("flux_1um", "flux_2um", "flux_3um", "flux_4p5um")})
    return pa.table(cols)


def _hit(ds: xr.Dataset) -> np.ndarray:
    return (np.asarray(ds["FLAGS"].values) & SOURCE) != 0


def _disc_pixels(x: float, y: float, r: float) -> int:
    """Number of pixel centres within ``r`` of ``(x, y)``, far from the image edges."""
    g = np.arange(-20, 21)
    return int((np.hypot(np.round(x) + g[None, :] - x, np.round(y) + g[:, None] - y) <= r).sum())


def _sigma(ds: xr.Dataset) -> np.ndarray:
    """sqrt of the median VARIANCE of the good pixels of each image [MJy / sr]."""
    bad = flags.test_flag(ds["FLAGS"].values, flags.DEFAULT_BAD)
    return np.sqrt(np.nanmedian(np.where(bad, np.nan, ds["VARIANCE"].values), axis=(-2, -1)))


# --- against the simulation truth ------------------------------------------------------------
def test_recall_of_the_true_source_signal(truth, l2, masked):
    # truth IMAGE - ZODI is exactly the sky of the rendered sources [MJy/sr]
    signal = (truth["IMAGE"] - truth["ZODI"]).values
    above = signal > THRESHOLD * _sigma(l2)[..., None, None]
    hit = _hit(masked)
    per_image = (hit & above).sum(axis=(-2, -1)) / above.sum(axis=(-2, -1))
    recall = (hit & above).sum() / above.sum()
    print(f"recall {recall:.5f} of {above.sum()} pixels; worst image {per_image.min():.5f}")
    assert above.sum() > 20_000  # 27313 pixels above 0.5 sigma in the 24 images
    # measured 0.99890 (30 pixels missed; worst image 0.99678). They lie just outside the
    # 1.5-pixel discs of sources whose band flux exceeds the catalogue interpolation
    # (emission lines: up to 3.7x) or next to a second source whose light adds up.
    assert recall >= 0.998
    assert per_image.min() >= 0.99


def test_flagged_fraction_is_recorded_and_sensible(truth, l2, masked):
    hit = _hit(masked)
    fraction = masked["source_fraction"].values
    np.testing.assert_array_equal(fraction, hit.mean(axis=(-2, -1)))
    # every catalogued source flags at least a 1.5-pixel disc: 8-9 % of the pixels at this
    # depth (real images, deeper catalogues: 40-70 %), well above the 1-3 % that truly
    # carry 0.5 sigma of source light
    assert 0.06 < fraction.min() and fraction.max() < 0.12  # measured 0.080 .. 0.091
    above = (truth["IMAGE"] - truth["ZODI"]).values > THRESHOLD * _sigma(l2)[..., None, None]
    assert np.all(fraction > 2.5 * above.mean(axis=(-2, -1)))
    # only SOURCE changes
    np.testing.assert_array_equal(masked["FLAGS"].values & ~np.uint32(SOURCE), l2["FLAGS"].values)
    assert masked["FLAGS"].dtype == np.uint32 and masked["source_fraction"].dims == ("band", "obs")


def test_every_catalogued_source_in_the_image_is_flagged(repo, masked):
    sources = repo.read_table("truth_sources").to_pandas()
    hit = _hit(masked)
    n_in = n_flagged = 0
    for (b, obsid), s in sources.groupby(["band", "obsid"]):
        i = int(np.flatnonzero(masked["band"].values == b)[0])
        j = int(np.flatnonzero(masked["obsid"].values == obsid)[0])
        xi, yi = np.rint(s["x"].to_numpy()).astype(int), np.rint(s["y"].to_numpy()).astype(int)
        inside = (xi >= 0) & (xi < 248) & (yi >= 0) & (yi < 248)
        n_in += inside.sum()
        n_flagged += hit[i, j, yi[inside], xi[inside]].sum()
    assert n_in > 15_000 and n_flagged == n_in


# --- units ------------------------------------------------------------------------------------
def test_solid_angle_conversion():
    # 1 MJy/sr over 1 arcsec^2: 1e12 uJy x (pi / 648000)^2 sr = 23.5044 uJy
    assert pixel_solid_angle(1.0) == pytest.approx(23.504430539, rel=1e-9)
    assert pixel_solid_angle(6.15**2) == pytest.approx(889.0, rel=1e-3)


def _pixel_fraction(dx: float, dy: float, sx: float, sy: float) -> float:
    """The simulator's two-Gaussian PSF integrated over the pixel at offset (dx, dy) [pixel]."""
    def box(d: float, s: float) -> float:
        return 0.5 * (erf((d + 0.5) / (math.sqrt(2) * s)) - erf((d - 0.5) / (math.sqrt(2) * s)))

    return ((1 - WING_FRACTION) * box(dx, sx) * box(dy, sy)
            + WING_FRACTION * box(dx, WING_SCALE * sx) * box(dy, WING_SCALE * sy))


@pytest.fixture(scope="module")
def bright(single, calib, repo):
    """A source position in the single image and the analytic ingredients there."""
    xs, ys = 124.5, 130.5  # pixel corner: no pixel centre lies within 0.04 px of the radii tested
    wcs = cube_wcs(single, band=1, obs=int(single["obs"][0]))
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    lam = float(calib["spectral_wcs"]["CWAVE"].sel(band=1).values[round(ys), round(xs)])
    omega = float(pixel_solid_angle(calib["solid_angle_pixel_map"]["SAPM"].sel(band=1).values[round(ys), round(xs)]))
    sx, sy = psf_sigmas(lam, xs, ys, instrument=repo.instrument)
    return {"x": xs, "y": ys, "ra": float(ra), "dec": float(dec), "omega": omega, "sx": float(sx), "sy": float(sy)}


@pytest.mark.parametrize("flux", [1e3, 1e5, 1e7, 1e10])  # [uJy]: AB 16.4 .. -1.1
def test_disc_radius_matches_the_psf_profile(single, calib, bright, flux):
    table = _table(bright["ra"], bright["dec"], flux)
    out = create_source_mask(single, calib=calib, tables={"refcat": table}, min_radius=0.0).compute()
    hit = _hit(out)[0, 0]
    # analytic radius: where F x (pixel fraction) / Omega falls to threshold x sigma along x
    level = THRESHOLD * NOISE * bright["omega"] / flux
    lo, hi = 0.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _pixel_fraction(mid, 0.0, bright["sx"], bright["sy"]) > level else (lo, mid)
    yy, xx = np.nonzero(hit)
    r_max = np.hypot(xx - bright["x"], yy - bright["y"]).max()
    r_area = math.sqrt(hit.sum() / math.pi)
    print(f"flux {flux:g} uJy: analytic radius {lo:.2f}, flagged max {r_max:.2f}, area-equivalent {r_area:.2f}")
    assert abs(r_max - lo) < 1.0 and abs(r_area - lo) < 1.0
    # pixel by pixel: the pixels the analytic PSF puts above the threshold, and few more
    g = np.arange(-8, 9)
    cx, cy = int(bright["x"]), int(bright["y"])
    above = np.array([[_pixel_fraction(cx + i - bright["x"], cy + j - bright["y"], bright["sx"], bright["sy"]) > level
                       for i in g] for j in g])
    stamp = hit[cy - 8:cy + 9, cx - 8:cx + 9]
    assert np.all(stamp[above]) and hit.sum() == stamp.sum()
    print(f"  flagged {stamp.sum()}, analytic above threshold {above.sum()}")
    if lo < 4.4:  # inside the PSF stamp: the same pixels (measured: 4, 24, 52 of 4, 24, 52)
        assert stamp.sum() - above.sum() <= 2
    else:  # the power-law tail beyond the stamp errs outward (measured 88 pixels for 76)
        assert 0.0 <= r_max - lo < 0.5


def test_threshold_crossing_is_in_the_right_units(single, calib, bright, repo):
    # a source on a pixel centre whose central pixel is predicted at exactly threshold x sigma
    xs, ys = 131.0, 117.0
    wcs = cube_wcs(single, band=1, obs=int(single["obs"][0]))
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    lam = float(calib["spectral_wcs"]["CWAVE"].sel(band=1).values[int(ys), int(xs)])
    sx, sy = psf_sigmas(lam, xs, ys, instrument=repo.instrument)
    omega = float(pixel_solid_angle(calib["solid_angle_pixel_map"]["SAPM"].sel(band=1).values[int(ys), int(xs)]))
    crossing = THRESHOLD * NOISE * omega / _pixel_fraction(0.0, 0.0, float(sx), float(sy))  # [uJy], ~90 uJy
    counts = []
    for factor in (0.95, 1.05):
        table = _table(float(ra), float(dec), crossing * factor)
        out = create_source_mask(single, calib=calib, tables={"refcat": table}, min_radius=0.0).compute()
        counts.append(int(_hit(out).sum()))
        assert out["source_fraction"].item() == pytest.approx(counts[-1] / 248**2)
    assert counts == [0, 1]


def test_min_and_max_radius(single, calib, bright):
    faint = create_source_mask(single, calib=calib, tables={"refcat": _table(bright["ra"], bright["dec"], 1e-3)},
                               min_radius=2.5).compute()
    assert _hit(faint).sum() == _disc_pixels(bright["x"], bright["y"], 2.5) == 16
    huge = create_source_mask(single, calib=calib, tables={"refcat": _table(bright["ra"], bright["dec"], 1e15)},
                              max_radius=6.0).compute()
    yy, xx = np.nonzero(_hit(huge)[0, 0])
    assert 5.5 < np.hypot(xx - bright["x"], yy - bright["y"]).max() <= 6.0
    with pytest.raises(ConfigError, match="max_radius"):
        create_source_mask(single, calib=calib, tables={"refcat": _table(0.0, 0.0, 1.0)}, min_radius=5, max_radius=2)


def test_proper_motion_moves_the_disc(single, calib, bright):
    # 1000 mas/yr north for 30 years: 30" (4.9 pixels) between the catalogue and the image
    mjd = float(single["mjd_avg"][0])
    epoch = 2000.0 + (mjd - 51544.5) / 365.25
    moved = _table(bright["ra"], bright["dec"] - 30.0 / 3600, 1e5, pmdec=1000.0, ref_epoch=epoch - 30.0)
    fixed = _table(bright["ra"], bright["dec"], 1e5, ref_epoch=epoch)
    a = create_source_mask(single, calib=calib, tables={"refcat": moved}).compute()
    b = create_source_mask(single, calib=calib, tables={"refcat": fixed}).compute()
    assert _hit(b).sum() == DISC_1E5
    np.testing.assert_array_equal(_hit(a), _hit(b))
    # no astrometric solution (NaN motion): the listed position
    unknown = _table(bright["ra"], bright["dec"], 1e5, pmdec=np.nan, ref_epoch=np.nan)
    c = create_source_mask(single, calib=calib, tables={"refcat": unknown}).compute()
    np.testing.assert_array_equal(_hit(c), _hit(b))


def test_catalogue_projection_matches_astropy(single):
    # the numba TAN-SIP projection (Newton inversion of the distortion) against astropy's
    # all_pix2world, over the detector and beyond its edge
    wcs = cube_wcs(single, band=1, obs=int(single["obs"][0]))
    assert wcs.sip is not None
    rng = np.random.default_rng(5)
    x, y = rng.uniform(-40, 296, 500), rng.uniform(-40, 296, 500)
    ra, dec = wcs.all_pix2world(x, y, 0)
    cat = catalog_array(_table(ra, dec, 1.0, ref_epoch=2000.0))
    sip = [np.asarray(getattr(wcs.sip, k), dtype=np.float64) for k in ("a", "b", "ap", "bp")]
    px, py = pixels_at_epoch(cat, np.arange(x.size), 2000.0, wcs.wcs.crval, np.linalg.inv(wcs.wcs.get_pc()),
                              wcs.wcs.crpix, *sip)
    assert np.abs(px - x).max() < 1e-5 and np.abs(py - y).max() < 1e-5
    # the far hemisphere has no pixel
    far = catalog_array(_table(wcs.wcs.crval[0] + 180.0, -wcs.wcs.crval[1], 1.0))
    assert np.isnan(pixels_at_epoch(far, np.arange(1), 2000.0, wcs.wcs.crval, np.eye(2), wcs.wcs.crpix,
                                     *sip)[0]).all()


def test_flux_interpolation_is_exact_for_power_laws():
    lam = np.array([0.75, 1.0, 1.4, 2.0, 2.6, 3.0, 4.5, 5.0])
    points = np.array([1.0, 2.0, 3.0, 4.5])
    for alpha in (-2.0, 0.0, 1.3):
        fluxes = np.broadcast_to(17.0 * points**alpha, (lam.size, 4))
        np.testing.assert_allclose(interpolate_flux(fluxes, lam), 17.0 * lam**alpha, rtol=1e-12)
    # log-log between the points of a curved spectrum
    assert interpolate_flux(np.array([[100.0, 400.0, 300.0, 100.0]]), np.array([math.sqrt(2.0)]))[0] == \
        pytest.approx(200.0)


def test_psf_envelope_of_the_product(calib, repo):
    psf = calib["average_psf"]
    env = psf_envelopes(psf["PSF"].sel(band=1).values, offset_x=psf["psf_x"].values / 6.15,
                        offset_y=psf["psf_y"].values / 6.15, oversampling=10)
    assert env.shape == (121, 89)  # 121 zones, 0 .. 4.4 pixels in 0.05-pixel steps
    assert np.all(np.diff(env, axis=-1) <= 0)
    # the central native pixel of the centre zone (123.5, 123.5) against the analytic PSF there: 0.70
    centre = float(psf["zone_x"][60]), float(psf["zone_y"][60])
    lam = float(calib["spectral_wcs"]["CWAVE"].sel(band=1).values[124, 124])
    sx, sy = psf_sigmas(lam, *centre, instrument=repo.instrument)
    assert centre == (123.5, 123.5)
    assert env[60, 0] == pytest.approx(_pixel_fraction(0.0, 0.0, float(sx), float(sy)), rel=1e-3)  # 1e-4
    # entry 40: the most any pixel centred more than 1.95 pixels out receives (the wing, 0.2 %
    # of the flux), at whatever angle: between the analytic maxima over angle at 2.0 and 1.95
    angles = np.linspace(0.0, math.pi / 2, 91)
    at = [max(_pixel_fraction(r * math.cos(a), r * math.sin(a), float(sx), float(sy)) for a in angles)
          for r in (2.0, 1.95)]
    assert at[0] * 0.999 <= env[60, 40] <= at[1] * 1.001
    assert env[60, 40] > 1.05 * _pixel_fraction(2.0, 0.0, float(sx), float(sy))  # not the value along x
    assert PROFILE_STEP == 0.05


# --- laziness, the catalogue choice, errors --------------------------------------------------
def test_builds_lazily_one_task_per_image(l2, calib, refcat, masked):
    lazy = l2.copy()
    for name in ("wcs_crpix", "wcs_crval", "wcs_cd"):
        lazy[name] = lazy[name].chunk({"band": 1, "obs": 1})  # dask-backed WCS too
    with raise_if_dask_computes():
        out = create_source_mask(lazy, calib={k: v.chunk() for k, v in calib.items()}, tables={"refcat": refcat})
    assert out["FLAGS"].data.numblocks == (3, 8, 1, 1)
    assert out["source_fraction"].data.numblocks == (3, 8)
    assert out.attrs["history"][-4] == "Create Source Mask, sphx create_source_mask 0.1.0"
    np.testing.assert_array_equal(out["FLAGS"].isel(band=[2], obs=[5]).values, masked["FLAGS"].isel(band=[2], obs=[5]))


def test_srccat_is_preferred(single, calib, refcat, bright):
    srccat = _table(bright["ra"], bright["dec"], 1e5)
    both = create_source_mask(single, calib=calib, tables={"srccat": srccat, "refcat": refcat}).compute()
    only = create_source_mask(single, calib=calib, tables={"srccat": srccat}).compute()
    ref = create_source_mask(single, calib=calib, tables={"refcat": refcat}).compute()
    np.testing.assert_array_equal(both["FLAGS"].values, only["FLAGS"].values)
    assert _hit(both).sum() == DISC_1E5 and _hit(ref).sum() > 4000  # one source vs ~850
    # an empty query result is still the query result: nothing flagged, earlier SOURCE bits cleared
    empty = create_source_mask(ref, calib=calib, tables={"srccat": srccat.slice(0, 0), "refcat": refcat}).compute()
    assert _hit(empty).sum() == 0 and empty["source_fraction"].item() == 0.0


def test_a_cut_of_the_image_gets_the_same_mask(single, calib, refcat):
    full = create_source_mask(single, calib=calib, tables={"refcat": refcat}).compute()
    part = single.isel(y=slice(90, 200), x=slice(100, 180))
    cut = create_source_mask(part, calib=calib, tables={"refcat": refcat}).compute()
    expected = full["FLAGS"].isel(y=slice(90, 200), x=slice(100, 180))
    np.testing.assert_array_equal(cut["FLAGS"].values, expected.values)
    fraction = ((expected.values & SOURCE) != 0).mean()
    assert cut["source_fraction"].item() == pytest.approx(fraction)
    assert 0.05 < fraction < 0.15


def test_a_wcs_without_distortion_terms(single, calib, refcat):
    full = create_source_mask(single, calib=calib, tables={"refcat": refcat}).compute()
    tan = single.drop_vars(["wcs_sip_a", "wcs_sip_b"])  # keep the inverse terms: they must be ignored alone
    plain = create_source_mask(tan, calib=calib, tables={"refcat": refcat}).compute()
    # the 0.4-pixel SIP distortion of the small detector moves some discs by a pixel
    changed = (_hit(full) != _hit(plain)).sum()
    print(f"SIP dropped: {changed} of {_hit(full).sum()} flagged pixels change")
    assert 0 < changed < 0.2 * _hit(full).sum()


def test_rerun_replaces_the_mask(single, calib, bright):
    big = create_source_mask(single, calib=calib, tables={"refcat": _table(bright["ra"], bright["dec"], 1e5)},
                             min_radius=4.0).compute()
    again = create_source_mask(big, calib=calib, tables={"refcat": _table(bright["ra"], bright["dec"], 1e5)})
    assert _hit(big).sum() == _disc_pixels(bright["x"], bright["y"], 4.0) == 52
    assert _hit(again.compute()).sum() == DISC_1E5


def test_errors(single, calib, refcat, bright):
    with pytest.raises(StepError, match="needs a source catalogue"):
        create_source_mask(single, calib=calib)
    with pytest.raises(StepError, match=r"lacks the column\(s\) \['pmra', 'pmdec'\]"):
        create_source_mask(single, calib=calib, tables={"refcat": refcat.drop_columns(["pmra", "pmdec"])})
    with pytest.raises(StepError, match=r"celestial WCS, but the cube lacks \['wcs_crval'\]"):
        create_source_mask(single.drop_vars("wcs_crval"), calib=calib, tables={"refcat": refcat})
    no_wcs = single.copy()
    no_wcs["wcs_crval"] = xr.full_like(single["wcs_crval"], np.nan)
    with pytest.raises(StepError, match="no celestial WCS"):
        create_source_mask(no_wcs, calib=calib, tables={"refcat": refcat})
    lazy = no_wcs.copy()
    lazy["wcs_crval"] = lazy["wcs_crval"].chunk()
    out = create_source_mask(lazy, calib=calib, tables={"refcat": refcat})  # found when the image runs
    with pytest.raises(StepError, match=r"image band 1 obs \d+ has no celestial WCS"):
        out["FLAGS"].compute()
    electrons = single.copy()
    electrons["VARIANCE"].attrs["units"] = "electron2 / s2"
    with pytest.raises(StepError, match="needs VARIANCE in"):
        create_source_mask(electrons, calib=calib, tables={"refcat": refcat})
    with pytest.raises(StepError, match="needs IMAGE in 'MJy / sr'"):
        create_source_mask(single.assign(IMAGE=single["IMAGE"].assign_attrs(units="electron / s")),
                           calib=calib, tables={"refcat": refcat})
    with pytest.raises(StepError, match="contiguous, increasing"):
        create_source_mask(single.isel(x=slice(None, None, -1)), calib=calib, tables={"refcat": refcat})
    bordered = single.assign_coords(x=single["x"] - 4)
    with pytest.raises(StepError, match="active frame"):
        create_source_mask(bordered, calib=calib, tables={"refcat": refcat})
    with pytest.raises(CalibrationError, match=r"spectral_wcs.*no band\(s\) \[1\]"):
        create_source_mask(single, calib={**calib, "spectral_wcs": calib["spectral_wcs"].sel(band=[3])},
                           tables={"refcat": refcat})
    with pytest.raises(CalibrationError, match="oversampling"):
        psf = calib["average_psf"].copy()
        psf.attrs = {}
        create_source_mask(single, calib={**calib, "average_psf": psf}, tables={"refcat": refcat})
