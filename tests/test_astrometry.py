"""Estimate Fine Astrometry and Query Reference Catalog against the simulator's truth.

Kernels first (centroids, peaks, the pattern match, the rotation fit) against known
inputs and independent implementations (photutils, scipy), then the steps in the
l1-l2 recipe on a simulated survey with arcminute pointing errors.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import yaml
from astropy.coordinates import SkyCoord
from scipy.linalg import orthogonal_procrustes

from sphx import flags as F
from sphx import open_repository
from sphx.astrometry.centroid import FIT_FIELDS, find_peaks, fit_centroids
from sphx.astrometry.pattern import match_offsets, match_patterns
from sphx.astrometry.solve import FINAST_BITS, describe_finast, fit_rotation
from sphx.demo import recipe_path
from sphx.level2.fine_astrometry import estimate_fine_astrometry
from sphx.level2.query_catalog import query_reference_catalog, srccat_tables
from sphx.pipeline.runner import run_recipe
from sphx.simulate import simulate_survey
from sphx.simulate.optics import render_point_sources
from sphx.testing import raise_if_dask_computes
from sphx.wcs import WCS_VARIABLES, cube_wcs

COL = {name: k for k, name in enumerate(FIT_FIELDS)}
# Small detectors see 1/68 of a real one's sky; ten times the stars per deg^2 gives
# each of them a few tens of calibrators, as a real image at high latitude has hundreds.
DENSE = {"instrument": "SPHEREx-small", "seed": 5, "bands": [1, 2, 4], "sky": {"star_density": 15000.0},
         "survey": {"n_exposures": 4, "pointing_error": 3.0, "roll_error": 0.2}}
# The galactic plane at b = +2: ~10^4 catalogue sources per small detector, the brightest
# of them saturated, so the image's brightest usable stars are not the catalogue's.
PLANE = {"instrument": "SPHEREx-small", "seed": 6, "bands": [1, 4],
         "survey": {"n_exposures": 3, "mode": "deep", "deep_field": [305.0, 40.0], "pointing_error": 3.0,
                    "roll_error": 0.2}}


def _stars(rng, n=400, k=150, sigma=0.4, flux=(1.5, 4.0)):
    img = np.zeros((n, n))
    x, y = rng.uniform(8, n - 8, k), rng.uniform(8, n - 8, k)
    f = 10 ** rng.uniform(*flux, k)
    render_point_sources(img, x, y, f, np.full(k, sigma), np.full(k, sigma))
    var = np.ones((n, n), np.float32)
    img = (img + 5.0 + rng.standard_normal((n, n))).astype(np.float32)
    return img, var, np.zeros((n, n), np.uint32), x, y, f


# --- kernels -----------------------------------------------------------------------------------
def test_centroids_are_unbiased_on_the_undersampled_psf():
    rng = np.random.default_rng(1)
    img, var, flags, x, y, _ = _stars(rng)
    out = fit_centroids(img, var, flags, np.uint32(1), np.uint32(2), x + rng.normal(0, 0.4, x.size),
                        y + rng.normal(0, 0.4, y.size), 3, 1.0, 1.5)
    ok = out[:, COL["status"]] == 0
    assert ok.mean() > 0.9
    dx, dy = out[ok, COL["x"]] - x[ok], out[ok, COL["y"]] - y[ok]
    snr = out[ok, COL["flux"]] / out[ok, COL["flux_error"]]
    bright = snr > 30
    # pixel-phase errors of a one-Gaussian fit to the core + wing PSF stay near 0.01 pixel
    assert abs(dx[bright].mean()) < 0.005 and abs(dy[bright].mean()) < 0.005
    assert np.hypot(dx[bright], dy[bright]).max() < 0.06
    # the formal errors describe the noise at moderate SNR (robust width: stars land on each other)
    mid = (snr > 10) & (snr < 30)
    pulls = np.concatenate([dx[mid] / out[ok, COL["x_error"]][mid], dy[mid] / out[ok, COL["y_error"]][mid]])
    assert 0.5 < 1.4826 * np.median(np.abs(pulls - np.median(pulls))) < 1.4


def test_centroids_agree_with_photutils_on_a_well_sampled_star():
    from photutils.centroids import centroid_2dg

    rng = np.random.default_rng(2)
    img, var, flags, x, y, _ = _stars(rng, n=64, k=1, sigma=2.0, flux=(4.5, 4.6))
    x0, y0 = x[0], y[0]
    out = fit_centroids(img, var, flags, np.uint32(1), np.uint32(2), x[:1] + 0.3, y[:1] - 0.3, 7, 1.5, 2.0)
    cx, cy = round(x0), round(y0)
    stamp = img[cy - 7:cy + 8, cx - 7:cx + 8] - 5.0
    px, py = centroid_2dg(stamp)
    assert out[0, COL["status"]] == 0
    assert abs(out[0, COL["x"]] - (cx - 7 + px)) < 0.02 and abs(out[0, COL["y"]] - (cy - 7 + py)) < 0.02
    assert abs(out[0, COL["x"]] - x0) < 0.02 and abs(out[0, COL["y"]] - y0) < 0.02
    assert abs(out[0, COL["sigma"]] - 2.0) < 0.05


def test_centroids_reject_flagged_cores_edges_and_missing_pixels():
    rng = np.random.default_rng(3)
    img, var, flags, x, y, _ = _stars(rng, n=64, k=1, flux=(4, 4.1))
    flags[round(y[0]), round(x[0])] = 2
    edge = np.array([1.0])
    empty = np.full_like(img, np.nan)
    assert fit_centroids(img, var, flags, np.uint32(1), np.uint32(2), x[:1], y[:1], 3, 1.0, 1.5)[0, -1] == 2
    assert fit_centroids(img, var, flags, np.uint32(1), np.uint32(0), edge, edge, 3, 1.0, 1.5)[0, -1] == 1
    assert fit_centroids(empty, var, flags, np.uint32(1), np.uint32(0), x[:1], y[:1], 3, 1.0, 1.5)[0, -1] == 1


def test_peaks_find_the_bright_stars():
    rng = np.random.default_rng(4)
    img, var, flags, x, y, _ = _stars(rng, flux=(2.5, 4.0))
    px, py, _ = find_peaks(img, var, flags, np.uint32(1), 10.0, 4)
    inside = (x > 5) & (x < 395) & (y > 5) & (y < 395)
    found = np.hypot(px[None, :] - x[inside, None], py[None, :] - y[inside, None]).min(axis=1) < 1.0
    assert found.mean() > 0.95
    assert px.size < 1.1 * inside.sum()  # few noise peaks at 10 sigma


def test_pattern_match_recovers_a_large_rotation_and_shift():
    rng = np.random.default_rng(5)
    x, y = rng.uniform(-100, 2140, 120), rng.uniform(-100, 2140, 120)
    theta, shift, centre = np.deg2rad(30.0), 140.0 - 90.0j, 1020 + 1020j
    z = np.exp(1j * theta) * (x + 1j * y - centre) + centre + shift
    seen = (z.real > 0) & (z.real < 2040) & (z.imag > 0) & (z.imag < 2040) & (rng.uniform(size=120) > 0.3)
    zi = z[seen] + 0.3 * (rng.standard_normal(seen.sum()) + 1j * rng.standard_normal(seen.sum()))
    zi = np.concatenate([zi, rng.uniform(0, 2040, 10) + 1j * rng.uniform(0, 2040, 10)])  # unmatched detections
    m = match_patterns(zi.real, zi.imag, x, y)
    assert m is not None
    assert abs(m.rotation + 30.0) < 0.05 and abs(m.scale - 1.0) < 1e-3
    mapped = m.apply(zi.real[:seen.sum()], zi.imag[:seen.sum()])
    assert np.hypot(mapped[0] - x[seen], mapped[1] - y[seen]).max() < 2.0
    assert len(m.pairs) >= 0.9 * seen.sum()
    # a mirror image (the other parity) and a list of three never match
    assert match_patterns(-zi.real, zi.imag, x, y) is None
    assert match_patterns(zi.real[:3], zi.imag[:3], x, y) is None


def test_offset_vote_matches_a_crowded_field_where_triangles_fail():
    # A plane-like list: 2500 catalogue stars in the flux range of 150 detections, most of
    # which are not detected (saturation, blends) and some detections have no
    # counterpart; fluxes scatter, so the brightest neighbours differ between the lists.
    rng = np.random.default_rng(8)
    x, y = rng.uniform(-150, 2190, 2500), rng.uniform(-150, 2190, 2500)
    theta, shift, centre = np.deg2rad(0.35), 90.0 - 60.0j, 1019.5 + 1019.5j
    z = np.exp(1j * theta) * (x + 1j * y - centre) + centre + shift  # catalogue star -> detector pixel
    on = np.flatnonzero((z.real > 5) & (z.real < 2035) & (z.imag > 5) & (z.imag < 2035))
    seen = rng.choice(on, 130, replace=False)
    zi = z[seen] + 0.3 * (rng.standard_normal(130) + 1j * rng.standard_normal(130))
    zi = np.concatenate([zi, rng.uniform(0, 2040, 20) + 1j * rng.uniform(0, 2040, 20)])
    m = match_offsets(zi.real, zi.imag, x, y, centre=(1019.5, 1019.5), radius=150.0, max_rotation=2.0)
    assert m is not None
    assert abs(m.rotation + 0.35) < 0.01 and abs(m.scale - 1.0) < 1e-3
    mapped = m.apply(zi.real[:130], zi.imag[:130])
    assert np.hypot(mapped[0] - x[seen], mapped[1] - y[seen]).max() < 2.0
    assert len(m.pairs) >= 125
    assert match_patterns(zi.real, zi.imag, x, y) is None
    # unrelated lists, or a shift beyond the search box, find nothing
    assert match_offsets(rng.uniform(0, 2040, 150), rng.uniform(0, 2040, 150), x, y, centre=(1019.5, 1019.5),
                         radius=150.0, max_rotation=2.0) is None
    assert match_offsets(zi.real + 400, zi.imag, x, y, centre=(1019.5, 1019.5), radius=150.0,
                         max_rotation=2.0) is None


def test_rotation_fit_matches_scipy_procrustes():
    rng = np.random.default_rng(6)
    q = rng.normal(0, 1, (50, 2))
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    xi = q @ rot.T + [0.5, -0.2] + rng.normal(0, 1e-3, (50, 2))
    got, s, t = fit_rotation(q, xi, np.ones(50))
    r, _ = orthogonal_procrustes(q - q.mean(0), xi - xi.mean(0))  # q R ~ xi: R = rot.T
    assert abs(got - np.arctan2(r[0, 1], r[0, 0])) < 1e-12 and abs(got - theta) < 1e-3
    assert s == 1.0 and np.allclose(t, [0.5, -0.2], atol=1e-3)


def test_describe_finast():
    assert describe_finast(0) == "good solution"
    text = describe_finast(4 | 16)
    assert FINAST_BITS[4] in text and FINAST_BITS[16] in text


# --- the steps on a simulated survey -----------------------------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A survey with 3' pointing and 0.2 deg roll errors after the l1-l2 recipe."""
    path = tmp_path_factory.mktemp("astrometry") / "repo"
    repo = simulate_survey(DENSE, path).repository
    run_recipe(recipe_path("l1-l2"), repo, profile="synchronous", progress=False, log=lambda s: None)
    return repo


def _rms_error(a, b, n: int) -> float:
    g = np.linspace(0, n - 1, 15)
    gx, gy = np.meshgrid(g, g)
    pa_, pb = (SkyCoord(*w.all_pix2world(gx.ravel(), gy.ravel(), 0), unit="deg") for w in (a, b))
    return float(np.sqrt(np.mean(pa_.separation(pb).arcsec ** 2)))


def test_solved_wcs_reproduces_the_truth(dense):
    l2, l1, truth = dense.open_level("l2"), dense.open_level("l1"), dense.open_level("truth")
    n = dense.instrument.n_active
    finast = l2["finast"].values
    assert (finast == 0).mean() >= 0.75, finast
    for b in l2["band"].values:
        for o in l2["obs"].values:
            solved, true = cube_wcs(l2, band=b, obs=o), cube_wcs(truth, band=b, obs=o)
            coarse = cube_wcs(l1, band=b, obs=o)
            assert _rms_error(coarse, true, n) > 5.0  # the pointing error to be solved
            if l2["finast"].sel(band=b, obs=o) == 0:
                assert _rms_error(solved, true, n) < 0.1
                assert l2["astrometry_rms"].sel(band=b, obs=o) < 1.0
                assert l2["astrometry_nmatch"].sel(band=b, obs=o) >= 10
                assert l2["astrometry_error"].sel(band=b, obs=o) <= 0.1
            else:  # failures keep the coarse WCS and fail Level 2 data quality: never silently wrong
                np.testing.assert_array_equal(l2["wcs_crval"].sel(band=b, obs=o), l1["wcs_crval"].sel(band=b, obs=o))
                assert not l2["l2dqa_pass"].sel(band=b, obs=o)
    assert l2["finast"].attrs["long_name"].startswith("FINAST")


def test_crowded_galactic_plane_is_solved(tmp_path):
    repo = simulate_survey(PLANE, tmp_path / "repo").repository
    run_recipe(recipe_path("l1-l2"), repo, profile="synchronous", progress=False, log=lambda s: None)
    l2, truth = repo.open_level("l2"), repo.open_level("truth")
    assert (l2["finast"].values == 0).all(), l2["finast"].values
    assert (l2["astrometry_nblind"].values >= 20).all()
    n = repo.instrument.n_active
    for b in l2["band"].values:
        for o in l2["obs"].values:
            assert _rms_error(cube_wcs(l2, band=b, obs=o), cube_wcs(truth, band=b, obs=o), n) < 0.1


def test_srccat_pieces_cover_each_target_group(dense):
    l1 = dense.open_level("l1")
    srccat = dense.read_table("srccat").to_pandas()
    refcat = dense.read_table("refcat", columns=["source_id", "ra", "dec"]).to_pandas()
    plan_groups = {(t, p) for t in np.unique(l1["target"].values) for p in ((1, 4), (2, 5))}
    pieces = dense.open_table("srccat").files
    assert len(pieces) == len(plan_groups)
    # every catalogue source on an image of band 1 is in the list of its group
    ids = set(srccat["source_id"])
    for o in l1["obs"].values:
        w = cube_wcs(l1, band=1, obs=o)
        near = SkyCoord(refcat["ra"].values, refcat["dec"].values, unit="deg").separation(
            SkyCoord(*w.wcs.crval, unit="deg")).deg < 1.0
        x, y = np.full(len(refcat), -1.0), np.full(len(refcat), -1.0)
        x[near], y[near] = w.all_world2pix(refcat["ra"].values[near], refcat["dec"].values[near], 0)
        on = (x > 0) & (x < 247) & (y > 0) & (y < 247)
        assert on.sum() > 100 and set(refcat["source_id"].values[on]) <= ids
    assert srccat["ref_epoch"].between(2025.9, 2026.1).all()  # moved to the exposures' epoch


def test_query_step_splits_into_one_piece_per_group(dense):
    l2a = dense.open_level("l2a")
    with raise_if_dask_computes():
        out = query_reference_catalog(l2a, tables={"refcat": dense.open_table("refcat")})
    rows = out["srccat_rows"].values
    assert (rows[..., 1] > rows[..., 0]).all()
    # dichroic partners share their group's rows
    np.testing.assert_array_equal(rows[list(out["band"].values).index(1)], rows[list(out["band"].values).index(4)])
    rest, pieces = srccat_tables(out)
    assert not any(v.startswith("srccat") for v in rest.variables)
    assert sum(t.num_rows for t in pieces.values()) == out.sizes["srccat_source"]


def test_fine_astrometry_is_lazy_and_flags_bad_inputs(dense):
    l2 = dense.open_level("l2").isel(obs=[0])
    l1 = dense.open_level("l1").isel(obs=[0])
    ds = l2.drop_vars([v for v in l2.data_vars if v.startswith(("wcs_", "finast", "astrometry_"))]).assign(
        {v: l1[v] for v in WCS_VARIABLES})
    later = np.uint32(F.mask("OUTLIER", "SOURCE"))  # set by steps after fine astrometry (star cores)
    ds["FLAGS"] = (ds["FLAGS"] & ~later).assign_attrs(ds["FLAGS"].attrs)
    calib = {"spectral_wcs": dense.open_calibration("spectral_wcs")}
    refcat = dense.read_table("refcat")
    with raise_if_dask_computes():
        lazy = estimate_fine_astrometry(ds, calib=calib, tables={"refcat": refcat})
    assert (lazy["finast"].values == 0).any()

    blank = ds.copy()
    blank["IMAGE"] = blank["IMAGE"] * np.nan
    out = estimate_fine_astrometry(blank, calib=calib, tables={"refcat": refcat})
    assert (out["finast"].values == 1).all()
    empty = refcat.slice(0, 0)
    out = estimate_fine_astrometry(ds, calib=calib, tables={"refcat": empty})
    assert (out["finast"].values == 2).all()
    np.testing.assert_array_equal(out["wcs_crval"].values, ds["wcs_crval"].values)
    elsewhere = pa.table({c: refcat.column(c) for c in refcat.column_names} | {
        "dec": pa.array(-np.asarray(refcat.column("dec")))})
    out = estimate_fine_astrometry(ds, calib=calib, tables={"refcat": elsewhere})
    assert (out["finast"].values & 2).all()


def test_failed_solution_never_replaces_the_coarse_wcs(dense, tmp_path):
    path = tmp_path / "repo"
    shutil.copytree(dense.location, path)
    repo = open_repository(path)
    recipe = yaml.safe_load(recipe_path("l1-l2").read_text())
    stage = recipe["stages"][2]
    stage["output"] = "l2_strict"
    stage["steps"] = [{"step": s, "config": {"min_matches": 100000}} if s == "estimate_fine_astrometry" else s
                      for s in stage["steps"]]
    recipe["stages"] = [stage]
    run_recipe(recipe, repo, profile="synchronous", progress=False, log=lambda s: None)
    l2, l1 = repo.open_level("l2_strict"), repo.open_level("l1")
    assert (l2["finast"].values != 0).all()
    np.testing.assert_array_equal(l2["wcs_crval"].values, l1["wcs_crval"].values)
    assert not l2["l2dqa_pass"].values.any()
    assert (l2["source_fraction"].values > 0).all()  # later steps still ran, on the coarse WCS
