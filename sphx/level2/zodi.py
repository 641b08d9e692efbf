"""Get Zodi Model: the zodiacal light of every pixel, from the Kelsall et al. (1998) model.

The Level 2b pipeline provides, for every spectral image, an estimate of the diffuse
zodiacal light at each pixel's sky position and wavelength (the ``ZODI`` extension; it is
not subtracted from ``IMAGE``). The physical model is :mod:`sphx.zodi` (Kelsall et al.
1998, scaled in wavelength after Tsumura et al. 2013), seen from the spacecraft at the
middle of the exposure. This module evaluates it on the image's pixel grid.

Method
------
A direct evaluation integrates six dust components along every line of sight (4.2 million
of them in a 2040 x 2040 image), more than a minute of CPU per image. The zodiacal light
is smooth on the sky, but not along the detector: the linear variable filter sweeps each
band's wavelength range from one edge of the image to the other, so that the brightness
changes by a factor of 1.1 (band 1) to 3 (band 5, where the thermal emission rises)
across an image, and the model's spectrum has slope breaks at the DIRBE wavelengths
1.25, 2.2, 3.5 and 4.9 um, between which its spectral parameters are interpolated. A
spline of the brightness follows the smooth part but not the breaks, so the wavelength
dependence is taken out before interpolating ("spectral scaling"):

1. Nodes: ``nodes`` x ``nodes`` pixels evenly spread over the image, including its corners
   and edges (rounded to whole pixels, so that each node has its own pixel's wavelength).
   The model is evaluated at each node's sky position (the image's celestial WCS, SIP
   included, converted to ecliptic coordinates) and at the node pixel's wavelength
   ``CWAVE``: ``Z_k``.
2. Reference spectrum ``S(lambda)``: the model in the direction of the image centre at
   about :data:`SPECTRUM_POINTS` wavelengths evenly spaced in log-wavelength over the
   image's ``CWAVE`` range, with the slope breaks inside it as extra samples; a cubic
   spline of ln S in ln lambda between consecutive breaks interpolates it (to 2e-6).
3. The ratio ``Z_k / S(lambda_k)`` carries what varies with the direction, and little of
   the wavelength. It is interpolated to every pixel with a separable (not-a-knot) cubic
   spline, the matrix product ``B_y R B_x^T`` of the node values ``R`` with the spline
   weights ``B`` of every row and column, and multiplied by ``S(CWAVE)`` of each pixel
   (looked up in a table evenly spaced in wavelength).

On the real geometry (2040 x 2040 pixels, 3.5 deg images 60-120 deg from the Sun, any
ecliptic latitude) the default 17 x 17 nodes reproduce the direct evaluation to 1.8e-4 or
better in every band, worst in the ecliptic plane 60 deg from the Sun (9 x 9 nodes:
8e-4; 33 x 33: 9e-5). Interpolating the brightness itself on the same nodes errs by up
to 5e-3 in band 4 (which holds the 3.5 um break) and 2e-3 in bands 3 and 6; in bands 1
and 5, which hold no break, both agree. With ``check_every > 0`` the step also evaluates
the model directly at every ``check_every``-th pixel of each image and records the
largest relative difference as ``zodi_interp_error``, so that the interpolation error can
be inspected in production (every 8th pixel of a full image: about a second of CPU).

Observer
--------
The heliocentric ecliptic position of the spacecraft at ``mjd_avg``: the Earth's
(:func:`sphx.zodi.earth_position`) plus the geocentric spacecraft position
``sc_position`` at ``sc_epoch = "avg"`` [km, equatorial axes], rotated to the ecliptic
(mean obliquity of J2000). Directions use the same frame.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping

import numba
import numpy as np
import pydantic
import xarray as xr
from astropy.wcs import WCS
from scipy.interpolate import CubicSpline

from ..cube import PIXEL_VARIABLES
from ..errors import CalibrationError, StepError
from ..instrument import Instrument
from ..levels import SURFACE_BRIGHTNESS, WAVELENGTH, same_unit
from ..pipeline.step import StepConfig, register_step
from ..wcs import WCS_VARIABLES, arrays_to_wcs
from ..zodi import _DIRBE_UM, _KERNEL_LOCK, _WAVELENGTH_RANGE_UM, earth_position, zodi_brightness

__all__ = [
    "DEFAULT_NODES",
    "SPECTRUM_POINTS",
    "ZodiConfig",
    "get_zodi_model",
    "interpolation_error",
    "observer_position",
    "reference_spectrum",
    "zodi_dense",
    "zodi_image",
]

#: Default number of model nodes per image side (see the module docstring for the errors).
DEFAULT_NODES = 17
#: About how many model samples make the reference spectrum over an image's wavelength range.
SPECTRUM_POINTS = 48
#: Astronomical unit [km].
AU_KM = 149_597_870.7
#: Mean obliquity of the ecliptic at J2000 [deg] (84381.448 arcsec).
OBLIQUITY_DEG = 23.4392911

# The model's spectral parameters are interpolated linearly between these wavelengths
# [um], so its spectrum has slope breaks there; they are added to the reference grid.
_SPECTRAL_BREAKS_UM = np.asarray(_DIRBE_UM, dtype=np.float64)
# Entries of the per-pixel lookup table of S, evenly spaced in wavelength: linear
# interpolation in it departs from the spline by < 1e-6 over a band's range.
_TABLE_SIZE = 4096
_COS_E, _SIN_E = math.cos(math.radians(OBLIQUITY_DEG)), math.sin(math.radians(OBLIQUITY_DEG))
# _KERNEL_LOCK (from sphx.zodi) serialises parallel numba launches: numba's fallback
# "workqueue" threading layer aborts when several threads (dask workers) launch parallel
# kernels at once, and each launch uses every core anyway.


class ZodiConfig(StepConfig):
    """How densely the model is evaluated."""

    nodes: int = pydantic.Field(
        DEFAULT_NODES, ge=2, le=257,
        description="model nodes per image side; the rest is spline-interpolated between them",
    )
    check_every: int = pydantic.Field(
        0, ge=0,
        description="when > 0, evaluate the model directly at every check_every-th pixel of each image and "
                    "store the largest relative interpolation error as zodi_interp_error (0: off)",
    )


# =========================================================================================
# Geometry
# =========================================================================================


def _to_ecliptic(v: np.ndarray) -> np.ndarray:
    """Equatorial cartesian vectors (..., 3) to ecliptic axes (J2000 mean obliquity)."""
    x, y, z = np.moveaxis(np.asarray(v, dtype=np.float64), -1, 0)
    return np.stack([x, _COS_E * y + _SIN_E * z, -_SIN_E * y + _COS_E * z], axis=-1)


def observer_position(mjd: float, sc_position_km: np.ndarray) -> np.ndarray:
    """Heliocentric ecliptic position of the spacecraft.

    Parameters
    ----------
    mjd
        Time of the observation (``mjd_avg``) [MJD].
    sc_position_km
        Geocentric spacecraft position at that time, equatorial (ICRS-aligned) axes [km],
        shape (3,).

    Returns
    -------
    numpy.ndarray
        Position [AU], shape (3,), in the frame of :func:`sphx.zodi.earth_position`
        (mean ecliptic and equinox of J2000).
    """
    sc = np.asarray(sc_position_km, dtype=np.float64)
    if sc.shape != (3,):
        raise ValueError(f"sc_position_km must have shape (3,) [km], got {sc.shape}")
    return earth_position(float(mjd)) + _to_ecliptic(sc) / AU_KM


def _ecliptic_lonlat(wcs: WCS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ecliptic longitude and latitude [deg] of 0-based pixel positions ``(x, y)``."""
    ra, dec = wcs.all_pix2world(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 0)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    v = _to_ecliptic(np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=-1))
    lon = np.rad2deg(np.arctan2(v[..., 1], v[..., 0]))
    lat = np.rad2deg(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return lon, lat


# =========================================================================================
# Kernels (numpy / numba, no xarray)
# =========================================================================================


def _check_inputs(
    cwave: object, x: object, y: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """``cwave`` (ny, nx) float32 [um], the pixel coordinates of its columns and rows, its range."""
    cw = np.asarray(cwave, dtype=np.float32)
    if cw.ndim != 2 or 0 in cw.shape:
        raise ValueError(f"cwave must be a non-empty 2-d (y, x) map [um], got shape {cw.shape}")
    px = np.arange(cw.shape[1], dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    py = np.arange(cw.shape[0], dtype=np.float64) if y is None else np.asarray(y, dtype=np.float64)
    for name, c, n in (("x", px, cw.shape[1]), ("y", py, cw.shape[0])):
        if c.shape != (n,):
            raise ValueError(f"{name} must give the pixel coordinate of each of the {n} cwave {name} positions, "
                             f"got shape {c.shape}")
        if n > 1 and not np.all(np.diff(c) > 0):
            raise ValueError(f"{name} pixel coordinates must increase strictly")
    lo, hi = _WAVELENGTH_RANGE_UM
    # NaN propagates through min and max, so two reductions check finiteness too
    lam_lo, lam_hi = float(cw.min()), float(cw.max())
    if not (math.isfinite(lam_lo) and math.isfinite(lam_hi)):
        raise CalibrationError(f"cwave has {int((~np.isfinite(cw)).sum())} non-finite value(s) on the image's pixels")
    if lam_lo < lo or lam_hi > hi:
        raise CalibrationError(f"cwave spans {lam_lo:.4g}-{lam_hi:.4g} um; the zodiacal-light model covers {lo}-{hi} um")
    return cw, px, py, (lam_lo, lam_hi)


def _node_index(n: int, nodes: int) -> np.ndarray:
    """Indices of ``nodes`` positions spread evenly over ``n`` pixels, ends included."""
    return np.unique(np.rint(np.linspace(0.0, n - 1.0, max(1, min(nodes, n)))).astype(np.int64))


def _spline_basis(knots: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Weights (len(at), len(knots)) of the knot values in the cubic spline through them."""
    return _cached_basis(np.ascontiguousarray(knots, dtype=np.float64).tobytes(),
                         np.ascontiguousarray(at, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=16)
def _cached_basis(knots: bytes, at: bytes) -> np.ndarray:
    # Every image of a cube has the same pixel grid: the basis is computed once.
    k, a = np.frombuffer(knots), np.frombuffer(at)
    basis = np.ones((a.size, 1)) if k.size == 1 else CubicSpline(k, np.eye(k.size))(a)
    basis.flags.writeable = False
    return basis


def _spectrum_samples(lo: float, hi: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample wavelengths [ln um] over [lo, hi] um and the segment each belongs to.

    Segments are separated by the model's slope breaks; each gets samples evenly spaced
    in log-wavelength (about ``n`` over the whole range, at least 4 per segment) with
    both its ends, so that a cubic spline per segment never straddles a break.
    """
    if not hi > lo * (1.0 + 1e-9):  # a single wavelength: a short interval around it
        lo, hi = lo * (1.0 - 1e-6), hi * (1.0 + 1e-6)
    inner = _SPECTRAL_BREAKS_UM[(_SPECTRAL_BREAKS_UM > lo) & (_SPECTRAL_BREAKS_UM < hi)]
    edges = np.log(np.concatenate([[lo], inner, [hi]]))
    span = edges[-1] - edges[0]
    ln_lam, segment = [], []
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        m = max(4, math.ceil(n * (b - a) / span))
        ln_lam.append(np.linspace(a, b, m))
        segment.append(np.full(m, k))
    return np.concatenate(ln_lam), np.concatenate(segment)


def _spectrum_on(ln_lam: np.ndarray, segment: np.ndarray, s: np.ndarray, ln_at: np.ndarray) -> np.ndarray:
    """Per-segment cubic spline of ln S in ln lambda, evaluated at ``ln_at``."""
    out = np.empty(ln_at.shape)
    n_seg = int(segment[-1]) + 1
    # segment k ends at its last sample, where segment k + 1 begins
    uppers = np.array([ln_lam[segment == k][-1] for k in range(n_seg)])
    which = np.minimum(np.searchsorted(uppers, ln_at), n_seg - 1)
    for k in range(n_seg):
        sel = segment == k
        spline = CubicSpline(ln_lam[sel], np.log(s[sel]))
        at = which == k
        out[at] = np.exp(spline(ln_at[at]))
    return out


def reference_spectrum(
    lon: float,
    lat: float,
    wavelength: np.ndarray,
    *,
    wavelength_range: tuple[float, float] | None = None,
    observer: np.ndarray,
    n: int = SPECTRUM_POINTS,
) -> np.ndarray:
    """The model spectrum in one direction, interpolated in log-wavelength.

    Parameters
    ----------
    lon, lat
        Ecliptic direction [deg].
    wavelength
        Wavelengths to return it at [um].
    wavelength_range
        (min, max) wavelength the samples cover [um]; default that of ``wavelength``.
    observer
        Heliocentric ecliptic observer position [AU], shape (3,).
    n
        About how many model samples, evenly spaced in log-wavelength; the model's slope
        breaks (1.25, 2.2, 3.5, 4.9 um) inside the range are added, and a cubic spline in
        (ln lambda, ln S) is fitted between consecutive breaks.

    Returns
    -------
    numpy.ndarray
        S(wavelength) [MJy/sr], the shape of ``wavelength``.
    """
    lam = np.asarray(wavelength, dtype=np.float64)
    lo, hi = wavelength_range if wavelength_range is not None else (float(lam.min()), float(lam.max()))
    ln_lam, segment = _spectrum_samples(float(lo), float(hi), n)
    s = zodi_brightness(np.full(ln_lam.size, lon), np.full(ln_lam.size, lat), np.exp(ln_lam), observer=observer)
    return _spectrum_on(ln_lam, segment, s, np.log(lam).ravel()).reshape(lam.shape)


@numba.njit(parallel=True, nogil=True, cache=True)
def _interpolate_and_scale(by: np.ndarray, tx: np.ndarray, cwave: np.ndarray, lam0: float, inv_step: float,
                           table: np.ndarray, out: np.ndarray) -> None:
    """``out = (by @ tx) * S(cwave)``, S linear in ``table`` (evenly spaced in wavelength).

    ``by`` (ny, nodes) are the spline weights of each row, ``tx`` (nodes, nx) the node rows
    already interpolated along x. Fusing the product with the scaling keeps each output
    row in cache instead of writing and re-reading an image-sized temporary.
    """
    ny, nx = out.shape
    nn = by.shape[1]
    last = table.size - 2
    for i in numba.prange(ny):
        row = np.zeros(nx)
        for k in range(nn):
            b = by[i, k]
            for j in range(nx):
                row[j] += b * tx[k, j]
        for j in range(nx):
            u = (cwave[i, j] - lam0) * inv_step
            m = min(max(int(u), 0), last)
            f = u - m
            out[i, j] = row[j] * (table[m] + f * (table[m + 1] - table[m]))


def zodi_image(
    wcs: WCS,
    cwave: np.ndarray,
    *,
    mjd: float,
    sc_position_km: np.ndarray,
    nodes: int = DEFAULT_NODES,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    spectral_scaling: bool = True,
) -> np.ndarray:
    """Zodiacal light of every pixel of one image, interpolated from a node grid.

    Parameters
    ----------
    wcs
        Celestial WCS of the image; its 0-based pixel coordinates are those of ``x`` and ``y``.
    cwave
        Central wavelength of each pixel [um], shape (ny, nx).
    mjd
        Time of the observation [MJD] (``mjd_avg``).
    sc_position_km
        Geocentric spacecraft position at ``mjd`` [km], equatorial axes, shape (3,).
    nodes
        Model nodes per image side.
    x, y
        Pixel coordinates of the columns and rows of ``cwave`` (default 0, 1, ...), strictly
        increasing.
    spectral_scaling
        Divide the node values by the reference spectrum before interpolating and multiply
        it back per pixel (see the module docstring). ``False`` interpolates the brightness
        itself, for comparison.

    Returns
    -------
    numpy.ndarray
        Surface brightness [MJy/sr], float32, shape (ny, nx).
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int | np.integer) or nodes < 2:
        raise ValueError(f"nodes must be an integer >= 2, got {nodes!r}")
    cw, px, py, (lam_lo, lam_hi) = _check_inputs(cwave, x, y)
    observer = observer_position(mjd, sc_position_km)
    iy, ix = _node_index(py.size, nodes), _node_index(px.size, nodes)
    gx, gy = np.meshgrid(px[ix], py[iy])
    lon, lat = _ecliptic_lonlat(wcs, gx, gy)
    lam_nodes = cw[np.ix_(iy, ix)].astype(np.float64)
    by, bx = _spline_basis(py[iy], py), _spline_basis(px[ix], px)
    out = np.empty(cw.shape, dtype=np.float32)
    if not spectral_scaling:
        z = zodi_brightness(lon, lat, lam_nodes, observer=observer)
        with _KERNEL_LOCK:  # a table of ones: S = 1
            _interpolate_and_scale(by, z @ bx.T, cw, 0.0, 0.0, np.ones(2), out)
        return out

    # One model call for the nodes and the reference spectrum (at the image centre).
    lon_c, lat_c = _ecliptic_lonlat(wcs, 0.5 * (px[0] + px[-1]), 0.5 * (py[0] + py[-1]))
    ln_lam, segment = _spectrum_samples(lam_lo, lam_hi, SPECTRUM_POINTS)
    both = zodi_brightness(np.r_[lon.ravel(), np.full(ln_lam.size, lon_c)],
                           np.r_[lat.ravel(), np.full(ln_lam.size, lat_c)],
                           np.r_[lam_nodes.ravel(), np.exp(ln_lam)], observer=observer)
    z, s = both[: lon.size].reshape(lon.shape), both[lon.size:]
    # Per pixel, S is looked up in a fine table even in wavelength (no logarithm or search
    # per pixel; < 1e-6 from the spline). The nodes use the same table, so the result
    # equals the model exactly at the nodes.
    lam_table = np.linspace(math.exp(ln_lam[0]), math.exp(ln_lam[-1]), _TABLE_SIZE)
    table = _spectrum_on(ln_lam, segment, s, np.log(lam_table))
    ratio_nodes = z / np.interp(lam_nodes, lam_table, table)
    with _KERNEL_LOCK:
        _interpolate_and_scale(by, ratio_nodes @ bx.T, cw, float(lam_table[0]),
                               1.0 / (lam_table[1] - lam_table[0]), table, out)
    return out


def zodi_dense(
    wcs: WCS,
    cwave: np.ndarray,
    *,
    mjd: float,
    sc_position_km: np.ndarray,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> np.ndarray:
    """The model evaluated directly at every pixel (the reference for :func:`zodi_image`).

    Parameters are those of :func:`zodi_image`. About 40 us of CPU per pixel.

    Returns
    -------
    numpy.ndarray
        Surface brightness [MJy/sr], float64, shape (ny, nx).
    """
    cw, px, py, _ = _check_inputs(cwave, x, y)
    gx, gy = np.meshgrid(px, py)
    lon, lat = _ecliptic_lonlat(wcs, gx, gy)
    return zodi_brightness(lon, lat, cw.astype(np.float64), observer=observer_position(mjd, sc_position_km))


def interpolation_error(
    zodi: np.ndarray,
    wcs: WCS,
    cwave: np.ndarray,
    *,
    mjd: float,
    sc_position_km: np.ndarray,
    every: int,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> float:
    """Largest relative difference between ``zodi`` and the model at every ``every``-th pixel.

    Parameters
    ----------
    zodi
        An interpolated image from :func:`zodi_image` [MJy/sr], shape (ny, nx).
    every
        Pixel step of the checked sub-grid in both axes (the last row and column are
        included).
    wcs, cwave, mjd, sc_position_km, x, y
        As given to :func:`zodi_image`.

    Returns
    -------
    float
        ``max |zodi / model - 1|`` over the sub-grid [dimensionless].
    """
    if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    cw, px, py, _ = _check_inputs(cwave, x, y)
    sy = np.unique(np.r_[np.arange(0, py.size, every), py.size - 1])
    sx = np.unique(np.r_[np.arange(0, px.size, every), px.size - 1])
    direct = zodi_dense(wcs, cw[np.ix_(sy, sx)], mjd=mjd, sc_position_km=sc_position_km, x=px[sx], y=py[sy])
    return float(np.max(np.abs(np.asarray(zodi, dtype=np.float64)[np.ix_(sy, sx)] / direct - 1.0)))


# =========================================================================================
# The pipeline step
# =========================================================================================

_WCS_HINT = "run estimate_coarse_astrometry first"


def _image_task(
    band: np.ndarray,
    obs: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    crpix: np.ndarray,
    crval: np.ndarray,
    cd: np.ndarray,
    cwave: np.ndarray,
    mjd: np.ndarray,
    sc: np.ndarray,
    *sip: np.ndarray,
    n_active: int,
    nodes: int,
    check_every: int,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One image on the cube's pixel grid, NaN outside the active frame."""
    where = f"image (band {int(band)}, obs {int(obs)})"
    if not (np.all(np.isfinite(crval)) and np.all(np.isfinite(crpix)) and np.all(np.isfinite(cd))):
        raise StepError(f"{where} has no celestial WCS (wcs_* is NaN); {_WCS_HINT}")
    if not (np.isfinite(mjd) and np.all(np.isfinite(sc))):
        raise StepError(f"{where}: mjd_avg or sc_position at sc_epoch 'avg' is NaN")
    wcs = arrays_to_wcs(crpix, crval, cd, *sip)
    # the active pixels are a contiguous range of x and y: slices, not copies
    ix, iy = np.flatnonzero((x >= 0) & (x < n_active)), np.flatnonzero((y >= 0) & (y < n_active))
    err = np.float64(np.nan)
    if not (ix.size and iy.size):
        out = np.full(cwave.shape, np.nan, dtype=np.float32)
    else:
        sx, sy = slice(ix[0], ix[-1] + 1), slice(iy[0], iy[-1] + 1)
        cw = cwave[sy, sx]
        if not np.isfinite(cw).all():
            raise CalibrationError(f"spectral_wcs CWAVE of band {int(band)} is not finite on every active pixel")
        geometry = {"mjd": float(mjd), "sc_position_km": sc, "x": x[sx], "y": y[sy]}
        z = zodi_image(wcs, cw, nodes=nodes, **geometry)
        if z.shape == cwave.shape:
            out = z.astype(np.float32, copy=False)
        else:
            out = np.full(cwave.shape, np.nan, dtype=np.float32)
            out[sy, sx] = z
        if check_every:
            err = np.float64(interpolation_error(z, wcs, cw, every=check_every, **geometry))
    return (out, err) if check_every else out


def _require_observer(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray]:
    """``mjd_avg`` (obs) and ``sc_position`` at sc_epoch "avg" (obs, xyz) [km]."""
    if "mjd_avg" not in ds.variables:
        raise StepError("step 'get_zodi_model' needs the observation time mjd_avg (obs) [MJD]")
    if "sc_position" not in ds.variables:
        raise StepError("step 'get_zodi_model' needs the spacecraft position sc_position (obs, sc_epoch, xyz) [km]")
    pos = ds["sc_position"]
    units = pos.attrs.get("units")
    if units is not None and not same_unit(units, "km"):
        raise StepError(f"sc_position must be in km, but the cube has {units!r}")
    if "sc_epoch" not in pos.dims or "xyz" not in pos.dims or pos.sizes["xyz"] != 3:
        raise StepError(f"sc_position must have dims (obs, sc_epoch, xyz) with 3 xyz, got {dict(pos.sizes)}")
    try:
        sc = pos.sel(sc_epoch="avg")
    except KeyError:
        raise StepError("sc_position has no sc_epoch 'avg' (the middle of the exposure)") from None
    mjd = ds["mjd_avg"].reset_coords(drop=True).variable
    sc = sc.reset_coords(drop=True).variable.transpose("obs", "xyz")
    for name, var in (("mjd_avg", mjd), ("sc_position", sc)):
        if var.chunks is None:
            bad = ~np.isfinite(var.values)
            bad = bad.any(axis=-1) if bad.ndim > 1 else bad
            if bad.any():
                raise StepError(f"{name} is NaN for obs {ds['obs'].values[bad][:5].tolist()}")
    return (xr.DataArray(mjd, coords={"obs": ds["obs"].values}),
            xr.DataArray(sc, coords={"obs": ds["obs"].values}))


def _require_wcs(ds: xr.Dataset) -> list[xr.DataArray]:
    """The cube's per-image celestial WCS variables; StepError if absent or NaN."""
    missing = [v for v in WCS_VARIABLES[:3] if v not in ds.variables]
    if missing:
        raise StepError(f"step 'get_zodi_model' needs the per-image celestial WCS (missing {', '.join(missing)}); "
                        + _WCS_HINT)
    names = [*WCS_VARIABLES[:3], *(v for v in WCS_VARIABLES[3:] if v in ds.variables)]
    if len(names) not in (3, 7):
        raise StepError("the cube holds only some of wcs_sip_a, wcs_sip_b, wcs_sip_ap, wcs_sip_bp")
    arrays = [ds[v].reset_coords(drop=True) for v in names]
    bad = np.zeros((ds.sizes["band"], ds.sizes["obs"]), dtype=bool)
    for arr in arrays[:3]:
        if arr.chunks is None:  # lazy WCSs are checked inside each task instead
            extra = tuple(range(2, arr.ndim))
            bad |= ~np.isfinite(arr.transpose("band", "obs", ...).values).all(axis=extra)
    if bad.any():
        ib, io = np.nonzero(bad)
        images = [(int(ds["band"].values[b]), ds["obs"].values[o].item()) for b, o in zip(ib, io, strict=True)]
        raise StepError(f"{len(images)} image(s) have no celestial WCS (wcs_* is NaN), e.g. (band, obs) "
                        f"{images[:3]}; {_WCS_HINT}")
    return arrays


def _cwave_on_cube(ds: xr.Dataset, product: xr.Dataset, instrument: Instrument) -> xr.DataArray:
    """CWAVE (band, y, x) of the cube's bands on its pixel grid (NaN off the active frame)."""
    if "CWAVE" not in product:
        raise CalibrationError("spectral_wcs has no CWAVE variable (central wavelength per pixel [um])")
    cwave = product["CWAVE"]
    if set(cwave.dims) != {"band", "y", "x"}:
        raise CalibrationError(f"spectral_wcs CWAVE must have dims (band, y, x), got {cwave.dims}")
    units = cwave.attrs.get("units")
    if units is not None and not same_unit(units, WAVELENGTH):
        raise CalibrationError(f"spectral_wcs CWAVE must be in {WAVELENGTH!r}, got {units!r}")
    have = set(cwave["band"].values.tolist()) if "band" in cwave.coords else set()
    missing = sorted(set(ds["band"].values.tolist()) - have)
    if missing:
        raise CalibrationError(f"spectral_wcs has no CWAVE for band(s) {missing} (it holds {sorted(have)})")
    n = instrument.n_active
    frame = np.arange(n)
    shape = (cwave.sizes["y"], cwave.sizes["x"])
    labels_ok = all(a not in cwave.coords or np.array_equal(cwave[a].values, frame) for a in ("y", "x"))
    if shape != (n, n) or not labels_ok:
        raise CalibrationError(f"spectral_wcs CWAVE has shape (y, x) = {shape}, expected the active frame "
                               f"({n}, {n}) of {instrument.name!r} with pixel labels 0..{n - 1}")
    cwave = cwave.sel(band=ds["band"].values).transpose("band", "y", "x").reset_coords(drop=True)
    cwave = cwave.assign_coords(y=frame, x=frame).reindex(y=ds["y"].values, x=ds["x"].values)
    return cwave.chunk({"band": 1, "y": -1, "x": -1}).drop_vars(["y", "x"])


@register_step(
    "get_zodi_model",
    module="Get Zodi Model",
    config=ZodiConfig,
    reads={"IMAGE": None},
    writes={"ZODI": SURFACE_BRIGHTNESS},
    calibrations=("spectral_wcs",),
)
def get_zodi_model(
    ds: xr.Dataset, *, calib: Mapping[str, xr.Dataset], config: ZodiConfig, instrument: Instrument
) -> xr.Dataset:
    """Add ZODI, the Kelsall et al. (1998) zodiacal light at every pixel [MJy/sr].

    Parameters
    ----------
    ds
        Cube with the per-image celestial WCS (``wcs_*``, from coarse astrometry),
        ``mjd_avg`` and ``sc_position`` (obs, sc_epoch, xyz) [km]; active or raw frame.
    calib
        ``{"spectral_wcs": Dataset}`` with ``CWAVE`` (band, y, x) [um] on the active frame.
    config
        :class:`ZodiConfig`: ``nodes`` per image side, and ``check_every`` (> 0 adds
        ``zodi_interp_error`` (band, obs), the largest relative difference from a direct
        evaluation at every ``check_every``-th pixel).

    Returns
    -------
    xarray.Dataset
        The cube with ``ZODI`` (band, obs, y, x) float32 [MJy/sr], one dask task per
        image, NaN on the reference border; lazy.

    Raises
    ------
    sphx.errors.StepError
        No WCS (or a NaN one) for an image, or no observation time or spacecraft position.
    sphx.errors.CalibrationError
        ``spectral_wcs`` lacks a band of the cube or is not on the active frame.
    """
    wcs = _require_wcs(ds)
    mjd, sc = _require_observer(ds)
    cwave = _cwave_on_cube(ds, calib["spectral_wcs"], instrument)
    labels = [xr.DataArray(ds[d].values, dims=(d,)).chunk({d: 1}) for d in ("band", "obs")]
    # pixel labels as (one-chunk) dask inputs: every task refers to them instead of a copy
    pixels = [xr.DataArray(ds[d].values, dims=(d,)).chunk({d: -1}) for d in ("x", "y")]
    geometry = [a.chunk({"band": 1, "obs": 1}) for a in wcs[:3]]
    sip = [a.chunk({"band": 1, "obs": 1}) for a in wcs[3:]]
    check = int(config.check_every)
    result = xr.apply_ufunc(
        _image_task,
        *labels,
        *pixels,
        *geometry,
        cwave,
        mjd.chunk({"obs": 1}),
        sc.chunk({"obs": 1}),
        *sip,
        kwargs={"n_active": instrument.n_active, "nodes": int(config.nodes), "check_every": check},
        input_core_dims=[[], [], ["x"], ["y"], ["wcs_axis"], ["wcs_axis"], ["wcs_axis", "wcs_pix"], ["y", "x"], [],
                         ["xyz"], *([["sip_p", "sip_q"]] * len(sip))],
        output_core_dims=[["y", "x"], []] if check else [["y", "x"]],
        vectorize=True,
        dask="parallelized",
        output_dtypes=[np.float32, np.float64] if check else [np.float32],
    )
    zodi, err = result if check else (result, None)
    out = ds.copy()
    method = (f"Kelsall et al. (1998) model on {config.nodes}x{config.nodes} nodes per image, divided by the "
              "reference spectrum of the image centre, spline-interpolated and rescaled per pixel")
    out["ZODI"] = (("band", "obs", "y", "x"), zodi.transpose("band", "obs", "y", "x").data,
                   {"long_name": PIXEL_VARIABLES["ZODI"].long_name, "units": SURFACE_BRIGHTNESS,
                    "comment": method})
    if err is not None:
        out["zodi_interp_error"] = (("band", "obs"), err.transpose("band", "obs").data, {
            "long_name": f"largest relative difference of ZODI from the model evaluated at every "
                         f"{check}-th pixel", "units": ""})
    return out
