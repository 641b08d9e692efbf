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

import numba
import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..blocks import apply_blocks, per_image
from ..calibration import product_for
from ..instrument import Instrument
from ..kernels.select import median
from ..pipeline.step import StepConfig, register_step
from ._frame import active_slice

__all__ = ["BadPixelConfig", "apply_bad_pixel_mask", "bad_pixel_map"]

_CALIBRATIONS = ("nonfunc", "dichroic", "dark", "abs_gain_matrix")
_NONFUNC, _DICHROIC, _HOT, _COLD = (np.uint32(_flags.Flag[n]) for n in ("NONFUNC", "DICHROIC", "HOT", "COLD"))


class BadPixelConfig(StepConfig):
    hot_factor: float = pydantic.Field(10.0, gt=1, description="HOT above this multiple of the median dark")
    cold_fraction: float = pydantic.Field(0.5, gt=0, lt=1, description="COLD below this fraction of the local response")
    cold_box: int = pydantic.Field(32, ge=4, description="block size of the local response median [pixel]")


@numba.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 is inf, as in numpy
def _defects(nonfunc, dichroic, dark, abs_gain, hot_factor, cold_fraction, box):
    ny, nx = dark.shape
    out = np.zeros((ny, nx), np.uint32)
    response = np.empty((ny, nx), np.float64)
    live_dark = np.empty(ny * nx, np.float32)  # float32: radix selection of its median
    n_live = 0
    for i in range(ny):
        for j in range(nx):
            r = 1.0 / np.float64(abs_gain[i, j])
            if nonfunc[i, j] != 0 or not np.isfinite(r) or r <= 0.0:
                out[i, j] = _NONFUNC
                response[i, j] = np.nan
            else:
                response[i, j] = r
                if np.isfinite(dark[i, j]):
                    live_dark[n_live] = dark[i, j]
                    n_live += 1
            if dichroic[i, j] != 0:
                out[i, j] |= _DICHROIC
    hot = hot_factor * median(live_dark[:n_live])  # NaN (no HOT) when nothing is live
    # dichroic pixels see half the light or less: each population is compared with the
    # median of its own kind in the block
    plain = np.empty(box * box, np.float64)
    masked = np.empty(box * box, np.float64)
    for i0 in range(0, ny, box):
        for j0 in range(0, nx, box):
            n_plain = n_masked = 0
            for i in range(i0, min(i0 + box, ny)):
                for j in range(j0, min(j0 + box, nx)):
                    r = response[i, j]
                    if np.isfinite(r):
                        if dichroic[i, j] != 0:
                            masked[n_masked] = r
                            n_masked += 1
                        else:
                            plain[n_plain] = r
                            n_plain += 1
            level_plain = cold_fraction * median(plain[:n_plain])
            level_masked = cold_fraction * median(masked[:n_masked])
            for i in range(i0, min(i0 + box, ny)):
                for j in range(j0, min(j0 + box, nx)):
                    if out[i, j] & _NONFUNC:
                        continue
                    if dark[i, j] > hot:
                        out[i, j] |= _HOT
                    if response[i, j] < (level_masked if dichroic[i, j] != 0 else level_plain):
                        out[i, j] |= _COLD
    return out


def bad_pixel_map(nonfunc: np.ndarray, dichroic: np.ndarray, dark: np.ndarray, abs_gain: np.ndarray, *,
                  hot_factor: float, cold_fraction: float, cold_box: int) -> np.ndarray:
    """FLAGS bits of one detector's permanent defects (active frame, uint32).

    ``nonfunc``, ``dichroic`` are the mask products, ``dark`` the dark current
    [electron / s], ``abs_gain`` the absolute gain (any consistent unit); all (n, n).
    """
    return _defects(nonfunc, dichroic, dark, abs_gain, float(hot_factor), float(cold_fraction), int(cold_box))


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
    defects = apply_blocks(
        per_image(bad_pixel_map), *args, input_core_dims=[["ay", "ax"]] * 4, output_core_dims=[["ay", "ax"]],
        kwargs=config.model_dump(), output_dtypes=[_flags.FLAG_DTYPE])
    flags = apply_blocks(
        _apply, ds["FLAGS"], defects, input_core_dims=[["y", "x"], ["ay", "ax"]], output_core_dims=[["y", "x"]],
        kwargs={"active": active_slice(ds, instrument)}, output_dtypes=[_flags.FLAG_DTYPE])
    out = ds.copy()
    out["FLAGS"] = flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    return out
