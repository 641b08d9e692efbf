"""The ``ds.sphx`` accessor: conveniences for notebooks on top of the module functions."""

from __future__ import annotations

from typing import Any

import xarray as xr
from astropy.wcs import WCS

from . import flags as _flags
from .instrument import Instrument
from .pipeline.step import instrument_of
from .wcs import cube_wcs


@xr.register_dataset_accessor("sphx")
class SphxAccessor:
    """``ds.sphx.wcs(band=1, obs=...)``, ``ds.sphx.good()``, ``ds.sphx.instrument``."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    @property
    def instrument(self) -> Instrument:
        """The geometry the cube follows."""
        return instrument_of(self._ds)

    def wcs(self, *, band: int, obs: int | str) -> WCS:
        """Celestial WCS of one image; ``obs`` is a key or an observation id."""
        if isinstance(obs, str):
            obs = int(self._ds["obs"].values[list(self._ds["obsid"].values).index(obs)])
        return cube_wcs(self._ds, band=band, obs=obs)

    def good(self, bad: Any = _flags.DEFAULT_BAD) -> xr.DataArray:
        """Lazy boolean mask of finite pixels carrying none of the ``bad`` bits."""
        ds = self._ds
        return ~_flags.test_flag(ds["FLAGS"], bad) & ds["IMAGE"].notnull()
