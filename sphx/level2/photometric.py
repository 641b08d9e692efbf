"""Apply Dark, Flat Field and Photometric Calibration: electron/s to MJy/sr.

``IMAGE = (IMAGE - DARK) * ABS_GAIN`` and
``VARIANCE = (VARIANCE + DARK_ERR**2) * ABS_GAIN**2``, with the ``dark`` product (its
uncertainty ``DARK_ERR`` when present) and the ``abs_gain_matrix`` product, which holds
the flat field and the absolute calibration together (surface brightness per unit
photocurrent, ``MJy s / (electron sr)``). Pixels without a gain (dead) become NaN. The
predicted persistent current, a diagnostic in electron/s, stays with Level 2a.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..calibration import product_for
from ..errors import StepError
from ..instrument import Instrument
from ..levels import ELECTRON_RATE, SURFACE_BRIGHTNESS, squared
from ..pipeline.step import StepConfig, register_step

__all__ = ["apply_photometric_calibration"]


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
    err2 = dark["DARK_ERR"] ** 2 if "DARK_ERR" in dark else 0.0
    out = ds.drop_vars("PERSIST_CURRENT", errors="ignore")
    out["IMAGE"] = ((ds["IMAGE"] - dark["DARK"]) * gain).astype(np.float32).transpose(*ds["IMAGE"].dims)
    out["IMAGE"].attrs = {**ds["IMAGE"].attrs, "units": SURFACE_BRIGHTNESS}
    out["VARIANCE"] = ((ds["VARIANCE"] + err2) * gain**2).astype(np.float32).transpose(*ds["VARIANCE"].dims)
    out["VARIANCE"].attrs = {**ds["VARIANCE"].attrs, "units": squared(SURFACE_BRIGHTNESS)}
    return out
