"""Detect Outlier Pixels: transients the on-board detection missed.

Particle hits late or early in the ramp, or below the on-board jump threshold, leave
single bright pixels (plus a little charge shared with the four neighbours, about 3 %
each). Each image is compared with its own ``size`` x ``size`` median
(:func:`sphx.kernels.median.median_filter`, with pixels already known to be bad left
out). A pixel is flagged OUTLIER when two tests agree:

1. **Significance.** Its excess over the median, ``e = IMAGE - median``, is more than
   ``nsigma`` times its noise. The noise is the pixel's VARIANCE plus that of the median
   of ``size**2`` samples (``pi / 2 / size**2`` of a pixel's variance for Gaussian noise).
2. **Sharpness** (``sharpness``, on by default). SPHEREx's PSF is undersampled: a star
   centred on a pixel puts most of its light there, so at the peak of a star the median
   is close to the background and test 1 alone flags the star itself (and, as it flags
   only the upward noise draws of faint stars, biases their photometry low). A particle
   hit is sharper than any star, though. Take ``n``, the mean excess of the four edge
   neighbours over the same median: at a star's pixels ``e`` is at most ``R n``, with
   ``R`` the largest ratio the PSF can produce at any sub-pixel position
   (:func:`psf_sharpness`, from the ``average_psf`` calibration, per zone: about 12 in
   band 1, where the core's sigma is 0.3 pixel, about 5 in band 6), while at a hit it is
   about 30 ``n``. The pixel must pass ``e - R n > k sigma_t``, ``sigma_t`` the noise of
   ``e - R n`` (pixel, neighbours and median with their covariances), where the margin
   ``k`` is

   * ``source_sharpness_nsigma`` on SOURCE pixels: a catalogued source is predicted there;
   * ``sharpness_nsigma`` elsewhere (sources the catalogue or the mask missed, moving
     objects), unless fine astrometry failed for the image (FINAST != 0): SOURCE was then
     painted with the coarse WCS, off by up to the pointing error, and every pixel gets
     the SOURCE margin.

   For a star centred in the worst way ``e - R n`` is zero on average, so the margin
   bounds the chance that its peak is flagged by ``1 - Phi(k)`` (2.3 % for ``k = 2``);
   stars elsewhere in their pixel lie well below the bound (on simulated surveys,
   0.15-0.3 % of the star pixels above 3 sigma are flagged, against 56 % by test 1 alone).

   The price is sensitivity to faint hits: ``sigma_t`` grows with ``R`` (5.9 pixel
   sigmas in band 1, 2.6 in band 6), so a hit must also be brighter than about
   ``k sigma_t / (1 - 0.03 R)``. In band 1 a hit of 5-10 sigma and a star centred on a
   pixel differ in their neighbours by less than the noise, so no test on the pixel and
   its neighbours can tell them apart. On simulated surveys 65-70 % of the missed hits
   that test 1 caught are still caught: all of those above 20 sigma, 83-92 % of those
   above 10 sigma. A pixel next to a saturated one (``saturated`` flags: its
   value is only a lower bound) is never called sharp; neighbours otherwise enter with
   their values whatever their flags (NaN ones are left out), and a pixel without any is
   judged by test 1 alone. Negative excesses (``two_sided``) are judged by test 1 alone:
   no source makes a dip.

The four edge neighbours of every hit, found on board (TRANSIENT) or here, are flagged
OUTLIER as well (``neighbours_of``), whatever their value, as jwst's jump step flags
them: each holds about 3 % of the hit's charge, several sigma for a hit of a few
hundred electrons, and on simulated surveys they were 98 % of the unflagged pixels
more than 5 sigma above the true sky (a positive tail that widened photometric pulls
from 1.00 to 1.04-1.06). Flagging them whatever their value keeps the choice
independent of their noise. Pixels already flagged keep their flags and may be
flagged OUTLIER too.

Also recorded per image: ``outlier_pull_std``, the robust width (1.4826 MAD) of the
normalised residual over unflagged pixels, which should be close to 1 when VARIANCE
describes the noise (a Level 2 data-quality test).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pydantic
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view

from .. import flags as _flags
from ..blocks import apply_blocks, per_image
from ..errors import CalibrationError, StepError
from ..instrument import Instrument
from ..kernels.median import median_filter
from ..kernels.select import median
from ..pipeline.step import StepConfig, register_step
from .source_mask import _pixel_window

__all__ = ["OutlierConfig", "detect_outliers", "outlier_kernel", "psf_sharpness", "sharpness_table"]

_ROBUST = 1.482602218505602
_EXCLUDED = ("TRANSIENT", "OVERFLOW", "SUR_ERROR", "NONFUNC", "HOT", "MISSING_DATA")
# Stamp pixels receiving less than this fraction of the stamp's largest excess are left
# out of the sharpness limit: a source would need a peak 1000 times the threshold for
# them to matter (such cores saturate), and in a measured PSF they are noise whose
# ratios mean nothing.
_LIMIT_FLOOR = 1e-3
# Neighbouring zones whose limit a zone takes on, in units of the zone spacing: a pixel
# between zone centres has a PSF between theirs (the 8 neighbours on a square grid).
_ZONE_REACH = 1.5


class OutlierConfig(StepConfig):
    size: int = pydantic.Field(5, ge=3, description="median box side [pixel], odd")
    nsigma: float = pydantic.Field(5.0, gt=0, description="flag above this many sigma")
    two_sided: bool = pydantic.Field(False, description="also flag pixels far below the median")
    exclude: _flags.FlagNames = pydantic.Field(_EXCLUDED, description="flags left out of the median")
    sharpness: bool = pydantic.Field(
        True, description="flag only excesses sharper than any PSF-shaped source can make (average_psf)")
    sharpness_nsigma: float = pydantic.Field(
        1.0, ge=0, description="margin of the sharpness test off SOURCE pixels of images with FINAST = 0 "
                               "[sigma of e - R n]")
    source_sharpness_nsigma: float = pydantic.Field(
        2.0, ge=0, description="margin of the sharpness test on SOURCE pixels, and on all pixels of images "
                               "with FINAST != 0 [sigma of e - R n]")
    saturated: _flags.FlagNames = pydantic.Field(
        ("OVERFLOW",), description="flags whose value is a lower bound: a pixel next to one is never sharp")
    neighbours_of: _flags.FlagNames = pydantic.Field(
        ("TRANSIENT", "OUTLIER"), description="the four edge neighbours of pixels with these flags are flagged "
                                              "OUTLIER too (a hit shares a few % of its charge with them)")

    @pydantic.field_validator("size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"size must be odd, got {v}")
        return v


# --- the PSF's sharpness limit ---------------------------------------------------------
def psf_sharpness(psf: np.ndarray, *, oversampling: int, size: int = 5) -> np.ndarray:
    """Largest ratio of a source's excess in a pixel to the mean excess of its four
    edge neighbours, over every sub-pixel position and every pixel near the peak.

    Excesses are taken over the median of the ``size`` x ``size`` box around the pixel,
    as :func:`outlier_kernel` takes them: a bright source lifts that median too, which
    makes the ratio of the excesses larger than that of the plain values.

    Parameters
    ----------
    psf
        (..., ny, nx) fraction of the source flux per oversampled pixel (the
        ``average_psf`` planes), the source at sample ``(ny // 2, nx // 2)``.
    oversampling
        Samples per native pixel along each axis.
    size
        Side of the median box [native pixel], odd.

    Returns
    -------
    numpy.ndarray
        (...) float64, dimensionless. The PSF is integrated over native pixels centred on
        every sample (exact when ``oversampling`` is odd, the cut edge samples
        interpolated when it is even, as in
        :func:`~sphx.level2.source_mask.psf_envelopes`), which places the source at every
        ``1 / oversampling`` pixel offset, the centred one included; each such
        native-pixel image is scanned at the pixels whose median box fits in the stamp
        and that receive at least 0.1 % of its largest excess. ``inf`` where such a pixel
        has no neighbour excess (the test can then never call a pixel sharp).
    """
    p = np.asarray(psf, dtype=np.float64)
    o = int(oversampling)
    w = _pixel_window(o)
    p = sliding_window_view(p, w.size, axis=-2) @ w  # native-pixel integral, then along x
    p = sliding_window_view(p, w.size, axis=-1) @ w
    h = size // 2
    best = np.zeros(p.shape[:-2])
    for py in range(o):
        for px in range(o):
            s = p[..., py::o, px::o]  # the native image of the source at one sub-pixel offset
            ny, nx = s.shape[-2:]
            if ny < size or nx < size:
                raise CalibrationError(f"the PSF stamp is {ny}x{nx} native pixels, smaller than the "
                                       f"{size}x{size} median box of outlier detection")
            med = np.median(sliding_window_view(s, (size, size), axis=(-2, -1)), axis=(-2, -1))
            c = s[..., h:ny - h, h:nx - h]
            n = 0.25 * (s[..., h - 1:ny - h - 1, h:nx - h] + s[..., h + 1:ny - h + 1, h:nx - h]
                        + s[..., h:ny - h, h - 1:nx - h - 1] + s[..., h:ny - h, h + 1:nx - h + 1])
            ec, en = c - med, n - med
            peak = ec.max(axis=(-2, -1), keepdims=True)
            use = ec > _LIMIT_FLOOR * peak
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(use, np.where(en > 0, ec / en, np.inf), 0.0)
            best = np.maximum(best, ratio.max(axis=(-2, -1)))
    return best


def sharpness_table(psf: np.ndarray, zone_x: np.ndarray, zone_y: np.ndarray, *, oversampling: int,
                    size: int = 5) -> np.ndarray:
    """The per-zone sharpness limits that :func:`outlier_kernel` reads.

    Parameters
    ----------
    psf
        (..., zone, ny, nx) fraction of the flux per oversampled pixel.
    zone_x, zone_y
        (zone,) zone centres [pixel, 0-based active frame].
    oversampling, size
        As for :func:`psf_sharpness`.

    Returns
    -------
    numpy.ndarray
        (..., 3, zone) float64: row 0 the limit ``R`` of each zone [dimensionless], the
        largest :func:`psf_sharpness` of the zone and the zones whose centres lie within
        1.5 zone spacings (a pixel between zone centres has a PSF between theirs, so
        the nearest zone's own limit could be a little low); rows 1 and 2 the zone
        centres x and y [pixel].
    """
    limit = psf_sharpness(psf, oversampling=oversampling, size=size)
    zx, zy = np.asarray(zone_x, np.float64), np.asarray(zone_y, np.float64)
    d = np.hypot(zx[:, None] - zx[None, :], zy[:, None] - zy[None, :])
    if zx.size > 1:
        spacing = d[d > 0].min() if np.any(d > 0) else 0.0
        near = d <= _ZONE_REACH * spacing
        limit = np.max(np.where(near, limit[..., None, :], 0.0), axis=-1)
    out = np.empty((*limit.shape[:-1], 3, zx.size))
    out[..., 0, :] = limit
    out[..., 1, :] = zx
    out[..., 2, :] = zy
    return out


# --- one image ----------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def _without_excluded(image, flags, exclude):  # pragma: no cover - compiled
    out = np.empty(image.shape, np.float32)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            out[i, j] = np.float32(np.nan) if flags[i, j] & exclude else image[i, j]
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")  # x / 0 is inf, as in numpy
def _sharp(image, med, variance, flags, i, j, excess, table, zone_grid, zone_row, zone_col, x0, y0, k, median_share,
           box, saturated):  # pragma: no cover - compiled
    """Whether the excess of pixel (i, j) is too sharp for a PSF-shaped source, by ``k``
    sigma of ``e - R n``; ``box`` is the number of pixels in the median box."""
    ny, nx = image.shape
    total, var_sum, n = 0.0, 0.0, 0
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        a, b = i + di, j + dj
        if a < 0 or a >= ny or b < 0 or b >= nx:
            continue
        if flags[a, b] & saturated:
            return False  # the neighbour may be far brighter than it reads
        v, s2 = image[a, b], variance[a, b]
        if np.isfinite(v) and np.isfinite(s2):
            total += v - med[i, j]  # the neighbours' excess over the same median as the centre
            var_sum += s2
            n += 1
    if n == 0:
        return True  # nothing to compare with: significance alone decides, as before
    if zone_grid.size:  # the PSF of the nearest zone: on a grid of zones, nearest row and column
        limit = table[0, zone_grid[zone_row[i], zone_col[j]]]
    else:
        best, limit = np.inf, np.inf
        for z in range(table.shape[1]):
            d = (table[1, z] - (x0 + j)) ** 2 + (table[2, z] - (y0 + i)) ** 2
            if d < best:
                best, limit = d, table[0, z]
    if not np.isfinite(limit):
        return False
    s2, mean_var = variance[i, j], var_sum / n
    # e - R n = I_c - R mean(I_n) + (R - 1) median. The median of the N = size**2 box has
    # variance (pi / 2 / N) s2 and, as the centre and the neighbours are in the box, a
    # covariance of about (its variance) / N with each of them (the median's influence
    # function), which takes (R - 1)^2 (2 / N) s2 off the sum: ~11 % less sigma_t for
    # R = 12 than independent noises, as measured on simulated empty sky.
    var_t = (s2 + limit * limit * mean_var / n + (limit - 1.0) ** 2 * median_share * s2
             + 2.0 * (limit - 1.0) * (s2 - limit * mean_var) / box)
    return excess - limit * total / n > k * math.sqrt(var_t)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _clip(image, med, variance, flags, table, zone_grid, zone_row, zone_col, x0, y0, factor, median_share, box,
          nsigma, two_sided, k_off, k_on, outlier, source, saturated):  # pragma: no cover - compiled
    """Flags with ``outlier`` set, and the robust width of the pull of unflagged pixels
    (every other row and column: a quarter of the image pins it down to 0.1 %)."""
    out = np.empty(flags.shape, flags.dtype)
    clean = np.empty(((image.shape[0] + 1) // 2) * ((image.shape[1] + 1) // 2), np.float32)
    sharpness = table.shape[1] > 0
    n = 0
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            excess = np.float32(image[i, j] - med[i, j])
            pull = excess / np.sqrt(np.float32(variance[i, j] * factor))
            f = flags[i, j]
            hit = pull > nsigma
            if hit and sharpness:  # only the rare significant pixels pay for the PSF test
                hit = _sharp(image, med, variance, flags, i, j, np.float64(excess), table, zone_grid, zone_row,
                             zone_col, x0, y0, k_on if f & source else k_off, median_share, box, saturated)
            if two_sided and pull < -nsigma:
                hit = True
            out[i, j] = f | outlier if hit else f
            if i % 2 == 0 and j % 2 == 0 and (f & ~source) == 0 and np.isfinite(pull):
                clean[n] = pull
                n += 1
    if n == 0:
        return out, np.nan
    clean = clean[:n]
    centre = np.float32(median(clean))
    for k in range(n):
        clean[k] = abs(clean[k] - centre)
    return out, _ROBUST * median(clean)


def _zone_lookup(table: np.ndarray, x0: int, y0: int, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, row, col) with ``grid[row[i], col[j]]`` the zone nearest to pixel (i, j) when
    the zone centres form a grid (as the ``average_psf`` zones do; the nearest point of a
    grid is at its nearest row and column), else empty arrays: :func:`_sharp` then scans
    every zone, which on a crowded 2040x2040 image took 3 times as long as the rest of
    the step."""
    empty = np.zeros((0, 0), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    zx, zy = table[1], table[2]
    ux, iz_x = np.unique(zx, return_inverse=True)
    uy, iz_y = np.unique(zy, return_inverse=True)
    if zx.size == 0 or ux.size * uy.size != zx.size:
        return empty
    grid = np.full((uy.size, ux.size), -1, np.int64)
    grid[iz_y, iz_x] = np.arange(zx.size)
    if np.any(grid < 0):  # a centre repeated: not a grid
        return empty
    col = np.abs((x0 + np.arange(nx))[:, None] - ux[None, :]).argmin(axis=1)
    row = np.abs((y0 + np.arange(ny))[:, None] - uy[None, :]).argmin(axis=1)
    return grid, row, col


@per_image
def outlier_kernel(image: np.ndarray, variance: np.ndarray, flags: np.ndarray, table: np.ndarray, *, size: int,
                   nsigma: float, two_sided: bool, exclude: int, saturated: int = int(_flags.Flag.OVERFLOW),
                   sharpness_nsigma: float = 1.0, source_sharpness_nsigma: float = 2.0, neighbours_of: int = 0,
                   x0: int = 0, y0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(flags with OUTLIER set, robust width of the normalised residual) of one image.

    Parameters
    ----------
    image, variance, flags
        (ny, nx) IMAGE [any unit], VARIANCE [its square] and FLAGS.
    table
        (3, zone) :func:`sharpness_table` of the image's band: sharpness limit,
        zone centre x, y [pixel]; with no zones, (3, 0), only the significance test runs.
    size, nsigma, two_sided, sharpness_nsigma, source_sharpness_nsigma
        As in :class:`OutlierConfig`.
    exclude, saturated, neighbours_of
        Bit masks: flags left out of the median; flags whose value is a lower bound;
        flags whose pixels' four edge neighbours are flagged OUTLIER as well.
    x0, y0
        Active-frame position [pixel] of pixel (0, 0), to find each pixel's zone.
    """
    med = median_filter(_without_excluded(image, flags, flags.dtype.type(exclude)), size=size)
    median_share = np.pi / 2.0 / size**2  # variance of a median of size**2 samples / that of one
    table = np.ascontiguousarray(table, dtype=np.float64)
    out, width = _clip(image, med, variance, flags, table, *_zone_lookup(table, x0, y0, *image.shape),
                       np.float64(x0), np.float64(y0), np.float32(1.0 + median_share), median_share, np.float64(size**2),
                       np.float32(nsigma), two_sided, np.float64(sharpness_nsigma), np.float64(source_sharpness_nsigma),
                       flags.dtype.type(_flags.Flag.OUTLIER), flags.dtype.type(_flags.Flag.SOURCE),
                       flags.dtype.type(saturated))
    if neighbours_of:
        out |= _edge_neighbours((out & flags.dtype.type(neighbours_of)) != 0) * flags.dtype.type(_flags.Flag.OUTLIER)
    return out, np.float64(width)


def _edge_neighbours(seed: np.ndarray) -> np.ndarray:
    """Pixels sharing an edge with a ``seed`` pixel (and not seeds themselves)."""
    near = np.zeros_like(seed)
    near[1:] |= seed[:-1]
    near[:-1] |= seed[1:]
    near[:, 1:] |= seed[:, :-1]
    near[:, :-1] |= seed[:, 1:]
    return near & ~seed


# --- the step ------------------------------------------------------------------------------
def _outlier_blocks(image, variance, flags, table, off_margin, **options):
    """:func:`outlier_kernel` over the leading (band, obs) axes of a block, with a margin
    off SOURCE per image (``off_margin``, broadcast like the images)."""
    core = (2, 2, 2, 2, 0)  # core ndim of every input
    inputs = (image, variance, flags, table, off_margin)
    lead = np.broadcast_shapes(*(a.shape[:a.ndim - k] for a, k in zip(inputs, core, strict=True)))
    inputs = [np.broadcast_to(a, lead + a.shape[a.ndim - k:]) for a, k in zip(inputs, core, strict=True)]
    out = np.empty(lead + flags.shape[-2:], flags.dtype)
    width = np.empty(lead, np.float64)
    for idx in np.ndindex(*lead):
        out[idx], width[idx] = outlier_kernel(*(a[idx] for a in inputs[:4]),
                                              sharpness_nsigma=float(inputs[4][idx]), **options)
    return out, width


def _sharpness_tables(ds: xr.Dataset, psf_product: xr.Dataset, config: OutlierConfig) -> xr.DataArray:
    """(band, limit_row, zone) :func:`sharpness_table` of every band of the cube (lazy)."""
    over = psf_product.attrs.get("oversampling")
    problems = [f"missing {c}" for c in ("PSF", "zone_x", "zone_y") if c not in psf_product.variables]
    if over is None:
        problems.append("no 'oversampling' attribute")
    if problems:
        raise CalibrationError("calibration product 'average_psf' cannot give the PSF's sharpness: "
                               + "; ".join(problems))
    missing = sorted(set(ds["band"].values.tolist()) - set(psf_product["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"calibration product 'average_psf' has no band(s) {missing}")
    psf = psf_product["PSF"].sel(band=ds["band"].values).chunk({"band": 1, "zone": -1, "psf_y": -1, "psf_x": -1})
    return apply_blocks(
        sharpness_table, psf, psf_product["zone_x"].variable.chunk(-1), psf_product["zone_y"].variable.chunk(-1),
        input_core_dims=[["zone", "psf_y", "psf_x"], ["zone"], ["zone"]],
        output_core_dims=[["limit_row", "zone"]],
        kwargs={"oversampling": int(over), "size": config.size},
        output_dtypes=[np.float64],
        output_sizes={"limit_row": 3},
    )


@register_step(
    "detect_outliers",
    module="Detect Outlier Pixels",
    config=OutlierConfig,
    reads={"IMAGE": None, "VARIANCE": None, "FLAGS": None},
    writes={"outlier_pull_std": ""},
    calibrations=("average_psf",),
    frame="active",
)
def detect_outliers(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: OutlierConfig, instrument: Instrument
) -> xr.Dataset:
    """Flag OUTLIER pixels: significant against a median-filtered image and sharper than the PSF (lazy).

    Parameters
    ----------
    ds
        Cube at the active frame: IMAGE, VARIANCE (its unit squared), FLAGS (SOURCE set
        by ``create_source_mask`` where catalogued sources are predicted) and, when
        present, ``finast`` (band, obs): images with FINAST != 0 take the SOURCE margin
        of the sharpness test on every pixel.
    calib
        ``average_psf``: PSF (band, zone, psf_y, psf_x), the fraction of the flux per
        oversampled pixel, with coordinates ``zone_x``/``zone_y`` [pixel] and the
        attribute ``oversampling`` (read only when ``config.sharpness``).
    config
        :class:`OutlierConfig`.

    Returns
    -------
    xarray.Dataset
        The cube with OUTLIER set in FLAGS and ``outlier_pull_std`` (band, obs); lazy,
        one task per image.

    Raises
    ------
    CalibrationError
        An ``average_psf`` without the cube's bands, zone centres or oversampling.
    StepError
        Pixel labels that are not a contiguous, increasing cut (the zones are found
        from them).
    """
    if config.sharpness:
        table = _sharpness_tables(ds, calib["average_psf"], config)
        x, y = ds["x"].values, ds["y"].values
        if np.any(np.diff(x) != 1) or np.any(np.diff(y) != 1):
            raise StepError("detect_outliers needs contiguous, increasing pixel labels x and y (a rectangular cut) "
                            "to find each pixel's PSF zone")
        x0, y0 = (int(x[0]), int(y[0])) if x.size and y.size else (0, 0)
    else:
        table, x0, y0 = xr.DataArray(np.empty((3, 0)), dims=("limit_row", "zone")), 0, 0
    # SOURCE was painted with the image's WCS; where fine astrometry failed (FINAST != 0) that
    # is the coarse one, off by up to the pointing error, so no pixel can be taken as free of
    # catalogued sources and the SOURCE margin applies to all
    off_margin = xr.DataArray(np.full((ds.sizes["band"], ds.sizes["obs"]), config.sharpness_nsigma),
                              dims=("band", "obs"))
    if "finast" in ds:
        off_margin = xr.where(ds["finast"].variable == 0, off_margin.variable, config.source_sharpness_nsigma)
    flags, width = apply_blocks(
        _outlier_blocks, ds["IMAGE"], ds["VARIANCE"], ds["FLAGS"], table, off_margin.astype(np.float64),
        input_core_dims=[["y", "x"]] * 3 + [["limit_row", "zone"], []], output_core_dims=[["y", "x"], []],
        kwargs={"size": config.size, "nsigma": config.nsigma, "two_sided": config.two_sided,
                "exclude": int(_flags.mask(*config.exclude)), "saturated": int(_flags.mask(*config.saturated)),
                "source_sharpness_nsigma": config.source_sharpness_nsigma,
                "neighbours_of": int(_flags.mask(*config.neighbours_of)), "x0": x0, "y0": y0},
        output_dtypes=[_flags.FLAG_DTYPE, np.float64],
    )
    out = ds.copy()
    out["FLAGS"] = flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    out["outlier_pull_std"] = width.transpose("band", "obs").assign_attrs(
        long_name="robust width of (IMAGE - median) / sigma over unflagged pixels")
    return out
