"""``sphx demo``: the whole pipeline that exists, end to end, on an embedded default.

Everything goes into one folder under the current directory (``./sphx-demo`` by
default): a repository with the raw exposures, the calibration products, the truth and
every level the recipes write. What runs today:

1. :func:`sphx.simulate.simulate_survey` simulates a small survey (target groups of
   small slews, stars and galaxies with spectra, Kelsall zodiacal light, the PSF and
   filter optics, every detector effect) and writes raw exposures, lab-measured
   calibration products and the truth;
2. ``recipes/quicklook.yaml`` runs on an embedded ``LocalCluster``: engineering units,
   reference-pixel removal and per-image statistics, written as level ``quicklook``;
3. the results are checked against the simulator's truth.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import SphxError
from .io import Repository
from .pipeline.runner import RunReport, run_recipe

__all__ = ["DemoResult", "recipe_path", "run_demo"]

_MARKER = ".sphx-demo"


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
    worst_current_error: float
    transients_found: int
    transients_detectable: int


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
    """
    from .simulate import TRUTH_LEVEL, load_config, simulate_survey

    say = log or (lambda s: print(s, flush=True))
    if n_exposures < 1:
        raise SphxError(f"n_exposures must be at least 1, got {n_exposures}")
    config = load_config({"seed": seed, "instrument": "SPHEREx" if full else "SPHEREx-small",
                          "survey": {"n_exposures": n_exposures}})
    out = _prepare(Path(output).resolve())
    instrument = config.instrument_model
    say(f"sphx demo: writing into {out}")
    say(f"  simulating {n_exposures} exposure(s) of {instrument.name}: {len(instrument.bands)} bands of "
        f"{instrument.n_active}x{instrument.n_active} active pixels, seed {seed}")
    sim = simulate_survey(config, out / "repository", log=say)
    repo = sim.repository
    say(f"  {sim}")
    say(f"  calibration products: {', '.join(sim.calibrations)}")

    run = run_recipe(recipe_path("quicklook"), repo, profile=profile, progress=progress, log=say)

    ql = xr.open_zarr(repo.level_url("quicklook"))  # plain xarray, as any user would
    truth = xr.open_zarr(repo.level_url(TRUTH_LEVEL))
    exact = repo.open_state("simulation_truth")
    current = (truth["IMAGE"] / exact["ABS_GAIN"] + exact["DARK"] + truth["PERSIST"]).median(("y", "x")).values
    zodi = truth["ZODI"].median(("y", "x")).values  # [MJy / sr]
    median = ql["stat_median"].values
    errors = []
    say("  median current [electron/s], quicklook vs truth (the difference is the readout channels' "
        "reference offsets, which the preamplifier correction will remove):")
    for i, b in enumerate(ql["band"].values):
        got, want = float(np.nanmedian(median[i])), float(np.median(current[i]))
        errors.append(abs(got / want - 1))
        say(f"    D{int(b)}: {got:7.3f} vs {want:7.3f} ({got / want - 1:+6.1%}); "
            f"zodi {np.median(zodi[i]):.3f} MJy/sr")
    hits = repo.read_table("truth_transients", columns=["band", "obsid", "y", "x", "flagged"]).to_pandas()
    flagged = hits[hits.flagged].drop_duplicates(["band", "obsid", "y", "x"])
    found = int(ql["flag_count"].sel(flag="TRANSIENT").sum())
    say(f"  TRANSIENT pixels flagged on board: {found} of {len(flagged)} detectable "
        f"({len(hits)} particle hits injected, the rest too faint or too early in the ramp)")
    say(f"  OVERFLOW pixels (saturating stars): {int(ql['flag_count'].sel(flag='OVERFLOW').sum())}")
    say(f"done: open the levels with xarray.open_zarr('{repo.level_url('quicklook')}')")
    return DemoResult(out, repo, run, max(errors), found, len(flagged))
