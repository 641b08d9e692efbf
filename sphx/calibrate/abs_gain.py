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

Graph: one task per image reads it and returns its calibrators' ratios (a few kB); one task per band
combines them. The work per image that does not depend on the image is shared: one task
per band builds the photometry templates of the PSF, and one task per ``batch`` images
reads the reference catalogue over all of them (the calibrators and the sources near
them), from which each image's task takes its own rows. Memory is one image per task,
the templates and the ratio table, whatever the number of images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import dask
import numba
import numpy as np
import pyarrow as pa
import pydantic
import xarray as xr
from scipy.spatial import cKDTree

from .. import flags as _flags
from ..ephemeris import julian_year
from ..errors import CalibrationError
from ..io.repository import Repository
from ..kernels.photometry import TemplateBank, template_bank
from ..kernels.select import median
from ..level3.photometry import PHOTOMETRY_MASK, image_catalog, photometer_image
from ..simulate.sky import sed_flux
from ..wcs import cube_wcs
from .inputs import IMAGE_WCS, SolverInputs, batch_catalog, catalog_epoch, read_images
from .run import Solver, register_solver

__all__ = ["AbsGainConfig", "calibrator_ratios", "estimate_abs_gain", "gain_function"]

# the photometry's noise slope and the sky level from a sample of at least this many
# pixels (every 4th row and column of a full detector: all 4 million took longer than the
# calibrators' photometry)
_SKY_SAMPLE = 250_000
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
    batch: int = pydantic.Field(32, ge=1, description="images that share one read of the reference catalogue")


def _image_cube(meta: xr.Dataset, image: np.ndarray, variance: np.ndarray, flags: np.ndarray) -> xr.Dataset:
    dims = ("band", "obs", "y", "x")
    return meta.assign(IMAGE=(dims, image), VARIANCE=(dims, variance), FLAGS=(dims, flags))


def calibrator_ratios(cube: xr.Dataset, catalog: pa.Table, *, band: int, obs: int, dark: np.ndarray, flat: np.ndarray,
                      a0: float, zodi: np.ndarray, calibrations: dict[str, xr.Dataset],
                      config: AbsGainConfig, bank: TemplateBank | None = None) -> pa.Table:
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
    bank
        Photometry templates of the band's PSF (built from ``average_psf`` when None).

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
    sky_mask = np.uint32(PHOTOMETRY_MASK | _flags.Flag.SOURCE)
    step = max(1, math.isqrt(cell["IMAGE"].size // _SKY_SAMPLE))
    trial, trial_var, sky_ratio = _trial_image(*(np.ascontiguousarray(cell[n].values) for n in ("IMAGE", "VARIANCE",
                                                                                                   "FLAGS")),
                                               np.ascontiguousarray(zodi), np.ascontiguousarray(dark, np.float64),
                                               np.ascontiguousarray(flat, np.float64), float(a0), sky_mask, step)
    dims = ("band", "obs", "y", "x")
    cube = cube.assign(IMAGE=(dims, trial[None, None]), VARIANCE=(dims, trial_var[None, None]))
    level = median(sky_ratio) if sky_ratio.size > 100 else 0.0
    # calibrators and the catalogue sources whose light reaches their cutouts
    ra = np.radians(catalog.column("ra").to_numpy())
    dec = np.radians(catalog.column("dec").to_numpy())
    xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    pixel = math.radians(float(np.sqrt(abs(np.linalg.det(cube_wcs(cube, band=band, obs=obs).pixel_scale_matrix)))))
    near = (xyz @ xyz[is_cal].T).max(axis=1) >= math.cos(config.neighbour_radius * pixel)
    subset = catalog.filter(pa.array(near))
    table = photometer_image(cube, subset, band=band, obs=obs, psf=calibrations["average_psf"],
                             sapm=calibrations["solid_angle_pixel_map"], spectral_wcs=calibrations["spectral_wcs"],
                             background=(level * zodi).astype(np.float32, copy=False), local_background=True,
                             half_size=config.half_size, bank=bank, noise_sample=step)
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


@numba.njit(nogil=True, cache=True)
def _trial_image(image, variance, flags, zodi, dark, flat, a0, sky_mask, step):  # pragma: no cover - compiled
    """The image and its variance scaled by the trial gain, ``(I - dark) a0 / flat`` (as
    float32, what the photometry takes; NaN where the flat is not positive), and the
    ratios ``trial / zodi`` (float64) of the sky pixels on every ``step``-th row and
    column: unflagged by ``sky_mask`` with finite values and positive zodiacal light.

    One pass over the pixels instead of a dozen array expressions: on a full detector
    those took longer than reading the image.
    """
    ny, nx = image.shape
    trial = np.empty((ny, nx), np.float32)
    trial_var = np.empty((ny, nx), np.float32)
    ratio = np.empty(((ny + step - 1) // step) * ((nx + step - 1) // step))
    n = 0
    for j in range(ny):
        for i in range(nx):
            f = flat[j, i]
            scale = a0 / f if f > 0 else np.nan
            t = (np.float64(image[j, i]) - dark[j, i]) * scale
            trial[j, i] = t
            trial_var[j, i] = np.float64(variance[j, i]) * (scale * scale)
            z = zodi[j, i]
            if (j % step == 0 and i % step == 0 and (flags[j, i] & sky_mask) == 0 and np.isfinite(t)
                    and np.isfinite(z) and z > 0):
                ratio[n] = t / z
                n += 1
    return trial, trial_var, ratio[:n]


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


def _batch_catalog(location: str, meta: xr.Dataset, *, band: int, epoch: float, config: AbsGainConfig) -> pa.Table:
    """The calibrators of :func:`~sphx.calibrate.inputs.batch_catalog` and the sources
    near them: each image's :func:`~sphx.level3.photometry.image_catalog` on this table
    finds exactly the rows (and positions) it finds on the whole catalogue, minus sources
    too far from any calibrator to matter (a read per image cost more than the
    photometry of its calibrators)."""
    table = batch_catalog(location, meta, band=band, epoch=epoch)
    obs = [int(o) for o in meta["obs"].values]
    is_cal = np.asarray(table.column("calibrator").to_numpy(zero_copy_only=False), bool)
    if not is_cal.any():
        return table.slice(0, 0)
    # near a calibrator at the images' epochs: within the neighbour radius plus what two
    # sources can move (proper motion, parallax seen from up to 1.1 AU) since the catalogue
    scale = max(float(np.sqrt(abs(np.linalg.det(cube_wcs(meta, band=band, obs=o).pixel_scale_matrix))))
                for o in obs)
    years = float(np.max(np.abs(np.asarray(julian_year(meta["mjd_avg"].values)) - epoch)))
    col = {c: np.nan_to_num(table.column(c).to_numpy(), nan=0.0) if c in table.column_names else np.zeros(1)
           for c in ("pmra", "pmdec", "parallax")}
    motion = float(np.max(np.hypot(col["pmra"], col["pmdec"]))) * years + 1.1 * float(np.max(col["parallax"]))
    radius = math.radians(1.001 * config.neighbour_radius * scale + 2 * motion / 3.6e6 + 1e-6)
    ra, dec = np.radians(table.column("ra").to_numpy()), np.radians(table.column("dec").to_numpy())
    xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    hits = cKDTree(xyz).query_ball_point(xyz[is_cal], 2 * math.sin(radius / 2), return_sorted=False)
    near = np.zeros(table.num_rows, bool)
    near[np.concatenate([np.asarray(h, np.int64) for h in hits])] = True
    return table.filter(pa.array(near))


@contextlib.contextmanager
def _one_numba_thread() -> Iterator[None]:
    """Numba's parallel kernels run on one thread inside a task (the setting is per
    thread): the tasks are the parallelism. Nested thread teams oversubscribe the cores,
    and a team that spins at its barrier waits for a thread the OS has descheduled
    (a few ms per kernel call, dozens of calls per image)."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def _measure(repo: Repository, levels: dict[str, str], meta: xr.Dataset, band: int, obs: int, dark: np.ndarray,
             flat: np.ndarray, a0: float, calibrations: dict[str, xr.Dataset], bank: TemplateBank,
             catalog: pa.Table | None, config: AbsGainConfig) -> pa.Table:
    """The task of one image: its pixels read here (``levels``: variable -> level; not
    tasks of their own, which a scheduler would run ahead), the per-image numbers of its
    batch (``meta``), and the batch's catalogue rows (:func:`_batch_catalog`; None: read
    the whole catalogue)."""
    pixels = read_images(repo, levels, band=band, obs=[obs])
    cube = _image_cube(meta.sel(obs=[obs]), *(pixels[n][None] for n in ("IMAGE", "VARIANCE", "FLAGS")))
    # the batch's rows, or (a catalogue whose rows have different epochs) the whole catalogue
    refcat = catalog if catalog is not None else repo.open_table("refcat")
    # every column: the calibrators' spectra are needed
    catalog = image_catalog(refcat, cube, band=band, obs=obs, columns=None)
    with _one_numba_thread():
        return calibrator_ratios(cube, catalog, band=band, obs=obs, dark=dark, flat=flat, a0=a0,
                                 zodi=pixels["ZODI"][0], calibrations=calibrations, config=config, bank=bank)


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
    small = {n: calibrations[n].sel(band=bands).load() for n in ("average_psf", "solid_angle_pixel_map",
                                                                  "spectral_wcs")}
    usable = inputs.usable(require_astrometry=c.require_astrometry)
    # per-image numbers (WCS, times, positions): small, read now so that tasks carry them;
    # only what the photometry reads (every selection of an image copies them all)
    meta = inputs.image_metadata()
    meta = meta.drop_vars([n for n in meta.coords if n not in meta.indexes and n not in ("obsid", "mjd_avg")]).load()
    meta.attrs = {}
    levels = {n: inputs.levels[n] for n in ("IMAGE", "VARIANCE", "FLAGS", "ZODI")}
    epoch = catalog_epoch(repo.open_table("refcat"))
    oversampling = int(small["average_psf"].attrs.get("oversampling", 10))
    per_band = []
    for i, band in enumerate(bands):
        dark = calibrations["dark"]["DARK"].sel(band=band).values.astype(np.float64)
        flat = calibrations["flat_field"]["FLAT"].sel(band=band).values.astype(np.float64)
        a0 = float(np.nanmedian(calibrations["abs_gain_matrix"]["ABS_GAIN"].sel(band=band).values))
        d_dark, d_flat = dask.delayed(dark), dask.delayed(flat)
        band_cal = {k: v.sel(band=[band]) for k, v in small.items()}
        psf = np.asarray(band_cal["average_psf"]["PSF"].sel(band=band).values, dtype=np.float64)
        bank = dask.delayed(template_bank)(psf, oversampling=oversampling, dask_key_name=f"abs-gain-templates-D{band}")
        use = np.flatnonzero(usable[i]).tolist()
        tasks = []
        for first in range(0, len(use), c.batch):
            group = use[first:first + c.batch]
            m = meta.isel(band=[i], obs=group)
            catalog = None if epoch is None else dask.delayed(_batch_catalog)(
                repo.location, m, band=int(band), epoch=epoch, config=c,
                dask_key_name=f"abs-gain-refcat-{int(m['obs'].values[0])}-D{band}")
            for obs in m["obs"].values:
                tasks.append(dask.delayed(_measure)(
                    repo, levels, m, int(band), int(obs), d_dark, d_flat, a0, band_cal, bank, catalog, c,
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
    extra=IMAGE_WCS))
