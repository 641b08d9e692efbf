"""Estimate Dark Current and Flat Field (paper section 4.4) as a Dask reduction.

Every pixel's photocurrent [electron/s] (Level 2a ``IMAGE``) is fitted against the
reference flux of its spectral channel in the same image (:mod:`sphx.kernels.dark_flat`):
the slope over many images is the flat field (response relative to the channel's
typical pixel) and the intercept the dark current. Sources, transients and outliers are
left out by the Level 2 ``FLAGS`` and by clipping at ``clip`` sigma from a prior model
(the calibration versions the run names: ``dark`` and ``flat_field``, or the flat
implied by ``abs_gain_matrix``); ``passes: 2`` clips the second pass against the first
pass's own solution instead. The reference flux is itself a median of noisy pixels:
its noise (and the pixel's own share in it) is removed from the fit, which would
otherwise dilute the slope and shift the intercept (``reference_errors``).

Graph: one task per batch of ``batch`` images per detector makes the nine regression
sums (:data:`~sphx.kernels.dark_flat.N_SUMS` float64 maps); the batches are added in a
tree (``split_every``) and solved per pixel. Memory is that of a few batches, whatever
the number of images.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..io.repository import Repository
from ..kernels.dark_flat import N_SUMS, accumulate_images, channel_keys, key_starts, solve_sums
from ..levels import ELECTRON_RATE
from .inputs import SolverInputs, band_maps
from .run import Solver, register_solver

__all__ = ["DarkFlatConfig", "dark_flat_sums", "estimate_dark_flat", "flat_from_gain"]

_FIT_MASK = ("SOURCE", "OUTLIER", "TRANSIENT", "NONFUNC", "OVERFLOW", "SUR_ERROR", "PERSIST", "MISSING_DATA",
             "PHANMISS", "NONLINEAR")


class DarkFlatConfig(pydantic.BaseModel):
    """Options of :func:`estimate_dark_flat` (unknown keys are errors)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    n_channels: int = pydantic.Field(510, ge=1, description="channels per band, equal steps in log wavelength")
    n_segments: int = pydantic.Field(4, ge=1, description="medians along each channel")
    degree: int = pydantic.Field(1, ge=0, le=3, description="polynomial along the channel (1: median and tilt)")
    clip: float = pydantic.Field(5.0, gt=0, description="[sigma] from the prior model")
    passes: int = pydantic.Field(1, ge=1, le=2, description="2: clip against the first pass's own solution")
    dark_prior: bool = pydantic.Field(True, description="the previous dark (DARK_ERR) is one more measurement")
    reference_errors: bool = pydantic.Field(
        True, description="remove the reference flux's own noise (regression dilution) from the fit")
    min_images: int = pydantic.Field(20, ge=3, description="fewer images of a band are an error")
    batch: int = pydantic.Field(8, ge=1, description="images per task")
    split_every: int = pydantic.Field(4, ge=2, description="batches added per reduction task")
    fit_mask: tuple[str, ...] = _FIT_MASK
    reference_mask: tuple[str, ...] = (*_FIT_MASK, "HOT", "COLD", "DICHROIC")


def flat_from_gain(agm: np.ndarray, key: np.ndarray, n_segments: int) -> np.ndarray:
    """Relative response implied by an absolute gain matrix: ``1 / ABS_GAIN`` divided by
    its median in each spectral channel (NaN where the gain is not finite)."""
    response = np.where(np.isfinite(agm) & (agm > 0), 1.0 / np.where(agm > 0, agm, 1.0), np.nan)
    channel = np.where(key >= 0, key // n_segments, -1)
    out = np.full(agm.shape, np.nan)
    for c in np.unique(channel[channel >= 0]):
        sel = (channel == c) & np.isfinite(response)
        if sel.any():
            out[sel] = response[sel] / np.median(response[sel])
    return out


def _partial(images, variances, flags, dark0, gain0, key, u, segment_u, starts, **kw):
    # blockwise gives (1, k, ny, nx) pixel blocks and (1, ...) band maps
    sums = accumulate_images(images[0], variances[0], flags=flags[0], key=key[0], u=u[0], segment_u=segment_u[0],
                             dark0=dark0[0], gain0=gain0[0], starts=starts[0], **kw)
    return sums[None, None]


def _channel_maps(inputs: SolverInputs, config: DarkFlatConfig) -> dict[str, np.ndarray]:
    """(band, ...) channel keys, positions along the channel, segment positions and where
    each key starts among the pixels sorted by key: static geometry from CWAVE, computed
    once per run."""
    per_band = band_maps(inputs, lambda b, cwave: channel_keys(cwave, n_channels=config.n_channels,
                                                               n_segments=config.n_segments))
    n_keys = config.n_channels * config.n_segments
    return {"key": np.stack([k for k, _, _ in per_band]), "u": np.stack([u for _, u, _ in per_band]),
            "segment_u": np.stack([s for _, _, s in per_band]),
            "starts": np.stack([key_starts(k.ravel(), n_keys) for k, _, _ in per_band])}


def _band_chunked(a: Any) -> da.Array:
    a = a.data if isinstance(a, xr.DataArray) else a
    a = a if isinstance(a, da.Array) else da.from_array(np.asarray(a))
    return a.astype(np.float64).rechunk((1, -1, -1))


def dark_flat_sums(inputs: SolverInputs, config: DarkFlatConfig, *, dark0: Any, gain0: Any,
                   maps: dict[str, np.ndarray] | None = None) -> da.Array:
    """Lazy (band, N_SUMS, y, x) regression sums over all images of ``inputs``.

    ``dark0`` and ``gain0`` are (band, y, x) prior maps (numpy, dask or xarray);
    ``maps`` the channel geometry (computed when not given).
    """
    c = config
    # (a no-op when the inputs were opened in batches: run_solver does)
    pix = [inputs.pixels[n].data.rechunk({1: c.batch}) for n in ("IMAGE", "VARIANCE", "FLAGS")]
    m = maps or _channel_maps(inputs, c)
    key, u, seg_u, starts = (da.from_array(m[n], chunks=(1, *m[n].shape[1:]))
                             for n in ("key", "u", "segment_u", "starts"))
    partial = da.blockwise(
        _partial, "bosyx", pix[0], "boyx", pix[1], "boyx", pix[2], "boyx", _band_chunked(dark0), "byx",
        _band_chunked(gain0), "byx", key, "byx", u, "byx", seg_u, "bk", starts, "bq",
        new_axes={"s": N_SUMS}, adjust_chunks={"o": 1}, dtype=np.float64, concatenate=True,
        fit_mask=np.uint32(_flags.mask(*c.fit_mask)), ref_mask=np.uint32(_flags.mask(*c.reference_mask)),
        n_segments=c.n_segments, degree=c.degree, clip=c.clip)
    return _tree_sum(partial, axis=1, split_every=c.split_every)


def _tree_sum(x: da.Array, *, axis: int, split_every: int) -> da.Array:
    """Sum of ``x`` over ``axis`` in a tree of ``split_every`` blocks per node, each node
    adding its blocks into one new array: an ordinary dask sum concatenates them first,
    a copy of all of them (a batch's sums are 300 MB at full size)."""
    return da.reduction(x, chunk=_identity, combine=_add_blocks, aggregate=_add_blocks, axis=axis,
                        concatenate=False, split_every=split_every, dtype=x.dtype)


def _identity(block: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return block


def _add_blocks(blocks: list[np.ndarray] | np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    blocks = blocks if isinstance(blocks, list) else [blocks]
    total = blocks[0] + blocks[1] if len(blocks) > 1 else blocks[0].copy()
    for block in blocks[2:]:
        total += block
    return total if keepdims else total.squeeze(axis)


def _solve_block(sums: np.ndarray, *prior: np.ndarray, reference_errors: bool = True) -> np.ndarray:
    out = solve_sums(sums[0], reference_errors=reference_errors,
                     **({"dark_prior": prior[0][0, 0], "dark_prior_err": prior[1][0, 0]} if prior else {}))
    return np.stack([out[k] for k in ("dark", "dark_err", "flat", "flat_err", "chi2", "n")])[None]


def estimate_dark_flat(repo: Repository, inputs: SolverInputs, config: DarkFlatConfig | None = None, *,
                       calibrations: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
    """Dark current and flat field of the selected detectors, lazily.

    Parameters
    ----------
    repo
        The repository (for the instrument).
    inputs
        :class:`~sphx.calibrate.inputs.SolverInputs` with ``IMAGE`` and ``VARIANCE`` of
        Level 2a [electron/s] and the Level 2 ``FLAGS``.
    config
        :class:`DarkFlatConfig`.
    calibrations
        ``spectral_wcs`` (channels), ``dark`` and ``flat_field`` or ``abs_gain_matrix``
        (the prior model).

    Returns
    -------
    dict
        Products ``dark`` (DARK, DARK_ERR [electron/s]) and ``flat_field`` (FLAT,
        FLAT_ERR, N_SAMPLES, CHI2), dask-backed, for the bands of ``inputs``.

    Raises
    ------
    CalibrationError
        If a band has fewer than ``min_images`` images.
    """
    c = config or DarkFlatConfig()
    inputs.require_images(c.min_images, what="the dark current and flat field")
    bands = inputs.bands
    dark0 = calibrations["dark"]["DARK"].sel(band=bands)
    maps = _channel_maps(inputs, c)
    if "flat_field" in calibrations:
        gain0 = calibrations["flat_field"]["FLAT"].sel(band=bands)
    else:
        agm = _band_chunked(calibrations["abs_gain_matrix"]["ABS_GAIN"].sel(band=bands))
        key = da.from_array(maps["key"], chunks=(1, -1, -1))
        gain0 = da.map_blocks(lambda g, k: flat_from_gain(g[0], k[0], c.n_segments)[None], agm, key,
                              dtype=np.float64)
    sums = dark_flat_sums(inputs, c, dark0=dark0, gain0=gain0, maps=maps)
    if c.passes == 2:
        # the first pass's solution is the prior of the second: the images are read again
        first = sums.map_blocks(_solve_block, dtype=np.float64, chunks=(1, 6, *sums.shape[2:]),
                                reference_errors=c.reference_errors)
        d0, g0 = _band_chunked(dark0), _band_chunked(gain0)
        sums = dark_flat_sums(inputs, c, dark0=da.where(da.isfinite(first[:, 0]), first[:, 0], d0),
                              gain0=da.where(da.isfinite(first[:, 2]), first[:, 2], g0), maps=maps)
    prior = []
    if c.dark_prior and "DARK_ERR" in calibrations["dark"]:
        dark_err = calibrations["dark"]["DARK_ERR"].sel(band=bands)
        prior = [_band_chunked(dark0)[:, None], _band_chunked(dark_err)[:, None]]
    solved = da.map_blocks(_solve_block, sums, *prior, dtype=np.float64, chunks=(1, 6, *sums.shape[2:]),
                           reference_errors=c.reference_errors)
    coords = {"band": np.asarray(bands, np.int64), "y": inputs.pixels["y"].values, "x": inputs.pixels["x"].values}
    dims = ("band", "y", "x")

    def var(i: int, units: str, long_name: str, dtype=np.float32) -> xr.DataArray:
        return xr.DataArray(solved[:, i].astype(dtype), dims=dims, attrs={"units": units, "long_name": long_name})

    dark = xr.Dataset({"DARK": var(0, ELECTRON_RATE, "dark current (intercept against the channel reference)"),
                       "DARK_ERR": var(1, ELECTRON_RATE, "1-sigma statistical uncertainty of DARK")}, coords=coords)
    flat = xr.Dataset({
        "FLAT": var(2, "", "response relative to the spectral channel's reference"),
        "FLAT_ERR": var(3, "", "1-sigma statistical uncertainty of FLAT"),
        "CHI2": var(4, "", "reduced chi-square of the pixel's fit"),
        "N_SAMPLES": var(5, "", "images used for the pixel", np.int32),
    }, coords=coords, attrs={"n_channels": c.n_channels, "n_segments": c.n_segments, "degree": c.degree})
    return {"dark": dark, "flat_field": flat}


register_solver(Solver(
    "dark_flat", "Estimate Dark Current and Flat Field", DarkFlatConfig,
    reads={"IMAGE": "l2a", "VARIANCE": "l2a", "FLAGS": "l2"}, calibrations=("dark", "flat_field|abs_gain_matrix"),
    tables=(), writes=("dark", "flat_field"), solve=estimate_dark_flat, batch_field="batch"))
