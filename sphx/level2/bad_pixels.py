"""Apply Bad Pixel Mask: permanent pixel defects into FLAGS with the SPHEREx bit numbers.

The on-board bits (TRANSIENT, OVERFLOW, SUR_ERROR, FULLSAMPLE) and those of earlier modules
(PHANMISS, NONLINEAR, PERSIST) are already in FLAGS; this step adds:

- NONFUNC from the ``nonfunc`` product and DICHROIC from the ``dichroic`` product;
- HOT where the dark current (``dark`` product) exceeds ``hot_factor`` times the band's
  median dark;
- COLD where the response is below ``cold_fraction`` of its surroundings: the response is
  the inverse of the absolute gain (``abs_gain_matrix``, flat field included), compared
  with its median over ``cold_box`` x ``cold_box`` blocks, which follows the smooth
  changes of pixel solid angle and filter throughput but not single pixels (dichroic
  pixels are compared with the dichroic pixels of the block, the others with the others);
- NONFUNC also where the absolute gain is not finite (no response at all).
"""

from __future__ import annotations

import warnings

import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..calibration import product_for
from ..instrument import Instrument
from ..pipeline.step import StepConfig, register_step
from ._frame import active_slice, per_image

__all__ = ["BadPixelConfig", "apply_bad_pixel_mask", "bad_pixel_map"]

_CALIBRATIONS = ("nonfunc", "dichroic", "dark", "abs_gain_matrix")


class BadPixelConfig(StepConfig):
    hot_factor: float = pydantic.Field(10.0, gt=1, description="HOT above this multiple of the median dark")
    cold_fraction: float = pydantic.Field(0.5, gt=0, lt=1, description="COLD below this fraction of the local response")
    cold_box: int = pydantic.Field(32, ge=4, description="block size of the local response median [pixel]")


def _block_median(a: np.ndarray, box: int) -> np.ndarray:
    """NaN-ignoring median of ``a`` over box x box blocks, expanded back to ``a``'s shape."""
    ny, nx = a.shape
    by, bx = -(-ny // box), -(-nx // box)
    padded = np.full((by * box, bx * box), np.nan, np.float64)
    padded[:ny, :nx] = a
    blocks = padded.reshape(by, box, bx, box).transpose(0, 2, 1, 3).reshape(by, bx, box * box)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks give NaN
        med = np.nanmedian(blocks, axis=-1)
    return np.repeat(np.repeat(med, box, 0), box, 1)[:ny, :nx]


def bad_pixel_map(nonfunc: np.ndarray, dichroic: np.ndarray, dark: np.ndarray, abs_gain: np.ndarray, *,
                  hot_factor: float, cold_fraction: float, cold_box: int) -> np.ndarray:
    """FLAGS bits of one detector's permanent defects (active frame, uint32)."""
    out = np.zeros(dark.shape, _flags.FLAG_DTYPE)
    response = 1.0 / abs_gain.astype(np.float64)
    dead = (nonfunc != 0) | ~np.isfinite(response) | (response <= 0)
    out[dead] |= np.uint32(_flags.Flag.NONFUNC)
    out[dichroic != 0] |= np.uint32(_flags.Flag.DICHROIC)
    out[~dead & (dark > hot_factor * np.nanmedian(dark[~dead]))] |= np.uint32(_flags.Flag.HOT)
    response[dead] = np.nan
    # dichroic pixels see half the light or less: compare each population with its own kind
    dichroic = dichroic != 0
    local = _block_median(np.where(dichroic, np.nan, response), cold_box)
    if dichroic.any():
        local = np.where(dichroic, _block_median(np.where(dichroic, response, np.nan), cold_box), local)
    with np.errstate(invalid="ignore"):
        cold = response < cold_fraction * local
    out[cold & ~dead] |= np.uint32(_flags.Flag.COLD)
    return out


@per_image
def _apply(flags: np.ndarray, defects: np.ndarray, *, active: slice) -> np.ndarray:
    out = flags.copy()
    out[active, active] |= defects
    return out


@register_step(
    "apply_bad_pixel_mask",
    module="Apply Bad Pixel Mask",
    config=BadPixelConfig,
    reads={"FLAGS": None},
    calibrations=_CALIBRATIONS,
)
def apply_bad_pixel_mask(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: BadPixelConfig, instrument: Instrument
) -> xr.Dataset:
    """OR the NONFUNC, DICHROIC, HOT and COLD bits into FLAGS (lazy)."""
    maps = {name: product_for(name, calib[name], ds, instrument=instrument) for name in _CALIBRATIONS}
    args = [maps["nonfunc"]["NONFUNC"], maps["dichroic"]["DICHROIC"], maps["dark"]["DARK"],
            maps["abs_gain_matrix"]["ABS_GAIN"]]
    args = [a.rename(y="ay", x="ax").drop_vars(["ay", "ax"]) for a in args]
    defects = xr.apply_ufunc(
        per_image(bad_pixel_map), *args, input_core_dims=[["ay", "ax"]] * 4, output_core_dims=[["ay", "ax"]],
        kwargs=config.model_dump(), dask="parallelized", output_dtypes=[_flags.FLAG_DTYPE])
    flags = xr.apply_ufunc(
        _apply, ds["FLAGS"], defects, input_core_dims=[["y", "x"], ["ay", "ax"]], output_core_dims=[["y", "x"]],
        kwargs={"active": active_slice(ds, instrument)}, dask="parallelized", output_dtypes=[_flags.FLAG_DTYPE])
    out = ds.copy()
    out["FLAGS"] = flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    return out
