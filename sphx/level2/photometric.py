"""Apply Dark, Flat Field and Photometric Calibration: electron/s to MJy/sr.

``IMAGE = (IMAGE - DARK) * ABS_GAIN`` and
``VARIANCE = (VARIANCE + DARK_ERR**2) * ABS_GAIN**2``, with the ``dark`` product (its
uncertainty ``DARK_ERR`` when present) and the ``abs_gain_matrix`` product, which holds
the flat field and the absolute calibration together (surface brightness per unit
photocurrent, ``MJy s / (electron sr)``). Pixels without a gain (dead) become NaN. The
predicted persistent current, a diagnostic in electron/s, stays with Level 2a.
"""

from __future__ import annotations

import numba
import numpy as np
import xarray as xr

from ..blocks import apply_blocks, per_image
from ..calibration import product_for
from ..errors import StepError
from ..instrument import Instrument
from ..levels import ELECTRON_RATE, SURFACE_BRIGHTNESS, squared
from ..pipeline.step import StepConfig, register_step

__all__ = ["apply_photometric_calibration"]


@numba.njit(nogil=True, cache=True)
def _calibrate(image, variance, dark, dark_err, gain):  # pragma: no cover - compiled
    out_image = np.empty(image.shape, np.float32)
    out_variance = np.empty(image.shape, np.float32)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            g = np.float64(gain[i, j])
            e = np.float64(dark_err[i, j])
            out_image[i, j] = (image[i, j] - np.float64(dark[i, j])) * g
            out_variance[i, j] = (variance[i, j] + e * e) * g * g
    return out_image, out_variance


@register_step(
    "apply_photometric_calibration",
    module="Apply Dark, Flat Field and Photometric Calibration",
    reads={"IMAGE": ELECTRON_RATE, "VARIANCE": squared(ELECTRON_RATE)},
    converts={"IMAGE": SURFACE_BRIGHTNESS, "VARIANCE": squared(SURFACE_BRIGHTNESS)},
    removes=("PERSIST_CURRENT",),
    calibrations=("dark", "abs_gain_matrix"),
    frame="active",
)
def apply_photometric_calibration(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument
) -> xr.Dataset:
    """Subtract the dark current and apply the absolute gain, propagating the variance (lazy)."""
    dark = product_for("dark", calib["dark"], ds, instrument=instrument)
    gain = product_for("abs_gain_matrix", calib["abs_gain_matrix"], ds, instrument=instrument)["ABS_GAIN"]
    if ds.sizes["y"] != gain.sizes["y"]:
        raise StepError("apply_photometric_calibration works on the active frame; run remove_reference_pixels first")
    dark_err = dark["DARK_ERR"] if "DARK_ERR" in dark else xr.zeros_like(dark["DARK"])
    maps = [m.rename(y="ay", x="ax").drop_vars(["ay", "ax"], errors="ignore") for m in (dark["DARK"], dark_err, gain)]
    image, variance = apply_blocks(
        per_image(_calibrate), ds["IMAGE"], ds["VARIANCE"], *maps,
        input_core_dims=[["y", "x"]] * 2 + [["ay", "ax"]] * 3, output_core_dims=[["y", "x"]] * 2,
        output_dtypes=[np.float32, np.float32])
    out = ds.drop_vars("PERSIST_CURRENT", errors="ignore")
    out["IMAGE"] = image.transpose(*ds["IMAGE"].dims).assign_attrs({**ds["IMAGE"].attrs, "units": SURFACE_BRIGHTNESS})
    out["VARIANCE"] = variance.transpose(*ds["VARIANCE"].dims).assign_attrs(
        {**ds["VARIANCE"].attrs, "units": squared(SURFACE_BRIGHTNESS)})
    return out
