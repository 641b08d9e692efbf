"""Perform Forced Photometry (paper section 4.3, Level 3a) on one spectral image.

Catalogue positions are moved to the image's epoch and projected with its (fine) WCS;
each source is fitted jointly with its neighbours on a 15 x 15 cutout of the
background-subtracted image (:mod:`sphx.kernels.photometry`), with the PSF interpolated
between the four zones around it. Fluxes are converted from MJy/sr x pixel to uJy with the solid angle pixel map
and carry the wavelength and bandwidth at the source position, the exposure's mid-time,
the FLAGS of the central pixels, the fit's reduced chi-square and the covariance with
the most correlated neighbours. One row per catalogue source whose position is on the
image, flagged rather than dropped when it cannot be measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import healpy as hp
import numpy as np
import pyarrow as pa
import xarray as xr

from .. import flags as _flags
from ..astrometry.catalog import CATALOG_COLUMNS, DEC, RA, catalog_array, sources_in_image
from ..catalog.query import query_catalog
from ..ephemeris import julian_year, observer_barycentric
from ..errors import StepError
from ..kernels.photometry import (
    PHOT_STATUS,
    forced_photometry,
    local_backgrounds,
    render_sources,
    template_bank,
)
from ..wcs import cube_wcs

__all__ = ["L3_NSIDE", "PHOTOMETRY_MASK", "image_catalog", "noise_model", "photometer_image", "psf_zone_weights",
           "split_by_tile"]

L3_NSIDE = 64  # Level 3 sky tiles: HEALPix NSIDE 64 (nested), about 0.84 sq. deg.
# Pixels left out of the fit (SOURCE only masks the background estimate).
PHOTOMETRY_MASK = _flags.mask("SUR_ERROR", "PHANMISS", "NONFUNC", "MISSING_DATA", "HOT", "COLD", "PERSIST",
                              "OUTLIER", "OVERFLOW", "TRANSIENT")
_SR_PER_ARCSEC2 = (math.pi / (180.0 * 3600.0)) ** 2
_UJY_PER_MJY = 1e12


def psf_zone_weights(x: np.ndarray, y: np.ndarray, zone_x: np.ndarray,
                     zone_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The four PSF zones around each position and their bilinear weights.

    The PSF is measured at zone centres on a regular grid and changes smoothly across
    the detector; blending the four nearest (as photutils' ``GriddedPSFModel`` does)
    removes the step between zones. Beyond the outermost centres the edge zones are
    used unchanged.

    Parameters
    ----------
    x, y
        Positions [pixel, detector frame].
    zone_x, zone_y
        Centre of each PSF plane [pixel] (a regular grid, any plane order).

    Returns
    -------
    zones : numpy.ndarray
        (n, 4) int64 plane indices (-1 where the position is not finite).
    weights : numpy.ndarray
        (n, 4) float64, summing to 1.
    """
    ux, uy = np.unique(zone_x), np.unique(zone_y)
    lookup = np.full((uy.size, ux.size), -1, np.int64)
    lookup[np.searchsorted(uy, zone_y), np.searchsorted(ux, zone_x)] = np.arange(len(zone_x))

    def bracket(values: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = np.clip(np.where(np.isfinite(values), values, centres[0]), centres[0], centres[-1])
        i = np.clip(np.searchsorted(centres, v, side="right") - 1, 0, max(centres.size - 2, 0))
        if centres.size == 1:
            return i, np.zeros(v.shape)
        return i, (v - centres[i]) / (centres[i + 1] - centres[i])

    ix, tx = bracket(np.asarray(x, float), ux)
    iy, ty = bracket(np.asarray(y, float), uy)
    jx, jy = np.minimum(ix + 1, ux.size - 1), np.minimum(iy + 1, uy.size - 1)
    zones = np.stack([lookup[iy, ix], lookup[iy, jx], lookup[jy, ix], lookup[jy, jx]], axis=1)
    weights = np.stack([(1 - ty) * (1 - tx), (1 - ty) * tx, ty * (1 - tx), ty * tx], axis=1)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    zones[bad] = -1
    return zones, weights


def noise_model(image: np.ndarray, variance: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, float]:
    """Split VARIANCE into a signal-independent part and a photon term per unit signal.

    Level 2 VARIANCE evaluates the photon noise at each pixel's own measured value, so
    weights taken from it are lower where the noise happens to be high: fits weighted
    that way underestimate fluxes (by ~0.1 sigma here). VARIANCE is linear in the
    positive signal (read noise plus photons), ``V = V0 + c max(I, 0)``; the photometry
    weights use ``V0 + c max(model, 0)`` instead, with the model of the sky.

    Returns
    -------
    v0 : numpy.ndarray
        Signal-independent variance per pixel [(MJy/sr)^2] (NaN where VARIANCE is).
    c : float
        Variance per unit signal [MJy/sr] (0 when the data show none).
    """
    signal = np.maximum(image, 0.0)
    good = usable & np.isfinite(signal) & np.isfinite(variance) & (signal > 0)
    c = 0.0
    if np.count_nonzero(good) > 400 and np.ptp(signal[good]) > 0:
        # a line through the medians of 40 equally populated signal bins: the few bright
        # star pixels (whose variance also carries non-linearity terms) do not steer it
        sig, var = signal[good].astype(np.float64), variance[good].astype(np.float64)
        order = np.argsort(sig)
        bins = np.array_split(order, 40)
        c = float(np.polyfit([np.median(sig[b]) for b in bins], [np.median(var[b]) for b in bins], 1)[0])
        c = c if math.isfinite(c) and c > 0 else 0.0
    # read noise can be a tiny part of it (photon noise of the zodiacal light dominates):
    # where the fitted slope leaves a slightly negative remainder, it is zero
    return np.maximum(variance - c * signal, 0.0), c


_POSITION_COLUMNS = ("source_id", "ra", "dec", "ref_epoch", "pmra", "pmdec")


def image_catalog(refcat: Any, cube: xr.Dataset, *, band: int, obs: int,
                  columns: Sequence[str] | None = _POSITION_COLUMNS) -> pa.Table:
    """Reference-catalogue sources over one image, at its mid-exposure epoch as seen from
    the spacecraft (proper motion and parallax), read only where the image lies.

    Parameters
    ----------
    refcat
        The ``refcat`` table (``pyarrow.dataset.Dataset`` or Table,
        :func:`sphx.catalog.query.query_catalog`).
    cube, band, obs
        The image (its ``wcs_*`` variables, ``x``/``y`` labels, ``mjd_avg`` and
        ``sc_position``).
    columns
        Columns to read (those the catalogue holds); None reads all of them.
    """
    wcs = cube_wcs(cube, band=band, obs=obs)
    x0, x1 = float(cube["x"].values[0]) - 0.5, float(cube["x"].values[-1]) + 0.5
    y0, y1 = float(cube["y"].values[0]) - 0.5, float(cube["y"].values[-1]) + 0.5
    ra, dec = wcs.all_pix2world(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]), 0)
    mjd = float(cube["mjd_avg"].sel(obs=obs).values)
    sc = cube["sc_position"].sel(obs=obs, sc_epoch="avg").values if "sc_position" in cube else None
    if columns is not None:
        columns = [c for c in columns if c in refcat.schema.names]
    table, _ = query_catalog(refcat, footprints=[np.column_stack([ra, dec])], epoch=float(julian_year(mjd)),
                             observer=observer_barycentric(mjd, sc), columns=columns)
    return table


def photometer_image(
    cube: xr.Dataset,
    catalog: pa.Table,
    *,
    band: int,
    obs: int,
    psf: xr.Dataset,
    sapm: xr.Dataset,
    spectral_wcs: xr.Dataset,
    background: np.ndarray,
    mask: int = int(PHOTOMETRY_MASK),
    local_background: bool = False,
    refine_background: Callable[[np.ndarray], np.ndarray] | None = None,
    half_size: int = 7,
) -> pa.Table:
    """Forced photometry of the catalogue sources on one image of a Level 2 cube.

    Parameters
    ----------
    cube
        Level 2 cube (IMAGE [MJy/sr], VARIANCE, FLAGS, the ``wcs_*`` variables,
        ``obsid`` and ``mjd_avg``); only image (band, obs) is read.
    catalog
        Reference-catalogue rows near the image: ``source_id``, ``ra``, ``dec`` [deg] at
        ``ref_epoch`` [Julian year], ``pmra``, ``pmdec`` [mas/yr]; :func:`image_catalog`
        gives them at the image's epoch with parallax applied.
    band, obs
        The image.
    psf, sapm, spectral_wcs
        Calibration products ``average_psf`` (PSF, zone_x, zone_y),
        ``solid_angle_pixel_map`` (SAPM [arcsec2]) and ``spectral_wcs`` (CWAVE, CBAND
        [um]), with a ``band`` dimension.
    background
        (y, x) background [MJy/sr] to subtract (:mod:`sphx.level3.background`).
    mask
        FLAGS bits whose pixels are left out of the fit.
    local_background
        Subtract from each cutout also the clipped level of its own 15 x 15 region,
        SOURCE pixels left out (or, with fewer than 10 others, clipped away), and add
        its uncertainty to the flux errors: the local estimate of crowded images, where
        ``background`` is only the smooth part.
    refine_background
        Background estimator of an image [MJy/sr] (the one that gave ``background``):
        when given, it is applied again to the image minus the fitted catalogue
        sources and every source is fitted again on that background. An estimate from
        the image itself includes the light of the sources' wings outside the SOURCE
        mask and of faint unmasked sources, which the fit also models: on Level 2
        images of simulated surveys that lowered isolated fluxes by 0.024 of their errors.
    half_size
        Cutout half size [pixel] (7: 15 x 15).

    Returns
    -------
    pyarrow.Table
        One row per source on the image: ``source_id``, ``obsid``, ``band``, ``ra``,
        ``dec`` [deg] (at the epoch), ``x``, ``y`` [pixel], ``flux``, ``flux_error``
        [uJy], ``wavelength``, ``bandwidth`` [um], ``mjd`` [d], ``flags`` (FLAGS OR-ed
        over the 3 x 3 central pixels), ``phot_status`` (:data:`PHOT_STATUS`), ``chi2``
        (reduced chi-square of the cutout fit), ``n_blend``, ``neighbour_id`` and
        ``neighbour_cov`` [uJy^2] (lists), ``healpix64`` (nested tile of the source's
        catalogue position).
    """
    cell = cube[["IMAGE", "VARIANCE", "FLAGS"]].sel(band=band, obs=obs)
    image = np.asarray(cell["IMAGE"].values, dtype=np.float32)
    if np.shape(background) != image.shape:
        raise StepError(f"background has shape {np.shape(background)}, image band {band} obs {obs} has {image.shape}")
    variance = np.asarray(cell["VARIANCE"].values)
    flags = np.asarray(cell["FLAGS"].values).astype(np.uint32, copy=False)
    x0, y0 = int(cube["x"].values[0]), int(cube["y"].values[0])
    ny, nx = image.shape
    background = np.asarray(background, dtype=np.float32)
    usable = (flags & np.uint32(mask)) == 0
    v0, per_signal = noise_model(image, variance, usable)

    mjd = float(cube["mjd_avg"].sel(obs=obs).values)
    obsid = str(cube["obsid"].sel(obs=obs).values)
    wcs = cube_wcs(cube, band=band, obs=obs)
    # only positions and motions matter here: absent flux columns read as NaN
    columns = {c: catalog.column(c) if c in catalog.column_names else np.full(catalog.num_rows, np.nan)
               for c in CATALOG_COLUMNS}
    cat = catalog_array(columns, name="catalogue")
    ids = np.asarray(catalog.column("source_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    if catalog.num_rows:
        rows, x, y = sources_in_image(cat, wcs, (x0, x0 + nx - 1), (y0, y0 + ny - 1), float(julian_year(mjd)),
                                      margin=half_size)
    else:
        rows, x, y = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    # a row per source centred on the image; its neighbours just off it still join fits
    on = (x > x0 - 0.5) & (x < x0 + nx - 0.5) & (y > y0 - 0.5) & (y < y0 + ny - 0.5)
    zone, zone_weight = psf_zone_weights(x, y, psf["zone_x"].values, psf["zone_y"].values)
    bank = template_bank(np.asarray(psf["PSF"].sel(band=band).values, dtype=np.float64),
                         oversampling=int(psf.attrs.get("oversampling", 10)))

    def weights(model: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(usable, 1.0 / (v0 + per_signal * np.maximum(model, 0.0)), 0.0)
        w[~np.isfinite(w)] = 0.0
        return w.astype(np.float32)

    xs, ys = x - x0, y - y0
    ix = np.clip(np.floor(xs + 0.5).astype(np.int64), 0, nx - 1)  # the pixel of each source
    iy = np.clip(np.floor(ys + 0.5).astype(np.int64), 0, ny - 1)
    excluded = ~usable | ((flags & np.uint32(_flags.Flag.SOURCE)) != 0)

    def pedestals(residual: np.ndarray) -> dict[str, np.ndarray | None]:
        if not (local_background and x.size):
            return {"pedestal": None, "pedestal_variance": None}
        level, var = local_backgrounds(residual, excluded, xs, ys, half_size=half_size)
        crowded = ~np.isfinite(level)
        level[crowded], var[crowded] = local_backgrounds(residual, ~usable, xs[crowded], ys[crowded],
                                                         half_size=half_size)
        return {"pedestal": level, "pedestal_variance": var}

    def fit(data: np.ndarray, w: np.ndarray, local: dict[str, np.ndarray | None],
            targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return forced_photometry(data, w, flags, xs, ys, zone, bank, zone_weight=zone_weight,
                                 half_size=half_size, targets=targets, **local)

    # first with the background's photon noise; then with the fitted sources' as well
    # (and, with refine_background, on the background of the image without them)
    local = pedestals(image - background)
    res = fit(image - background, weights(background), local)
    if x.size and (per_signal > 0 or refine_background is not None):
        sources = render_sources(image.shape, xs, ys, zone, np.fmax(res["flux"], 0.0), bank,
                                 zone_weight=zone_weight)
        targets = None
        if refine_background is not None:
            background = np.asarray(refine_background(image - sources), dtype=np.float32)
            if background.shape != image.shape:
                raise StepError(f"refine_background gave shape {background.shape}, image has {image.shape}")
            local = pedestals(image - background - sources)
        else:  # only sources that add appreciably (5 %) to the variance in their pixel
            first = v0[iy, ix] + per_signal * np.maximum(background[iy, ix], 0.0)
            targets = np.flatnonzero(per_signal * sources[iy, ix] / np.where(first > 0, first, np.inf) > 0.05)
        if targets is None or targets.size:
            again = fit(image - background, weights(background + sources), local, targets)
            if targets is None:
                res = again
            else:
                for k, v in again.items():
                    res[k][targets] = v[targets]

    omega = np.asarray(sapm["SAPM"].sel(band=band).values)[y0:y0 + ny, x0:x0 + nx][iy, ix].astype(np.float64)
    to_ujy = omega * _SR_PER_ARCSEC2 * _UJY_PER_MJY
    cwave = np.asarray(spectral_wcs["CWAVE"].sel(band=band).values)[y0:y0 + ny, x0:x0 + nx][iy, ix]
    cband = np.asarray(spectral_wcs["CBAND"].sel(band=band).values)[y0:y0 + ny, x0:x0 + nx][iy, ix]
    ra, dec = wcs.all_pix2world(x, y, 0) if x.size else (np.zeros(0), np.zeros(0))

    keep = np.flatnonzero(on)
    # neighbour lists, row by row: the reported neighbours of each kept source
    neighbour = res["neighbour"][keep]
    has = neighbour >= 0
    offsets_arr = pa.array(np.concatenate([[0], np.cumsum(has.sum(axis=1))]).astype(np.int32))
    nb = neighbour[has]
    nb_ids = ids[rows[nb]]
    nb_cov = res["neighbour_cov"][keep][has] * np.broadcast_to(to_ujy[keep][:, None], has.shape)[has] * to_ujy[nb]
    ra_k, dec_k = np.asarray(ra)[keep], np.asarray(dec)[keep]
    columns = {
        "source_id": pa.array(ids[rows[keep]], pa.int64()),
        "obsid": pa.array([obsid] * keep.size, pa.string()),
        "band": pa.array(np.full(keep.size, band, np.int8)),
        "ra": pa.array(ra_k), "dec": pa.array(dec_k),
        "x": pa.array(x[keep]), "y": pa.array(y[keep]),
        "flux": pa.array(res["flux"][keep] * to_ujy[keep]),
        "flux_error": pa.array(res["flux_error"][keep] * to_ujy[keep]),
        "wavelength": pa.array(cwave[keep].astype(np.float64)),
        "bandwidth": pa.array(cband[keep].astype(np.float64)),
        "mjd": pa.array(np.full(keep.size, mjd)),
        "flags": pa.array(res["flags"][keep].astype(np.uint32)),
        "phot_status": pa.array(res["status"][keep].astype(np.int32)),
        "chi2": pa.array(res["chi2"][keep]),
        "n_blend": pa.array(res["n_blend"][keep].astype(np.int32)),
        "neighbour_id": pa.ListArray.from_arrays(offsets_arr, pa.array(nb_ids, pa.int64())),
        "neighbour_cov": pa.ListArray.from_arrays(offsets_arr, pa.array(nb_cov, pa.float64())),
        # tile of the catalogue position, so that all measurements of a source share one
        "healpix64": pa.array(hp.ang2pix(L3_NSIDE, cat[rows[keep], RA], cat[rows[keep], DEC], lonlat=True,
                                         nest=True).astype(np.int64) if keep.size else np.zeros(0, np.int64)),
    }
    return pa.table(columns, metadata={"sphx.phot_status": repr(PHOT_STATUS)})


def split_by_tile(table: pa.Table) -> dict[int, pa.Table]:
    """One table per HEALPix NSIDE=64 tile (``healpix64``) of a photometry table."""
    tiles = table.column("healpix64").to_numpy()
    return {int(t): table.filter(pa.array(tiles == t)) for t in np.unique(tiles)}
