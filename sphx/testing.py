"""Helpers for testing code built on sphx: a no-compute guard and small synthetic cubes.

The synthetic cubes here are flat-sky stand-ins with known truth (sky level, channel
gains, injected flags); the physical sky and instrument simulator is
:mod:`sphx.simulate` once it exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import xarray as xr

from . import flags as _flags
from .cube import make_cube, nominal_spectral_maps
from .instrument import SPHEREX_SMALL, Instrument
from .levels import ADU_RATE
from .obsid import obs_key
from .wcs import tan_wcs

__all__ = ["SyntheticTruth", "gain_product", "raise_if_dask_computes", "synthetic_raw_cube"]


class _CountingScheduler:
    """A dask scheduler that fails once more than ``max_computes`` computes happen."""

    def __init__(self, max_computes: int) -> None:
        self.max_computes, self.total = max_computes, 0

    def __call__(self, dsk, keys, **kwargs):
        self.total += 1
        if self.total > self.max_computes:
            raise RuntimeError(f"dask computed {self.total} time(s); at most {self.max_computes} allowed here")
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[_CountingScheduler]:
    """Fail if dask computes more than ``max_computes`` times inside the block."""
    scheduler = _CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler


@dataclass
class SyntheticTruth:
    """What :func:`synthetic_raw_cube` put in.

    Attributes
    ----------
    sky
        Sky photocurrent per band [electron / s], shape (band,).
    noise
        Per-pixel noise of the photocurrent [electron / s], shape (band,).
    gains
        Electronic gain per band and readout channel [electron / adu], shape (band, 32).
    flagged
        Pixels injected with each flag name, summed over the active area of every image.
    """

    sky: np.ndarray
    noise: np.ndarray
    gains: np.ndarray
    flagged: dict[str, np.ndarray]


def synthetic_raw_cube(
    instrument: Instrument = SPHEREX_SMALL,
    *,
    n_obs: int = 3,
    bands: Sequence[int] | None = None,
    seed: int = 0,
    start_mjd: float = 61027.2,
    chunks: bool = True,
) -> tuple[xr.Dataset, SyntheticTruth]:
    """Raw exposures of a flat sky with per-channel gains, reference border and flags.

    Each active pixel reads ``(sky + noise) / gain[channel]`` ADU/s; reference pixels and
    phantom reads carry noise only. A few HOT, COLD and NONFUNC pixels are injected per
    image (HOT pixels bright, COLD dark, NONFUNC NaN).

    Returns
    -------
    cube, truth
        A lazy raw cube (dask, one chunk per image) and what was injected.
    """
    rng = np.random.default_rng(seed)
    bands = list(instrument.band_numbers if bands is None else bands)
    nb, n = len(bands), instrument.n_raw
    coords = instrument.pixel_coords(reference_pixels=True)
    active = (coords >= 0) & (coords < instrument.n_active)
    inside = active[:, None] & active[None, :]
    sky = np.array([2.0, 1.6, 1.2, 0.8, 0.5, 0.6])[np.array(bands) - 1] * 10.0
    noise = np.sqrt(sky / 10.0)
    gains = rng.uniform(0.9, 1.3, size=(nb, instrument.n_readout_channels)).astype(np.float32)
    image = np.empty((nb, n_obs, n, n), np.float32)
    flags = np.zeros((nb, n_obs, n, n), np.uint32)
    flags[..., ~inside] = int(_flags.Flag.REFERENCE)
    phantom = rng.normal(0, 1.0, (nb, n_obs, n, instrument.n_readout_channels, instrument.n_phantom))
    injected = {name: np.zeros((nb, n_obs), np.int64) for name in ("HOT", "COLD", "NONFUNC")}
    for i, b in enumerate(bands):
        per_column = gains[i, instrument.readout_channel(b, coords)]
        for j in range(n_obs):
            e = np.where(inside, sky[i], 0.0) + rng.normal(0, noise[i], (n, n))
            for name, value in (("HOT", 50 * sky[i]), ("COLD", 0.0), ("NONFUNC", np.nan)):
                k = int(rng.integers(3, 8))
                yy, xx = rng.integers(0, instrument.n_active, (2, k))
                fresh = flags[i, j, yy + instrument.n_reference, xx + instrument.n_reference] == 0
                yy, xx = yy[fresh], xx[fresh]
                e[yy + instrument.n_reference, xx + instrument.n_reference] = value
                flags[i, j, yy + instrument.n_reference, xx + instrument.n_reference] |= int(_flags.Flag[name])
                injected[name][i, j] = np.count_nonzero(
                    flags[i, j][inside] & int(_flags.Flag[name]))
            image[i, j] = e / per_column[None, :]
    obsid = [f"2025W51_1A_0684_{j + 1}" for j in range(n_obs)]
    mjd = start_mjd + np.arange(n_obs) * 125.0 / 86400.0
    wcs = {(b, obs_key(o)): tan_wcs(ra=10.0, dec=40.9 + 0.28 * j, pa=155.0, pixel_scale=instrument.pixel_scale,
                                    n_pixels=instrument.n_active)
           for b in bands for j, o in enumerate(obsid)}
    cwave, cband = nominal_spectral_maps(instrument, bands=bands, reference_pixels=True)
    chunk = (lambda a: da.from_array(a, chunks=(1, 1, *a.shape[2:]))) if chunks else (lambda a: a)
    cube = make_cube(
        chunk(image), level="raw", obsid=obsid, mjd_avg=mjd, instrument=instrument, bands=bands,
        flags=chunk(flags), phantom=chunk((phantom / gains[:, None, None, :, None]).astype(np.float32)),
        wcs=wcs, cwave=cwave, cband=cband, units={"IMAGE": ADU_RATE},
        observations={"target": np.full(n_obs, 684), "survey": np.ones(n_obs, np.int64)},
    )
    return cube, SyntheticTruth(sky, noise, gains, injected)


def gain_product(gains: np.ndarray, bands: Sequence[int]) -> xr.Dataset:
    """A ``gain_factors`` calibration product from a (band, channel) array [electron / adu]."""
    return xr.Dataset(
        {"GAIN": (("band", "readout_channel"), np.asarray(gains, np.float32),
                  {"units": "electron / adu", "long_name": "electronic gain per readout channel"})},
        coords={"band": np.asarray(bands, np.int64),
                "readout_channel": np.arange(np.shape(gains)[1], dtype=np.int64)},
    )
