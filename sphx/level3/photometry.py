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
import numba
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
    TemplateBank,
    forced_photometry,
    local_backgrounds,
    render_sources,
    template_bank,
)
from ..wcs import cube_wcs

__all__ = ["L3_NSIDE", "PHOTOMETRY_MASK", "image_catalog", "noise_model", "photometer_image",
           "psf_zone_weights", "split_by_tile"]

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
    c = _noise_slope(signal, variance, np.logical_not(usable).view(np.uint8), 1)
    # read noise can be a tiny part of it (photon noise of the zodiacal light dominates):
    # where the fitted slope leaves a slightly negative remainder, it is zero
    return np.maximum(variance - c * signal, 0.0), c


_NOISE_BINS = 40


def _noise_slope(signal: np.ndarray, variance: np.ndarray, flags: np.ndarray, mask: int) -> float:
    """The ``c`` of :func:`noise_model` from the pixels not flagged with ``mask`` whose
    variance is finite and signal finite and positive.

    A line through the medians of 40 equally populated signal bins: the few bright star
    pixels (whose variance also carries non-linearity terms) do not steer it. The bins
    are those of a stable sort by signal (pixel order among equal values) cut as
    :func:`numpy.array_split` cuts, and the medians those of :func:`numpy.median`; they
    are found by counting instead of sorting (:func:`_noise_medians`): a detector image
    has 4 million pixels.
    """
    signal = np.ascontiguousarray(signal)
    if signal.dtype not in (np.float32, np.float64):
        signal = signal.astype(np.float64)
    # bits of positive floats order as the values; +inf's bound the finite ones
    bits, inf_bits = ((signal.view(np.int32), 0x7F80_0000) if signal.dtype == np.float32
                      else (signal.view(np.int64), 0x7FF0_0000_0000_0000))
    sig, var = _noise_medians(signal, bits, inf_bits, np.ascontiguousarray(variance), np.ascontiguousarray(flags),
                              mask, _NOISE_BINS)
    if sig.size == 0:  # too few samples, or all of one signal
        return 0.0
    c = float(np.polyfit(sig, var, 1)[0])
    return c if math.isfinite(c) and c > 0 else 0.0


@numba.njit(nogil=True, cache=True)
def _noise_medians(signal, bits, inf_bits, variance, flags, mask, n_bins):  # pragma: no cover - compiled
    """Median signal and median variance in ``n_bins`` bins of the samples (as for
    :func:`_noise_slope`) sorted stably by signal and cut as :func:`numpy.array_split`
    cuts; empty arrays for 400 samples or fewer, or one signal value only.

    Three passes over the pixels: the key range (``bits``: positive floats order as
    their bits), counts in buckets of consecutive keys (at most :data:`_MAX_BUCKETS`),
    then each sample goes to its bin. The buckets holding a cut or a bin's middle rank
    are sorted (by signal, then pixel: a stable sort); every other one lies inside a
    single bin. The medians of the signal are its values at the middle ranks; those of
    the variance are selected among the bin's samples, which fit in cache.
    """
    sig_all, key_all, var_all, flag_all = signal.ravel(), bits.ravel(), variance.ravel(), flags.ravel()
    empty = np.zeros(0)
    n, kmin, kmax = 0, np.int64(inf_bits), np.int64(0)
    for i in range(key_all.size):
        k = np.int64(key_all[i])
        if 0 < k < inf_bits and (flag_all[i] & mask) == 0 and np.isfinite(var_all[i]):
            n += 1
            kmin, kmax = min(kmin, k), max(kmax, k)
    if n <= 400 or kmin == kmax:
        return empty, empty
    shift = 0
    while ((kmax - kmin) >> shift) >= min(_MAX_BUCKETS, n):
        shift += 1
    n_buckets = ((kmax - kmin) >> shift) + 1
    first = np.zeros(n_buckets + 1, np.int64)  # rank of each bucket's first sample
    for i in range(key_all.size):
        k = np.int64(key_all[i])
        if 0 < k < inf_bits and (flag_all[i] & mask) == 0 and np.isfinite(var_all[i]):
            first[((k - kmin) >> shift) + 1] += 1
    for b in range(n_buckets):
        first[b + 1] += first[b]
    # rank at which each bin starts (the first n % n_bins bins are one longer), and the
    # two middle ranks of each bin
    q, r = n // n_bins, n % n_bins
    cut = np.empty(n_bins + 1, np.int64)
    for b in range(n_bins + 1):
        cut[b] = b * q + min(b, r)
    mid = np.empty(2 * n_bins, np.int64)
    for b in range(n_bins):
        m = cut[b + 1] - cut[b]
        mid[2 * b], mid[2 * b + 1] = cut[b] + (m - 1) // 2, cut[b] + m // 2
    sort_bucket = np.zeros(n_buckets, np.bool_)
    for rank in mid:
        sort_bucket[_bucket_of(first, rank)] = True
    bucket_bin = np.full(n_buckets, -1, np.int32)
    b = 0
    for k in range(n_buckets):
        lo, hi = first[k], first[k + 1]
        if hi == lo:
            continue
        while cut[b + 1] <= lo:
            b += 1
        if hi > cut[b + 1]:
            sort_bucket[k] = True  # a cut falls inside
        bucket_bin[k] = b
    offset = np.zeros(n_buckets + 1, np.int64)  # the pixels of the buckets sorted, in a list
    for k in range(n_buckets):
        offset[k + 1] = offset[k] + (first[k + 1] - first[k] if sort_bucket[k] else 0)
    members = np.empty(offset[n_buckets], np.int64)
    fill = offset[:-1].copy()
    grouped = np.empty(n, var_all.dtype)  # the variances, bin after bin
    put = cut[:-1].copy()
    for i in range(key_all.size):
        k = np.int64(key_all[i])
        if 0 < k < inf_bits and (flag_all[i] & mask) == 0 and np.isfinite(var_all[i]):
            k = (k - kmin) >> shift
            if sort_bucket[k]:
                members[fill[k]] = i
                fill[k] += 1
            else:
                grouped[put[bucket_bin[k]]] = var_all[i]
                put[bucket_bin[k]] += 1
    at = np.empty(2 * n_bins)
    j = 0
    for k in range(n_buckets):
        if offset[k + 1] == offset[k]:
            continue
        idx = members[offset[k]:offset[k + 1]]  # in pixel order
        values = sig_all[idx]
        _sort_pairs(values, idx)  # by (signal, pixel): a stable sort
        b = bucket_bin[k]
        for p in range(idx.size):
            rank = first[k] + p
            while cut[b + 1] <= rank:
                b += 1
            grouped[put[b]] = var_all[idx[p]]
            put[b] += 1
            while j < mid.size and mid[j] == rank:
                at[j] = values[p]
                j += 1
    sig_median, var_median = np.empty(n_bins), np.empty(n_bins)
    for b in range(n_bins):
        odd = (cut[b + 1] - cut[b]) % 2 == 1
        sig_median[b] = at[2 * b] if odd else (at[2 * b] + at[2 * b + 1]) / 2
        # (few buckets: the counts stay in the fastest cache)
        two = _at_ranks(grouped[cut[b]:cut[b + 1]].astype(np.float64), mid[2 * b:2 * b + 2] - cut[b], 1 << 12)
        var_median[b] = two[0] if odd else (two[0] + two[1]) / 2
    return sig_median, var_median


_SIGN = np.int64(0x7FFF_FFFF_FFFF_FFFF)
_MAX_BUCKETS = 1 << 18  # counts of 2 MB: they stay in cache


@numba.njit(inline="always")
def _key(bits):  # pragma: no cover - compiled
    """An int64 that orders as the float64 with these bits (the magnitude bits of
    negative numbers flipped)."""
    return bits ^ ((bits >> 63) & _SIGN)


@numba.njit(nogil=True, cache=True)
def _sort_pairs(values, index):  # pragma: no cover - compiled
    """Sort ``values`` in place by (value, index), carrying ``index`` along: a heap sort.

    Written out rather than numpy's sorts, whose compiled helpers can clash with those
    of other cached kernels (numba gives them process-dependent symbol names).
    """
    n = values.size
    for root in range(n // 2 - 1, -1, -1):  # a max-heap
        _sift(values, index, root, n)
    for end in range(n - 1, 0, -1):  # the largest to the end, the heap one shorter
        values[0], values[end] = values[end], values[0]
        index[0], index[end] = index[end], index[0]
        _sift(values, index, 0, end)


@numba.njit(inline="always")
def _sift(values, index, root, n):  # pragma: no cover - compiled
    """Move the root down the heap values[:n] (ordered by value, then index)."""
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and (values[child + 1] > values[child]
                              or (values[child + 1] == values[child] and index[child + 1] > index[child])):
            child += 1
        if values[child] > values[root] or (values[child] == values[root] and index[child] > index[root]):
            values[root], values[child] = values[child], values[root]
            index[root], index[child] = index[child], index[root]
            root = child
        else:
            return


@numba.njit(inline="always")
def _bucket_of(first, rank):  # pragma: no cover - compiled
    """The bucket holding ``rank``: the last k with first[k] <= rank (binary search)."""
    lo, hi = 0, first.size - 1
    while hi - lo > 1:
        m = (lo + hi) // 2
        if first[m] <= rank:
            lo = m
        else:
            hi = m
    return lo


@numba.njit(nogil=True, cache=True)
def _buckets(values, max_buckets):  # pragma: no cover - compiled
    """Counts of the values in at most ``max_buckets`` buckets of consecutive keys
    (:func:`_key`): (kmin, shift, first), the bucket of a value ``(key - kmin) >> shift``,
    ``first[k]`` the rank of bucket k's first value among the sorted values."""
    bits = values.view(np.int64)
    kmin, kmax = _key(bits[0]), _key(bits[0])
    for i in range(bits.size):
        k = _key(bits[i])
        kmin, kmax = min(kmin, k), max(kmax, k)
    span = np.uint64(kmax - kmin)  # the difference wraps; as unsigned it is exact
    shift = np.uint64(0)
    while (span >> shift) >= max_buckets:
        shift += np.uint64(1)
    n_buckets = np.int64(span >> shift) + 1
    first = np.zeros(n_buckets + 1, np.int64)
    for i in range(bits.size):
        first[np.int64(np.uint64(_key(bits[i]) - kmin) >> shift) + 1] += 1
    for k in range(n_buckets):
        first[k + 1] += first[k]
    return kmin, shift, first


@numba.njit(nogil=True, cache=True)
def _at_ranks(values, ranks, max_buckets):  # pragma: no cover - compiled
    """The values at ``ranks`` (ascending) of the sorted values: only the buckets
    (:func:`_buckets`, at most ``max_buckets``) holding those ranks are gathered and
    sorted."""
    kmin, shift, first = _buckets(values, min(max_buckets, values.size))
    bits = values.view(np.int64)
    slot = np.full(first.size - 1, -1, np.int64)
    bucket = np.empty(ranks.size, np.int64)
    for r in range(ranks.size):
        bucket[r] = _bucket_of(first, ranks[r])
    n_slots = 0
    start = np.zeros(ranks.size + 1, np.int64)
    for b in bucket:
        if slot[b] < 0:
            slot[b] = n_slots
            start[n_slots + 1] = start[n_slots] + first[b + 1] - first[b]
            n_slots += 1
    gathered = np.empty(start[n_slots])
    where = np.empty(start[n_slots], np.int64)
    fill = start[:n_slots].copy()
    for i in range(values.size):
        s = slot[np.int64(np.uint64(_key(bits[i]) - kmin) >> shift)]
        if s >= 0:
            gathered[fill[s]], where[fill[s]] = values[i], i
            fill[s] += 1
    for s in range(n_slots):
        _sort_pairs(gathered[start[s]:start[s + 1]], where[start[s]:start[s + 1]])
    out = np.empty(ranks.size)
    for r in range(ranks.size):
        out[r] = gathered[start[slot[bucket[r]]] + ranks[r] - first[bucket[r]]]
    return out


_REGION_BLOCK = 8  # [pixel] granularity of the pixels a photometry call evaluates


def _fit_region(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], reach: int) -> np.ndarray | None:
    """Flat indices of the pixels within ``reach`` of any position (in blocks of
    :data:`_REGION_BLOCK`), or None when they are most of the image.

    The fits, local backgrounds and source weights read pixels only within a cutout
    half size of a source, so the per-pixel arithmetic before them (weights, residuals,
    masks) is needed only there: for a few calibrator stars on a 2040 x 2040 image a
    few per cent of the pixels.
    """
    ny, nx = shape
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return np.zeros(0, np.int64)
    cx = np.floor(x[ok] + 0.5).astype(np.int64)
    cy = np.floor(y[ok] + 0.5).astype(np.int64)
    blk = _REGION_BLOCK
    nby, nbx = -(-ny // blk), -(-nx // blk)
    bx0, bx1 = np.clip((cx - reach) // blk, 0, nbx - 1), np.clip((cx + reach) // blk, 0, nbx - 1)
    by0, by1 = np.clip((cy - reach) // blk, 0, nby - 1), np.clip((cy + reach) // blk, 0, nby - 1)
    blocks = np.zeros((nby, nbx), bool)
    for dy in range(int((by1 - by0).max()) + 1):
        for dx in range(int((bx1 - bx0).max()) + 1):
            blocks[np.minimum(by0 + dy, by1), np.minimum(bx0 + dx, bx1)] = True
    if blocks.mean() > 0.5:
        return None
    by, bx = np.nonzero(blocks)
    rows = (by[:, None] * blk + np.arange(blk)[None, :])[:, :, None]
    cols = (bx[:, None] * blk + np.arange(blk)[None, :])[:, None, :]
    inside = (rows < ny) & (cols < nx)
    return np.broadcast_to(rows * nx + cols, inside.shape)[inside]


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
    bank: TemplateBank | None = None,
    noise_sample: int = 1,
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
    bank
        :func:`~sphx.kernels.photometry.template_bank` of ``psf``'s plane of ``band``
        (built here when None): callers photometering many images of one detector
        build it once.
    noise_sample
        The variance per unit signal (:func:`noise_model`) is fitted on every
        ``noise_sample``-th row and column: 4 reads 1/16 of the pixels, still 260 000 on
        a full detector (fitting it on all 4 million takes longer than photometering a few
        hundred calibrators).

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
    if bank is None:
        bank = template_bank(np.asarray(psf["PSF"].sel(band=band).values, dtype=np.float64),
                             oversampling=int(psf.attrs.get("oversampling", 10)))
    xs, ys = x - x0, y - y0
    ix = np.clip(np.floor(xs + 0.5).astype(np.int64), 0, nx - 1)  # the pixel of each source
    iy = np.clip(np.floor(ys + 0.5).astype(np.int64), 0, ny - 1)

    # Every pixel the fits, the local backgrounds and the source weights read lies within
    # a cutout half size of a source. Where the sources are sparse (calibrator stars) the
    # per-pixel arithmetic is done on those pixels only (0 elsewhere, never read); the
    # noise model is fitted on the whole image either way. A refined background is
    # estimated on the whole image, so it needs whole images.
    region = _fit_region(xs, ys, image.shape, half_size + 1) if refine_background is None else None

    def per_pixel(fn: Callable[..., np.ndarray], *arrays: np.ndarray) -> np.ndarray:
        if region is None:
            return fn(*arrays)
        values = fn(*(np.ascontiguousarray(a).ravel()[region] for a in arrays))
        out = np.zeros(image.shape, values.dtype)
        out.ravel()[region] = values
        return out

    k = int(noise_sample)
    per_signal = _noise_slope(image[::k, ::k], variance[::k, ::k], flags[::k, ::k], np.uint32(mask)) if x.size else 0.0
    usable = per_pixel(lambda f: (f & np.uint32(mask)) == 0, flags)
    # read noise can be a tiny part of it (photon noise of the zodiacal light dominates):
    # where the fitted slope leaves a slightly negative remainder, it is zero
    v0 = per_pixel(lambda i, v: np.maximum(v - per_signal * np.maximum(i, 0.0), 0.0), image, variance)

    def weights(*model: np.ndarray) -> np.ndarray:
        def inverse(ok: np.ndarray, v: np.ndarray, *parts: np.ndarray) -> np.ndarray:
            m = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            with np.errstate(divide="ignore", invalid="ignore"):
                w = np.where(ok, 1.0 / (v + per_signal * np.maximum(m, 0.0)), 0.0)
            w[~np.isfinite(w)] = 0.0
            return w.astype(np.float32)
        return per_pixel(inverse, usable, v0, *model)

    excluded = per_pixel(lambda ok, f: ~ok | ((f & np.uint32(_flags.Flag.SOURCE)) != 0), usable, flags)

    def pedestals(residual: np.ndarray) -> dict[str, np.ndarray | None]:
        if not (local_background and x.size):
            return {"pedestal": None, "pedestal_variance": None}
        level, var = local_backgrounds(residual, excluded, xs, ys, half_size=half_size)
        crowded = ~np.isfinite(level)
        if crowded.any():
            level[crowded], var[crowded] = local_backgrounds(residual, ~usable, xs[crowded], ys[crowded],
                                                             half_size=half_size)
        return {"pedestal": level, "pedestal_variance": var}

    def fit(data: np.ndarray, w: np.ndarray, local: dict[str, np.ndarray | None],
            targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return forced_photometry(data, w, flags, xs, ys, zone, bank, zone_weight=zone_weight,
                                 half_size=half_size, targets=targets, **local)

    # first with the background's photon noise; then with the fitted sources' as well
    # (and, with refine_background, on the background of the image without them)
    # (float64 when local backgrounds are taken: they take it so, and the fits read the
    # same values either way)
    residual = per_pixel(lambda i, b: (i - b).astype(np.float64) if local_background else i - b, image, background)
    local = pedestals(residual)
    res = fit(residual, weights(background), local)
    if x.size and (per_signal > 0 or refine_background is not None):
        sources = render_sources(image.shape, xs, ys, zone, np.fmax(res["flux"], 0.0), bank,
                                 zone_weight=zone_weight)
        targets = None
        if refine_background is not None:
            background = np.asarray(refine_background(image - sources), dtype=np.float32)
            if background.shape != image.shape:
                raise StepError(f"refine_background gave shape {background.shape}, image has {image.shape}")
            residual = image - background
            local = pedestals(residual - sources)
        else:  # only sources that add appreciably (5 %) to the variance in their pixel
            first = v0[iy, ix] + per_signal * np.maximum(background[iy, ix], 0.0)
            targets = np.flatnonzero(per_signal * sources[iy, ix] / np.where(first > 0, first, np.inf) > 0.05)
        if targets is None or targets.size:
            again = fit(residual, weights(background, sources), local, targets)
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
