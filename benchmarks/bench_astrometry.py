"""Estimate Fine Astrometry on the real geometry: accuracy against the truth and speed.

Simulates a deep field at high galactic latitude and one in the galactic plane (real
2040x2040 detectors, arcminute pointing and a few tenths of a degree of roll error),
runs the whole ``l1-l2`` recipe, and compares every image's solved WCS with the true
one over a 20x20 grid of the detector. Then times the solver alone on the Level 2
images (inputs in memory, two threads: one image per core, as the step runs).

    python benchmarks/bench_astrometry.py [--exposures 8] [--bands 1 2 3 4 5 6]
        [--pointing-error 5] [--roll-error 0.2] [--dir /tmp/sphx-bench-astrometry]

Prints, per field: images solved (FINAST = 0), the largest and median rms error of the
solved WCSs against the truth [arcsec], how many flagged images would have been wrong,
and the solver's wall time per image.
"""

from __future__ import annotations

import argparse
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from astropy.coordinates import SkyCoord

from sphx import flags as _flags
from sphx.astrometry.catalog import catalog_inputs, image_rows
from sphx.astrometry.solve import SolveOptions, describe_finast, solve_image
from sphx.demo import recipe_path
from sphx.ephemeris import julian_year
from sphx.level2.query_catalog import query_reference_catalog
from sphx.pipeline.runner import run_recipe
from sphx.simulate import simulate_survey
from sphx.wcs import cube_wcs

FIELDS = {"high": ("high latitude (b = +73)", (180.0, 40.0)), "plane": ("galactic plane (b = +2)", (305.0, 40.0))}


def _truth_error(l2, truth, band, obs, n: int) -> float:
    g = np.linspace(0, n - 1, 20)
    gx, gy = np.meshgrid(g, g)
    a = SkyCoord(*cube_wcs(l2, band=band, obs=obs).all_pix2world(gx.ravel(), gy.ravel(), 0), unit="deg")
    b = SkyCoord(*cube_wcs(truth, band=band, obs=obs).all_pix2world(gx.ravel(), gy.ravel(), 0), unit="deg")
    return float(np.sqrt(np.mean(a.separation(b).arcsec ** 2)))


def run_field(key: str, args: argparse.Namespace) -> None:
    name, centre = FIELDS[key]
    path = Path(args.dir) / key
    shutil.rmtree(path, ignore_errors=True)
    config = {"seed": args.seed, "instrument": "SPHEREx", "bands": args.bands,
              "survey": {"n_exposures": args.exposures, "mode": "deep", "deep_field": list(centre),
                         "pointing_error": args.pointing_error, "roll_error": args.roll_error}}
    t0 = time.perf_counter()
    repo = simulate_survey(config, path).repository
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_recipe(recipe_path("l1-l2"), repo, log=lambda s: None)
    t_run = time.perf_counter() - t0
    l2, truth, l1 = repo.open_level("l2"), repo.open_level("truth"), repo.open_level("l1")
    n = repo.instrument.n_active
    good, wrong, errors, codes = 0, 0, [], {}
    for b in l2["band"].values:
        for o in l2["obs"].values:
            finast = int(l2["finast"].sel(band=b, obs=o))
            err = _truth_error(l2, truth, b, o, n)
            if finast == 0:
                good += 1
                errors.append(err)
                wrong += err > 0.1
            else:
                codes[describe_finast(finast)] = codes.get(describe_finast(finast), 0) + 1
    total = l2.sizes["band"] * l2.sizes["obs"]
    print(f"{name}: simulate {t_sim:.0f} s, l1-l2 recipe {t_run:.0f} s for {total} images")
    print(f"  FINAST = 0: {good} of {total} ({100.0 * good / total:.1f} %); flagged: {codes or 'none'}")
    if errors:
        e = np.array(errors)
        print(f"  solved WCS vs truth, rms over the detector: median {np.median(e):.3f}\", max {e.max():.3f}\"; "
              f"FINAST = 0 images worse than 0.1\": {wrong}")
        nmatch = l2["astrometry_nmatch"].values[l2["finast"].values == 0]
        print(f"  calibrators per solved image: median {int(np.median(nmatch))}, min {int(nmatch.min())}")

    # the solver alone, on the Level 2 images in memory, one image per core
    l2in = l2.drop_vars([v for v in l2.data_vars if v.startswith("wcs_")]).assign(
        {v: l1[v] for v in l1.data_vars if v.startswith("wcs_")})  # the coarse WCS again
    l2in = query_reference_catalog(l2in, tables={"refcat": repo.open_table("refcat")})
    catalog, rows = catalog_inputs(l2in, {}, step="bench")
    catalog, rows = catalog.values, rows.values
    cwave = repo.open_calibration("spectral_wcs")["CWAVE"]
    options = SolveOptions(pixel_scale=repo.instrument.pixel_scale, bad=int(_flags.DEFAULT_BAD),
                           saturated=int(_flags.mask("OVERFLOW", "NONLINEAR", "SUR_ERROR")))
    jobs = []
    for i, b in enumerate(l2in["band"].values):
        cw = cwave.sel(band=b).values
        for j, o in enumerate(l2in["obs"].values):
            cell = l2in.sel(band=b, obs=o)
            arrays = [cell[v].values for v in ("IMAGE", "VARIANCE", "FLAGS")] + [cw] + [
                cell[f"wcs_{k}"].values for k in ("crpix", "crval", "cd", "sip_a", "sip_b", "sip_ap", "sip_bp")]
            jobs.append((arrays, image_rows(catalog, rows[i, j]), float(julian_year(cell["mjd_avg"].values))))
    solve_image(*jobs[0][0], jobs[0][1], jobs[0][2], options)  # compile
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: solve_image(*job[0], job[1], job[2], options), jobs))
    per_image = (time.perf_counter() - t0) / len(jobs)
    print(f"  solver wall time per image on 2 threads: {per_image:.3f} s (budget 1 s); "
          f"catalogue rows per image: {int(np.mean(rows[..., 1] - rows[..., 0]))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exposures", type=int, default=8)
    p.add_argument("--bands", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--pointing-error", type=float, default=5.0, help="rms boresight error [arcmin]")
    p.add_argument("--roll-error", type=float, default=0.2, help="rms roll error [deg]")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--dir", default="/tmp/sphx-bench-astrometry")
    p.add_argument("--fields", nargs="+", choices=["high", "plane"], default=["high", "plane"])
    args = p.parse_args()
    for key in args.fields:
        run_field(key, args)


if __name__ == "__main__":
    main()
