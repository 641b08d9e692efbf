"""Create Source Mask: flag the pixels that known sources light up.

The paper's Level 2b module "adds a flag for pixels predicted to be impacted by flux
from known sources", with the source list from the Query Reference Catalog module.
For every image this step predicts where each catalogued source puts more surface
brightness than ``threshold`` times the image's noise and sets the SOURCE bit there.

Per image (one Dask task each):

1. **Catalogue.** The image's target-group source list put into the cube by
   ``query_reference_catalog``, else an ``srccat`` or ``refcat`` table; all have the
   columns of :data:`sphx.simulate.sky.CATALOG_SCHEMA`. Sources are moved to the epoch of the
   image (``mjd_avg``) with linear proper motion along the tangent plane (exact to
   far below a pixel for decades of motion), projected with the image's WCS
   (``wcs_*`` variables), and kept when they lie within ``max_radius`` of the image.
2. **Flux.** The monochromatic F_nu of each source at the central wavelength of its
   pixel (``CWAVE`` of ``spectral_wcs``), interpolated linearly in log flux against log
   wavelength between the catalogue's 1, 2, 3 and 4.5 um points; the end segments are
   extended outside 1-4.5 um (bands 1 and 6 reach 0.75 and 5 um).
3. **Profile.** The ``average_psf`` planes (fraction of the flux per oversampled pixel)
   are integrated over one native pixel, which gives the fraction of the flux a native
   pixel receives as a function of its offset from the source. Its *envelope* against
   distance, ``T(r)`` = the largest fraction received by any pixel centred about ``r``
   or farther away, is tabulated every :data:`PROFILE_STEP` pixel for every zone. The
   envelope rather than the azimuthal mean is used so that the disc also covers the
   long axis of the elongated PSFs toward the field edges. Each source takes the
   profile of the zone nearest to it. Beyond the stamp the profile continues as a power
   law fitted to its outer fifth, no shallower than ``r**-2``.
4. **Radius.** A pixel at distance ``r`` receives ``F T(r) / Omega`` [MJy / sr], with
   ``Omega`` the pixel solid angle (``SAPM`` [arcsec^2] x 2.35044e-11 sr / arcsec^2 x
   1e12 uJy / MJy, about 900 uJy per MJy/sr for 6.15" pixels). The disc radius is the
   largest ``r`` where this exceeds ``threshold x sigma``, with ``sigma`` the square root
   of the median VARIANCE of the image's good pixels, clipped to
   ``[min_radius, max_radius]``: every catalogued source flags at least its own
   ``min_radius`` disc, however faint.
5. **Paint** the discs (pixel centres within the radius) into the SOURCE bit, which is
   cleared first so that a rerun replaces the mask, and record the flagged fraction of
   the active pixels as ``source_fraction`` (the header's ``PXSRCMSK`` / 100).

The catalogue travels to the tasks as one array in the graph (shared by every image);
nothing is computed while the graph is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numba
import numpy as np
import pydantic
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view

from .. import flags as _flags
from ..astrometry.catalog import CATALOG_WAVELENGTHS, F0, catalog_inputs, image_rows, interpolate_flux, sources_in_image
from ..blocks import apply_blocks
from ..errors import CalibrationError, StepError
from ..instrument import Instrument
from ..kernels.select import median
from ..levels import SURFACE_BRIGHTNESS, same_unit, squared
from ..pipeline.step import StepConfig, register_step
from ..wcs import SIP_ORDER, WCS_VARIABLES, arrays_to_wcs
from ._frame import calibration_map

__all__ = [
    "PROFILE_STEP",
    "SR_PER_ARCSEC2",
    "UJY_PER_MJY",
    "SourceMaskConfig",
    "create_source_mask",
    "paint_discs",
    "pixel_solid_angle",
    "psf_envelopes",
    "source_radii",
]

SR_PER_ARCSEC2 = (math.pi / (180.0 * 3600.0)) ** 2  # 2.3504430539e-11 sr per arcsec^2
UJY_PER_MJY = 1e12
PROFILE_STEP = 0.05  # [pixel] spacing of the tabulated PSF envelope
_TAIL_FRACTION = 0.8  # the power-law tail is fitted between 0.8 and 1 of the stamp radius
_TAIL_SHALLOWEST_SLOPE = -2.0


class SourceMaskConfig(StepConfig):
    """Where a catalogued source counts as impacting a pixel."""

    threshold: float = pydantic.Field(
        0.5, gt=0, description="flag where the predicted source surface brightness exceeds this many image sigmas")
    min_radius: float = pydantic.Field(
        1.5, ge=0, description="[pixel] smallest disc flagged around every catalogued source in the image")
    max_radius: float = pydantic.Field(
        30.0, gt=0, description="[pixel] largest disc flagged around any source (also the selection margin)")

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> SourceMaskConfig:
        if self.max_radius < self.min_radius:
            raise ValueError(f"max_radius ({self.max_radius}) must not be below min_radius ({self.min_radius})")
        return self


# --- kernels ---------------------------------------------------------------------------
def pixel_solid_angle(sapm: Any) -> Any:
    """uJy per pixel for each MJy/sr of surface brightness, from the solid angle [arcsec^2]."""
    return np.asarray(sapm, dtype=np.float64) * SR_PER_ARCSEC2 * UJY_PER_MJY


def _pixel_window(oversampling: int) -> np.ndarray:
    """Weights that integrate the stamp over one native pixel centred on a sample.

    Samples are oversampled pixels (their flux, not a density). When ``oversampling`` is
    odd a native pixel centred on a sample covers exactly ``oversampling`` of them. When
    it is even its edges cut the two outer samples in half; the cumulative flux there is
    interpolated with the cubic through the four nearest sample edges (weights -1/16,
    1/2, 17/16 at each end), which keeps the sharp core (sigma 0.3 pixel) to 0.1 %
    where halving the edge samples is 1 % low.
    """
    if oversampling % 2:
        return np.ones(oversampling)
    w = np.zeros(oversampling + 3)
    w[1:-1] = 1.0
    w[[1, -2]] = 0.5
    w[[2, -3]] += 1.0 / 16.0
    w[[0, -1]] = -1.0 / 16.0
    return w


def _window_centres(offsets: np.ndarray, oversampling: int) -> np.ndarray:
    """Centres [pixel] of the native-pixel windows along one axis of the stamp."""
    w = _pixel_window(oversampling)
    return np.convolve(np.asarray(offsets, dtype=np.float64), w[::-1] / w.sum(), mode="valid")


def _profile_size(offset_x: np.ndarray, offset_y: np.ndarray, oversampling: int) -> int:
    cx, cy = _window_centres(offset_x, oversampling), _window_centres(offset_y, oversampling)
    inscribed = min(np.abs(cx).max(), np.abs(cy).max())
    return math.floor(inscribed / PROFILE_STEP + 1e-9) + 1


def psf_envelopes(psf: np.ndarray, *, offset_x: np.ndarray, offset_y: np.ndarray, oversampling: int) -> np.ndarray:
    """Envelope of the native-pixel PSF against distance, every :data:`PROFILE_STEP` pixel.

    Parameters
    ----------
    psf
        (..., ny, nx) fraction of the source flux per oversampled pixel.
    offset_x, offset_y
        (nx,), (ny,) offsets of the samples from the source [native pixel].
    oversampling
        Samples per native pixel along each axis.

    Returns
    -------
    numpy.ndarray
        (..., n_radius) float64: entry ``i`` is the largest fraction of the flux that a
        native pixel whose centre is more than ``(i - 1) * PROFILE_STEP`` from the source
        receives (entry 0: any pixel). Entries do not increase with ``i``; a pixel at a
        distance in ``((i - 1) * PROFILE_STEP, i * PROFILE_STEP]`` receives at most entry
        ``i``, so a radius read off the table errs outward, by at most one step.
        ``n_radius`` covers the circle inscribed in the stamp.
    """
    p = np.asarray(psf, dtype=np.float64)
    over = int(oversampling)
    w = _pixel_window(over)
    # integrate over one native pixel in y, then in x (the window axis comes last)
    p = sliding_window_view(p, w.size, axis=-2) @ w
    p = sliding_window_view(p, w.size, axis=-1) @ w
    cx, cy = _window_centres(np.asarray(offset_x, float), over), _window_centres(np.asarray(offset_y, float), over)
    d = np.hypot(cx[None, :], cy[:, None]).ravel()
    order = np.argsort(d, kind="stable")
    d = d[order]
    v = p.reshape(*p.shape[:-2], -1)[..., order]
    beyond = np.maximum.accumulate(v[..., ::-1], axis=-1)[..., ::-1]  # max over samples at >= d[k]
    n = _profile_size(np.asarray(offset_x, float), np.asarray(offset_y, float), over)
    inner = (np.arange(n) - 1) * PROFILE_STEP
    start = np.where(np.arange(n) == 0, 0, np.searchsorted(d, inner, side="right"))
    return np.ascontiguousarray(beyond[..., start])


@numba.njit(nogil=True, cache=True)
def source_radii(level, zone, envelopes, step, min_radius, max_radius):  # pragma: no cover - compiled
    """Disc radius of each source [pixel].

    Parameters
    ----------
    level : (n,) float64
        Fraction of its flux a pixel must receive to be flagged:
        ``threshold * sigma * Omega / flux``. NaN (unknown noise or flux) gives
        ``min_radius``; zero or below (no noise) gives ``max_radius``.
    zone : (n,) int64
        Row of ``envelopes`` for each source.
    envelopes : (n_zone, n_radius) float64
        :func:`psf_envelopes` tables.
    step : float
        Their spacing [pixel].
    min_radius, max_radius : float
        Clip [pixel].
    """
    out = np.empty(level.size)
    for s in range(level.size):
        lev = level[s]
        t = envelopes[zone[s]]
        n = t.size
        if math.isnan(lev):
            r = min_radius
        elif lev <= 0.0:
            r = max_radius
        elif lev > t[0]:
            r = 0.0
        elif lev <= t[n - 1]:
            # power-law tail beyond the stamp from the outer fifth of the table
            r_end = (n - 1) * step
            m = max(1, int(_TAIL_FRACTION * (n - 1)))
            slope = _TAIL_SHALLOWEST_SLOPE
            if t[m] > t[n - 1] > 0.0 and m < n - 1:
                slope = min(math.log(t[n - 1] / t[m]) / math.log((n - 1) / m), _TAIL_SHALLOWEST_SLOPE)
            r = r_end * (lev / t[n - 1]) ** (1.0 / slope) if t[n - 1] > 0.0 else r_end
        else:
            lo, hi = 0, n - 1  # t[lo] >= lev > t[hi]
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if t[mid] >= lev:
                    lo = mid
                else:
                    hi = mid
            r = lo * step
        out[s] = min(max(r, min_radius), max_radius)
    return out


@numba.njit(nogil=True, cache=True)
def paint_discs(target, x, y, radius, value):  # pragma: no cover - compiled
    """OR ``value`` into every pixel of ``target`` whose centre lies within ``radius`` of ``(x, y)``.

    Parameters
    ----------
    target : (ny, nx) integer or bool array
        Pixel ``(j, i)`` has its centre at ``x = i``, ``y = j``; changed in place.
    x, y, radius : (n,) float64
        Disc centres and radii [pixel]; non-finite centres and radii of zero or less
        paint nothing.
    value
        Bits to set (``True`` for a bool mask).

    Returns
    -------
    int
        Number of pixels that did not carry ``value`` before and now do.
    """
    ny, nx = target.shape
    painted = 0
    for s in range(x.size):
        r, xs, ys = radius[s], x[s], y[s]
        if not (np.isfinite(xs) and np.isfinite(ys) and r > 0.0):
            continue
        j0 = max(0, math.ceil(ys - r))
        j1 = min(ny - 1, math.floor(ys + r))
        for j in range(j0, j1 + 1):
            h2 = r * r - (j - ys) * (j - ys)
            if h2 < 0.0:
                continue
            h = math.sqrt(h2)
            i0 = max(0, math.ceil(xs - h))
            i1 = min(nx - 1, math.floor(xs + h))
            for i in range(i0, i1 + 1):
                if target[j, i] & value != value:
                    target[j, i] |= value
                    painted += 1
    return painted


@numba.njit(nogil=True, cache=True)
def _noise_and_cleared(variance, flags, bad, source):  # pragma: no cover - compiled
    """Median VARIANCE of the good pixels (NaN if none) and FLAGS without ``source``."""
    good = np.empty(variance.size, np.float32)  # float32: radix selection of the median
    out = np.empty_like(flags)
    n = 0
    for i in range(flags.shape[0]):
        for j in range(flags.shape[1]):
            f, v = flags[i, j], variance[i, j]
            out[i, j] = f & ~source
            if (f & bad) == 0 and np.isfinite(v):
                good[n] = v
                n += 1
    return median(good[:n]), out


@numba.njit(nogil=True, cache=True)
def _nearest(x, y, centre_x, centre_y):  # pragma: no cover - compiled
    """Index of the nearest of the points ``(centre_x, centre_y)`` to each ``(x, y)``."""
    out = np.zeros(x.size, np.int64)
    for s in range(x.size):
        best = np.inf
        for z in range(centre_x.size):
            d = (x[s] - centre_x[z]) ** 2 + (y[s] - centre_y[z]) ** 2
            if d < best:
                best, out[s] = d, z
    return out


# --- one image ---------------------------------------------------------------------------
def _mask_image(flags, variance, cwave, sapm, envelopes, zone_x, zone_y, crpix, crval, cd,
                sip_a, sip_b, sip_ap, sip_bp, epoch, band, obs, rows, cat, *, x0: int, y0: int, threshold: float,
                min_radius: float, max_radius: float) -> tuple[np.ndarray, float]:
    """New FLAGS and flagged fraction of one image whose pixel (0, 0) has labels ``x0, y0``."""
    if not np.all(np.isfinite(crval)):
        raise StepError(f"image band {band} obs {obs} has no celestial WCS (wcs_crval is NaN); "
                        "the source mask needs the image's astrometry")
    wcs = arrays_to_wcs(crpix, crval, cd, sip_a, sip_b, sip_ap, sip_bp)
    ny, nx = flags.shape
    source = np.uint32(int(_flags.Flag.SOURCE))
    median_variance, out = _noise_and_cleared(variance, flags, np.uint32(int(_flags.DEFAULT_BAD)), source)
    sigma = math.sqrt(median_variance)
    painted = 0
    cat = image_rows(cat, rows)
    if cat.shape[0]:  # NaN rows (no position) never pass the selection
        rows, x, y = sources_in_image(cat, wcs, (x0, x0 + nx - 1), (y0, y0 + ny - 1), float(epoch), max_radius)
        xi = np.clip(np.rint(x - x0), 0, nx - 1).astype(np.int64)
        yi = np.clip(np.rint(y - y0), 0, ny - 1).astype(np.int64)
        lam = cwave[yi, xi].astype(np.float64)
        if not np.all(np.isfinite(lam)):  # a pixel without a wavelength: the image's typical one
            lam = np.where(np.isfinite(lam), lam, np.nanmedian(cwave))
        flux = interpolate_flux(cat[rows, F0:F0 + len(CATALOG_WAVELENGTHS)], lam)  # [uJy]
        omega = pixel_solid_angle(sapm[yi, xi])  # [uJy per MJy/sr]
        with np.errstate(divide="ignore", invalid="ignore"):
            level = threshold * sigma * omega / flux  # fraction of the flux per pixel at the threshold
        zone = _nearest(x, y, np.asarray(zone_x, np.float64), np.asarray(zone_y, np.float64))
        radius = source_radii(level, zone, envelopes, PROFILE_STEP, min_radius, max_radius)
        painted = paint_discs(out, x - x0, y - y0, radius, source)
    return out, painted / out.size


def _mask_stack(flags, variance, *args, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_mask_image` over the leading (band, obs) axes of a block."""
    core = (2, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0, 1, 2)  # core ndim of every input
    inputs = (flags, variance, *args)
    loop = np.broadcast_shapes(*(a.shape[:a.ndim - k] for a, k in zip(inputs, core, strict=True)))
    inputs = [np.broadcast_to(a, loop + a.shape[a.ndim - k:]) for a, k in zip(inputs, core, strict=True)]
    out = np.empty(loop + flags.shape[-2:], flags.dtype)
    fraction = np.empty(loop, np.float64)
    for idx in np.ndindex(*loop):
        out[idx], fraction[idx] = _mask_image(*(a[idx] for a in inputs), **options)
    return out, fraction


# --- the step ------------------------------------------------------------------------------
@register_step(
    "create_source_mask",
    module="Create Source Mask",
    config=SourceMaskConfig,
    reads={"IMAGE": SURFACE_BRIGHTNESS, "VARIANCE": None, "FLAGS": None},
    writes={"FLAGS": "", "source_fraction": ""},
    calibrations=("spectral_wcs", "average_psf", "solid_angle_pixel_map"),
    tables={"srccat": False, "refcat": False},
    frame="active",
)
def create_source_mask(
    ds: xr.Dataset,
    *,
    calib: dict[str, xr.Dataset],
    config: SourceMaskConfig,
    instrument: Instrument,
    tables: Mapping[str, Any],
) -> xr.Dataset:
    """Set SOURCE on the pixels where catalogued sources exceed ``threshold`` x the noise.

    Parameters
    ----------
    ds
        Calibrated cube at the active frame: IMAGE [MJy / sr], VARIANCE [(MJy / sr)^2],
        FLAGS, the ``wcs_*`` variables and the ``mjd_avg`` coordinate.
    calib
        ``spectral_wcs`` (CWAVE [um]), ``solid_angle_pixel_map`` (SAPM [arcsec^2]) and
        ``average_psf`` (PSF (band, zone, psf_y, psf_x) per oversampled pixel, with
        coordinates ``zone_x``/``zone_y`` [pixel] and ``psf_x``/``psf_y`` [arcsec] and
        the attribute ``oversampling``).
    config
        :class:`SourceMaskConfig`.
    tables
        Used when the cube holds no source lists (from ``query_reference_catalog``):
        ``srccat`` or ``refcat``, with the columns
        :data:`~sphx.astrometry.catalog.CATALOG_COLUMNS`
        (positions [deg] at ``ref_epoch`` [Julian year], proper motions [mas / yr],
        F_nu [uJy]). Sources with a NaN proper motion or epoch stay where listed; an
        empty ``srccat`` flags nothing.

    Returns
    -------
    xarray.Dataset
        The cube with SOURCE set in FLAGS (replacing any earlier SOURCE bits) and
        ``source_fraction`` (band, obs): flagged fraction of the active pixels; lazy,
        one task per image.

    Raises
    ------
    StepError
        No catalogue table, a table without the needed columns, a cube with a
        reference border, VARIANCE in other units, or an image without a WCS.
    CalibrationError
        A product without the cube's bands or pixels, or an ``average_psf`` without
        its zone centres or oversampling.
    """
    catalog, rows = catalog_inputs(ds, tables, step="create_source_mask")
    x, y = ds["x"].values, ds["y"].values
    if x.min() < 0 or y.min() < 0 or x.max() >= instrument.n_active or y.max() >= instrument.n_active:
        raise StepError("create_source_mask works on the active frame (x, y in 0.."
                        f"{instrument.n_active - 1}); remove the reference pixels first")
    if np.any(np.diff(x) != 1) or np.any(np.diff(y) != 1):
        raise StepError("create_source_mask needs contiguous, increasing pixel labels x and y (a rectangular cut)")
    var_units = ds["VARIANCE"].attrs.get("units")
    if var_units is not None and not same_unit(var_units, squared(SURFACE_BRIGHTNESS)):
        raise StepError(f"create_source_mask needs VARIANCE in {squared(SURFACE_BRIGHTNESS)!r}, "
                        f"but the cube has {var_units!r}")
    missing = [v for v in WCS_VARIABLES[:3] if v not in ds]
    if missing:
        raise StepError(f"create_source_mask needs the images' celestial WCS, but the cube lacks {missing}")
    crval = ds["wcs_crval"]
    if not isinstance(crval.data, da.Array):
        bad = np.argwhere(~np.all(np.isfinite(crval.transpose("band", "obs", ...).values), axis=-1))
        if bad.size:
            b, o = bad[0]
            raise StepError(f"{len(bad)} image(s) have no celestial WCS (wcs_crval is NaN), e.g. band "
                            f"{ds['band'].values[b]} obs {ds['obs'].values[o]}; the source mask needs astrometry")
    if "mjd_avg" not in ds.variables:
        raise StepError("create_source_mask needs the mjd_avg coordinate (epoch of the proper motions)")

    psf_product = calib["average_psf"]
    over = psf_product.attrs.get("oversampling")
    problems = [f"missing {c}" for c in ("zone_x", "zone_y", "psf_x", "psf_y") if c not in psf_product.variables]
    if over is None:
        problems.append("no 'oversampling' attribute")
    if problems:
        raise CalibrationError("calibration product 'average_psf' cannot give PSF profiles: " + "; ".join(problems))
    missing = sorted(set(ds["band"].values.tolist()) - set(psf_product["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"calibration product 'average_psf' has no band(s) {missing}")
    offset_x = psf_product["psf_x"].values / instrument.pixel_scale  # [arcsec] -> [pixel]
    offset_y = psf_product["psf_y"].values / instrument.pixel_scale
    psf = psf_product["PSF"].sel(band=ds["band"].values).chunk({"band": 1, "zone": -1, "psf_y": -1, "psf_x": -1})
    envelopes = apply_blocks(
        psf_envelopes, psf,
        input_core_dims=[["zone", "psf_y", "psf_x"]],
        output_core_dims=[["zone", "psf_radius"]],
        kwargs={"offset_x": offset_x, "offset_y": offset_y, "oversampling": int(over)},
        output_dtypes=[np.float64],
        output_sizes={"psf_radius": _profile_size(offset_x, offset_y, int(over))},
    )
    zone_x = psf_product["zone_x"].variable.chunk(-1)
    zone_y = psf_product["zone_y"].variable.chunk(-1)

    per_image = {"band": 1, "obs": 1}
    flags_in = ds["FLAGS"].chunk({**per_image, "y": -1, "x": -1})
    variance = ds["VARIANCE"].chunk({**per_image, "y": -1, "x": -1})
    wcs_in = [ds["wcs_crpix"], crval, ds["wcs_cd"]]
    for k in ("a", "b", "ap", "bp"):
        name = f"wcs_sip_{k}"
        no_sip = xr.DataArray(np.zeros((SIP_ORDER + 1, SIP_ORDER + 1)), dims=("sip_p", "sip_q"))
        wcs_in.append(ds.get(name, no_sip))
    wcs_in = [w.chunk({d: 1 for d in per_image if d in w.dims}) for w in wcs_in]
    epoch = (2000.0 + (ds["mjd_avg"].variable - 51544.5) / 365.25).chunk({"obs": 1})  # Julian year
    band = xr.Variable("band", ds["band"].values).chunk({"band": 1})
    obs = xr.Variable("obs", ds["obs"].values).chunk({"obs": 1})

    new_flags, fraction = apply_blocks(
        _mask_stack,
        flags_in, variance,
        calibration_map(calib, "spectral_wcs", "CWAVE", ds),
        calibration_map(calib, "solid_angle_pixel_map", "SAPM", ds),
        envelopes, zone_x, zone_y, *wcs_in, epoch, band, obs, rows, catalog,
        input_core_dims=[["y", "x"]] * 4 + [["zone", "psf_radius"], ["zone"], ["zone"], ["wcs_axis"], ["wcs_axis"],
                                            ["wcs_axis", "wcs_pix"]] + [["sip_p", "sip_q"]] * 4
        + [[], [], [], ["srccat_bound"], ["catalog_source", "catalog_field"]],
        output_core_dims=[["y", "x"], []],
        kwargs={"x0": int(x[0]), "y0": int(y[0]), "threshold": config.threshold, "min_radius": config.min_radius,
                "max_radius": config.max_radius},
        output_dtypes=[ds["FLAGS"].dtype, np.float64],
    )
    out = ds.copy()
    out["FLAGS"] = new_flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    out["source_fraction"] = fraction.transpose("band", "obs").assign_attrs(
        long_name="fraction of the active pixels flagged SOURCE (PXSRCMSK / 100)", units="")
    return out
