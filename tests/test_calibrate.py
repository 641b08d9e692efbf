"""Calibration solvers (paper section 4.4) against the simulator's truth.

A 24-exposure survey of band 1 (small geometry, many calibrator stars) runs through
Level 1-2 once; the solvers run on copies of it. The numbers the issue asks for with
~1000 images are in the ``slow`` tests at the end and in ``benchmarks/bench_calibration.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sphx import open_repository
from sphx.calibrate.dark_flat import DarkFlatConfig, estimate_dark_flat
from sphx.calibrate.inputs import open_inputs
from sphx.calibrate.run import get_solver, merge_bands, run_solver
from sphx.demo import recipe_path
from sphx.errors import CalibrationError, RecipeError
from sphx.kernels.dark_flat import (
    accumulate_images,
    channel_keys,
    median_variance,
    reference_fluxes,
    reference_sample,
    sampled_segments,
    solve_sums,
)
from sphx.pipeline import check_recipe, load_recipe, run_recipe
from sphx.testing import raise_if_dask_computes

CALIB_SURVEY = {"instrument": "SPHEREx-small", "seed": 7, "bands": [1], "survey": {"n_exposures": 24},
                "sky": {"calibrator_density": 300.0}}
QUIET = {"profile": "synchronous", "progress": False, "log": lambda s: None}


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    from sphx.simulate import simulate_survey

    path = tmp_path_factory.mktemp("calib") / "repo"
    repo = simulate_survey(CALIB_SURVEY, path).repository
    run_recipe(recipe_path("l1-l2"), repo, **QUIET)
    return path


@pytest.fixture
def calib_repo(calib_path, tmp_path):
    dest = tmp_path / "repo"
    shutil.copytree(calib_path, dest)
    return open_repository(dest)


def _inputs(repo):
    solver = get_solver("dark_flat")
    return open_inputs(repo, solver.reads, spectral_wcs=repo.open_calibration("spectral_wcs"))


def _calibrations(repo, *names):
    return {n: repo.open_calibration(n) for n in names}


# --- kernels --------------------------------------------------------------------------
def test_regression_sums_add_up_over_batches_and_match_a_weighted_polyfit():
    rng = np.random.default_rng(1)
    k, n = 40, 32
    cwave = np.broadcast_to(np.linspace(1.0, 1.2, n)[:, None], (n, n))
    key, u, seg_u = channel_keys(cwave, n_channels=8, n_segments=2)
    dark = rng.uniform(0.0, 0.5, (n, n))
    flat = rng.normal(1.0, 0.05, (n, n))
    level = rng.uniform(2.0, 9.0, k)[:, None, None] * (1 + 0.05 * u[None])  # a tilt along the channel
    images = dark + flat * level + rng.normal(0.0, 0.05, (k, n, n))
    variances = np.full((k, n, n), 0.05**2)
    ok = np.ones((k, n, n), bool)
    options = {"key": key, "u": u, "segment_u": seg_u, "dark0": dark, "gain0": flat, "n_segments": 2, "clip": 5.0}
    whole = accumulate_images(images, variances, ok, ok, **options)
    halves = accumulate_images(images[:15], variances[:15], ok[:15], ok[:15], **options) + \
        accumulate_images(images[15:], variances[15:], ok[15:], ok[15:], **options)
    np.testing.assert_allclose(halves, whole, rtol=1e-12)
    plain = solve_sums(whole, reference_errors=False)
    # the same fit with numpy: reference = the polynomial through the segment medians of
    # the image flat-fielded with the prior
    j, i = 5, 7
    xs = []
    for b in range(k):
        coef = reference_fluxes((images[b] - dark) / flat, ok[b], key, seg_u, n_segments=2, min_pixels=1)
        xs.append(np.polyval(coef[key[j, i] // 2][::-1], u[j, i]))
    slope, intercept = np.polyfit(np.array(xs), images[:, j, i], 1)
    assert plain["flat"][j, i] == pytest.approx(slope, rel=1e-9)
    assert plain["dark"][j, i] == pytest.approx(intercept, rel=1e-7, abs=1e-9)
    # with the true flat as prior the reference is the sky itself and the slope the flat
    sol = solve_sums(whole)  # with the reference's noise removed: a small change with 512 pixels a segment
    assert np.std(sol["flat"] / flat - 1) < 0.008 and np.std(sol["dark"] - dark) < 0.05  # 0.004, 0.02 expected
    assert np.max(np.abs(sol["flat"] - plain["flat"])) < 1e-3


def test_flags_and_masks_select_the_same_samples_as_boolean_masks():
    rng = np.random.default_rng(4)
    k, n = 6, 40
    cwave = np.broadcast_to(np.linspace(1.0, 1.2, n)[:, None], (n, n))
    key, u, seg_u = channel_keys(cwave, n_channels=5, n_segments=2)
    images = rng.normal(3.0, 0.1, (k, n, n)).astype(np.float32)
    images[rng.random(images.shape) < 0.02] = np.nan
    variances = np.full((k, n, n), 0.01, np.float32)
    variances[rng.random(variances.shape) < 0.02] = np.nan
    flags = rng.choice(np.array([0, 0, 0, 1, 4, 5], np.uint32), size=(k, n, n))  # bit 0: not fitted, bit 2: no reference
    gain0 = np.ones((n, n))
    gain0[3, 4], gain0[5, 6] = np.nan, 0.0  # no reference value there (the samples still count)
    options = {"key": key, "u": u, "segment_u": seg_u, "dark0": np.zeros((n, n)), "gain0": gain0, "n_segments": 2,
               "clip": 1e6, "min_pixels": 1}
    by_flags = accumulate_images(images, variances, flags=flags, fit_mask=1, ref_mask=5, **options)
    by_masks = accumulate_images(images, variances, (flags & 1) == 0, (flags & 5) == 0, **options)
    np.testing.assert_array_equal(by_flags, by_masks)
    # without clipping, every fitted sample with a value and a variance counts
    expected = (((flags & 1) == 0) & np.isfinite(images) & np.isfinite(variances)).sum(axis=0)
    np.testing.assert_array_equal(by_flags[0], expected)


def test_a_sampled_reference_represents_every_row_and_keeps_the_solution():
    # one pixel in 4 (full-size detectors): blocks of 64 along the rows, staggered, so
    # that each row of a channel (whose wavelength changes across its rows) counts alike
    taken = reference_sample((64, 512), 4)
    assert taken.mean() == 0.25
    assert set(taken.sum(axis=1).tolist()) == {128} and set(taken.sum(axis=0).tolist()) == {16}
    rng = np.random.default_rng(5)
    k, ny, nx = 30, 256, 512
    # channels 4 rows tall, tilted as on the detector, the sky changing along the band too
    cwave = np.linspace(1.0, 1.2, ny)[:, None] + np.linspace(0.0, 0.004, nx)[None, :]
    key, u, _ = channel_keys(cwave, n_channels=64, n_segments=2)
    dark, flat = rng.uniform(0.0, 0.5, (ny, nx)), rng.normal(1.0, 0.05, (ny, nx))
    sky = rng.uniform(2.0, 9.0, k)[:, None, None] * (1 + 0.05 * u[None]) * cwave[None] ** -2
    images = dark + flat * sky + rng.normal(0.0, 0.05, (k, ny, nx))
    variances = np.full((k, ny, nx), 0.05**2)
    ok = np.ones((k, ny, nx), bool)
    solved = {}
    for sample in (1, 4):
        seg_u, starts = sampled_segments(key, u, n_keys=128, sample=sample)
        sums = accumulate_images(images, variances, ok, ok, key=key, u=u, segment_u=seg_u, starts=starts,
                                 sample=sample, dark0=dark, gain0=flat, n_segments=2)
        solved[sample] = solve_sums(sums)
    one, four = solved[1], solved[4]
    # a quarter of the 1024 pixels per median: the medians' noise, shared by a segment's
    # pixels, moves the flat by 0.2 of its errors (0.25 here) and adds 2.4 % to its
    # distance from the truth (the two segments' line through it reaches the channel's
    # ends; the detector's four segments and 500 pixels per median give less)
    assert np.sqrt(np.mean(((four["flat"] - one["flat"]) / one["flat_err"]) ** 2)) < 0.3
    assert np.std(four["flat"] / flat - 1) < 1.04 * np.std(one["flat"] / flat - 1)
    assert np.median(four["flat_err"]) == pytest.approx(np.median(one["flat_err"]), rel=0.02)


def test_median_variance_matches_monte_carlo():
    # unequal errors: the variance follows sum(1/sigma), not the mean variance (which is
    # 5 % off for errors within +-25 % and 30 % off for a factor 4)
    rng = np.random.default_rng(4)
    for n, spread in ((7, 1.25), (30, 1.25), (31, 1.25), (31, 2.0)):
        sigma = rng.uniform(1 / spread, spread, n)
        draws = np.median(sigma * rng.standard_normal((40000, n)), axis=1)
        assert median_variance(n, np.sum(1 / sigma)) == pytest.approx(draws.var(), rel=0.04)


def _sums_with_a_noisy_reference(sky_range, k=300, n=64, seed=3):
    """Sums of ``k`` images with 32 pixels per segment (one row a channel, two segments)
    and sky levels uniform in ``sky_range``; and the true dark and flat."""
    rng = np.random.default_rng(seed)
    cwave = np.broadcast_to(np.linspace(1.0, 1.2, n)[:, None], (n, n))
    key, u, seg_u = channel_keys(cwave, n_channels=n, n_segments=2)
    dark = rng.uniform(0.0, 0.5, (n, n))
    flat = rng.normal(1.0, 0.05, (n, n))
    sigma = rng.uniform(0.7, 1.3, (n, n))
    level = rng.uniform(*sky_range, k)[:, None, None] * (1 + 0.1 * u[None])
    images = dark + flat * level + sigma * rng.standard_normal((k, n, n))
    variances = np.broadcast_to(sigma**2, (k, n, n)).copy()
    ok = np.ones((k, n, n), bool)
    sums = accumulate_images(images, variances, ok, ok, key=key, u=u, segment_u=seg_u, dark0=dark, gain0=flat,
                             n_segments=2, clip=50.0, min_pixels=5)
    return sums, dark, flat


def test_noisy_reference_does_not_dilute_the_slope_or_shift_the_dark():
    # a faint, narrow range of sky levels: the reference (a median of 32 pixels) has a noise
    # variance 12 % of the variance of the sky levels, and the pixel's own noise offsets
    # 2/pi of that in its own median; the plain least-squares slope is ~5 % low and the
    # intercept high by as much times the mean sky. The moment correction removes both.
    sums, dark, flat = _sums_with_a_noisy_reference((1.0, 3.0))
    plain, sol = solve_sums(sums, reference_errors=False), solve_sums(sums)
    # averages over 4096 pixels: statistical errors 0.002 (flat) and 0.004 (dark)
    assert np.mean(plain["flat"] / flat - 1) < -0.04 and np.mean(plain["dark"] - dark) > 0.08
    assert abs(np.mean(sol["flat"] / flat - 1)) < 0.008 and abs(np.mean(sol["dark"] - dark)) < 0.016
    # and the errors hold (with the second-order term of the two noises)
    for name, truth in (("flat", flat), ("dark", dark)):
        pull = (sol[name] - truth) / sol[f"{name}_err"]
        assert abs(np.mean(pull)) < 0.1 and 0.95 < np.std(pull) < 1.07


def test_correction_is_capped_where_the_reference_is_mostly_noise():
    # sky levels within +-5 %: the reference's noise is 93 % of its variance; the fully
    # corrected slope would be a ratio of two noisy numbers. Capped, it lies between the
    # plain and the corrected one and its errors hold, where the plain fit is 1.4 sigma off.
    sums, dark, flat = _sums_with_a_noisy_reference((1.9, 2.1))
    plain, sol = solve_sums(sums, reference_errors=False), solve_sums(sums)
    plain_pull = (plain["dark"] - dark) / plain["dark_err"]
    pull = (sol["dark"] - dark) / sol["dark_err"]
    assert np.median(plain_pull) > 1.0 and abs(np.median(pull)) < 0.3 and 0.85 < np.std(pull) < 1.1
    assert np.all(np.isfinite(sol["flat"])) and np.median(sol["flat"] / flat) > np.median(plain["flat"] / flat)


def test_reference_flux_is_the_channel_median_and_tilt():
    n = 64
    cwave = np.broadcast_to(np.linspace(1.0, 1.5, n)[:, None], (n, n))
    key, u, seg_u = channel_keys(cwave, n_channels=16, n_segments=4)
    image = 3.0 + 0.4 * u
    usable = np.ones((n, n), bool)
    usable[::3, ::5] = False
    image = np.where(usable, image, 1e6)  # unusable pixels must not count
    coef = reference_fluxes(image, usable, key, seg_u, n_segments=4, min_pixels=5)
    np.testing.assert_allclose(coef, np.tile([3.0, 0.4], (16, 1)), atol=0.02)


# --- dark and flat --------------------------------------------------------------------
def test_dark_flat_graph_is_lazy(calib_repo):
    inputs = _inputs(calib_repo)
    with raise_if_dask_computes():
        products = estimate_dark_flat(calib_repo, inputs, DarkFlatConfig(passes=2),
                                      calibrations=_calibrations(calib_repo, "dark", "abs_gain_matrix"))
    assert products["dark"]["DARK"].chunks is not None and products["flat_field"]["FLAT"].chunks is not None


def test_a_batch_added_again_is_not_counted_twice(calib_repo):
    # the chains add batches into their sums in place: a task run again (retries) must
    # find its batch already there
    from sphx.calibrate.dark_flat import _add_batch, _channel_maps

    inputs = _inputs(calib_repo)
    config = DarkFlatConfig()
    maps = _channel_maps(inputs, config)[0]
    shape = (inputs.pixels.sizes["y"], inputs.pixels.sizes["x"])
    priors = (calib_repo.open_calibration("dark")["DARK"].sel(band=1).values.astype(np.float64), np.ones(shape))
    obs = [int(o) for o in inputs.pixels["obs"].values]
    args = (calib_repo, inputs.levels, 1)
    chain = _add_batch(None, *args, obs[:8], priors, maps, config, shape)
    once = chain[0].copy()
    again = _add_batch(chain, *args, obs[:8], priors, maps, config, shape)
    np.testing.assert_array_equal(again[0], once)
    more = _add_batch(again, *args, obs[8:16], priors, maps, config, shape)
    assert more[1] == {obs[0], obs[8]} and more[0][0].sum() > 1.9 * once[0].sum()


def test_dark_flat_recovers_truth_within_its_statistical_error(calib_repo):
    # coarse channels: with so few images the reference noise of narrow ones would still dilute the slope
    report = run_solver(calib_repo, "dark_flat", {"dark_prior": False, "n_channels": 62, "n_segments": 8},
                        log=lambda s: None)
    assert report.versions == {"dark": 2, "flat_field": 1} and report.images == {1: 24}
    dark, flat = calib_repo.open_calibration("dark"), calib_repo.open_calibration("flat_field")
    truth = calib_repo.open_state("simulation_truth").sel(band=1)
    good = (truth["MASKS"].values == 0) & np.isfinite(dark["DARK"].sel(band=1).values)
    resid = (dark["DARK"].sel(band=1).values - truth["DARK"].values)[good]
    err = dark["DARK_ERR"].sel(band=1).values[good]
    pull = resid / err
    # (with 24 images over 5 degrees the reference flux barely varies: its noise is most
    # of its variance, so the correction for it is capped and the intercept keeps a shift
    # of about 0.04 of its error, 0.08 without the correction; ~1000 images show none)
    assert 0.9 < pull.std() < 1.1 and abs(np.median(pull)) < 0.15
    assert np.sqrt(np.mean(resid**2)) < 1.1 * np.sqrt(np.mean(err**2))
    # the flat's uncertainties hold as well (the slow test checks the flat with ~1000 images)
    flat_pull = _flat_pulls(calib_repo, flat, truth, good)
    assert 0.8 < flat_pull.std() < 1.6
    assert np.nanmedian(flat["N_SAMPLES"].values) >= 20


def _flat_pulls(repo, flat, truth, good):
    """(FLAT / true relative response - 1) / FLAT_ERR, the truth (1 / ABS_GAIN: response times
    solid angle) normalised by its median in each of the solver's channels."""
    ratio = flat["FLAT"].sel(band=1).values * truth["ABS_GAIN"].values
    attrs = flat.attrs
    key = channel_keys(repo.open_calibration("spectral_wcs")["CWAVE"].sel(band=1).values,
                       n_channels=attrs["n_channels"], n_segments=attrs["n_segments"])[0] // attrs["n_segments"]
    norm = np.array([np.median(ratio[(key == c) & good]) if np.any((key == c) & good) else np.nan
                     for c in range(key.max() + 1)])
    return ((ratio / norm[key] - 1) / flat["FLAT_ERR"].sel(band=1).values)[good]


def test_dark_flat_needs_enough_images(calib_repo):
    with pytest.raises(CalibrationError, match=r"at least 50 images per band, but band 1 has 24"):
        run_solver(calib_repo, "dark_flat", {"min_images": 50}, log=lambda s: None)
    with pytest.raises(CalibrationError, match="known keys"):
        run_solver(calib_repo, "dark_flat", {"clipp": 3}, log=lambda s: None)
    assert calib_repo.calibration_versions("flat_field") == []  # nothing half-written


def test_new_versions_carry_other_bands_and_record_provenance(calib_repo):
    dark = calib_repo.open_calibration("dark")
    fake = dark.assign_coords(band=[2])  # pretend an earlier version also held band 2
    merged, carried = merge_bands(dark.sel(band=[1]) * 2, fake)
    assert carried == [2] and merged["band"].values.tolist() == [1, 2]
    np.testing.assert_array_equal(merged["DARK"].sel(band=2).values, dark["DARK"].sel(band=1).values)
    run_solver(calib_repo, "dark_flat", select={"start": 0.0}, log=lambda s: None)
    record = calib_repo.provenance("calibration", "dark")[-1]
    assert record["solver"] == "dark_flat" and record["bands_solved"] == [1]
    assert record["calibrations"]["dark"] == 1 and record["bands_carried"] == []
    assert record["inputs"]["images"] in ({"1": 24}, {1: 24})
    # Level 2 can be pointed at either version
    for version in (1, 2):
        recipe = load_recipe(recipe_path("l1-l2"), overrides=[f"calibrations.dark={version}"])
        plan = check_recipe(recipe, calib_repo)
        used = [s["calibrations"] for st in plan for s in st["steps"] if "dark" in s["calibrations"]]
        assert used and all(u["dark"] == version for u in used)


# --- recipes --------------------------------------------------------------------------
def test_calibration_recipes_check_and_refuse_bad_keys(calib_repo):
    for name, writes in (("calib-dark-flat", "dark, flat_field"), ("calib-psf", "average_psf")):
        plan = check_recipe(load_recipe(recipe_path(name)), calib_repo)
        assert plan[0]["output"].endswith(writes)
    with pytest.raises(RecipeError, match="flat_field"):  # the absolute gain needs the flat first
        check_recipe(load_recipe(recipe_path("calib-abs-gain")), calib_repo)
    with pytest.raises(RecipeError, match="unknown calibration solver 'flat'") as e:
        load_recipe({"recipe": "x", "stages": [{"kind": "calibration", "solver": "flat"}]})
    assert e.value.key == "stages[0].solver"
    with pytest.raises(RecipeError, match="min_imagez"):
        load_recipe({"recipe": "x", "stages": [{"kind": "calibration", "solver": "dark_flat",
                                                 "config": {"min_imagez": 3}}]})


def test_abs_gain_recovers_truth_per_channel(calib_repo):
    run_recipe(recipe_path("calib-dark-flat"), calib_repo, **QUIET)
    run_recipe(recipe_path("calib-abs-gain"), calib_repo, overrides=["stages.0.config.min_measurements=5"], **QUIET)
    agm = calib_repo.open_calibration("abs_gain_matrix")
    assert calib_repo.calibration_versions("abs_gain_matrix") == [1, 2]
    truth = calib_repo.open_state("simulation_truth").sel(band=1)
    ratio = agm["ABS_GAIN"].sel(band=1).values / truth["ABS_GAIN"].values
    cwave = calib_repo.open_calibration("spectral_wcs")["CWAVE"].sel(band=1).values
    edges = calib_repo.instrument.channel_edges(1)
    channel = np.clip(np.searchsorted(edges, cwave) - 1, 0, edges.size - 2)
    good = (truth["MASKS"].values == 0) & np.isfinite(ratio)
    per_channel = np.array([np.median(ratio[good & (channel == c)]) for c in range(edges.size - 1)])
    fn = agm["GAIN_FUNCTION_ERR"].sel(band=1).values / agm["GAIN_FUNCTION"].sel(band=1).values
    assert np.all(np.abs(per_channel - 1) < 0.02), per_channel
    # the deviations are what the gain function's errors allow
    assert np.sqrt(np.mean(((per_channel - 1) / np.sqrt(fn**2 + 1e-6)) ** 2)) < 3
