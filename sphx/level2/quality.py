"""Data Quality Assessment for Level 2.

The paper: "a series of automated tests on the output from each module ... To be
transferred to IRSA, the image must pass at least half of the module tests, be outside
the South Atlantic Anomaly, have a transient count less than 435,000 pixels and have a
fine astrometry flag value of 0". Per image this step records:

- the statistics and per-bit flag counts of :func:`sphx.quality.image_statistics` (the
  headers' ``L2 N_<FLAG>`` counts), plus ``n_tran_nb`` and ``n_pers_nb``, the TRANSIENT and
  PERSIST pixels that carry none of the bad-pixel bits (N_TRAN_NB, N_PERS_NB);
- ``l2dqa_tests`` (band, obs, dqa_test): 1 pass, 0 fail, -1 not run (the module's output
  is absent), one per module test listed in :data:`MODULE_TESTS`;
- ``l2dqa_pass`` (L2DQAFLG): at least half of the tests that ran pass, the ground track
  is outside the SAA (``saa_distance`` > 0, when associated), the transient count is
  below the trigger, and ``finast == 0`` when fine astrometry ran.
"""

from __future__ import annotations

import numba
import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..blocks import apply_blocks, per_image
from ..cube import STRING_DTYPE
from ..instrument import Instrument
from ..level1.quality import transient_limit
from ..pipeline.step import register_step
from ..quality import STATISTICS, ImageStatisticsConfig, add_statistics

__all__ = ["MODULE_TESTS", "Level2QualityConfig", "assess_level2_quality"]

MODULE_TESTS = {
    "sur": "Validate SUR passed (sur_pass)",
    "preamp": "preamplifier offsets fitted for every readout channel",
    "nonlinearity": "NONLINEAR pixels below max_nonlinear of the image",
    "persistence": "PERSIST pixels below max_persist of the image",
    "bad_pixels": "NONFUNC, HOT and COLD pixels below max_bad of the image",
    "calibration": "finite IMAGE and positive VARIANCE on all functional pixels",
    "source_mask": "SOURCE fraction within source_range",
    "outliers": "OUTLIER pixels below max_outlier, residual pull width within pull_range",
    "zodi": "ZODI finite and positive everywhere, interpolation error below max_zodi_error",
}
_BAD_PIXEL = ("NONFUNC", "HOT", "COLD", "DICHROIC", "MISSING_DATA")


class Level2QualityConfig(ImageStatisticsConfig):
    transient_limit: int | None = pydantic.Field(None, ge=0, description="default 435,000 scaled by detector area")
    max_nonlinear: float = 0.01
    max_persist: float = 0.05
    max_bad: float = 0.02
    source_range: tuple[float, float] = (0.01, 0.95)
    max_outlier: float = 0.01
    pull_range: tuple[float, float] = (0.7, 1.5)
    max_zodi_error: float = 0.005


@numba.njit(nogil=True, cache=True)
def _n_uncalibrated(image, variance, flags, nonfunc):
    """Functional pixels without a finite IMAGE and a positive VARIANCE."""
    n = 0
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            if (flags[i, j] & nonfunc) == 0 and not (np.isfinite(image[i, j]) and variance[i, j] > 0):
                n += 1
    return np.int64(n)


@numba.njit(nogil=True, cache=True)
def _n_bad_zodi(zodi):
    """Pixels whose ZODI is not finite and positive."""
    n = 0
    for v in zodi.ravel():
        if not (v > 0 and np.isfinite(v)):
            n += 1
    return np.int64(n)


@register_step(
    "assess_level2_quality",
    module="Data Quality Assessment for Level 2",
    config=Level2QualityConfig,
    reads={"IMAGE": None, "FLAGS": None},
    writes={**{k: None for k in STATISTICS}, "flag_count": None, "n_tran_nb": None, "n_pers_nb": None,
            "l2dqa_tests": None, "l2dqa_pass": None},
)
def assess_level2_quality(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: Level2QualityConfig, instrument: Instrument
) -> xr.Dataset:
    """Flag counts, module tests and the L2DQAFLG outcome of every image (lazy)."""
    out, count_nb = add_statistics(ds, bad=config.bad, instrument=instrument, without=_BAD_PIXEL)
    npix = instrument.n_active**2
    for name, bit in (("n_tran_nb", "TRANSIENT"), ("n_pers_nb", "PERSIST")):
        out[name] = count_nb.sel(flag=bit, drop=True).assign_attrs(
            long_name=f"{bit} pixels without bad-pixel bits (L2 N_{bit[:4]}_NB)")
    count = out["flag_count"]
    frac = {n: count.sel(flag=n, drop=True) / npix for n in ("NONLINEAR", "PERSIST", "SOURCE", "OUTLIER")}
    bad = sum(count.sel(flag=n, drop=True) for n in ("NONFUNC", "HOT", "COLD")) / npix

    def run(condition: xr.DataArray | None) -> xr.DataArray:
        if condition is None:
            return xr.full_like(out["stat_npix"], -1, dtype=np.int8)
        return condition.astype(np.int8)

    def each_image(kernel, *arrays: xr.DataArray, **kwargs) -> xr.DataArray:
        return apply_blocks(per_image(kernel), *arrays, kwargs=kwargs, input_core_dims=[["y", "x"]] * len(arrays),
                            output_dtypes=[np.int64])

    good_cal = None
    if "VARIANCE" in ds:
        good_cal = each_image(_n_uncalibrated, ds["IMAGE"], ds["VARIANCE"], ds["FLAGS"],
                              nonfunc=np.uint32(_flags.Flag.NONFUNC)) == 0
    zodi = None
    if "ZODI" in ds:
        zodi = each_image(_n_bad_zodi, ds["ZODI"]) == 0
        if "zodi_interp_error" in ds:
            zodi = zodi & (ds["zodi_interp_error"] < config.max_zodi_error)
    outliers = frac["OUTLIER"] < config.max_outlier
    if "outlier_pull_std" in ds:
        lo, hi = config.pull_range
        outliers = outliers & (ds["outlier_pull_std"] >= lo) & (ds["outlier_pull_std"] <= hi)
    lo, hi = config.source_range
    tests = {
        "sur": ds.get("sur_pass"),
        "preamp": np.isfinite(ds["preamp_offset"]).all([d for d in ds["preamp_offset"].dims
                                                        if d not in ("band", "obs")])
        if "preamp_offset" in ds else None,
        "nonlinearity": frac["NONLINEAR"] < config.max_nonlinear,
        "persistence": frac["PERSIST"] < config.max_persist,
        "bad_pixels": bad < config.max_bad,
        "calibration": good_cal,
        "source_mask": (frac["SOURCE"] >= lo) & (frac["SOURCE"] <= hi) if "source_fraction" in ds else None,
        "outliers": outliers,
        "zodi": zodi,
    }
    results = xr.concat([run(t).transpose("band", "obs") for t in tests.values()], dim="dqa_test")
    out["l2dqa_tests"] = results.transpose("band", "obs", "dqa_test").assign_attrs(
        long_name="module test outcome: 1 pass, 0 fail, -1 not run")
    out = out.assign_coords(dqa_test=("dqa_test", np.array(list(tests), dtype=STRING_DTYPE)))
    ran = (results >= 0).sum("dqa_test")
    passed = (results == 1).sum("dqa_test")
    ok = (2 * passed >= ran) & (count.sel(flag="TRANSIENT", drop=True) < transient_limit(instrument, config.transient_limit))
    if "saa_distance" in ds.coords:
        ok = ok & (ds["saa_distance"] > 0)
    if "finast" in ds:
        ok = ok & (ds["finast"] == 0)
    out["l2dqa_pass"] = ok.transpose("band", "obs").assign_attrs(long_name="Level 2 data-quality outcome (L2DQAFLG)")
    return out
