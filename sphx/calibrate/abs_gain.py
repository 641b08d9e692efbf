"""Estimate Absolute Gain Matrix (paper section 4.4): calibrator stars against their spectra.

Each image's photocurrent (Level 2a ``IMAGE`` [electron/s]) is dark subtracted and
divided by the flat field (products ``dark`` and ``flat_field`` of
:mod:`sphx.calibrate.dark_flat`) and scaled by a trial gain ``A0`` (the median of the
prior absolute gain), so that it would be in MJy/sr if the gain were ``A0`` everywhere.
The catalogue's calibrator stars (``calibrator`` column) are photometered on it with
the Level 3 forced photometry (jointly with catalogue sources near them), and each
measured flux is divided by the star's known spectrum averaged over the bandpass of the
pixel it falls on (``CWAVE``, ``CBAND``): the bandpass integral is the colour
correction. The ratios ``r`` are combined per spectral channel with inverse-variance
weights (outliers clipped at ``clip`` sigma) into the gain function
``g(lambda) = A0 / r``, interpolated in log wavelength between channels, and

    ``ABS_GAIN = g(CWAVE) / FLAT``    [MJy s / (electron sr)]

Graph: one task per image returns its calibrators' ratios (a few kB); one task combines
them. Memory is one image per task and the ratio table.
"""

from __future__ import annotations

import math
from typing import Any

import dask
import numpy as np
import pyarrow as pa
import pydantic
import xarray as xr

from .. import flags as _flags
from ..errors import CalibrationError
from ..io.repository import Repository
from ..level3.photometry import PHOTOMETRY_MASK, image_catalog, photometer_image
from ..simulate.sky import sed_flux
from ..wcs import cube_wcs
from .inputs import SolverInputs
from .run import Solver, register_solver

__all__ = ["AbsGainConfig", "calibrator_ratios", "estimate_abs_gain", "gain_function"]

_RATIO_COLUMNS = ("source_id", "band", "obsid", "wavelength", "bandwidth", "flux", "flux_error", "predicted", "ratio",
                  "ratio_error")


class AbsGainConfig(pydantic.BaseModel):
    """Options of :func:`estimate_abs_gain` (unknown keys are errors)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    min_snr: float = pydantic.Field(20.0, gt=0, description="calibrator measurements below this S/N are not used")
    max_chi2: float = pydantic.Field(3.0, gt=0, description="reduced chi-square limit of the cutout fit")
    neighbour_radius: float = pydantic.Field(12.0, gt=0, description="[pixel] catalogue sources fitted with a calibrator")
    clip: float = pydantic.Field(4.0, gt=0, description="[sigma] outlier clipping per channel")
    min_measurements: int = pydantic.Field(20, ge=1, description="per spectral channel; fewer is an error")
    half_size: int = pydantic.Field(7, ge=2, description="photometry cutout half size [pixel]")
    require_astrometry: bool = True


def _image_cube(meta: xr.Dataset, image: np.ndarray, variance: np.ndarray, flags: np.ndarray) -> xr.Dataset:
    cube = meta.copy()
    dims = ("band", "obs", "y", "x")
    cube["IMAGE"] = (dims, image)
    cube["VARIANCE"] = (dims, variance)
    cube["FLAGS"] = (dims, flags)
    return cube


def calibrator_ratios(cube: xr.Dataset, catalog: pa.Table, *, band: int, obs: int, dark: np.ndarray, flat: np.ndarray,
                      a0: float, zodi: np.ndarray, calibrations: dict[str, xr.Dataset],
                      config: AbsGainConfig) -> pa.Table:
    """Measured over predicted flux of the calibrators on one image.

    Parameters
    ----------
    cube
        One image (band, obs) with Level 2a ``IMAGE``, ``VARIANCE`` [electron/s] and
        Level 2 ``FLAGS`` and ``wcs_*`` variables.
    catalog
        Catalogue rows over the image, with ``calibrator`` and the spectral columns of
        :data:`sphx.simulate.sky.CATALOG_SCHEMA`.
    dark, flat
        (y, x) dark current [electron/s] and relative response of the band.
    a0
        Trial gain [MJy s / (electron sr)].
    zodi
        (y, x) zodiacal light model [MJy/sr], the shape of the background.
    calibrations
        ``average_psf``, ``solid_angle_pixel_map``, ``spectral_wcs``.
    config
        :class:`AbsGainConfig`.

    Returns
    -------
    pyarrow.Table
        One row per usable calibrator measurement (:data:`_RATIO_COLUMNS`).
    """
    empty = pa.table({c: pa.array([], pa.float64()) for c in _RATIO_COLUMNS})
    is_cal = np.asarray(catalog.column("calibrator").to_numpy(zero_copy_only=False), bool) if catalog.num_rows else []
    if not np.any(is_cal):
        return empty
    cell = cube.sel(band=band, obs=obs)
    scale = np.where(flat > 0, a0 / flat, np.nan)
    trial = (cell["IMAGE"].values - dark) * scale
    cube = cube.copy()
    cube["IMAGE"] = (("band", "obs", "y", "x"), trial[None, None].astype(np.float32))
    cube["VARIANCE"] = (("band", "obs", "y", "x"), (cell["VARIANCE"].values * scale**2)[None, None].astype(np.float32))
    flags = cell["FLAGS"].values
    sky = (flags & np.uint32(PHOTOMETRY_MASK | _flags.Flag.SOURCE)) == 0
    sky &= np.isfinite(trial) & np.isfinite(zodi) & (zodi > 0)
    level = float(np.median(trial[sky] / zodi[sky])) if sky.sum() > 100 else 0.0
    # calibrators and the catalogue sources whose light reaches their cutouts
    ra = np.radians(catalog.column("ra").to_numpy())
    dec = np.radians(catalog.column("dec").to_numpy())
    xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    pixel = math.radians(float(np.sqrt(abs(np.linalg.det(cube_wcs(cube, band=band, obs=obs).pixel_scale_matrix)))))
    near = (xyz @ xyz[is_cal].T).max(axis=1) >= math.cos(config.neighbour_radius * pixel)
    subset = catalog.filter(pa.array(near))
    table = photometer_image(cube, subset, band=band, obs=obs, psf=calibrations["average_psf"],
                             sapm=calibrations["solid_angle_pixel_map"], spectral_wcs=calibrations["spectral_wcs"],
                             background=(level * zodi).astype(np.float32), local_background=True,
                             half_size=config.half_size)
    if not table.num_rows:
        return empty
    ids = table.column("source_id").to_numpy()
    cat_ids = subset.column("source_id").to_numpy()
    order = np.argsort(cat_ids)
    row = order[np.searchsorted(cat_ids, ids, sorter=order)]
    flux, err = table.column("flux").to_numpy(), table.column("flux_error").to_numpy()
    good = (np.asarray(subset.column("calibrator").to_numpy(zero_copy_only=False), bool)[row]
            & (table.column("phot_status").to_numpy() == 0)
            & ((table.column("flags").to_numpy() & np.uint32(PHOTOMETRY_MASK)) == 0)
            & (table.column("chi2").to_numpy() < config.max_chi2)
            & (flux > config.min_snr * err))
    if not good.any():
        return empty
    lam, bw = table.column("wavelength").to_numpy()[good], table.column("bandwidth").to_numpy()[good]
    predicted = sed_flux(subset, lam, bw, rows=row[good])
    ratio = flux[good] / predicted
    return pa.table({
        "source_id": ids[good].astype(np.float64), "band": np.full(good.sum(), float(band)),
        "obsid": pa.array([str(cell["obsid"].values)] * int(good.sum())),
        "wavelength": lam, "bandwidth": bw, "flux": flux[good], "flux_error": err[good],
        "predicted": predicted, "ratio": ratio, "ratio_error": err[good] / predicted,
    })


def gain_function(ratios: pa.Table, *, edges: np.ndarray, a0: float, clip: float,
                  min_measurements: int, band: int) -> dict[str, np.ndarray]:
    """Per-channel gain ``a0 / r`` from calibrator ratios, with inverse-variance weights.

    Returns
    -------
    dict
        ``wavelength`` (weighted mean per channel) [um], ``gain``, ``gain_error``
        [MJy s / (electron sr)], ``n`` (measurements kept).

    Raises
    ------
    CalibrationError
        If a channel has fewer than ``min_measurements`` measurements.
    """
    lam = ratios.column("wavelength").to_numpy()
    r = ratios.column("ratio").to_numpy()
    s = ratios.column("ratio_error").to_numpy()
    channel = np.clip(np.searchsorted(edges, lam) - 1, 0, edges.size - 2)
    n_ch = edges.size - 1
    out = {k: np.full(n_ch, np.nan) for k in ("wavelength", "gain", "gain_error")}
    out["n"] = np.zeros(n_ch, np.int64)
    short = []
    for c in range(n_ch):
        sel = channel == c
        keep = sel.copy()
        for _ in range(10):  # clip about the weighted mean until nothing changes
            if keep.sum() < 2:
                break
            w = 1.0 / s[keep] ** 2
            mean = np.sum(w * r[keep]) / w.sum()
            new = sel & (np.abs(r - mean) <= clip * s)
            if np.array_equal(new, keep):
                break
            keep = new
        n = int(keep.sum())
        out["n"][c] = n
        if n < min_measurements:
            short.append(f"channel {c} ({edges[c]:.3f}-{edges[c + 1]:.3f} um) has {n}")
            continue
        w = 1.0 / s[keep] ** 2
        mean = np.sum(w * r[keep]) / w.sum()
        chi2 = np.sum(w * (r[keep] - mean) ** 2) / max(n - 1, 1)
        err = math.sqrt(max(chi2, 1.0) / w.sum())  # inflated when the ratios scatter more than their errors
        out["wavelength"][c] = np.sum(w * lam[keep]) / w.sum()
        out["gain"][c] = a0 / mean
        out["gain_error"][c] = a0 * err / mean**2
    if short:
        raise CalibrationError(f"band {band}: the absolute gain needs at least {min_measurements} calibrator "
                               f"measurements per spectral channel, but " + "; ".join(short) +
                               " (add exposures or calibrators, or lower min_measurements)")
    return out


def _measure(image, variance, flags, zodi, meta, location, band, obs, dark, flat, a0, calibrations, config):
    from ..io.repository import open_repository

    cube = _image_cube(meta, image, variance, flags)
    refcat = open_repository(location).open_table("refcat")
    # every column: the calibrators' spectra are needed
    catalog = image_catalog(refcat, cube, band=band, obs=obs, columns=None)
    return calibrator_ratios(cube, catalog, band=band, obs=obs, dark=dark, flat=flat, a0=a0, zodi=zodi[0, 0],
                             calibrations=calibrations, config=config)


def estimate_abs_gain(repo: Repository, inputs: SolverInputs, config: AbsGainConfig | None = None, *,
                      calibrations: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
    """Absolute gain matrix of the selected detectors from their calibrator stars (lazy).

    Parameters
    ----------
    repo
        The repository (its ``refcat`` table is read by the tasks).
    inputs
        Level 2a ``IMAGE``, ``VARIANCE``; Level 2 ``FLAGS``, ``ZODI`` and the WCS.
    config
        :class:`AbsGainConfig`.
    calibrations
        ``dark``, ``flat_field``, ``abs_gain_matrix`` (the trial scale), ``average_psf``,
        ``solid_angle_pixel_map``, ``spectral_wcs``.

    Returns
    -------
    dict
        ``abs_gain_matrix``: ABS_GAIN (band, y, x) and the gain function GAIN_FUNCTION,
        GAIN_FUNCTION_ERR, GAIN_WAVELENGTH, N_CALIBRATORS on (band, spectral_channel).
    """
    c = config or AbsGainConfig()
    bands = inputs.bands
    px = inputs.pixels
    small = {n: calibrations[n].sel(band=bands).load() for n in ("average_psf", "solid_angle_pixel_map",
                                                                  "spectral_wcs")}
    finast = px["finast"].values if "finast" in px else np.zeros((len(bands), px.sizes["obs"]))
    meta = px.drop_vars([n for n, v in px.variables.items() if "y" in v.dims and n not in px.indexes])
    blocks = {n: px[n].data.rechunk((1, 1, -1, -1)).to_delayed() for n in ("IMAGE", "VARIANCE", "FLAGS", "ZODI")}
    per_band = []
    for i, band in enumerate(bands):
        dark = calibrations["dark"]["DARK"].sel(band=band).values.astype(np.float64)
        flat = calibrations["flat_field"]["FLAT"].sel(band=band).values.astype(np.float64)
        a0 = float(np.nanmedian(calibrations["abs_gain_matrix"]["ABS_GAIN"].sel(band=band).values))
        d_dark, d_flat = dask.delayed(dark), dask.delayed(flat)
        tasks = []
        for j, obs in enumerate(px["obs"].values):
            if not inputs.present.values[i, j] or (c.require_astrometry and finast[i, j] != 0):
                continue
            m = meta.isel(band=[i], obs=[j])
            tasks.append(dask.delayed(_measure)(
                *(blocks[n][i, j, 0, 0] for n in ("IMAGE", "VARIANCE", "FLAGS", "ZODI")), m, repo.location, int(band),
                int(obs), d_dark, d_flat, a0, {k: v.sel(band=[band]) for k, v in small.items()}, c,
                dask_key_name=f"abs-gain-{obs}-D{band}"))
        edges = repo.instrument.channel_edges(int(band))
        per_band.append(dask.delayed(_band_gain)(tasks, edges=edges, a0=a0, config=c, band=int(band),
                                                 cwave=small["spectral_wcs"]["CWAVE"].sel(band=band).values,
                                                 flat=d_flat))
    solved = dask.delayed(lambda parts: parts)(per_band)
    return {"abs_gain_matrix": _as_dataset(solved, inputs, repo)}


def _band_gain(tables: list[pa.Table], *, edges, a0, config, band, cwave, flat) -> dict[str, np.ndarray]:
    ratios = pa.concat_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables) else None
    if ratios is None:
        raise CalibrationError(f"band {band}: no calibrator star could be measured on any image")
    g = gain_function(ratios, edges=edges, a0=a0, clip=config.clip, min_measurements=config.min_measurements,
                      band=band)
    # gain function between channel wavelengths, linear in log wavelength, flat beyond
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.interp(np.log(cwave), np.log(g["wavelength"]), g["gain"])
        agm = np.where((flat > 0) & np.isfinite(cwave), gain / flat, np.nan)
    return {"ABS_GAIN": agm.astype(np.float32), **g}


def _as_dataset(solved: Any, inputs: SolverInputs, repo: Repository) -> xr.Dataset:
    """The product as a dask-backed Dataset around the delayed per-band results."""
    import dask.array as da

    bands = inputs.bands
    ny, nx = inputs.pixels.sizes["y"], inputs.pixels.sizes["x"]
    n_ch = repo.instrument.n_spectral_channels
    parts = [solved[i] for i in range(len(bands))]
    agm = da.stack([da.from_delayed(p["ABS_GAIN"], (ny, nx), np.float32) for p in parts])
    fn = {k: da.stack([da.from_delayed(p[k], (n_ch,), np.float64) for p in parts])
          for k in ("gain", "gain_error", "wavelength")}
    n = da.stack([da.from_delayed(p["n"], (n_ch,), np.int64) for p in parts])
    units = "MJy s / (electron sr)"
    return xr.Dataset(
        {"ABS_GAIN": (("band", "y", "x"), agm, {"units": units, "long_name": "absolute gain (flat field included)"}),
         "GAIN_FUNCTION": (("band", "spectral_channel"), fn["gain"], {"units": units,
                                                                        "long_name": "gain of the channel's typical pixel"}),
         "GAIN_FUNCTION_ERR": (("band", "spectral_channel"), fn["gain_error"], {"units": units}),
         "GAIN_WAVELENGTH": (("band", "spectral_channel"), fn["wavelength"],
                             {"units": "um", "long_name": "weighted mean wavelength of the channel's measurements"}),
         "N_CALIBRATORS": (("band", "spectral_channel"), n, {"units": "", "long_name": "measurements used"})},
        coords={"band": np.asarray(bands, np.int64), "y": inputs.pixels["y"].values, "x": inputs.pixels["x"].values,
                "spectral_channel": np.arange(n_ch)})


register_solver(Solver(
    "abs_gain", "Estimate Absolute Gain Matrix", AbsGainConfig,
    reads={"IMAGE": "l2a", "VARIANCE": "l2a", "FLAGS": "l2", "ZODI": "l2"},
    calibrations=("dark", "flat_field", "abs_gain_matrix", "average_psf", "solid_angle_pixel_map"),
    tables=("refcat",), writes=("abs_gain_matrix",), solve=estimate_abs_gain,
    extra=("wcs_crpix", "wcs_crval", "wcs_cd", "wcs_sip_a", "wcs_sip_b", "wcs_sip_ap", "wcs_sip_bp", "finast",
           "sc_position")))
