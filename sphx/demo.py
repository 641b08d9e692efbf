"""``sphx demo``: the whole pipeline that exists, end to end, on an embedded default.

Everything goes into one folder under the current directory (``./sphx-demo`` by
default): a repository with the raw exposures, the calibration products, the truth and
every level the recipes write. What runs today:

1. :func:`sphx.simulate.simulate_survey` simulates a small survey (target groups of
   small slews, stars and galaxies with spectra, Kelsall zodiacal light, the PSF and
   filter optics, every detector effect) and writes raw exposures, lab-measured
   calibration products and the truth;
2. ``recipes/l1-l2.yaml`` runs on an embedded ``LocalCluster``: Level 1 (written as
   level ``l1``), Level 2a (``l2a``, with the persistence state) and Level 2b (``l2``,
   calibrated spectral images with flags, variance and the zodiacal light model);
   Level 2b queries the reference catalogue once per target group and dichroic pair,
   solves every image's pointing and roll from its stars (fine astrometry: the survey
   is simulated with arcminute pointing errors) and lists the known solar system
   objects on each image;
3. the Level 2 images and their solved WCSs are checked against the simulator's truth;
4. the Level 2 spectral images are exported as archive-format FITS files (7 HDUs, one
   file per detector and exposure) into ``fits/``;
5. ``recipes/l3.yaml`` runs Level 3: background and forced photometry of every
   catalogued source on every image, then per sky tile the primary, secondary
   (spectra and variability) and high-reliability catalogs, as Parquet tables and HATS
   catalogs (``repository/hats/``); a few recovered spectra are compared with the truth;
6. with ``--calibrate`` (and at least 24 exposures), the dark current and flat field are
   solved from the survey's own images (``recipes/calib-dark-flat.yaml``) as new
   calibration versions and compared with the truth.

On the small test geometry a detector sees 1/68 of a real one's sky, so the demo's sky
has ten times the stars per square degree (none brighter than AB mag 10, which would
then crowd the small images): each image has a few tens of astrometric calibrators,
where a real image at high latitude has hundreds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import flags as _flags
from .astrometry.solve import describe_finast
from .errors import SphxError
from .io import Repository
from .io.fits import export_level
from .pipeline.runner import RunReport, run_recipe
from .wcs import cube_wcs

__all__ = ["DemoResult", "recipe_path", "run_demo"]

_MARKER = ".sphx-demo"
CALIBRATION_EXPOSURES = 24  # the dark/flat solver's min_images (20) with every band present
# flags that make a pixel unusable for the comparison with the truth (SOURCE is not one)
_DEMO_BAD = ("TRANSIENT", "OVERFLOW", "SUR_ERROR", "NONFUNC", "DICHROIC", "MISSING_DATA", "HOT", "COLD",
             "PHANMISS", "NONLINEAR", "PERSIST", "OUTLIER")


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped with sphx (``recipes/<name>.yaml``)."""
    path = Path(__file__).resolve().parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        raise SphxError(f"no recipe {name!r} shipped with sphx (looked for {path})")
    return path


@dataclass
class DemoResult:
    output: Path
    repository: Repository
    run: RunReport
    pulls: dict[int, tuple[float, float]]  # band -> (mean, std) of (IMAGE - truth) / sigma
    transients_found: int
    transients_detectable: int
    astrometry_solved: int  # images with FINAST = 0
    astrometry_worst: float  # largest rms error of a solved WCS against the truth over the detector [arcsec]
    fits_files: list[Path]  # the exported Level 2 spectral images
    level3: RunReport | None = None
    catalogs: dict[str, str] | None = None  # HATS catalog directories by table name
    spectra_chi2: list[tuple[float, int]] | None = None  # (chi2/dof, measurements) of spectra against the truth
    calibration: dict[int, dict[str, float]] | None = None  # band -> dark and flat against the truth (--calibrate)


def _prepare(output: Path) -> Path:
    if output.exists():
        if not (output / _MARKER).exists() and any(output.iterdir()):
            raise SphxError(f"{output} exists and was not made by 'sphx demo'; choose another --output")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / _MARKER).write_text("made by sphx demo; safe to delete\n")
    return output


def run_demo(
    output: str | Path = "sphx-demo",
    *,
    full: bool = False,
    n_exposures: int = 4,
    seed: int = 2025,
    profile: str | None = None,
    progress: bool | None = None,
    calibrate: bool = False,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo; see the module docstring.

    Parameters
    ----------
    output
        Folder to (re)create; a folder not made by the demo is never deleted.
    full
        Real 2040x2040 detectors instead of the small test geometry.
    n_exposures
        Exposures to simulate (a target group holds four).
    seed
        Seed of the simulation.
    profile
        Compute profile (default: embedded ``LocalCluster``).
    calibrate
        Also solve the dark current and flat field from the survey
        (``recipes/calib-dark-flat.yaml``) as new calibration versions and compare them
        with the truth; needs at least ``CALIBRATION_EXPOSURES`` exposures. (The
        absolute gain is left out: on the small detectors even 24 exposures of 2000
        calibrators per square degree leave some spectral channels of band 4 without
        a calibrator measurement.)
    """
    from .simulate import TRUTH_LEVEL, load_config, simulate_survey

    say = log or (lambda s: print(s, flush=True))
    if n_exposures < 1:
        raise SphxError(f"n_exposures must be at least 1, got {n_exposures}")
    if calibrate and n_exposures < CALIBRATION_EXPOSURES:
        raise SphxError(f"the calibration solvers need at least {CALIBRATION_EXPOSURES} exposures, got "
                        f"{n_exposures}: add --exposures {CALIBRATION_EXPOSURES}")
    sky = {} if full else {"star_density": 15000.0, "mag_bright": 10.0}
    config = load_config({"seed": seed, "instrument": "SPHEREx" if full else "SPHEREx-small",
                          "survey": {"n_exposures": n_exposures, "pointing_error": 3.0}, "sky": sky})
    out = _prepare(Path(output).resolve())
    instrument = config.instrument_model
    say(f"sphx demo: writing into {out}")
    say(f"  simulating {n_exposures} exposure(s) of {instrument.name}: {len(instrument.bands)} bands of "
        f"{instrument.n_active}x{instrument.n_active} active pixels, seed {seed}")
    sim = simulate_survey(config, out / "repository", log=say)
    repo = sim.repository
    say(f"  {sim}")
    say(f"  calibration products: {', '.join(sim.calibrations)}")

    run = run_recipe(recipe_path("l1-l2"), repo, profile=profile, progress=progress, log=say)

    l2 = xr.open_zarr(repo.level_url("l2"))  # plain xarray, as any user would
    truth = xr.open_zarr(repo.level_url(TRUTH_LEVEL))
    bad = _flags.mask(*_DEMO_BAD)
    say("  Level 2 against the truth, unflagged pixels: (IMAGE - true sky) / sqrt(VARIANCE)")
    pulls = {}
    for b in l2["band"].values:
        img, var = l2["IMAGE"].sel(band=b).values, l2["VARIANCE"].sel(band=b).values
        good = ((l2["FLAGS"].sel(band=b).values & np.uint32(bad)) == 0) & np.isfinite(img)
        pull = ((img - truth["IMAGE"].sel(band=b).values) / np.sqrt(var))[good]
        zodi = float(np.nanmedian(l2["ZODI"].sel(band=b).values))
        pulls[int(b)] = (float(pull.mean()), float(pull.std()))
        say(f"    D{int(b)}: pull mean {pull.mean():+.3f}, std {pull.std():.3f} over {pull.size} pixels; "
            f"zodi {zodi:.3f} MJy/sr")
    hits = repo.read_table("truth_transients", columns=["band", "obsid", "y", "x", "flagged"]).to_pandas()
    flagged = hits[hits.flagged].drop_duplicates(["band", "obsid", "y", "x"])
    count = l2["flag_count"]
    found = int(count.sel(flag="TRANSIENT").sum())
    say(f"  TRANSIENT pixels flagged on board: {found} of {len(flagged)} detectable "
        f"({len(hits)} particle hits injected); OUTLIER pixels found on the ground: "
        f"{int(count.sel(flag='OUTLIER').sum())}")
    say(f"  PERSIST pixels: {int(count.sel(flag='PERSIST').sum())}; NONLINEAR: "
        f"{int(count.sel(flag='NONLINEAR').sum())}; SOURCE: {float(count.sel(flag='SOURCE').sum()) / count.sizes['band'] / count.sizes['obs'] / (instrument.n_active ** 2):.0%} of pixels")
    solved, worst = _astrometry(repo, l2, truth, instrument.n_active, say)
    say(f"  images passing Level 2 data quality: {int(l2['l2dqa_pass'].sum())} of {l2['l2dqa_pass'].size}")
    files = export_level(repo.open_level("l2"), out / "fits", psf=repo.open_calibration("average_psf"),
                         spectral_wcs=repo.open_calibration("spectral_wcs"),
                         sapm=repo.open_calibration("solid_angle_pixel_map"))
    say(f"  Level 2 spectral images exported as FITS: {len(files)} files in {out / 'fits'} (e.g. {files[0].name})")
    level3 = run_recipe(recipe_path("l3"), repo, profile=profile, progress=progress, log=say)
    catalogs = dict(level3.writes[-1].catalogs)
    chi2 = _spectra(repo, say)
    solved_cal = _calibrate(repo, say, profile=profile, progress=progress) if calibrate else None
    say(f"done: open the levels with xarray.open_zarr('{repo.level_url('l2')}') (also l1, l2a); the catalogs with "
        f"lsdb.open_catalog('{catalogs.get('l3_secondary', repo.catalog_path('l3_secondary'))}') or as Parquet "
        f"tables in {repo.table_path('l3_primary')}")
    return DemoResult(out, repo, run, pulls, found, len(flagged), solved, worst, files, level3, catalogs, chi2,
                      solved_cal)


def _calibrate(repo: Repository, say: Callable[[str], None], **compute: Any) -> dict[int, dict[str, float]]:
    """Solve the dark current and flat field from the survey and compare them with the truth."""
    truth = repo.open_state("simulation_truth")
    run_recipe(recipe_path("calib-dark-flat"), repo, log=say, **compute)
    dark, flat = repo.open_calibration("dark"), repo.open_calibration("flat_field")
    cwave = repo.open_calibration("spectral_wcs")["CWAVE"]
    say("  dark current and flat field solved from the survey, against the truth (unmasked pixels):")
    out = {}
    for b in dark["band"].values:
        t = truth.sel(band=b)
        good = (t["MASKS"].values == 0) & np.isfinite(dark["DARK"].sel(band=b).values)
        resid = (dark["DARK"].sel(band=b).values - t["DARK"].values)[good]
        expected = np.sqrt(np.mean(dark["DARK_ERR"].sel(band=b).values[good] ** 2))
        # the flat is relative within a spectral channel: compare FLAT x true gain with its channel median
        edges = repo.instrument.channel_edges(int(b))
        channel = np.clip(np.searchsorted(edges, cwave.sel(band=b).values) - 1, 0, edges.size - 2)
        product = flat["FLAT"].sel(band=b).values * t["ABS_GAIN"].values
        medians = np.array([np.median(product[good & (channel == c)]) for c in range(edges.size - 1)])
        rel = (product / medians[channel])[good]
        out[int(b)] = {"dark_rms_over_error": float(np.sqrt(np.mean(resid**2)) / expected),
                       "flat_rms": float(np.std(rel)),
                       "flat_error": float(np.sqrt(np.mean(flat["FLAT_ERR"].sel(band=b).values[good] ** 2)))}
        say(f"    D{int(b)}: dark rms residual {out[int(b)]['dark_rms_over_error']:.2f} x its error; flat rms "
            f"{out[int(b)]['flat_rms']:.2%} per pixel (statistical error {out[int(b)]['flat_error']:.2%})")
    return out


def _spectra(repo: Repository, say: Callable[[str], None], *, n: int = 3) -> list[tuple[float, int]]:
    """Print the recovered spectra of bright, well-measured sources against the truth;
    returns each one's chi2/dof and number of measurements.

    The truth of each measurement is the simulator's flux of that source on that image;
    it is averaged into the channels with the measurement's weights, as the secondary
    catalog averages the measurements.
    """
    primary = repo.read_table("l3_primary", columns=["source_id", "obsid", "band", "flux", "flux_error",
                                                     "wavelength", "phot_status", "flags"]).to_pandas()
    truth = repo.read_table("truth_sources", columns=["source_id", "obsid", "band", "flux"]).to_pandas()
    m = primary.merge(truth, on=["source_id", "obsid", "band"], suffixes=("", "_true"))
    # measured (not OUTSIDE, NO_DATA, SINGULAR, NO_PSF), central pixel used, no saturated
    # or otherwise bad pixel in the centre
    bad = int(_flags.mask("OVERFLOW", "NONLINEAR", "SUR_ERROR", "TRANSIENT", "HOT", "COLD", "NONFUNC"))
    m = m[((m.phot_status & (45 | 16)) == 0) & ((m["flags"] & bad) == 0)]
    per_source = m.assign(snr=m.flux_true / m.flux_error).groupby("source_id").agg(snr=("snr", "median"),
                                                                                   count=("snr", "size"))
    # the bright sources seen most often (on few exposures, most have one or two points)
    chosen = per_source[per_source.snr > 20].sort_values(["count", "snr"], ascending=False).index[:n]
    out = []
    for sid in chosen:
        s = m[m.source_id == sid].sort_values("wavelength")
        dof = len(s)
        chi2 = float((((s.flux - s.flux_true) / s.flux_error) ** 2).sum() / dof)
        out.append((chi2, dof))
        say(f"  source {sid}: {dof} measurements from {s.wavelength.min():.2f} to {s.wavelength.max():.2f} um, "
            f"chi2/dof against the truth {chi2:.2f}")
        for _, row in s.iloc[:: max(len(s) // 4, 1)].iterrows():
            say(f"    {row.wavelength:.3f} um: {row.flux:10.1f} +- {row.flux_error:6.1f} uJy (true {row.flux_true:10.1f})")
    return out


def _astrometry(repo: Repository, l2: xr.Dataset, truth: xr.Dataset, n: int,
                say: Callable[[str], None]) -> tuple[int, float]:
    """Solved images, and the worst rms error of a solved WCS against the true one [arcsec]."""
    from astropy.coordinates import SkyCoord

    grid = np.meshgrid(np.linspace(0, n - 1, 12), np.linspace(0, n - 1, 12))
    finast = l2["finast"].values
    errors = []
    for i, b in enumerate(l2["band"].values):
        for j, o in enumerate(l2["obs"].values):
            if finast[i, j] == 0:
                a, t = (SkyCoord(*cube_wcs(ds, band=b, obs=o).all_pix2world(grid[0].ravel(), grid[1].ravel(), 0),
                                 unit="deg") for ds in (l2, truth))
                errors.append(float(np.sqrt(np.mean(a.separation(t).arcsec ** 2))))
    worst = max(errors, default=float("nan"))
    say(f"  fine astrometry: FINAST = 0 for {len(errors)} of {finast.size} images; the coarse WCS was off by "
        f"{np.median(l2['astrometry_offset'].values[finast == 0]):.0f}\" (median); solved WCS against the truth: "
        f"at most {worst:.3f}\" rms over the detector; {int(np.median(l2['astrometry_nmatch'].values[finast == 0]))} "
        "calibrators per image (median)")
    for code in sorted(set(finast[finast != 0].tolist())):
        say(f"    FINAST {code} on {int((finast == code).sum())} image(s): {describe_finast(code)}")
    sso = repo.read_table("sso").num_rows if "sso" in repo.tables() else 0
    say(f"  reference catalogue sources queried (srccat): {repo.read_table('srccat').num_rows}; "
        f"known solar system objects on the images (sso): {sso}")
    return len(errors), worst
