"""Pixel-grid helpers shared by the Level 2 steps."""

from __future__ import annotations

import xarray as xr

from ..errors import StepError
from ..instrument import Instrument

__all__ = ["active_slice"]


def active_slice(ds: xr.Dataset, instrument: Instrument) -> slice:
    """Index range of the active pixels along ``y`` and ``x`` of ``ds`` (raw or active frame)."""
    x = ds["x"].values
    start = int(-x[0]) if x.size else -1
    if start < 0 or x.size != instrument.n_active + 2 * start or ds.sizes["y"] != x.size:
        raise StepError(f"the cube's pixel grid ({ds.sizes['y']}x{x.size}, x from {x[0] if x.size else None}) is "
                        f"neither the active nor the raw frame of {instrument.name!r}")
    return slice(start, start + instrument.n_active)
