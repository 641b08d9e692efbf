"""Pixel-grid helpers shared by the Level 2 steps."""

from __future__ import annotations

from collections.abc import Mapping

import xarray as xr

from ..errors import CalibrationError, StepError
from ..instrument import Instrument

__all__ = ["active_slice", "calibration_map"]


def active_slice(ds: xr.Dataset, instrument: Instrument) -> slice:
    """Index range of the active pixels along ``y`` and ``x`` of ``ds`` (raw or active frame)."""
    x = ds["x"].values
    start = int(-x[0]) if x.size else -1
    if start < 0 or x.size != instrument.n_active + 2 * start or ds.sizes["y"] != x.size:
        raise StepError(f"the cube's pixel grid ({ds.sizes['y']}x{x.size}, x from {x[0] if x.size else None}) is "
                        f"neither the active nor the raw frame of {instrument.name!r}")
    return slice(start, start + instrument.n_active)


def calibration_map(calib: Mapping[str, xr.Dataset], product: str, var: str, ds: xr.Dataset) -> xr.DataArray:
    """Map ``var`` of calibration ``product`` on the cube's bands and pixels, one chunk per band."""
    p = calib[product]
    if var not in p:
        raise CalibrationError(f"calibration product {product!r} has no variable {var}")
    missing = sorted(set(ds["band"].values.tolist()) - set(p["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"calibration product {product!r} has no band(s) {missing}")
    try:
        out = p[var].sel(band=ds["band"].values, y=ds["y"].values, x=ds["x"].values)
    except KeyError:
        raise CalibrationError(
            f"calibration product {product!r} does not cover the cube's active pixels "
            f"y {int(ds['y'][0])}..{int(ds['y'][-1])}, x {int(ds['x'][0])}..{int(ds['x'][-1])}") from None
    return out.chunk({"band": 1, "y": -1, "x": -1})
