"""``sphx demo``: the whole pipeline that exists, end to end, on an embedded default.

Everything goes into one folder under the current directory (``./sphx-demo`` by
default): a repository with the raw exposures, the calibration products and every level
the recipes write. What runs today:

1. synthetic raw exposures of a flat sky (six bands, reference border, phantom reads,
   32 channel gains, injected HOT/COLD/NONFUNC pixels) with their truth;
2. the ``gain_factors`` calibration product, stored as version 1;
3. ``recipes/quicklook.yaml`` on an embedded ``LocalCluster``: engineering units,
   reference-pixel removal and per-image statistics, written as level ``quicklook``;
4. a check of the recovered sky level and flag counts against the truth.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import SphxError
from .instrument import SPHEREX, SPHEREX_SMALL
from .io import Repository
from .pipeline.runner import RunReport, run_recipe
from .testing import gain_product, synthetic_raw_cube

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
    worst_sky_error: float


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
        Exposures to simulate.
    profile
        Compute profile (default: embedded ``LocalCluster``).
    """
    say = log or (lambda s: print(s, flush=True))
    if n_exposures < 1:
        raise SphxError(f"n_exposures must be at least 1, got {n_exposures}")
    out = _prepare(Path(output).resolve())
    instrument = SPHEREX if full else SPHEREX_SMALL
    say(f"sphx demo: writing into {out}")
    say(f"  instrument {instrument.name}: {len(instrument.bands)} bands of {instrument.n_active}x"
        f"{instrument.n_active} active pixels, {n_exposures} exposure(s)")

    repo = Repository.create(out / "repository", instrument=instrument)
    raw, truth = synthetic_raw_cube(instrument, n_obs=n_exposures, seed=2025)
    say(f"  {repo.write_level('raw', raw, provenance={'source': 'sphx.testing.synthetic_raw_cube'})}")
    version = repo.write_calibration("gain_factors", gain_product(truth.gains, instrument.band_numbers),
                                     provenance={"source": "truth of the synthetic exposures"})
    say(f"  calibration gain_factors v{version}")

    run = run_recipe(recipe_path("quicklook"), repo, profile=profile, progress=progress, log=say)

    ql = xr.open_zarr(repo.level_url("quicklook"))  # plain xarray, as any user would
    median = ql["stat_median"].values  # (band, obs) [electron / s]
    errors = []
    say("  recovered sky [electron/s] (median over exposures) vs truth:")
    for i, b in enumerate(ql["band"].values):
        got = float(np.nanmedian(median[i]))
        if np.isnan(got):
            continue
        rel = got / truth.sky[instrument.band_numbers.index(int(b))] - 1.0
        errors.append(abs(rel))
        say(f"    D{int(b)}: {got:8.3f} vs {truth.sky[instrument.band_numbers.index(int(b))]:8.3f}  ({rel:+.2%})")
    counts = ql["flag_count"].sel(flag=["HOT", "COLD", "NONFUNC"]).sum(("band", "obs")).values
    injected = [int(truth.flagged[n].sum()) for n in ("HOT", "COLD", "NONFUNC")]
    say(f"  flagged HOT/COLD/NONFUNC pixels found {counts.tolist()} vs injected {injected}")
    say(f"done: open the levels with xarray.open_zarr('{repo.level_url('quicklook')}')")
    return DemoResult(out, repo, run, max(errors) if errors else float("nan"))
