"""Convert to Engineering Units: slopes from ADU/s to electrons/s.

Each detector is read through 32 readout channels of 64 columns, each behind its own
amplifier chain with its own electronic gain [electron / adu] (the ``gain_factors``
calibration product, 32 values per detector). Every pixel, reference pixels and phantom
reads included, is multiplied by the gain of its channel; MWIR images are stored flipped
in x, so their channel map is flipped too (:meth:`Instrument.readout_channel`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import CalibrationError
from ..instrument import Instrument
from ..levels import ADU_RATE, ELECTRON_RATE, squared
from ..pipeline.step import StepConfig, register_step

__all__ = ["channel_map", "convert_to_engineering_units"]


def channel_map(ds: xr.Dataset, instrument: Instrument) -> xr.DataArray:
    """Readout channel of every (band, x) column of a cube."""
    x = ds["x"].values
    return xr.DataArray(
        np.stack([instrument.readout_channel(int(b), x) for b in ds["band"].values]),
        dims=("band", "x"),
        coords={"band": ds["band"], "x": ds["x"]},
    )


@register_step(
    "convert_to_engineering_units",
    module="Convert to Engineering Units",
    reads={"IMAGE": ADU_RATE},
    converts={"IMAGE": ELECTRON_RATE, "PHANTOM": ELECTRON_RATE, "VARIANCE": squared(ELECTRON_RATE)},
    calibrations=("gain_factors",),
)
def convert_to_engineering_units(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument
) -> xr.Dataset:
    """Convert IMAGE (and PHANTOM, VARIANCE) from ADU/s to electrons/s with per-channel gains.

    Parameters
    ----------
    ds
        Cube with IMAGE in adu / s.
    calib
        ``{"gain_factors": Dataset}`` with ``GAIN`` (band, readout_channel) [electron / adu].

    Returns
    -------
    xarray.Dataset
        The cube with IMAGE in electron / s; lazy.
    """
    gain = calib["gain_factors"]["GAIN"]
    missing = sorted(set(ds["band"].values.tolist()) - set(gain["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"gain_factors has no gains for band(s) {missing}")
    gain = gain.sel(band=ds["band"]).astype(np.float32)
    per_column = gain.isel(readout_channel=channel_map(ds, instrument)).drop_vars("readout_channel", errors="ignore")
    out = ds.copy()
    out["IMAGE"] = (ds["IMAGE"] * per_column).transpose(*ds["IMAGE"].dims)
    out["IMAGE"].attrs = {**ds["IMAGE"].attrs, "units": ELECTRON_RATE}
    if "VARIANCE" in ds:
        out["VARIANCE"] = (ds["VARIANCE"] * per_column**2).transpose(*ds["VARIANCE"].dims)
        out["VARIANCE"].attrs = {**ds["VARIANCE"].attrs, "units": squared(ELECTRON_RATE)}
    if "PHANTOM" in ds:
        out["PHANTOM"] = (ds["PHANTOM"] * gain).transpose(*ds["PHANTOM"].dims)
        out["PHANTOM"].attrs = {**ds["PHANTOM"].attrs, "units": ELECTRON_RATE}
    return out
