"""Correct Non-linearity: the on-board slope back to the true photocurrent.

An H2RG pixel's gain falls as charge accumulates, so a ramp bends and the on-board
least-squares slope underestimates the current. With the per-pixel parameters of the
``nonlinear_pars`` product (form in :mod:`sphx.kernels.nonlinearity`) the slope is
inverted exactly for the on-board fit (frames ``n_discarded_frames`` .. ``n_frames - 1``).
Only active pixels are corrected (reference and phantom pixels collect no charge).
Pixels whose charge at the last frame would exceed the parameters' validity limit
``Qmax``, or whose slope lies beyond the model's turnover, are flagged NONLINEAR; the
latter keep their measured slope.
"""

from __future__ import annotations

import numba
import numpy as np
import xarray as xr

from .. import flags as _flags
from ..blocks import apply_blocks, per_image
from ..calibration import product_for
from ..instrument import Instrument
from ..kernels.nonlinearity import true_rate
from ..levels import ELECTRON_RATE
from ..pipeline.step import StepConfig, register_step
from ._frame import active_slice

__all__ = ["correct_nonlinearity", "nonlinearity_kernel"]

_PARAMETERS = ("Q_nl", "b1", "b2", "b3", "Qmax")


@numba.njit(parallel=True, nogil=True, cache=True)
def _finish(rate, measured, q_max, t_last, flags, bit):
    for y in numba.prange(rate.shape[0]):
        for x in range(rate.shape[1]):
            r, m = rate[y, x], measured[y, x]
            if not np.isfinite(r):
                rate[y, x] = m
                if np.isfinite(m):
                    flags[y, x] |= bit
            elif r * t_last > q_max[y, x]:
                flags[y, x] |= bit


@per_image
def nonlinearity_kernel(image: np.ndarray, flags: np.ndarray, q_nl: np.ndarray, b1: np.ndarray, b2: np.ndarray,
                        b3: np.ndarray, q_max: np.ndarray, *, active: slice, first: int, last: int,
                        frame_time: float) -> tuple[np.ndarray, np.ndarray]:
    """Correct one image's active pixels; return (image [electron/s], flags).

    ``image`` and ``flags`` are (ny, nx) on the cube's grid; the parameters are (n, n)
    active maps [electron, 1/electron^k]; ``active`` locates them in the grid.
    """
    image, flags = image.copy(), flags.copy()
    measured = image[active, active].copy()
    rate = image[active, active]  # written in place
    true_rate(measured, q_nl, b1, b2, b3, first=first, last=last, frame_time=frame_time, out=rate)
    _finish(rate, measured, q_max, float(last * frame_time), flags[active, active],
            np.uint32(_flags.Flag.NONLINEAR))
    return image, flags


@register_step(
    "correct_nonlinearity",
    module="Correct Non-linearity",
    reads={"IMAGE": ELECTRON_RATE, "FLAGS": None},
    calibrations=("nonlinear_pars",),
)
def correct_nonlinearity(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument
) -> xr.Dataset:
    """Replace IMAGE by the linearised current and flag NONLINEAR pixels (lazy)."""
    pars = product_for("nonlinear_pars", calib["nonlinear_pars"], ds, instrument=instrument)
    pars = pars.rename(y="ay", x="ax").drop_vars(["ay", "ax"])
    image, flags = apply_blocks(
        nonlinearity_kernel, ds["IMAGE"], ds["FLAGS"], *(pars[p] for p in _PARAMETERS),
        input_core_dims=[["y", "x"]] * 2 + [["ay", "ax"]] * len(_PARAMETERS),
        output_core_dims=[["y", "x"]] * 2,
        kwargs={"active": active_slice(ds, instrument), "first": instrument.n_discarded_frames,
                "last": instrument.n_frames - 1, "frame_time": instrument.frame_time},
        output_dtypes=[np.float32, _flags.FLAG_DTYPE],
    )
    out = ds.copy()
    out["IMAGE"] = image.astype(np.float32).transpose(*ds["IMAGE"].dims).assign_attrs(ds["IMAGE"].attrs)
    out["FLAGS"] = flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    return out
