"""Create Variance Map: the variance of each on-board slope.

The on-board slope is an ordinary least-squares fit to ``n = n_frames - n_discarded_frames``
equally spaced reads, so its variance is the Robberto (2007) form for a sample-up-the-ramp
fit, a read-noise term plus a photon term evaluated at the pixel's (linearised) current
(:func:`sphx.kernels.ramp.slope_variance`, the same formula the simulator draws its noise
from). Read noise per frame comes from the ``readnoise_pars`` product. Reference pixels
have no read-noise map and get NaN; they are removed at the end of Level 2a.
"""

from __future__ import annotations

import numba
import numpy as np
import xarray as xr

from ..blocks import apply_blocks, per_image
from ..calibration import product_for
from ..instrument import Instrument
from ..kernels.ramp import slope_variance_scalar
from ..levels import ELECTRON_RATE, squared
from ..pipeline.step import StepConfig, register_step
from ._frame import active_slice

__all__ = ["create_variance_map", "variance_kernel"]


@numba.njit(parallel=True, nogil=True, cache=True)
def _variance(image, read_noise, start, n_frames, frame_time, out):
    for y in numba.prange(read_noise.shape[0]):
        for x in range(read_noise.shape[1]):
            r = image[y + start, x + start]
            r = max(0.0, r)  # also maps NaN to 0: the read-noise floor
            out[y + start, x + start] = slope_variance_scalar(r, read_noise[y, x], n_frames, frame_time)


@per_image
def variance_kernel(image: np.ndarray, read_noise: np.ndarray, *, active: slice, n_frames: int,
                    frame_time: float) -> np.ndarray:
    """Slope variance [(electron/s)^2] of one image on the cube's grid (NaN off the active area)."""
    out = np.full(image.shape, np.nan, np.float32)
    _variance(image, read_noise, active.start, float(n_frames), float(frame_time), out)
    return out


@register_step(
    "create_variance_map",
    module="Create Variance Map",
    reads={"IMAGE": ELECTRON_RATE},
    writes={"VARIANCE": squared(ELECTRON_RATE)},
    calibrations=("readnoise_pars",),
)
def create_variance_map(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument
) -> xr.Dataset:
    """Add VARIANCE (band, obs, y, x) [(electron/s)^2] from the current and the read noise (lazy)."""
    rn = product_for("readnoise_pars", calib["readnoise_pars"], ds, instrument=instrument)["READNOISE"]
    rn = rn.rename(y="ay", x="ax").drop_vars(["ay", "ax"])
    var = apply_blocks(
        variance_kernel, ds["IMAGE"], rn,
        input_core_dims=[["y", "x"], ["ay", "ax"]], output_core_dims=[["y", "x"]],
        kwargs={"active": active_slice(ds, instrument),
                "n_frames": instrument.n_frames - instrument.n_discarded_frames,
                "frame_time": instrument.frame_time},
        output_dtypes=[np.float32],
    )
    out = ds.copy()
    out["VARIANCE"] = var.transpose(*ds["IMAGE"].dims).assign_attrs(
        long_name="variance of IMAGE", units=squared(ELECTRON_RATE))
    return out
