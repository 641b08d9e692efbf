"""Measure Exposure-Averaged PSF: the solver's stacking and its run through the repository.

The kernels (stacking, pixel deconvolution) are tested against the simulator's PSF in
``test_psf_stack.py``. Here: which stars a Level 2 image contributes and with what weight,
and a small survey (bright, uncrowded stars, so that every zone gets some) solved into
a new ``average_psf`` version. Its accuracy is not tested here: with tens of stars
per zone the deconvolved core is ~50 % too wide (docs/calibration.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from sphx import flags
from sphx.calibrate.inputs import open_inputs
from sphx.calibrate.psf import PsfConfig, estimate_psf, isolated_stars, stack_image
from sphx.calibrate.run import get_solver, run_solver
from sphx.demo import recipe_path
from sphx.errors import CalibrationError
from sphx.kernels.psf_stack import psf_fwhm_2d
from sphx.pipeline import run_recipe
from sphx.simulate.optics import render_point_sources
from sphx.testing import raise_if_dask_computes

PSF_SURVEY = {"instrument": "SPHEREx-small", "seed": 5, "bands": [1], "survey": {"n_exposures": 32, "mode": "deep"},
              "sky": {"star_density": 3000.0, "mag_limit": 16.0, "galaxy_density": 100.0}}


@pytest.fixture(scope="module")
def psf_repo(tmp_path_factory):
    from sphx.simulate import simulate_survey

    repo = simulate_survey(PSF_SURVEY, tmp_path_factory.mktemp("psf") / "repo").repository
    run_recipe(recipe_path("l1-l2"), repo, profile="synchronous", progress=False, log=lambda s: None)
    return repo


# --- one image ------------------------------------------------------------------------
def _scene(flux, x, y, *, noise=0.01, seed=3):
    rng = np.random.default_rng(seed)
    image = rng.normal(1.0, noise, (60, 60))
    render_point_sources(image, x, y, flux, np.full(len(x), 0.6), np.full(len(x), 0.6))
    return image, np.full(image.shape, noise**2), np.zeros(image.shape, np.uint32)


def test_saturated_stars_are_left_out():
    x, y = np.array([15.3, 44.8, 30.1]), np.array([15.6, 20.2, 44.4])
    flux = np.array([50.0, 80.0, 60.0])
    image, variance, fl = _scene(flux, x, y)
    fl[20, 44] |= np.uint32(flags.Flag.OVERFLOW)  # the core of star 1 saturated
    options = {"n_zones": 1, "oversampling": 10, "half_size": 5}
    _, stars = stack_image(image, variance, fl, x, y, flux, np.zeros(3, np.int64), **options)
    assert stars.tolist() == [2]


def test_isolation_counts_brighter_neighbours_only():
    x, y = np.array([10.0, 13.0, 30.0, 33.0]), np.array([10.0, 10.0, 30.0, 30.0])
    flux = np.array([100.0, 5.0, 100.0, 50.0])
    keep = isolated_stars(x, y, flux, np.array([0, 2]), radius=6.0, fraction=0.1)
    assert keep.tolist() == [True, False]
    # against every pair, on a crowded field (NaN fluxes count as bright neighbours)
    rng = np.random.default_rng(2)
    x, y, flux = rng.uniform(0, 100, 600), rng.uniform(0, 100, 600), rng.lognormal(0, 2, 600)
    flux[::50] = np.nan
    candidates = np.flatnonzero(flux > 5)
    near = np.hypot(x[candidates, None] - x, y[candidates, None] - y) <= 6.0
    brighter = np.where(np.isfinite(flux), flux, np.inf) > 0.1 * flux[candidates, None]
    near[np.arange(candidates.size), candidates] = False
    expected = ~np.any(near & brighter, axis=1)
    assert 0 < expected.sum() < candidates.size
    np.testing.assert_array_equal(isolated_stars(x, y, flux, candidates, radius=6.0, fraction=0.1), expected)


def test_brightest_bounds_the_flux_across_the_band():
    # the bound that lets a batch skip the rows too faint to matter: never below the
    # flux at any wavelength of the band, the end segments extrapolated included
    from sphx.astrometry.catalog import interpolate_flux
    from sphx.calibrate.psf import _brightest

    rng = np.random.default_rng(8)
    fluxes = rng.lognormal(0.0, 2.0, (500, 4))
    fluxes[::97, 2] = np.nan
    for lo, hi in ((0.75, 1.11), (1.6, 3.8), (3.8, 5.0)):
        bound = _brightest(fluxes, lo, hi)
        lams = np.union1d(np.linspace(lo, hi, 200), [lam for lam in (1.0, 2.0, 3.0, 4.5) if lo < lam < hi])
        grid = np.stack([interpolate_flux(fluxes, np.full(500, lam)) for lam in lams])
        assert np.all(np.isnan(bound) == np.isnan(grid).any(axis=0))
        ok = np.isfinite(bound)
        assert np.all(bound[ok] >= grid[:, ok].max(axis=0) * (1 - 1e-12))
        np.testing.assert_allclose(bound[ok], grid[:, ok].max(axis=0), rtol=1e-12)  # and reached


# --- through the repository -----------------------------------------------------------
def test_psf_graph_is_lazy(psf_repo):
    spec = get_solver("psf")
    cal = {n: psf_repo.open_calibration(n) for n in ("average_psf", "solid_angle_pixel_map", "spectral_wcs")}
    inputs = open_inputs(psf_repo, spec.reads, spectral_wcs=cal["spectral_wcs"], extra=spec.extra)
    with raise_if_dask_computes():
        product = estimate_psf(psf_repo, inputs, PsfConfig(min_stars=1), calibrations=cal)["average_psf"]
    assert product["PSF"].shape == (1, 121, 101, 101)


def test_each_batch_is_stacked_once(psf_repo, monkeypatch):
    # a dask array handed to a delayed function gets a graph of its own: the band's stacks
    # were once computed a second time for N_STARS
    import sphx.calibrate.psf as psf_module

    stacked = []
    real = psf_module._stack_batch
    monkeypatch.setattr(psf_module, "_stack_batch", lambda *a: stacked.append(a[2]["obs"].values[0]) or real(*a))
    spec = get_solver("psf")
    cal = {n: psf_repo.open_calibration(n) for n in ("average_psf", "solid_angle_pixel_map", "spectral_wcs")}
    inputs = open_inputs(psf_repo, spec.reads, spectral_wcs=cal["spectral_wcs"], extra=spec.extra)
    config = PsfConfig(min_stars=1, batch=8, chains=2, iterations=1)
    estimate_psf(psf_repo, inputs, config, calibrations=cal)["average_psf"].compute(scheduler="threads")
    assert len(stacked) == len(set(stacked)) == 4  # 32 images in batches of 8


def test_batches_and_chains_do_not_change_the_stack(psf_repo):
    # 32 images: one batch in one chain, against batches of 3 carried along 2 chains (each
    # chain adds several batches onto the accumulator it was handed)
    spec = get_solver("psf")
    cal = {n: psf_repo.open_calibration(n) for n in ("average_psf", "solid_angle_pixel_map", "spectral_wcs")}
    inputs = open_inputs(psf_repo, spec.reads, spectral_wcs=cal["spectral_wcs"], extra=spec.extra)
    one, many = (estimate_psf(psf_repo, inputs, PsfConfig(min_stars=1, **kw), calibrations=cal)["average_psf"]
                 .compute() for kw in ({"batch": 32, "chains": 1}, {"batch": 3, "chains": 2}))
    np.testing.assert_array_equal(one["N_STARS"].values, many["N_STARS"].values)  # no batch lost
    # the stacks differ by round-off, which the deconvolution (ill-conditioned on the
    # rim, stopped at a relative residual of 1e-6) amplifies
    peak = np.nanmax(one["PSF"].values)
    np.testing.assert_allclose(many["PSF"].values, one["PSF"].values, rtol=0, atol=1e-3 * peak)


def test_the_batch_catalogue_stacks_what_each_image_query_stacks(psf_repo):
    # a batch reads the catalogue once, keeps the rows bright enough to matter and moves
    # them per image (proper motion, parallax from the spacecraft); the per-image query
    # of the whole catalogue (a catalogue without one epoch) is the reference
    import sphx.calibrate.psf as psf_module
    from sphx.calibrate.inputs import catalog_epoch

    spec = get_solver("psf")
    cal = {n: psf_repo.open_calibration(n) for n in ("average_psf", "solid_angle_pixel_map", "spectral_wcs")}
    inputs = open_inputs(psf_repo, spec.reads, spectral_wcs=cal["spectral_wcs"], extra=spec.extra)
    meta = inputs.image_metadata().load().isel(band=[0], obs=list(range(6)))
    prior = cal["average_psf"]
    args = (psf_repo, {n: inputs.levels[n] for n in ("IMAGE", "VARIANCE", "FLAGS")}, meta, 1, prior["zone_x"].values,
            prior["zone_y"].values, cal["solid_angle_pixel_map"]["SAPM"].sel(band=1).values.astype(np.float64),
            cal["spectral_wcs"]["CWAVE"].sel(band=1).values.astype(np.float64), 10)
    epoch = catalog_epoch(psf_repo.open_table("refcat"))
    assert epoch is not None
    batch, per_image = (psf_module._stack_batch(*args, e, PsfConfig(min_stars=1), None) for e in (epoch, None))
    assert batch[1].sum() > 100
    np.testing.assert_array_equal(batch[1], per_image[1])
    np.testing.assert_allclose(batch[0], per_image[0], rtol=0, atol=1e-12 * np.abs(per_image[0]).max())


def test_psf_on_a_real_scheduler_equals_the_threaded_run(psf_repo, loopback_cluster):
    # the stacking tasks read their images themselves, on the workers, from the repository
    # (one deconvolution iteration: the stacks are what the workers make, and the
    # converged deconvolution would amplify the round-off of BLAS differences)
    from distributed import Client

    spec = get_solver("psf")
    cal = {n: psf_repo.open_calibration(n) for n in ("average_psf", "solid_angle_pixel_map", "spectral_wcs")}
    inputs = open_inputs(psf_repo, spec.reads, spectral_wcs=cal["spectral_wcs"], extra=spec.extra)
    product = estimate_psf(psf_repo, inputs, PsfConfig(min_stars=1, batch=4, chains=2, iterations=1), calibrations=cal)
    here = product["average_psf"].compute(scheduler="threads")
    with Client(loopback_cluster[0]) as client:
        there = client.compute(product["average_psf"]).result()
    np.testing.assert_array_equal(there["N_STARS"].values, here["N_STARS"].values)
    assert here["N_STARS"].values.sum() > 1500
    np.testing.assert_allclose(there["PSF"].values, here["PSF"].values, rtol=0, atol=1e-6 * here["PSF"].values.max())


def test_too_few_stars_per_zone_is_an_error(psf_repo):
    with pytest.raises(CalibrationError, match=r"at least 100000 isolated stars per zone .* has \d+"):
        run_solver(psf_repo, "psf", {"min_stars": 100000}, log=lambda s: None)


def test_psf_solved_into_a_new_version(psf_repo):
    report = run_solver(psf_repo, "psf", {"min_stars": 5}, log=lambda s: None)
    assert report.versions == {"average_psf": 2}
    new = psf_repo.open_calibration("average_psf")
    n = new["N_STARS"].sel(band=1).values
    assert n.min() >= 5 and n.sum() > 1500
    psf = new["PSF"].sel(band=1).values
    # tens of stars per zone: some zones' noisy rims outshine their cores, their mean does not
    mean = psf.mean(axis=0)
    assert np.unravel_index(mean.argmax(), mean.shape) == (50, 50)
    assert abs(np.median(psf.sum(axis=(1, 2))) - 1) < 0.1  # the stamp holds most of the flux


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """12 deep exposures of a real 2040 x 2040 band-1 detector (~1100 stars per zone),
    reduced and solved for the PSF (~1 minute)."""
    from sphx.simulate import simulate_survey

    config = {"seed": 5, "instrument": "SPHEREx", "bands": [1], "survey": {"n_exposures": 12, "mode": "deep"},
              "sky": {"star_density": 3000.0, "mag_limit": 16.0, "galaxy_density": 100.0}}
    repo = simulate_survey(config, tmp_path_factory.mktemp("full-size") / "repo").repository
    run_recipe(recipe_path("l1-l2"), repo, profile="threads", progress=False, log=lambda s: None)
    run_solver(repo, "psf", {"min_stars": 900}, log=lambda s: None)
    truth, solved = (repo.open_calibration("average_psf", version=v).sel(band=[1]).load() for v in (1, 2))
    return repo, truth, solved


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="FWHM -0.7 / -0.4 % (x / y), worst -1.24 %: docs/calibration.md, band 4")
def test_psf_of_a_full_size_survey_has_the_true_fwhm(full_size):
    _, truth, solved = full_size
    assert solved["N_STARS"].values.min() >= 900
    fwhm = np.array([np.array(psf_fwhm_2d(p)) / np.array(psf_fwhm_2d(t)) - 1
                     for p, t in zip(solved["PSF"].values[0], truth["PSF"].values[0], strict=True)])
    # the issue's requirement: within 1 % in every zone. Measured (x, y): mean -0.73 / -0.45 %, rms
    # 0.74 / 0.47 %, worst 1.24 / 0.74 %; before the detector saturated at its full well (its
    # brightest stars' cores then NONLINEAR and left out): -0.25 / -0.20 %, worst 0.49 / 0.43 %
    assert np.abs(fwhm).max() < 0.01, fwhm


@pytest.mark.slow
def test_psf_of_a_full_size_survey_photometers_like_the_truth(full_size):
    from sphx.level3.photometry import image_catalog, photometer_image

    repo, truth, solved = full_size
    l2 = repo.open_level("l2")
    cal = {n: repo.open_calibration(n) for n in ("solid_angle_pixel_map", "spectral_wcs")}
    ratios = []
    for j in range(2):
        cube = l2.isel(band=[0], obs=[j]).load()
        obs = int(cube.obs.values[0])
        catalog = image_catalog(repo.open_table("refcat"), cube, band=1, obs=obs)
        options = {"band": 1, "obs": obs, "sapm": cal["solid_angle_pixel_map"], "spectral_wcs": cal["spectral_wcs"],
                   "background": cube["ZODI"].values[0, 0].astype(np.float32), "local_background": True}
        a = photometer_image(cube, catalog, psf=truth, **options)
        b = photometer_image(cube, catalog, psf=solved, **options)
        fa, fb, ea = (t.column(c).to_numpy() for t, c in ((a, "flux"), (b, "flux"), (a, "flux_error")))
        ok = (a.column("phot_status").to_numpy() == 0) & (b.column("phot_status").to_numpy() == 0) & (fa > 50 * ea)
        ratios.append(fb[ok] / fa[ok])
    ratio = np.concatenate(ratios)
    # measured: median 0.9992, 16-84 % 0.9981-1.0001, 99.8 % of 11 870 sources within 1 %
    assert abs(np.median(ratio) - 1) < 0.003
    assert np.mean(np.abs(ratio - 1) < 0.01) > 0.95
