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

Graph: the nine regression sums (:data:`~sphx.kernels.dark_flat.N_SUMS` float64 maps,
300 MB for a full-size detector) are carried along ``chains`` chains per band; each task
reads a batch of ``batch`` images and adds them to its chain's sums in place. The chains
are added and solved per pixel. Memory is ``chains`` sums per band and a batch of images
per thread, whatever the number of images. A new array per batch (a tree of per-batch
sums) cost more than the arithmetic: the kernel maps a fresh 300 MB a page at a time.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pydantic
import xarray as xr
from dask.base import tokenize

from .. import flags as _flags
from ..io.repository import Repository
from ..kernels.dark_flat import N_SUMS, accumulate_images, channel_keys, sampled_segments, solve_sums
from ..levels import ELECTRON_RATE
from .inputs import SolverInputs, band_maps, read_images
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
    sample: int | None = pydantic.Field(
        None, ge=1, description="reference medians from one pixel in sample (None: ~500 pixels per median)")
    batch: int = pydantic.Field(8, ge=1, description="images per task")
    chains: int = pydantic.Field(2, ge=1, description="sums per band (300 MB each at full size), added to in turn")
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


_REFERENCE_PIXELS = 500  # pixels per segment median that sample None aims at


def _channel_maps(inputs: SolverInputs, config: DarkFlatConfig) -> list[dict[str, Any]]:
    """Per band: channel keys, positions along the channel, segment positions, the
    reference medians' sample and where each key starts among its pixels sorted by key:
    static geometry from CWAVE, computed once per run."""
    n_keys = config.n_channels * config.n_segments
    out = []
    for key, u, _ in band_maps(inputs, lambda b, cwave: channel_keys(
            cwave, n_channels=config.n_channels, n_segments=config.n_segments)):
        step = config.sample
        if step is None:
            counts = np.bincount(key[key >= 0], minlength=n_keys)
            step = max(1, int(np.median(counts[counts > 0])) // _REFERENCE_PIXELS) if counts.any() else 1
        segment_u, starts = sampled_segments(key, u, n_keys=n_keys, sample=step)
        out.append({"key": key, "u": u, "segment_u": segment_u, "sample": step, "starts": starts})
    return out


def _band_chunked(a: Any) -> da.Array:
    a = a.data if isinstance(a, xr.DataArray) else a
    a = a if isinstance(a, da.Array) else da.from_array(np.asarray(a))
    return a.astype(np.float64).rechunk((1, -1, -1))


def _priors(dark0: np.ndarray, gain0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(dark0, dtype=np.float64), np.ascontiguousarray(gain0, dtype=np.float64)


def _add_batch(chain: tuple[np.ndarray, frozenset] | None, repo: Repository, levels: dict[str, str], band: int,
               obs: list[int], priors: tuple[np.ndarray, np.ndarray], maps: dict[str, Any], config: DarkFlatConfig,
               shape: tuple[int, int]) -> tuple[np.ndarray, frozenset]:
    """The task of a batch: its images read (not tasks of their own, which a scheduler
    would run ahead of the chains) and added to the chain's sums in place. The sums carry
    the batches already in them: a task run again (``retries``) does not add twice."""
    sums, done = chain if chain is not None else (np.zeros((N_SUMS, *shape)), frozenset())
    if obs[0] in done:
        return sums, done
    pixels = read_images(repo, levels, band=band, obs=obs)
    c = config
    accumulate_images(pixels["IMAGE"], pixels["VARIANCE"], flags=pixels["FLAGS"], key=maps["key"], u=maps["u"],
                      segment_u=maps["segment_u"], starts=maps["starts"], sample=maps["sample"], dark0=priors[0],
                      gain0=priors[1], n_segments=c.n_segments, degree=c.degree, clip=c.clip,
                      fit_mask=int(_flags.mask(*c.fit_mask)), ref_mask=int(_flags.mask(*c.reference_mask)),
                      sums=sums)
    return sums, done | {obs[0]}


def _add_chains(chains: list[tuple[np.ndarray, frozenset]]) -> np.ndarray:
    total = chains[0][0].copy()
    for sums, _ in chains[1:]:
        total += sums
    return total


def dark_flat_sums(repo: Repository, inputs: SolverInputs, config: DarkFlatConfig, *, dark0: Any, gain0: Any,
                   maps: list[dict[str, Any]] | None = None) -> da.Array:
    """Lazy (band, N_SUMS, y, x) regression sums over all images of ``inputs``.

    ``dark0`` and ``gain0`` are (band, y, x) prior maps (numpy, dask or xarray);
    ``maps`` the channel geometry per band (computed when not given).
    """
    c = config
    maps = maps or _channel_maps(inputs, c)
    levels = {n: inputs.levels[n] for n in ("IMAGE", "VARIANCE", "FLAGS")}
    shape = (inputs.pixels.sizes["y"], inputs.pixels.sizes["x"])
    labels = inputs.pixels["obs"].values
    d0, g0 = _band_chunked(dark0), _band_chunked(gain0)
    per_band = []
    for i, band in enumerate(inputs.bands):
        use = [int(o) for o in labels[inputs.present.values[i]]]
        # keys of their own for every set of priors (the two passes of passes: 2)
        token = tokenize(repo.location, c, d0.name, g0.name, use)
        geometry = dask.delayed(maps[i], pure=True)
        # one task per band: as arrays handed to every batch's task, the conversions were
        # fused into each of them
        priors = dask.delayed(_priors)(d0[i], g0[i], dask_key_name=f"dark-flat-priors-D{band}-{token}")
        heads: list[Any] = [None] * c.chains
        for k, first in enumerate(range(0, len(use), c.batch)):
            group = use[first:first + c.batch]
            heads[k % c.chains] = dask.delayed(_add_batch)(
                heads[k % c.chains], repo, levels, int(band), group, priors, geometry, c, shape,
                dask_key_name=f"dark-flat-sums-{group[0]}-D{band}-{token}")
        total = dask.delayed(_add_chains)([h for h in heads if h is not None],
                                          dask_key_name=f"dark-flat-total-D{band}-{token}")
        per_band.append(da.from_delayed(total, (N_SUMS, *shape), np.float64))
    return da.stack(per_band)


def _solved(sums: da.Array, *prior: da.Array, reference_errors: bool) -> da.Array:
    """(band, 6, y, x) dark, its error, flat, its error, chi-square and samples, solved
    in blocks of rows: the last band's solve is not one thread's alone."""
    rows = -(-sums.shape[2] // 4)
    sums = sums.rechunk((1, N_SUMS, rows, -1))
    prior = tuple(p.rechunk((1, 1, rows, -1)) for p in prior)
    return da.map_blocks(_solve_block, sums, *prior, dtype=np.float64, chunks=(sums.chunks[0], (6,), *sums.chunks[2:]),
                         reference_errors=reference_errors)


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
        key = da.from_array(np.stack([m["key"] for m in maps]), chunks=(1, -1, -1))
        gain0 = da.map_blocks(lambda g, k: flat_from_gain(g[0], k[0], c.n_segments)[None], agm, key,
                              dtype=np.float64)
    sums = dark_flat_sums(repo, inputs, c, dark0=dark0, gain0=gain0, maps=maps)
    if c.passes == 2:
        # the first pass's solution is the prior of the second: the images are read again
        first = _solved(sums, reference_errors=c.reference_errors)
        d0, g0 = _band_chunked(dark0), _band_chunked(gain0)
        sums = dark_flat_sums(repo, inputs, c, dark0=da.where(da.isfinite(first[:, 0]), first[:, 0], d0),
                              gain0=da.where(da.isfinite(first[:, 2]), first[:, 2], g0), maps=maps)
    prior = []
    if c.dark_prior and "DARK_ERR" in calibrations["dark"]:
        dark_err = calibrations["dark"]["DARK_ERR"].sel(band=bands)
        prior = [_band_chunked(dark0)[:, None], _band_chunked(dark_err)[:, None]]
    solved = _solved(sums, *prior, reference_errors=c.reference_errors)
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
