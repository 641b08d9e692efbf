"""Level 3 on a simulated survey: background, forced photometry, catalogs, HATS, reruns."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.spatial import cKDTree

from sphx import flags as _flags
from sphx.errors import StepError
from sphx.instrument import SPHEREX_SMALL
from sphx.io.hats import write_hats
from sphx.level3.background import estimate_background
from sphx.level3.catalogs import channel_grid, high_reliability_catalog, primary_catalog, secondary_catalog
from sphx.level3.photometry import image_catalog, photometer_image
from sphx.level3.run import CATALOG_TABLES, PHOTOMETRY_TABLE, run_level3
from sphx.simulate import TRUTH_LEVEL

# dense enough that every small image has astrometric calibrators (as the demo)
CONFIG = {"instrument": "SPHEREx-small", "seed": 11, "bands": [1, 4], "survey": {"n_exposures": 4},
          "sky": {"star_density": 15000.0, "mag_bright": 10.0}}
_FATAL = 1 | 4 | 8 | 32


def _simulate(config, path):
    from sphx.demo import recipe_path
    from sphx.pipeline.runner import run_recipe
    from sphx.simulate import simulate_survey

    repo = simulate_survey(config, path).repository
    run_recipe(recipe_path("l1-l2"), repo, profile="synchronous", progress=False, log=lambda s: None)
    calib = {k: repo.open_calibration(k).load() for k in ("average_psf", "solid_angle_pixel_map", "spectral_wcs")}
    return {"repo": repo, "l2": repo.open_level("l2"), "truth": repo.open_level(TRUTH_LEVEL), "calib": calib,
            "refcat": repo.read_table("refcat"), "sources": repo.read_table("truth_sources").to_pandas()}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return _simulate(CONFIG, tmp_path_factory.mktemp("l3") / "repo")


@pytest.fixture(scope="module")
def pipeline_survey(tmp_path_factory):
    """Three times as many exposures: over 5000 isolated measurements on pipeline images."""
    return _simulate({**CONFIG, "survey": {"n_exposures": 12}}, tmp_path_factory.mktemp("l3") / "repo")


def _image(survey, band, obs):
    l2, truth = survey["l2"], survey["truth"]
    cell = l2.sel(band=band, obs=obs)
    return cell, truth.sel(band=band, obs=obs)


def test_background_recovers_the_true_diffuse_sky(survey):
    l2, cwave = survey["l2"], survey["calib"]["spectral_wcs"]["CWAVE"]
    for band in (1, 4):
        cell, truth = _image(survey, band, int(l2.obs.values[0]))
        noise = float(np.sqrt(np.nanmedian(cell["VARIANCE"].values)))
        image = cell["IMAGE"].values
        # an airglow-like line at a fixed wavelength: iso-wavelength stripes the ZODI model lacks
        lam = cwave.sel(band=band).values
        line = 0.5 * noise * np.exp(-0.5 * ((lam - np.median(lam)) / (0.02 * np.median(lam))) ** 2)
        est = estimate_background(image + line, cell["FLAGS"].values, cell["ZODI"].values, lam)
        assert est.method == "global" and est.usable_fraction > 0.9
        residual = (est.background - truth["ZODI"].values - line) / noise
        assert abs(np.median(residual)) < 0.05
        assert np.std(residual) < 0.2  # 10x10 boxes: ~0.1 of a pixel's noise
        assert np.std(est.spectral - line) < 0.1 * noise


def test_crowded_images_use_the_local_background(survey):
    l2, cwave = survey["l2"], survey["calib"]["spectral_wcs"]["CWAVE"]
    cell, truth = _image(survey, 1, int(l2.obs.values[0]))
    flags = cell["FLAGS"].values.copy()
    rng = np.random.default_rng(0)
    crowded = rng.random(flags.shape) < 0.8  # SOURCE over 80 % of the pixels
    flags[crowded] |= np.uint32(_flags.Flag.SOURCE)
    est = estimate_background(cell["IMAGE"].values, flags, cell["ZODI"].values, cwave.sel(band=1).values)
    assert est.method == "local" and est.usable_fraction < 0.9
    noise = float(np.sqrt(np.nanmedian(cell["VARIANCE"].values)))
    assert abs(np.median(est.background - truth["ZODI"].values)) < 0.1 * noise
    with pytest.raises(ValueError, match="one shape"):
        estimate_background(cell["IMAGE"].values, flags[:10], cell["ZODI"].values, cwave.sel(band=1).values)


def _photometry(survey, *, truth_pixels: bool, draws: int = 1, crowded: bool = False, refine: bool = True):
    """Measurements of every image joined with the simulator's truth; with ``truth_pixels``
    the pixels are the true sky plus Gaussian noise of the Level 2 variance (``draws``
    noise realisations per image); ``crowded`` marks 80 % of the pixels SOURCE, which
    forces the local background; ``refine`` estimates the background again without the
    fitted sources, as ``run_level3`` does."""
    l2, calib, rng = survey["l2"], survey["calib"], np.random.default_rng(1)
    rows = []
    images = [(b, o) for b in l2["band"].values for o in l2["obs"].values]
    for band, obs in images * draws:
        cube = l2.sel(band=[band], obs=[obs]).load()
        cell, truth = _image(survey, band, obs)
        if truth_pixels:
            var = cube["VARIANCE"].values[0, 0]
            cube["IMAGE"][0, 0] = truth["IMAGE"].values + rng.normal(size=var.shape) * np.sqrt(np.nan_to_num(var, nan=1.0))
        if crowded:
            cube["FLAGS"][0, 0] = cube["FLAGS"].values[0, 0] | np.where(
                rng.random(cube["FLAGS"].shape[2:]) < 0.8, np.uint32(_flags.Flag.SOURCE), np.uint32(0))
        background = partial(estimate_background, flags=cube["FLAGS"].values[0, 0], zodi=cell["ZODI"].values,
                             wavelength=calib["spectral_wcs"]["CWAVE"].sel(band=band).values)
        est = background(cube["IMAGE"].values[0, 0])
        assert est.method == ("local" if crowded else "global")
        catalog = image_catalog(survey["refcat"], cube, band=int(band), obs=int(obs))
        table = photometer_image(cube, catalog, band=int(band), obs=int(obs), psf=calib["average_psf"],
                                 sapm=calib["solid_angle_pixel_map"], spectral_wcs=calib["spectral_wcs"],
                                 background=est.background, local_background=est.method == "local",
                                 refine_background=(lambda i, f=background: f(i).background) if refine else None).to_pandas()
        src = survey["sources"]
        src = src[(src.obsid == table.obsid.iloc[0]) & (src.band == band)]
        nearest, _ = cKDTree(np.c_[src.x, src.y]).query(np.c_[src.x, src.y], k=2)
        src = src.assign(isolated=nearest[:, 1] > 4)
        rows.append(table.merge(src, on="source_id", suffixes=("", "_true")))
    return pd.concat(rows, ignore_index=True)


def test_forced_photometry_recovers_the_simulated_fluxes(survey):
    m = _photometry(survey, truth_pixels=True, draws=3)
    assert np.abs(m.x - m.x_true).max() < 0.05  # fine WCS, proper motion and parallax
    assert np.abs(m.wavelength - m.wavelength_true).max() < 0.01  # CWAVE at the source [um]
    ok = (m.phot_status & _FATAL) == 0
    pull = ((m.flux - m.flux_true) / m.flux_error)[ok & m.isolated]
    assert pull.size > 5000  # the median's own scatter: ~0.017
    assert abs(np.std(pull) - 1) < 0.05
    assert abs(np.median(pull)) < 0.05
    assert 0.9 < np.nanmedian(m.chi2[ok]) < 1.1


def test_bright_spectra_match_the_truth(survey):
    m = _photometry(survey, truth_pixels=True)
    ok = ((m.phot_status & _FATAL) == 0) & m.isolated
    snr = (m.flux_true / m.flux_error).groupby(m.source_id).transform("median")
    bright = ok & (snr > 10)  # sources with a median S/N above 10 over their measurements
    assert m.source_id[bright].nunique() >= 10
    assert 0.8 < np.mean(((m.flux - m.flux_true) / m.flux_error)[bright] ** 2) < 1.2


def test_crowded_images_are_photometered_with_the_local_background(survey):
    m = _photometry(survey, truth_pixels=True, crowded=True)
    ok = ((m.phot_status & _FATAL) == 0) & m.isolated
    pull = ((m.flux - m.flux_true) / m.flux_error)[ok]
    assert abs(np.std(pull) - 1) < 0.05  # each cutout's level uncertainty is in the error
    assert abs(np.median(pull)) < 0.05


def _isolated_pulls(m):
    ok = ((m.phot_status & _FATAL) == 0) & m.isolated
    return ((m.flux - m.flux_true) / m.flux_error)[ok]


def test_pipeline_images_give_unbiased_isolated_fluxes(pipeline_survey):
    m = _photometry(pipeline_survey, truth_pixels=False)
    pull = _isolated_pulls(m)
    assert pull.size > 5000  # the median's own scatter: ~0.016
    assert abs(np.std(pull) - 1) < 0.05
    assert abs(np.median(pull)) < 0.05
    # the background estimated again without the fitted sources: an estimate from the image
    # itself sits higher, by 0.02 of the flux errors here (0.0008 the paired scatter)
    first = _photometry(pipeline_survey, truth_pixels=False, refine=False)
    both = m.merge(first[["source_id", "obsid", "band", "flux"]], on=["source_id", "obsid", "band"],
                   suffixes=("", "_first"))
    shift = ((both.flux - both.flux_first) / both.flux_error)[_isolated_pulls(both).index]
    assert shift.size == pull.size and shift.mean() > 0.015


@pytest.mark.slow
def test_pipeline_images_of_six_surveys_give_unbiased_isolated_fluxes(tmp_path):
    pulls = [_isolated_pulls(_photometry(_simulate({**CONFIG, "seed": seed, "survey": {"n_exposures": 6}},
                                                   tmp_path / f"s{seed}"), truth_pixels=False))
             for seed in range(11, 17)]
    pull = np.concatenate(pulls)
    assert pull.size > 15000  # the median's own scatter: ~0.01
    assert abs(np.std(pull) - 1) < 0.05
    assert abs(np.median(pull)) < 0.05


def test_noise_slope_from_a_sample_of_the_pixels(survey):
    # noise_sample=4 fits the variance per unit signal on 1/16 of the pixels (1.5 % off the
    # whole image's here): the weights barely change, the fluxes by a small fraction of their
    # errors (measured: median 0.001, most 0.02 of the error)
    l2, calib = survey["l2"], survey["calib"]
    band, obs = 1, int(l2.obs.values[0])
    cube = l2.sel(band=[band], obs=[obs]).load()
    catalog = image_catalog(survey["refcat"], cube, band=band, obs=obs)
    options = {"band": band, "obs": obs, "psf": calib["average_psf"], "sapm": calib["solid_angle_pixel_map"],
               "spectral_wcs": calib["spectral_wcs"], "background": cube["ZODI"].values[0, 0].astype(np.float32),
               "local_background": True}
    whole, sample = (photometer_image(cube, catalog, noise_sample=k, **options) for k in (1, 4))
    assert whole.num_rows == sample.num_rows > 50
    a, b, err = (t.column(c).to_numpy() for t, c in ((whole, "flux"), (sample, "flux"), (whole, "flux_error")))
    ok = np.isfinite(a) & (err > 0)
    shift = np.abs(b[ok] - a[ok]) / err[ok]
    assert shift.max() > 0  # the sample gives its own slope
    assert np.median(shift) < 0.005 and shift.max() < 0.1


def test_photometry_input_errors(survey):
    l2, calib = survey["l2"], survey["calib"]
    band, obs = 1, int(l2.obs.values[0])
    with pytest.raises(StepError, match="background has shape"):
        photometer_image(l2, survey["refcat"], band=band, obs=obs, psf=calib["average_psf"],
                         sapm=calib["solid_angle_pixel_map"], spectral_wcs=calib["spectral_wcs"],
                         background=np.zeros((3, 3)))
    empty = survey["refcat"].slice(0, 0)
    table = photometer_image(l2, empty, band=band, obs=obs, psf=calib["average_psf"],
                             sapm=calib["solid_angle_pixel_map"], spectral_wcs=calib["spectral_wcs"],
                             background=np.zeros((l2.sizes["y"], l2.sizes["x"])))
    assert table.num_rows == 0 and "neighbour_cov" in table.column_names


def _measurements(rng, n_sources, n_visits, *, variable=()):
    """A primary-catalog-like table: constant sources seen in two surveys (some variable)."""
    inst = SPHEREX_SMALL
    grid_band, grid_centre, _ = channel_grid(inst)
    rows = {k: [] for k in ("source_id", "flux", "flux_error", "wavelength", "band", "mjd")}
    truth = rng.uniform(50, 500, (n_sources, grid_band.size))
    for s in range(n_sources):
        for v in range(n_visits):
            survey = v % 2
            ch = rng.integers(0, grid_band.size, 20)
            err = np.full(ch.size, 5.0)
            flux = truth[s, ch] * (1.3 if (s in variable and survey == 1) else 1.0)
            rows["source_id"].append(np.full(ch.size, s))
            rows["flux"].append(flux + rng.normal(0, 1, ch.size) * err)
            rows["flux_error"].append(err)
            rows["wavelength"].append(grid_centre[ch])
            rows["band"].append(grid_band[ch])
            rows["mjd"].append(np.full(ch.size, 60800.0 + 190.0 * survey + v))
    cols = {k: np.concatenate(v) for k, v in rows.items()}
    n = cols["flux"].size
    cols.update(ra=np.full(n, 10.0), dec=np.full(n, 20.0), bandwidth=np.full(n, 0.01),
                obsid=np.array(["x"] * n), flags=np.zeros(n, np.uint32), phot_status=np.zeros(n, np.int32),
                chi2=np.ones(n), n_blend=np.zeros(n, np.int32), healpix64=np.zeros(n, np.int64))
    table = pa.table(cols).append_column("neighbour_id", pa.array([[]] * n, pa.list_(pa.int64())))
    table = table.append_column("neighbour_cov", pa.array([[]] * n, pa.list_(pa.float64())))
    return table, truth, inst


def test_secondary_catalog_spectra_and_variability():
    rng = np.random.default_rng(3)
    table, truth, inst = _measurements(rng, 300, 8, variable=set(range(10)))
    secondary = secondary_catalog(primary_catalog([table]), inst, bright_snr=1e9)
    flux = np.array(secondary.column("flux").to_pylist())
    err = np.array(secondary.column("flux_error").to_pylist())
    seen = np.isfinite(flux[10:])
    # channel means of the constant sources against the truth: unit pulls
    pull = ((flux[10:] - truth[10:]) / err[10:])[seen]
    assert abs(np.std(pull) - 1) < 0.05
    sigma = secondary.column("variability_sigma").to_numpy()
    variable = secondary.column("variable").to_numpy()
    assert variable[:10].all()  # a 30 % brightening between surveys at S/N ~20 per point
    assert variable[10:].mean() < 0.01 and np.mean(sigma[10:] > 3) < 0.02  # ~0.3 % expected
    assert np.all(secondary.column("n_epochs").to_numpy() == 2)
    reliable = high_reliability_catalog(secondary)
    ids = set(reliable.column("source_id").to_pylist())
    assert not ids & set(range(10)) and len(ids) > 250


def test_hats_catalog_opens_and_cone_searches_with_lsdb(tmp_path):
    import lsdb

    rng = np.random.default_rng(4)
    import healpy as hp

    ra, dec = rng.uniform(10, 12, 3000), rng.uniform(-1, 1, 3000)
    tile = hp.ang2pix(64, ra, dec, lonlat=True, nest=True)
    table = pa.table({"source_id": np.arange(3000), "ra": ra, "dec": dec, "flux": rng.normal(size=3000)})
    tiles = {int(t): table.filter(pa.array(tile == t)) for t in np.unique(tile)}
    # one row filed under the wrong tile is moved to its own
    first, second = sorted(tiles)[:2]
    tiles[first] = pa.concat_tables([tiles[first], tiles[second].slice(0, 1)])
    tiles[second] = tiles[second].slice(1)
    path = write_hats(tmp_path / "cat", tiles, name="test")
    catalog = lsdb.open_catalog(path)
    assert catalog.hc_structure.catalog_info.total_rows == 3000
    found = catalog.cone_search(11.0, 0.0, 1800).compute()
    cos = np.sin(np.radians(dec)) * 0 + np.cos(np.radians(dec)) * np.cos(np.radians(ra - 11.0))
    expected = np.flatnonzero(np.degrees(np.arccos(np.clip(cos, -1, 1))) * 3600 < 1800)
    assert sorted(found["source_id"]) == sorted(expected)
    with pytest.raises(FileExistsError):
        write_hats(tmp_path / "cat", tiles, name="test")
    # an update replaces only the given tiles' files
    untouched = {p: p.stat().st_mtime_ns for p in (tmp_path / "cat" / "dataset").rglob("Npix=*.parquet")}
    changed = tiles[second].set_column(3, "flux", pa.array(np.full(tiles[second].num_rows, 99.0)))
    write_hats(tmp_path / "cat", {second: changed}, name="test", update=True)
    catalog = lsdb.open_catalog(tmp_path / "cat")
    assert catalog.hc_structure.catalog_info.total_rows == 3000 - 1
    data = catalog.compute()
    assert np.all(data.flux[np.isin(data.source_id, changed["source_id"].to_numpy())] == 99.0)
    rewritten = [p for p, t in untouched.items() if p.stat().st_mtime_ns != t]
    assert len(rewritten) == 1 and f"Npix={second}." in rewritten[0].name
    with pytest.raises(ValueError, match="does not replace"):
        write_hats(tmp_path / "cat", {second: tiles[first]}, name="test", update=True)


def test_run_level3_writes_catalogs_and_reruns_only_new_work(survey, tmp_path):
    import shutil

    from sphx import open_repository

    path = tmp_path / "repo"
    shutil.copytree(survey["repo"].location, path)
    repo = open_repository(path)
    obsids = [str(o) for o in survey["l2"]["obsid"].values]
    first = run_level3(repo, select={"obs": obsids[:2]})
    assert len(first.images) == 4 and first.tiles
    assert set(repo.tables()) >= {PHOTOMETRY_TABLE, *CATALOG_TABLES}
    measured = sum(i["rows"] for i in first.images)
    primary = repo.read_table("l3_primary")
    assert primary.num_rows == measured
    # new images: only they are photometered, and only their tiles catalogued again
    second = run_level3(repo)
    assert {i["obsid"] for i in second.images} == set(obsids[2:])
    assert len(second.skipped) == 4
    assert {t["tile"] for t in second.tiles} == {t for i in second.images for t in i["tiles"]}
    assert repo.read_table("l3_primary").num_rows == measured + sum(i["rows"] for i in second.images)
    assert not run_level3(repo).images


def test_l3_recipe_checks_its_wiring(survey, tmp_path):
    from sphx.demo import recipe_path
    from sphx.errors import RecipeError
    from sphx.pipeline.recipe import load_recipe
    from sphx.pipeline.runner import run_recipe

    plan = run_recipe(recipe_path("l3"), survey["repo"], dry_run=True).plan
    assert [s["step"] for s in plan[0]["steps"]] == [
        "estimate_diffuse_background", "perform_forced_photometry", "create_primary_catalog",
        "create_secondary_catalog_and_estimate_variability", "create_high_reliability_catalog"]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.config.*bright_sn"):
        load_recipe(recipe_path("l3"), overrides=["stages.0.config.bright_sn=5"])
    with pytest.raises(RecipeError, match="unknown stage kind 'level4'"):
        load_recipe(recipe_path("l3"), overrides=["stages.0.kind=level4"])
    bad = load_recipe(recipe_path("l3"), overrides=["stages.0.input=l1"])
    with pytest.raises(RecipeError, match=r"needs (VARIANCE, )?ZODI"):
        run_recipe(bad, survey["repo"], dry_run=True)
