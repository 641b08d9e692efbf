"""Measure Exposure-Averaged PSF (paper section 4.4) as a Dask reduction.

On every Level 2 image the reference catalogue's bright, isolated stars are placed with
the image's fine WCS, and the native pixels around each (less the median of a square
ring around it, divided by the star's catalogue flux at the pixel's wavelength) are
stacked at their sub-pixel offsets onto a 10x oversampled grid, one per PSF zone (the
nearest zone centre; :func:`sphx.kernels.psf_stack.stack_stars`). The stack is the
pixel-convolved (effective) PSF. Per band, the bins beyond the isolation radius are
dropped and the background left at the edge of what remains is taken off
(:func:`_within_reach`). The PSF of every zone is then a core + halo model plus one
correction shared by the zones (:func:`sphx.kernels.psf_stack.deconvolve_zones`): each
zone's stack is fitted by two concentric elliptical Gaussians integrated over the pixel,
whose parameters are smoothed over the detector by polynomials of ``field_degree`` (3),
and the zones' residuals from their models, added over all zones, are deconvolved from
the pixel response once per band (:func:`sphx.kernels.psf_stack.deconvolve_pixel`). The
PSF is normalised to unit flux and cut to the product's 101 x 101 stamp, so that each
plane holds the fraction of the flux per oversampled pixel, as the archive's
``average_psf`` does.

A star's catalogue flux only scales its samples: an error in it (or in the absolute
gain) adds scatter to the stack, not a change of shape, and the final normalisation
removes the scale.

Graph: one task per ``batch`` images reads them (:meth:`Repository.read_images
<sphx.io.repository.Repository.read_images>`) and the catalogue, once for all of them,
and stacks their stars onto a (2, zones, S, S) float64 accumulator (sums and counts) and
per-zone star counts, carried from batch to batch along ``chains`` chains per band; the
chains are added and deconvolved per band. Memory is ``chains`` accumulators (~23 MB
each for 121 zones) per band and a batch's images and catalogue per thread, whatever
the number of images: the images are not tasks of their own, which a scheduler runs
ahead of the chains.
"""

from __future__ import annotations

import math

import dask
import dask.array as da
import numba
import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..astrometry.catalog import CATALOG_WAVELENGTHS, F0, KIND, catalog_array, interpolate_flux, sources_in_image
from ..ephemeris import julian_year, observer_barycentric
from ..errors import CalibrationError
from ..io.repository import Repository
from ..kernels.psf_stack import deconvolve_zones, stack_grid_size, stack_stars
from ..level3.photometry import PHOTOMETRY_MASK, image_catalog
from ..wcs import cube_wcs
from .inputs import IMAGE_WCS, SolverInputs, batch_catalog, catalog_epoch, read_images
from .run import Solver, register_solver

__all__ = ["PsfConfig", "estimate_psf", "isolated_stars", "stack_image", "usable_pixels"]

_SNR_FLOOR = 100.0  # star S/N (flux over one pixel's noise) at which a star's weight is 1/2
_UJY_PER_MJY_SR_ARCSEC2 = 1e12 * (math.pi / (180.0 * 3600.0)) ** 2  # uJy per (MJy/sr x arcsec^2)


class PsfConfig(pydantic.BaseModel):
    """Options of :func:`estimate_psf` (unknown keys are errors)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    half_size: int = pydantic.Field(5, ge=3, description="stacked cutouts are 2 half_size + 1 native pixels wide")
    isolation: float = pydantic.Field(6.0, gt=0, description="[pixel] no brighter neighbour within this distance")
    max_neighbour: float = pydantic.Field(0.1, gt=0, description="neighbours fainter than this fraction are allowed")
    min_snr: float = pydantic.Field(50.0, ge=0, description="star flux over one pixel's noise; fainter are not used")
    min_stars: int = pydantic.Field(1000, ge=1, description="stars per zone; fewer is an error")
    iterations: int = pydantic.Field(2000, ge=1, description="most deconvolution iterations")
    smoothing: float | None = pydantic.Field(None, gt=0, description="deconvolution smoothness (None: default)")
    compactness: float | None = pydantic.Field(None, ge=0, description="deconvolution compactness (None: default)")
    require_astrometry: bool = True
    field_degree: int = pydantic.Field(
        3, ge=0, le=5, description="degree of the core + halo model's polynomials over the detector")
    batch: int = pydantic.Field(16, ge=1, description="images per task (one catalogue read)")
    chains: int = pydantic.Field(4, ge=1, description="accumulators per band (23 MB each), added to in turn")


@numba.njit(nogil=True, cache=True)
def usable_pixels(image: np.ndarray, variance: np.ndarray, flags: np.ndarray,
                  mask: int) -> tuple[np.ndarray, float]:  # pragma: no cover - compiled
    """The pixels with no ``mask`` bit in ``flags`` and a finite value, and the smallest
    noise (square root of ``variance``) among them (inf if none): the noise floor under
    any star the stacking can use."""
    ny, nx = image.shape
    usable = np.empty((ny, nx), np.bool_)
    least = np.inf
    for j in range(ny):
        for i in range(nx):
            ok = (flags[j, i] & mask) == 0 and np.isfinite(image[j, i])
            usable[j, i] = ok
            if ok and variance[j, i] < least:
                least = variance[j, i]
    return usable, math.sqrt(max(least, 0.0))


def _ring_offsets(inner: int, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the square ring of ``width`` pixels just outside a cutout of half-size ``inner``."""
    r = inner + width
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    ring = np.maximum(np.abs(dy), np.abs(dx)) > inner
    return dy[ring], dx[ring]


def isolated_stars(x: np.ndarray, y: np.ndarray, flux: np.ndarray, candidates: np.ndarray, *, radius: float,
                   fraction: float) -> np.ndarray:
    """Which candidates have no neighbour brighter than ``fraction`` of their flux within ``radius``.

    Parameters
    ----------
    x, y, flux
        All catalogue sources on the image [pixel], [any flux unit]; non-finite fluxes
        count as bright.
    candidates
        Indices into them of the stars to test.
    radius
        [pixel].
    fraction
        Neighbours fainter than ``fraction * flux`` are allowed.

    Returns
    -------
    np.ndarray
        bool per candidate.
    """
    from scipy.spatial import cKDTree

    if not candidates.size:
        return np.zeros(0, bool)
    bright = np.where(np.isfinite(flux), flux, np.inf)
    # only sources brighter than the faintest candidate's limit can crowd one
    limit = np.nanmin(flux[candidates]) * fraction if np.isfinite(flux[candidates]).any() else np.inf
    near = np.flatnonzero(bright > limit)
    pairs = cKDTree(np.column_stack([x[candidates], y[candidates]])).sparse_distance_matrix(
        cKDTree(np.column_stack([x[near], y[near]])), radius, output_type="ndarray")
    k, j = pairs["i"], near[pairs["j"]]
    crowded = (j != candidates[k]) & (bright[j] > fraction * flux[candidates[k]])
    return np.bincount(k[crowded], minlength=candidates.size) == 0


def stack_image(image: np.ndarray, variance: np.ndarray, flags: np.ndarray, x: np.ndarray, y: np.ndarray,
                flux: np.ndarray, zone: np.ndarray, *, n_zones: int, oversampling: int, half_size: int,
                mask: int = int(PHOTOMETRY_MASK), usable: np.ndarray | None = None,
                out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack one image's stars into per-zone accumulators.

    Parameters
    ----------
    image, variance, flags
        (ny, nx) surface brightness [MJy/sr], its variance [(MJy/sr)^2] and FLAGS.
    x, y
        Star positions [pixel, 0-based array indices].
    flux
        Catalogue flux of each star in image units x pixel [MJy/sr x pixel].
    zone
        PSF zone of each star (-1: skip).
    n_zones, oversampling, half_size
        Accumulator planes, grid oversampling, cutout half-size [pixel].
    mask
        FLAGS bits that make a pixel unusable.
    usable
        (ny, nx) bool, the pixels with no ``mask`` bit and a finite value, if known
        (:func:`usable_pixels`).
    out
        ``(acc, stars)`` to add to in place (new zeros when None).

    Returns
    -------
    acc
        (2, n_zones, S, S) float64: sums and counts of :func:`stack_stars`.
    stars
        (n_zones,) stars that contributed.

    Notes
    -----
    Stars whose 3 x 3 core has a masked, saturated (OVERFLOW) or non-linear pixel are
    left out: the wings of a saturated star would enter without its core, and with
    a weight its missing core cannot justify. A star's samples are weighted by
    ``s^2 / (s^2 + 100^2)``, ``s`` its flux over the background noise (the median
    variance of the ring): the inverse variance of its samples with a floor for what
    does not average down with brightness (the spread of offsets within a bin,
    neighbours), scaled so that a bright star weighs 1 as the deconvolution's
    regularisation expects. Weights growing as ``s^2`` without that floor let a few
    bright stars make each zone, and the zones' FWHM scattered 3 times more.
    """
    size = stack_grid_size(half_size=half_size, oversampling=oversampling)
    acc, stars = out if out is not None else (np.zeros((2, n_zones, size, size)), np.zeros(n_zones, np.int64))
    if not x.size:
        return acc, stars
    ny, nx = image.shape
    if usable is None:
        usable = usable_pixels(image, variance, flags, mask)[0]
    cy, cx = np.mgrid[-1:2, -1:2]
    jy = np.clip(np.floor(y + 0.5).astype(np.int64)[:, None] + cy.ravel(), 0, ny - 1)
    jx = np.clip(np.floor(x + 0.5).astype(np.int64)[:, None] + cx.ravel(), 0, nx - 1)
    saturated = (flags[jy, jx] & np.uint32(_flags.Flag.OVERFLOW | _flags.Flag.NONLINEAR)) != 0
    core_ok = (usable[jy, jx] & ~saturated).all(axis=1)
    # background: the median of a ring just outside the cutout (at least half of it usable)
    dy, dx = _ring_offsets(half_size)
    iy = np.floor(y + 0.5).astype(np.int64)[:, None] + dy
    ix = np.floor(x + 0.5).astype(np.int64)[:, None] + dx
    inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
    iyc, ixc = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
    ring = np.where(inside & usable[iyc, ixc], image[iyc, ixc], np.nan)
    enough = np.isfinite(ring).sum(axis=1) >= ring.shape[1] // 2
    sky = np.nanmedian(np.where(enough[:, None], ring, 0.0), axis=1)
    noise = np.sqrt(np.nanmedian(np.where(enough[:, None] & np.isfinite(ring), variance[iyc, ixc], 1.0), axis=1))
    zone = np.where(enough & core_ok & (noise > 0), zone, -1)
    if not np.any(zone >= 0):
        return acc, stars
    snr2 = np.where(zone >= 0, (flux / noise) ** 2, np.nan)
    weight = snr2 / (snr2 + _SNR_FLOOR**2)
    stars += np.bincount(zone[zone >= 0], minlength=n_zones)
    stack_stars(image, usable, x, y, flux, sky, zone, sums=acc[0], counts=acc[1], weight=weight,
                half_size=half_size, oversampling=oversampling)
    return acc, stars


# what the stacking reads of the catalogue
_COLUMNS = ("ra", "dec", "ref_epoch", "pmra", "pmdec", "parallax", "kind", *CATALOG_WAVELENGTHS)


def _stack_batch(repo, levels, meta, band, zone_x, zone_y, omega, cwave, oversampling, epoch, config, previous):
    """The task of a batch of images (``meta``: their per-image numbers): their pixels
    read (``levels``: variable -> level) and stacked onto a copy of the ``previous``
    batch's accumulators of the chain (None: zeros). The images are read here, not by
    tasks of their own, which a scheduler would run ahead of their chain (every image of
    the band in memory before the first stacking). The catalogue is read once for the
    batch (:func:`~sphx.calibrate.inputs.batch_catalog`) and each image moves the rows
    near it to its epoch and viewpoint; ``epoch`` None (rows of different epochs): each
    image queries the whole catalogue."""
    size = stack_grid_size(half_size=config.half_size, oversampling=oversampling)
    # a copy, not the previous result itself: a task run again must find its input as it was
    out = (previous[0].copy(), previous[1].copy()) if previous is not None else \
        (np.zeros((2, zone_x.size, size, size)), np.zeros(zone_x.size, np.int64))
    obs = [int(o) for o in meta["obs"].values]
    pixels = read_images(repo, levels, band=band, obs=obs)
    usable, floor = zip(*(usable_pixels(pixels["IMAGE"][k], pixels["VARIANCE"][k], pixels["FLAGS"][k],
                                        int(PHOTOMETRY_MASK)) for k in range(len(obs))), strict=True)
    batch = None
    if epoch is not None:
        table = batch_catalog(repo.location, meta, band=band, epoch=epoch, columns=_COLUMNS)
        cat = catalog_array(table)
        parallax = table.column("parallax").to_numpy() if "parallax" in table.column_names else None
        # Most catalogue rows are too faint to be stacked or to crowd a star that is: a
        # stacked star has at least min_snr times the noise floor of its image, and only
        # neighbours brighter than max_neighbour times that count. The rows are sorted by
        # their brightest flux in the band, and each image moves and projects only the
        # rows above its limit (the stacks are the same).
        brightest = _brightest(cat[:, F0:F0 + len(CATALOG_WAVELENGTHS)], np.nanmin(cwave), np.nanmax(cwave))
        key = -np.nan_to_num(brightest, nan=np.inf)  # NaN (unknown) rows first, then the brightest
        order = np.argsort(key, kind="stable")
        batch = (cat[order], parallax[order] if parallax is not None else None, key[order])
        scale = config.max_neighbour * config.min_snr * float(np.nanmin(omega)) * _UJY_PER_MJY_SR_ARCSEC2
    for k, o in enumerate(obs):
        one = meta.isel(obs=[k])
        if batch is None:  # the image's rows, already moved
            cat, parallax = catalog_array(image_catalog(repo.open_table("refcat"), one, band=band, obs=o,
                                                        columns=list(_COLUMNS))), None
        else:
            n = np.searchsorted(batch[2], -scale * floor[k])  # the rows brighter than the image's limit
            cat, parallax = batch[0][:n], None if batch[1] is None else batch[1][:n]
        _stack_one(pixels["IMAGE"][k], pixels["VARIANCE"][k], pixels["FLAGS"][k], usable[k], one, cat, parallax, band,
                   o, zone_x, zone_y, omega, cwave, oversampling, config, out)
    return out


def _brightest(fluxes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Upper bound of each row's F_nu between the wavelengths ``lo`` and ``hi`` [um]
    (:func:`~sphx.astrometry.catalog.interpolate_flux` is monotonic between the
    catalogue's points and beyond its ends); NaN where a point is NaN."""
    n = fluxes.shape[0]
    values = [interpolate_flux(fluxes, np.full(n, lo)), interpolate_flux(fluxes, np.full(n, hi))]
    values += [np.maximum(fluxes[:, i], 1e-30) for i, lam in enumerate(CATALOG_WAVELENGTHS.values()) if lo < lam < hi]
    return np.max(values, axis=0)


def _stack_one(image, variance, flags, usable, meta, cat, parallax, band, obs, zone_x, zone_y, omega, cwave,
               oversampling, config, out):
    x0, y0 = int(meta["x"].values[0]), int(meta["y"].values[0])
    ny, nx = image.shape
    mjd = float(meta["mjd_avg"].values[0])
    # seen from the spacecraft, as image_catalog sees them
    observer = None if parallax is None else observer_barycentric(
        mjd, meta["sc_position"].sel(sc_epoch="avg").values[0] if "sc_position" in meta else None)
    rows, x, y = sources_in_image(cat, cube_wcs(meta, band=band, obs=obs), (x0, x0 + nx - 1), (y0, y0 + ny - 1),
                                  float(julian_year(mjd)), margin=config.isolation, parallax=parallax,
                                  observer=observer)
    if not rows.size:
        return
    xs, ys = x - x0, y - y0
    ix = np.clip(np.floor(xs + 0.5).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.floor(ys + 0.5).astype(np.int64), 0, ny - 1)
    flux = interpolate_flux(cat[rows, F0:F0 + len(CATALOG_WAVELENGTHS)], cwave[iy, ix])  # [uJy]
    # image units x pixel, the unit of a star's summed pixels
    flux_image = flux / (omega[iy, ix] * _UJY_PER_MJY_SR_ARCSEC2)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux_image / np.sqrt(variance[iy, ix])
    h = config.half_size
    star = ((cat[rows, KIND] == 0) & (snr >= config.min_snr) & (xs >= h) & (xs <= nx - 1 - h)
            & (ys >= h) & (ys <= ny - 1 - h))
    candidates = np.flatnonzero(star)
    chosen = candidates[isolated_stars(xs, ys, flux, candidates, radius=config.isolation,
                                       fraction=config.max_neighbour)]
    if not chosen.size:
        return
    # the nearest zone centre (zones run x-fast: plane = iy * nx_zones + ix)
    zx, zy = np.unique(zone_x) - x0, np.unique(zone_y) - y0
    kx = np.abs(xs[chosen, None] - zx[None, :]).argmin(axis=1)
    ky = np.abs(ys[chosen, None] - zy[None, :]).argmin(axis=1)
    stack_image(image, variance, flags, xs[chosen], ys[chosen], flux_image[chosen], ky * zx.size + kx, usable=usable,
                n_zones=zone_x.size, oversampling=oversampling, half_size=h, out=out)


def _add_accumulators(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    acc, stars = parts[0][0].copy(), parts[0][1].copy()
    for a, n in parts[1:]:
        acc += a
        stars += n
    return acc, stars


def _within_reach(sums: np.ndarray, counts: np.ndarray, *, oversampling: int,
                  radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop the stack bins farther than ``radius`` [pixel] from the star, and subtract
    the mean level of the outermost pixel of what is left.

    The square cutouts reach 1.4 times their half-size in the corners, beyond the
    isolation radius, where the light of brighter neighbours adds up (it put 20-35 %
    of the flux into the corners of the simulated stacks). The deconvolution fills the
    dropped bins from its penalties.
    """
    size = sums.shape[-1]
    r = (np.arange(size) - (size - 1) / 2) / oversampling
    r = np.hypot(r[:, None], r[None, :])
    keep = r <= radius
    # the ring median under each star sees neighbours beyond the isolation radius and
    # sits above the sky near the star: the stack is 3e-4 of the flux per pixel low
    # (-1.5 % over the cutout in the simulated stacks); the outermost pixel of the
    # reach, where the PSF is negligible, measures that offset
    edge = keep & (r > radius - 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = sums[:, edge].sum(axis=1) / counts[:, edge].sum(axis=1)
    level = np.where(np.isfinite(level), level, 0.0)
    return (sums - level[:, None, None] * counts) * keep, counts * keep


def _finish(acc: np.ndarray, stars: np.ndarray, *, size: int, oversampling: int, config: PsfConfig,
            band: int, n_side: int) -> np.ndarray:
    short = [f"zone {z} (x {z % n_side}, y {z // n_side}) has {n}" for z, n in enumerate(stars)
             if n < config.min_stars]
    if short:
        shown = "; ".join(short[:5]) + (f"; and {len(short) - 5} more zones" if len(short) > 5 else "")
        raise CalibrationError(f"band {band}: the PSF needs at least {config.min_stars} isolated stars per zone "
                               f"(min_stars), but {shown}; add exposures (fields near the galactic plane have more "
                               "stars) or lower min_stars")
    # a neighbour's core reaches ~1.5 pixel toward the star
    reach = min(config.half_size + 0.5, config.isolation - 1.5)
    sums, counts = _within_reach(acc[0], acc[1], oversampling=oversampling, radius=reach)
    # only the bins within reach hold samples: the deconvolution works on them alone (its
    # cost goes as the grid's side cubed: 1.7 times faster), the PSF's grid reaching one
    # pixel kernel beyond them, where only the penalties hold it
    full = acc.shape[-1]
    cut = max((full - 1) // 2 - math.ceil(reach * oversampling), 0)
    sums, counts = (a[:, cut:full - cut, cut:full - cut] for a in (sums, counts))
    options = {k: v for k in ("smoothing", "compactness") if (v := getattr(config, k)) is not None}
    psf = deconvolve_zones(sums, counts, n_side=n_side, oversampling=oversampling, degree=config.field_degree,
                           iterations=config.iterations, **options)
    grid = psf.shape[-1]
    psf /= psf.sum(axis=(1, 2), keepdims=True)
    if grid < size:  # the PSF is zero beyond its grid
        pad = (size - grid) // 2
        return np.pad(psf, ((0, 0), (pad, pad), (pad, pad))).astype(np.float32)
    cut = (grid - size) // 2
    return psf[:, cut:cut + size, cut:cut + size].astype(np.float32)


def estimate_psf(repo: Repository, inputs: SolverInputs, config: PsfConfig | None = None, *,
                 calibrations: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
    """Exposure-averaged PSF of the selected detectors (lazy).

    Parameters
    ----------
    repo
        The repository (its ``refcat`` table is read by the tasks).
    inputs
        Level 2 ``IMAGE`` [MJy/sr], ``VARIANCE``, ``FLAGS`` and the fine WCS.
    config
        :class:`PsfConfig`.
    calibrations
        ``average_psf`` (zone centres and grid of the product), ``solid_angle_pixel_map``
        and ``spectral_wcs``.

    Returns
    -------
    dict
        ``average_psf``: PSF (band, zone, psf_y, psf_x) on the zones and grid of the
        prior product, and N_STARS (band, zone).
    """
    c = config or PsfConfig()
    prior = calibrations["average_psf"]
    over = int(prior.attrs.get("oversampling", repo.instrument.psf_oversampling))
    size = prior.sizes["psf_x"]
    zone_x, zone_y = prior["zone_x"].values, prior["zone_y"].values
    n_zones = zone_x.size
    usable = inputs.usable(require_astrometry=c.require_astrometry)
    # per-image numbers (WCS, times): small, read now so that the tasks carry them
    meta = inputs.image_metadata().load()
    levels = {n: inputs.levels[n] for n in ("IMAGE", "VARIANCE", "FLAGS")}
    epoch = catalog_epoch(repo.open_table("refcat"))
    planes, counts = [], []
    for i, band in enumerate(inputs.bands):
        # maps as graph inputs (dask-backed from the repository: nothing is read while building)
        omega = calibrations["solid_angle_pixel_map"]["SAPM"].sel(band=band).data.astype(np.float64)
        cwave = calibrations["spectral_wcs"]["CWAVE"].sel(band=band).data.astype(np.float64)
        use = np.flatnonzero(usable[i]).tolist()
        # ``chains`` accumulators per band, each taking every chains-th batch in turn: the
        # memory is that many accumulators whatever the number of images (a tree sum of
        # one accumulator per batch held many while the scheduler ran ahead)
        heads = [None] * c.chains
        for k, first in enumerate(range(0, len(use), c.batch)):
            group = use[first:first + c.batch]
            m = meta.isel(band=[i], obs=group)
            heads[k % c.chains] = dask.delayed(_stack_batch)(
                repo, levels, m, int(band), zone_x, zone_y, omega, cwave, over, epoch, c, heads[k % c.chains],
                dask_key_name=f"psf-stack-{int(m['obs'].values[0])}-D{band}")
        if heads[0] is None:
            raise CalibrationError(f"band {band}: no image with fine astrometry to stack stars from")
        total = dask.delayed(_add_accumulators)([h for h in heads if h is not None])
        n = da.from_delayed(total[1], (n_zones,), np.int64)
        # total[1], not the array n: a dask array handed to a delayed function is finalised
        # in a graph of its own, and ``total`` (all of the band's stacking) computed twice
        plane = dask.delayed(_finish)(total[0], total[1], size=size, oversampling=over, config=c, band=int(band),
                                      n_side=np.unique(zone_x).size)
        planes.append(da.from_delayed(plane, (n_zones, size, size), np.float32))
        counts.append(n)
    ds = xr.Dataset(
        {"PSF": (("band", "zone", "psf_y", "psf_x"), da.stack(planes), prior["PSF"].attrs),
         "N_STARS": (("band", "zone"), da.stack(counts), {"units": "", "long_name": "stars stacked in the zone"})},
        coords={"band": np.asarray(inputs.bands, np.int64),
                **{k: v for k, v in prior.coords.items() if k != "band" and "band" not in v.dims}},
        attrs=dict(prior.attrs))
    return {"average_psf": ds}


register_solver(Solver(
    "psf", "Measure Exposure-Averaged PSF", PsfConfig,
    reads={"IMAGE": "l2", "VARIANCE": "l2", "FLAGS": "l2"}, calibrations=("average_psf", "solid_angle_pixel_map"),
    tables=("refcat",), writes=("average_psf",), solve=estimate_psf,
    extra=IMAGE_WCS))
