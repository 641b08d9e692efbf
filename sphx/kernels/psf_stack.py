"""Exposure-averaged PSF: stars stacked on an oversampled grid, then the pixel deconvolved.

The kernels of the "Measure Exposure-Averaged PSF" calibration step, after the method of
Symons et al. (2021):

1. **Stack.** Every native pixel in a (2h+1)^2 cutout around a star, background
   subtracted and divided by the star's flux, is a sample of the *effective* PSF (the
   optical PSF convolved with the pixel) at the offset ``d = pixel centre - star``. The
   sample goes into the bin of an ``oversampling`` times finer grid nearest to ``d``
   (:func:`stack_stars`). The accumulators are a sum and a count per bin, so partial
   stacks from different images or tasks combine by plain addition, in any order.
2. **Deconvolve.** A native pixel is the sum of the ``o x o`` oversampled PSF bins under
   it, so the stack mean is the optical PSF ``P`` (on the oversampled grid) convolved with
   a top-hat of one native pixel, separably in x and y. :func:`deconvolve_pixel` solves
   that for ``P`` by weighted least squares (weights = sample counts) with a light
   smoothness penalty, by preconditioned conjugate gradients.
3. **Over the detector.** :func:`deconvolve_zones` models every zone's PSF as a core +
   halo function whose parameters vary smoothly over the detector, plus one correction
   shared by the zones and deconvolved from all their stars: the pixel hides what makes
   the width of a narrow core, and a zone's stars alone leave it uncertain by ~3 %.

Grids and conventions
---------------------
Pixel ``(j, i)`` covers ``x`` in ``[i - 0.5, i + 0.5)`` (``y`` likewise). The stack grid
is ``S x S`` (:func:`stack_grid_size`) with centre index ``c = (S - 1) // 2``; bin ``k``
is centred at offset ``(k - c) / o`` [native pixel] and spans ``+-0.5 / o``. The product
is ``size x size`` (101 for the archive's ``average_psf``), centred on the same offset 0,
each value the optical PSF integrated over one oversampled pixel, so that a plane sums
to the fraction of the star's flux inside it: the layout that
:func:`sphx.kernels.photometry.template_bank` reads.

The forward model
-----------------
A stack bin averages the pixel integral of the PSF over offsets spread uniformly across
the bin, so its mean is ``(1/delta) int P_c(x_k - t) box_1(t) dt``: ``P_c`` the PSF
integrated over a bin-wide window (whose samples at the bin centres are the product's
values), ``delta = 1/o``. The trapezoid rule on the bin centres turns that into the 1-d
kernel ``[0.5, 1, ..., 1, 0.5]`` (``o + 1`` taps, even ``o``; ``o`` ones by the
midpoint rule for odd ``o``), exact in flux but with the second moment
``1/12 + 1/(6 o^2)`` pixel^2 instead of the pixel's ``1/12``: fitted with it, ``P``
comes out narrower than the truth by ``1/(6 o^2)`` pixel^2 in variance (FWHM -0.2 % at
sigma = 0.65 pixel, ``o = 10``). The Euler-Maclaurin end terms (``-+1/24`` on the bins
either side of each pixel edge, :func:`_pixel_kernel`) remove that: on noise-free,
exactly bin-averaged stacks the fitted ``P`` matches the truth to 1e-4 of its peak.

The solver
----------
Per zone, weighted least squares (weights = counts) plus a smoothness penalty chosen so
that, for uniform counts, the normal equations are diagonal in a per-axis generalised
eigenbasis (:func:`_basis`), and a compactness penalty that is not. Conjugate gradients
in that basis, preconditioned by the uniform-count diagonal and that of the compactness
term, converge in tens to hundreds of iterations where plain CG would need thousands
(the pixel top-hat has exact zeros at multiples of 1 cycle per native pixel, which only
the penalties control). Every operator is a pair of dense matrix products for a few
zones at once (no FFT).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special
from scipy.interpolate import CubicSpline

__all__ = ["core_halo_planes", "deconvolve_pixel", "deconvolve_zones", "effective_psf", "fit_core_halo", "psf_fwhm_2d",
           "smooth_over_field", "stack_grid_size", "stack_stars"]

_SMOOTHING = 1.5  # default strength of the deconvolution's smoothness penalty
_COMPACTNESS = 0.1  # default strength of its compactness penalty [pixel^-4]
_WIDTH_POWER = 7  # the penalty scales as the PSF width to this power
_RTOL = 1e-6  # relative residual (preconditioned norm) at which a zone's conjugate gradients stop
_ZONES_AT_ONCE = 8  # zones solved together


# --- stacking --------------------------------------------------------------------------
def stack_grid_size(*, half_size: int, oversampling: int) -> int:
    """Side of the stacking grid [oversampled bins].

    Parameters
    ----------
    half_size
        Cutout half-size [native pixel]: stars contribute ``(2 half_size + 1)^2`` pixels.
    oversampling
        Bins per native pixel.

    Returns
    -------
    int
        ``S = oversampling (2 half_size + 1) + 1`` for even ``oversampling`` (odd; centre
        index ``(S - 1) // 2``). For odd ``oversampling`` that would be even, so it is one
        more (``+ 2``): the grid stays symmetric about its centre bin and still holds
        every offset a cutout pixel can have.
    """
    if half_size < 0 or oversampling < 1:
        raise ValueError(f"need half_size >= 0 and oversampling >= 1, got {half_size}, {oversampling}")
    # offsets reach +-(half_size + 0.5) native pixels, i.e. +-ceil(o (h + 1/2)) bins
    reach = (oversampling * (2 * half_size + 1) + 1) // 2
    return 2 * reach + 1


@numba.njit(nogil=True, cache=True)
def _stack(image, usable, xs, ys, norm, sky, weight, zone, order, sums, counts, half, o):
    ny, nx = image.shape
    size = sums.shape[-1]
    c = (size - 1) // 2
    n_used = 0
    for s in order:
        z = zone[s]
        x, y, f, b, w = xs[s], ys[s], norm[s], sky[s], weight[s]
        if (z < 0 or not (np.isfinite(x) and np.isfinite(y) and np.isfinite(b) and np.isfinite(f)) or not f > 0.0
                or not w > 0.0 or not np.isfinite(w)):
            continue
        # stars whose cutout misses the image entirely (also keeps the int casts safe)
        if x < -half - 1.0 or y < -half - 1.0 or x > nx + half or y > ny + half:
            continue
        i0 = math.floor(x + 0.5)
        j0 = math.floor(y + 0.5)
        used = False
        for j in range(max(j0 - half, 0), min(j0 + half + 1, ny)):
            ky = math.floor((j - y) * o + 0.5) + c
            if ky < 0 or ky >= size:
                continue
            for i in range(max(i0 - half, 0), min(i0 + half + 1, nx)):
                v = image[j, i]
                if not usable[j, i] or not np.isfinite(v):
                    continue
                kx = math.floor((i - x) * o + 0.5) + c
                if kx < 0 or kx >= size:
                    continue
                sums[z, ky, kx] += w * (v - b) / f
                counts[z, ky, kx] += w
                used = True
        if used:
            n_used += 1
    return n_used


def _star_array(a: np.ndarray, n: int, name: str, dtype: type) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=dtype)
    if out.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {out.shape}")
    return out


def stack_stars(image: np.ndarray, usable: np.ndarray, x: np.ndarray, y: np.ndarray, norm: np.ndarray,
                sky: np.ndarray, zone: np.ndarray, *, sums: np.ndarray, counts: np.ndarray,
                weight: np.ndarray | None = None, half_size: int = 5, oversampling: int = 10) -> int:
    """Add the native pixels around each star to the stacking accumulators, in place.

    Parameters
    ----------
    image
        (ny, nx) float32/64 surface brightness (any unit); NaN pixels are skipped.
    usable
        (ny, nx) bool; False pixels are skipped.
    x, y
        (n,) star positions [pixel, 0-based; pixel (j, i) covers x in [i - 0.5, i + 0.5)].
    norm
        (n,) star flux [image unit x pixel]: the sample added is ``(image - sky) / norm``.
        Stars with non-positive or non-finite ``norm`` are skipped.
    sky
        (n,) local background level under each star [image unit].
    zone
        (n,) int accumulator plane of each star; negative skips the star.
    sums, counts
        (n_zones, S, S) float64 C-contiguous accumulators, ``S =``
        :func:`stack_grid_size` ``(half_size=, oversampling=)``; updated in place.
    weight
        (n,) weight of each star's samples (default 1): ``sums`` gets ``weight (image -
        sky) / norm`` and ``counts`` gets ``weight``. Weights proportional to ``norm^2``
        make the stack a flux regression, so that a star whose ``norm`` is too small
        cannot dominate it. Stars with non-positive or non-finite weight are skipped.
    half_size
        Cutout half-size [native pixel]: the ``(2 half_size + 1)^2`` pixels centred on the
        pixel holding the star.
    oversampling
        Stack bins per native pixel.

    Returns
    -------
    int
        Number of stars that added at least one pixel.

    Notes
    -----
    A pixel centred at offset ``d = (i - x, j - y)`` goes into bin
    ``k = floor(d o + 0.5) + (S - 1) // 2`` per axis. Every accumulator update is an
    addition, so stacks of disjoint star sets sum to the stack of their union (up to
    floating-point reassociation in ``sums``; ``counts`` are exact).
    """
    size = stack_grid_size(half_size=half_size, oversampling=oversampling)
    for name, acc in (("sums", sums), ("counts", counts)):
        if (not isinstance(acc, np.ndarray) or acc.dtype != np.float64 or acc.ndim != 3
                or acc.shape[1:] != (size, size) or not acc.flags.c_contiguous or not acc.flags.writeable):
            raise ValueError(f"{name} must be a writeable C-contiguous float64 (n_zones, {size}, {size}) array")
    if sums.shape != counts.shape:
        raise ValueError(f"sums {sums.shape} and counts {counts.shape} differ in shape")
    image = np.asarray(image)
    if image.dtype not in (np.float32, np.float64):
        image = image.astype(np.float64)
    usable = np.asarray(usable, dtype=bool)
    if image.ndim != 2 or usable.shape != image.shape:
        raise ValueError(f"image {image.shape} and usable {usable.shape} must be the same 2-d shape")
    if np.ndim(x) != 1:
        raise ValueError(f"x must be 1-d, got shape {np.shape(x)}")
    n = len(x)
    weight = np.ones(n) if weight is None else weight
    x, y, norm, sky, weight = (_star_array(a, n, nm, np.float64) for a, nm in (
        (x, "x"), (y, "y"), (norm, "norm"), (sky, "sky"), (weight, "weight")))
    zone = _star_array(zone, n, "zone", np.int64)
    if n and zone.max() >= sums.shape[0]:
        raise ValueError(f"zone index {int(zone.max())} but the accumulators have {sums.shape[0]} zones")
    # zone by zone keeps each zone's planes in cache (1.6x faster for 121 zones); the
    # stable order adds every bin's samples in input order, so the sums are unchanged
    order = np.argsort(zone, kind="stable")
    return int(_stack(np.ascontiguousarray(image), np.ascontiguousarray(usable), x, y, norm, sky, weight, zone, order,
                      sums, counts, int(half_size), int(oversampling)))


def effective_psf(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stack mean (the pixel-convolved, "effective" PSF) and its sample count per bin.

    Parameters
    ----------
    sums, counts
        Accumulators of :func:`stack_stars` (any matching shape).

    Returns
    -------
    mean : np.ndarray
        ``sums / counts`` [fraction of the star's flux per native pixel]; NaN where
        ``counts == 0``.
    counts : np.ndarray
        A float64 copy of ``counts``.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.array(counts, dtype=np.float64)
    if sums.shape != counts.shape:
        raise ValueError(f"sums {sums.shape} and counts {counts.shape} differ in shape")
    mean = np.full(sums.shape, np.nan)
    np.divide(sums, counts, out=mean, where=counts > 0)
    return mean, counts


# --- deconvolution ---------------------------------------------------------------------
def _pixel_kernel(oversampling: int) -> np.ndarray:
    """1-d native-pixel top-hat on the oversampled grid, with end corrections.

    The stack mean in bin ``k`` is ``(1/delta) int P_c(x_k - t) box_1(t) dt`` with ``P_c``
    the PSF integrated over a bin-wide window (the product's values are its samples) and
    ``delta = 1/o`` [native pixel]. The trapezoid rule on the bin centres gives
    ``[0.5, 1, ..., 1, 0.5]`` (even ``o``: the pixel edges fall on bin centres) or ``o``
    ones (odd ``o``: the midpoint rule, edges on bin edges); the Euler-Maclaurin end
    terms ``-+ delta^2 / 12 [P_c']`` with centred differences add ``-+1/24`` one bin
    either side of each edge, which makes the second moment of the kernel exactly the
    pixel's ``1/12``. Without them ``P`` comes out narrower by ``1 / (6 o^2)`` pixel^2 in
    variance (0.2 % in FWHM at sigma = 0.65 pixel, ``o = 10``). Taps sum to ``o``.
    """
    o = int(oversampling)
    e = 1.0 / 24.0
    if o % 2:
        kern = np.ones(o + 2)
        kern[[0, -1]] = e
        kern[[1, -2]] -= e
    else:
        kern = np.ones(o + 3)
        kern[[0, -1]] = -e
        kern[[1, -2]] = 0.5
        kern[[2, -3]] += e
    return kern


def _convolution_matrix(kern: np.ndarray, n_out: int) -> np.ndarray:
    """(n_out, n_out + taps - 1) matrix of the 'valid' correlation with ``kern``."""
    taps = kern.size
    out = np.zeros((n_out, n_out + taps - 1))
    rows = np.arange(n_out)
    for t in range(taps):
        out[rows, rows + t] = kern[t]
    return out


def _second_difference(n: int) -> np.ndarray:
    """(n - 2, n) second-difference matrix."""
    out = np.zeros((n - 2, n))
    rows = np.arange(n - 2)
    out[rows, rows] = 1.0
    out[rows, rows + 1] = -2.0
    out[rows, rows + 2] = 1.0
    return out


class _Basis(NamedTuple):
    """Per-axis generalised eigenbasis of the deconvolution (see :func:`_basis`)."""

    vec: np.ndarray  # (N, N) V: P = V Z V^T
    kv: np.ndarray  # (S, N) K V: the stack model is kv Z kv^T
    mu: np.ndarray  # (N,) V^T G V, in [0, 1]
    beta: np.ndarray  # (N,) V^T B V = o^2 (1 - mu)
    k: np.ndarray  # (S, N) K, the pixel kernel: the stack model of a PSF P is K P K^T


@functools.lru_cache(maxsize=8)
def _basis(oversampling: int, s_size: int) -> _Basis:
    """Generalised eigenvectors of ``(G, C)``, ``G = D^T D``, ``C = K^T K / o^2 + G``.

    ``V^T C V = I`` and ``V^T G V = diag(mu)``, hence ``V^T K^T K V = o^2 (1 - mu)``:
    in ``Z = V^-1 P V^-T`` both the uniform-weight data term and the penalty are
    diagonal, per axis.
    """
    o = int(oversampling)
    k_mat = _convolution_matrix(_pixel_kernel(o), s_size)
    d_mat = _second_difference(k_mat.shape[1])
    g_mat = d_mat.T @ d_mat
    mu, vec = scipy.linalg.eigh(g_mat, k_mat.T @ k_mat / o**2 + g_mat)
    mu = np.clip(mu, 0.0, 1.0)  # rounding only
    out = _Basis(vec, k_mat @ vec, mu, o**2 * (1.0 - mu), k_mat)
    for a in out:
        a.flags.writeable = False
    return out


def _sandwich(left: np.ndarray, cube: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ cube[z] @ right`` for every plane, as two large matrix products."""
    z, n, m = cube.shape
    tmp = (cube.reshape(z * n, m) @ right).reshape(z, n, right.shape[1])
    # left acts on axis 1: bring it to the front so one GEMM does all planes
    out = left @ tmp.transpose(1, 0, 2).reshape(n, -1)
    return out.reshape(left.shape[0], z, right.shape[1]).transpose(1, 0, 2)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("zij,zij->z", a, b)


def _gaussian_bins(centres: np.ndarray, sigma: float, width: float) -> np.ndarray:
    """Integral of a unit 1-d Gaussian of ``sigma`` over bins of ``width`` at ``centres`` (same unit)."""
    q = math.sqrt(2.0) * sigma
    return 0.5 * (scipy.special.erf((centres + 0.5 * width) / q) - scipy.special.erf((centres - 0.5 * width) / q))


def _core_gaussian(sums: np.ndarray, counts: np.ndarray, oversampling: int, *,
                   radius: float = 1.0) -> tuple[float, float]:
    """Width [pixel] and flux [fraction of the star's] of the Gaussian which, integrated
    over native pixels, best fits the stack within ``radius`` [pixel] of its centre.

    A least-squares fit of ``A g(x) g(y)`` (``g`` a unit Gaussian integrated over one
    pixel; ``A`` is solved for at each width, so only the width is searched), weighted by
    the counts, uses every sample of the core, so that stacks of a few tens of stars
    (most bins empty) give the same width as deep ones. A FWHM read off profiles through
    the centre did not: it came out at the 0.1 or 5 pixel bounds on such stacks, which
    changed the smoothing by ``(5 / 0.1)^7`` and made the conjugate gradients run to
    their limit. The width is within 0.1-5 pixel; (1, 0) when the core has no positive
    signal.
    """
    d = (np.arange(sums.shape[-1]) - (sums.shape[-1] - 1) / 2) / oversampling  # [pixel]
    near = np.hypot(d[:, None], d[None, :]) <= radius
    s, c = np.where(near, sums, 0.0), np.where(near, counts, 0.0)
    if not (c.sum() > 0 and s.sum() > 0):
        return 1.0, 0.0

    def fit(log_sigma: float) -> tuple[float, float]:
        g = _gaussian_bins(d, math.exp(log_sigma), 1.0)
        return g @ s @ g, (g * g) @ c @ (g * g)

    def misfit(log_sigma: float) -> float:  # chi^2 less its constant part, at the best A
        cross, norm = fit(log_sigma)
        return -cross * abs(cross) / norm

    best = scipy.optimize.minimize_scalar(misfit, bounds=(math.log(0.1), math.log(5.0)), method="bounded",
                                          options={"xatol": 1e-4})
    cross, norm = fit(best.x)
    return float(math.exp(best.x)), float(cross / norm)


def _conjugate_gradients(normal: Callable[[np.ndarray, np.ndarray], np.ndarray], z: np.ndarray, rhs: np.ndarray,
                         diag: np.ndarray, stop: np.ndarray, zones: np.ndarray, *, iterations: int) -> None:
    """Solve ``normal(z, zones) = rhs`` for the planes ``zones`` of ``z`` (in place, from
    their values there) by conjugate gradients preconditioned with ``diag``, each plane
    until its squared preconditioned residual is below ``stop``."""
    resid = rhs[zones] - normal(z[zones], zones)
    direction = resid / diag[zones]
    rz = _dot(resid, direction)
    active = rz > stop[zones]
    for _ in range(iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        planes, d = zones[idx], direction[idx]
        a_d = normal(d, planes)
        alpha = (rz[idx] / _dot(d, a_d))[:, None, None]
        z[planes] += alpha * d
        res = resid[idx] - alpha * a_d
        p = res / diag[planes]
        rz_new = _dot(res, p)
        resid[idx] = res
        direction[idx] = p + (rz_new / rz[idx])[:, None, None] * d
        rz[idx] = rz_new
        active[idx] = rz_new > stop[planes]


def deconvolve_pixel(sums: np.ndarray, counts: np.ndarray, *, oversampling: int = 10, size: int | None = 101,
                     iterations: int = 1000, smoothing: float = _SMOOTHING,
                     compactness: float = _COMPACTNESS, base: np.ndarray | None = None) -> np.ndarray:
    """The optical PSF whose pixel-convolved version fits the stack.

    Parameters
    ----------
    sums, counts
        (n_zones, S, S) accumulators of :func:`stack_stars` (or one (S, S) plane).
    oversampling
        Stack bins per native pixel (the product has the same sampling).
    size
        Side of the product [oversampled bins], odd, at most the PSF's grid: the stack's
        ``S`` and one pixel kernel (``oversampling + 2`` or ``+ 3`` bins). None: the
        whole grid.
    iterations
        Most conjugate-gradient iterations; a zone stops once its relative residual is
        below 1e-6 (10-40 iterations without the compactness penalty, a few hundred with
        it, up to ~1000 for sparse stacks of narrow PSFs).
    smoothing
        Strength of the smoothness penalty (> 0, dimensionless; independent of
        ``oversampling``). With uniform counts it damps a pattern of ``f`` cycles per
        native pixel along one axis by ``1 / (1 + smoothing (w f)^4 / (sqrt(n)
        T(f)^2))``: ``n`` the mean count of a stack bin, ``w`` the PSF's width (the
        sigma [pixel] of the Gaussian that, integrated over pixels, best fits the
        stack's core: :func:`_core_gaussian`) and
        ``T(f) = sin(pi f) / (pi f)`` the pixel's transfer function. So what the pixel
        passes well is barely touched, what it cannot see (near 1, 2, ... cycles per
        pixel; bins without samples) is filled smoothly, and the same value suits PSFs
        of any width and stacks of any depth. Raise it for noisy stacks, at the price
        of a broader core (see Notes).
    compactness
        Strength of a penalty on the extent of the PSF less its core Gaussian,
        ``compactness sum (r / 1 pixel)^4 (P - P0)^2`` (>= 0, in units of the data term
        with weights of mean 1; see Notes). The pixel
        cannot see patterns periodic with one native pixel; a compact PSF can only
        contain them in the combination its Fourier neighbours imply, and this term
        picks that one instead of the zero the smoothness penalty would choose, which
        made narrow cores too wide.
    base
        (n_zones, N, N) PSF the penalties pull toward, on the PSF's grid (``S`` plus one
        pixel kernel; see :func:`deconvolve_zones`). None: the Gaussian which,
        integrated over pixels, best fits the stack's core.

    Returns
    -------
    np.ndarray
        (n_zones, size, size) float64 optical PSF, each value the PSF integrated over one
        oversampled pixel [fraction of the star's flux], centre at index
        ``(size - 1) / 2``; all-NaN for zones without samples.

    Notes
    -----
    Per zone, with ``c`` the counts, ``m = sums / c``, ``n = mean(c)`` and ``K`` the
    separable pixel kernel (:func:`_pixel_kernel`), it minimises

        ``sum_k c_k (K P K^T - m)_k^2 + lambda [tr(Q^T G Q C) + tr(Q C Q^T G)]``

    plus the compactness term, with ``Q = P - P0``, ``P0`` the Gaussian which, integrated
    over pixels, best fits the stack's core (:func:`_core_gaussian`), ``G = D^T D`` (``D``
    the second difference) and ``C = K^T K / o^2 + G``: the squared second differences
    of ``Q`` along one axis, after smoothing by the pixel along the other (plus a small
    mixed fourth-difference term), and ``lambda = smoothing sqrt(n) w^7 o^8 / (2
    pi)^4``. Two choices there are empirical. The
    penalty grows as the square root of the number of samples where the data term
    grows linearly: more stars, less smoothing, at the rate that kept the core-width
    error near its minimum from ~10 to ~400 samples per bin. And the ``w^4`` puts the
    second derivatives in units of the PSF's own width: without it the best
    ``smoothing`` differed ~100-fold between sigma = 0.45 and 1.3 pixel, with ``w^4``
    ~3-fold, and ``w^7`` (the default power) keeps the best value the same from
    sigma = 0.31 to 1.3 pixel. ``P`` lives on a grid one kernel width wider than the
    stack, so that every stack bin sees its whole kernel support.

    The penalty has this form so that the problem is diagonal in the generalised
    eigenbasis ``V`` of ``(G, C)`` when the counts are uniform: conjugate gradients in
    that basis, with the diagonal (and that of the compactness term) as
    preconditioner, converge in tens to hundreds of iterations where plain CG would
    need thousands (the pixel kernel has zeros at multiples of 1 cycle per pixel).

    Errors: the stack's noise (photon noise and, even for noise-free stars, the spread
    of the sub-pixel offsets within a bin) is amplified where the pixel transfer is
    small; the penalty trades that for a slight broadening of the core. Acting on the
    PSF less ``P0`` (an analytic core plus an empirical correction, as DAOPHOT models
    PSFs), it pulls the core toward the fitted Gaussian instead of broadening it: on
    12 full-size simulated exposures (~1100 stars per zone, sigma ~0.34 pixel) the
    zones' FWHM came out +0.7 % wide on average instead of +1.8 %, and +0.5 % instead
    of +1.6 % from their noise-free stacks. Frequencies at the pixel's zeros (1, 2,
    ... cycles per pixel) cannot be recovered at all, which matters for narrow PSFs;
    the compactness penalty fills them in. FWHM errors (x, y) at the defaults, core +
    wing PSFs: from 40 000 noise-free stars (the spread of offsets within a bin is
    their only noise) -0.7 / -1.1 % at sigma = 0.31 pixel (the simulated instrument's
    shortest wavelengths), +0.3 / -0.2 % at 0.47 and within 0.2 % at 0.7 and 1.3; from
    1000 stars with peak S/N 100-1000, mean and spread over three draws, +1.3 +- 1.3 %
    at 0.31, +0.2 +- 2.0 % at 0.47 and 0.0 +- 0.6 % at 0.7. A few hundred iterations
    converge (up to ~1000 for sparse stacks of narrow PSFs).
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    squeeze = sums.ndim == 2
    if squeeze:
        sums, counts = sums[None], counts[None]
    if sums.ndim != 3 or sums.shape != counts.shape or sums.shape[1] != sums.shape[2]:
        raise ValueError(f"need matching (n_zones, S, S) sums and counts, got {sums.shape}, {counts.shape}")
    if not smoothing > 0 or not compactness >= 0:
        raise ValueError(f"need smoothing > 0 and compactness >= 0, got {smoothing}, {compactness}")
    if np.any(counts < 0):
        raise ValueError("counts must be >= 0")
    o = int(oversampling)
    n_zones, s_size = sums.shape[0], sums.shape[1]
    basis = _basis(o, s_size)
    kv, mu, beta = basis.kv, basis.mu, basis.beta
    size = kv.shape[1] if size is None else size
    if size % 2 == 0 or size > kv.shape[1]:
        raise ValueError(f"size must be odd and at most the PSF grid's {kv.shape[1]} (stack {s_size} + "
                         f"{kv.shape[1] - s_size}), got {size}")

    mean_count = counts.reshape(n_zones, -1).mean(axis=1)
    has_data = mean_count > 0
    # the data term is divided by n (weights of mean 1), so the penalty by sqrt(n)
    n = np.where(has_data, mean_count, 1.0)[:, None, None]
    weight = counts / n
    core = np.array([_core_gaussian(sums[k], counts[k], o) if has_data[k] else (1.0, 0.0) for k in range(n_zones)])
    width = core[:, 0]
    lam = float(smoothing) * o**8 / (2.0 * math.pi) ** 4 / np.sqrt(n) * width[:, None, None] ** _WIDTH_POWER
    penalty = lam * (mu[:, None] + mu[None, :])
    r = (np.arange(basis.vec.shape[0]) - (basis.vec.shape[0] - 1) / 2) / o  # [native pixel]
    extent = float(compactness) * (r[:, None] ** 2 + r[None, :] ** 2) ** 2
    # preconditioner: the normal operator's diagonal for uniform counts, the compactness
    # term's included (without it, 2.5 times more iterations)
    v2 = basis.vec**2
    diag = beta[:, None] * beta[None, :] + penalty + v2.T @ extent @ v2

    # the matrix products in float32 (twice as fast; their rounding, ~1e-7, is well below
    # the tolerance), the iteration's vectors in float64
    kv32, vec32, weight32, extent32 = (a.astype(np.float32) for a in (kv, basis.vec, weight, extent))

    def normal(z: np.ndarray, idx: np.ndarray) -> np.ndarray:
        z32 = z.astype(np.float32)
        out = _sandwich(kv32.T, _sandwich(kv32, z32, kv32.T) * weight32[idx], kv32)
        if compactness:
            out += _sandwich(vec32.T, extent32 * _sandwich(vec32, z32, vec32.T), vec32)
        return out + penalty[idx] * z

    # the penalties act on the PSF less its core Gaussian (see Notes)
    if base is None:
        g = np.stack([_gaussian_bins(r, w, 1.0 / o) for w in width])
        base = core[:, 1, None, None] * g[:, :, None] * g[:, None, :]
    else:
        base = np.asarray(base, dtype=np.float64).reshape(n_zones, r.size, r.size)
    data = np.where(counts > 0, sums, 0.0) / n
    rhs = _sandwich(kv.T, data - weight * _sandwich(basis.k, base, basis.k.T), kv)
    full = _sandwich(kv.T, data, kv)  # the tolerance is relative to the whole PSF's
    stop = _dot(full, full / diag) * _RTOL**2
    z = rhs / diag  # the exact answer were the counts uniform
    # a few zones at a time: their working arrays stay in the cache (1.4 times faster
    # than all zones in each product)
    for first in range(0, n_zones, _ZONES_AT_ONCE):
        group = np.arange(first, min(first + _ZONES_AT_ONCE, n_zones))
        _conjugate_gradients(normal, z, rhs, diag, stop, group[has_data[group]], iterations=int(iterations))

    centre = (s_size - 1) // 2 + (kv.shape[1] - s_size) // 2
    lo = centre - (size - 1) // 2
    v_crop = basis.vec[lo:lo + size]
    out = _sandwich(v_crop, z, v_crop.T) + base[:, lo:lo + size, lo:lo + size]
    out[~has_data] = np.nan
    return out[0] if squeeze else out


# --- the PSF over the detector: core + halo model and a shared correction ---------------
@numba.njit(nogil=True, cache=True)
def _pixel_gaussian(d, sigma, out):  # pragma: no cover - compiled
    # a unit Gaussian integrated over a native pixel centred at each offset d [pixel]
    q = 1.0 / (math.sqrt(2.0) * sigma)
    for i in range(d.size):
        out[i] = 0.5 * (math.erf((d[i] + 0.5) * q) - math.erf((d[i] - 0.5) * q))


@numba.njit(nogil=True, cache=True)
def _core_halo_misfit(log_p, d, sums, counts, bin_var):  # pragma: no cover - compiled
    # chi^2 less its constant part at the best core and halo fluxes (they enter linearly,
    # neither negative), and those fluxes: the model of a stack bin is core + halo, each an
    # elliptical Gaussian integrated over a pixel and averaged over the bin (its variance
    # bin_var added)
    sx, sy, k = math.exp(log_p[0]), math.exp(log_p[1]), 1.0 + math.exp(log_p[2])
    n = d.size
    gx1, gy1, gx2, gy2 = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    _pixel_gaussian(d, math.sqrt(sx * sx + bin_var), gx1)
    _pixel_gaussian(d, math.sqrt(sy * sy + bin_var), gy1)
    _pixel_gaussian(d, math.sqrt(k * k * sx * sx + bin_var), gx2)
    _pixel_gaussian(d, math.sqrt(k * k * sy * sy + bin_var), gy2)
    b1 = b2 = m11 = m12 = m22 = 0.0
    for j in range(n):
        for i in range(n):
            c = counts[j, i]
            if c == 0.0:
                continue
            t1, t2 = gy1[j] * gx1[i], gy2[j] * gx2[i]
            b1 += t1 * sums[j, i]
            b2 += t2 * sums[j, i]
            m11 += c * t1 * t1
            m12 += c * t1 * t2
            m22 += c * t2 * t2
    # the best of the free fit and those with one flux at 0 (free fluxes of +49 and -48,
    # a halo as wide as the core, fitted a sparse stack); chi^2 less its constant part is
    # -(a1 b1 + a2 b2) at the best fluxes
    best, a1, a2 = 1e300, 0.0, 0.0
    det = m11 * m22 - m12 * m12
    if det > 1e-12 * m11 * m22:
        f1, f2 = (m22 * b1 - m12 * b2) / det, (m11 * b2 - m12 * b1) / det
        if f1 >= 0 and f2 >= 0:
            best, a1, a2 = -(f1 * b1 + f2 * b2), f1, f2
    if m11 > 0 and b1 >= 0 and -b1 * b1 / m11 < best:
        best, a1, a2 = -b1 * b1 / m11, b1 / m11, 0.0
    if m22 > 0 and b2 >= 0 and -b2 * b2 / m22 < best:
        best, a1, a2 = -b2 * b2 / m22, 0.0, b2 / m22
    return best, a1, a2


_LOG_HALF, _LOG_50 = math.log(0.5), math.log(50.0)


@numba.njit(nogil=True, cache=True)
def _core_halo_value(log_p, d, sums, counts, bin_var):  # pragma: no cover - compiled
    if abs(log_p[0] - _LOG_HALF) > _LOG_50 or abs(log_p[1] - _LOG_HALF) > _LOG_50:  # widths 0.01 to 25 pixel
        return 1e300
    return _core_halo_misfit(log_p, d, sums, counts, bin_var)[0]


@numba.njit(nogil=True, cache=True)
def _minimise_core_halo(x0, d, sums, counts, bin_var, xatol, max_evals):  # pragma: no cover - compiled
    # Nelder-Mead with the usual coefficients (reflect 1, expand 2, contract and shrink
    # 1/2), compiled with its objective: scipy's calls a Python function per step, 40 us
    # of a 60 us step, and holds the GIL while the other bands' tasks wait for it
    n = x0.size
    simplex = np.empty((n + 1, n))
    values = np.empty(n + 1)
    for i in range(n + 1):
        simplex[i] = x0
        if i > 0:
            simplex[i, i - 1] += 0.1
        values[i] = _core_halo_value(simplex[i], d, sums, counts, bin_var)
    evals = n + 1
    while True:
        order = np.argsort(values)
        simplex, values = simplex[order], values[order]
        if evals >= max_evals or (np.abs(simplex[1:] - simplex[0]).max() <= xatol
                                  and values[n] - values[0] <= 1e-12 * abs(values[0])):
            return simplex[0].copy(), values[0]
        centroid = simplex[:n].sum(axis=0) / n
        xr = 2.0 * centroid - simplex[n]
        fr = _core_halo_value(xr, d, sums, counts, bin_var)
        evals += 1
        if fr < values[0]:
            xe = 3.0 * centroid - 2.0 * simplex[n]
            fe = _core_halo_value(xe, d, sums, counts, bin_var)
            evals += 1
            simplex[n], values[n] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[n - 1]:
            simplex[n], values[n] = xr, fr
        else:
            xc = centroid + 0.5 * ((xr if fr < values[n] else simplex[n]) - centroid)
            fc = _core_halo_value(xc, d, sums, counts, bin_var)
            evals += 1
            if fc < min(fr, values[n]):
                simplex[n], values[n] = xc, fc
            else:
                for i in range(1, n + 1):
                    simplex[i] = simplex[0] + 0.5 * (simplex[i] - simplex[0])
                    values[i] = _core_halo_value(simplex[i], d, sums, counts, bin_var)
                evals += n


def fit_core_halo(sums: np.ndarray, counts: np.ndarray, *, oversampling: int,
                  start: np.ndarray | None = None) -> np.ndarray:
    """The core + halo model that, integrated over native pixels, best fits a stack.

    The model is two concentric elliptical Gaussians aligned with the detector axes: a
    core of widths ``(sigma_x, sigma_y)`` and a halo ``halo_scale`` (> 1) times wider,
    with fluxes ``core_flux`` and ``halo_flux`` [fraction of the star's flux, >= 0]. The
    widths are searched (a compiled Nelder-Mead on the logarithms of the widths and of
    ``halo_scale - 1``), the fluxes solved for at each step (weighted least squares,
    weights the counts, over every bin with samples). A stack bin
    averages offsets across its width, which the model includes (``1 / (12 o^2)`` pixel^2
    of variance, +0.4 % on the width of a 0.33-pixel core if left out).

    Parameters
    ----------
    sums, counts
        (S, S) accumulators of :func:`stack_stars`.
    oversampling
        Stack bins per native pixel.
    start
        Parameters to start from (a neighbouring zone's); None: the best of a few.

    Returns
    -------
    np.ndarray
        (5,) ``sigma_x, sigma_y`` [pixel], ``halo_scale``, ``core_flux``, ``halo_flux``;
        NaN when the stack has no samples.
    """
    sums = np.ascontiguousarray(np.where(counts > 0, sums, 0.0), dtype=np.float64)
    counts = np.ascontiguousarray(np.where(counts > 0, counts, 0.0), dtype=np.float64)
    if not counts.any():
        return np.full(5, np.nan)
    size = sums.shape[-1]
    d = (np.arange(size) - (size - 1) / 2) / oversampling
    bin_var = 1.0 / (12.0 * oversampling**2)

    if start is not None and np.all(np.isfinite(start)):
        starts = [np.log([start[0], start[1], start[2] - 1.0])]
    else:
        w, _ = _core_gaussian(sums, counts, oversampling)
        starts = [np.log([w, w, k - 1.0]) for k in (1.5, 2.5, 4.0)]
    best, _ = min((_minimise_core_halo(np.asarray(x0, np.float64), d, sums, counts, bin_var, 1e-4, 2000)
                   for x0 in starts), key=lambda r: r[1])
    _, a1, a2 = _core_halo_misfit(best, d, sums, counts, bin_var)
    sx, sy, k = np.exp(best[0]), np.exp(best[1]), 1.0 + np.exp(best[2])
    return np.array([sx, sy, k, a1, a2])


def core_halo_planes(params: np.ndarray, offsets: np.ndarray, *, oversampling: int) -> np.ndarray:
    """The core + halo model of :func:`fit_core_halo` integrated over oversampled bins.

    Parameters
    ----------
    params
        (n, 5) model parameters.
    offsets
        (P,) bin centres [native pixel].
    oversampling
        Bins per native pixel.

    Returns
    -------
    np.ndarray
        (n, P, P) fraction of the star's flux per oversampled bin (the product's layout).
    """
    params = np.atleast_2d(params)
    out = np.empty((params.shape[0], offsets.size, offsets.size))
    for z, (sx, sy, k, a1, a2) in enumerate(params):
        if not np.all(np.isfinite([sx, sy, k, a1, a2])):
            out[z] = np.nan
            continue
        gx1, gy1, gx2, gy2 = (_gaussian_bins(offsets, s, 1.0 / oversampling) for s in (sx, sy, k * sx, k * sy))
        out[z] = a1 * np.outer(gy1, gx1) + a2 * np.outer(gy2, gx2)
    return out


def smooth_over_field(values: np.ndarray, weights: np.ndarray, *, n_side: int, degree: int,
                      clip: float | None = 5.0) -> np.ndarray:
    """Values of the zones replaced by a polynomial over the detector fitted to them.

    Parameters
    ----------
    values
        (n_side^2, q) one row per zone, zones running x-fast.
    weights
        (n_side^2,) inverse variances (any scale); zones of weight 0 or non-finite values
        are left out of the fit and get its value.
    n_side
        Zones per side.
    degree
        Total degree of the polynomial in the zone's position (``u^i v^j``, ``i + j <=
        degree``); lowered until the zones used are at least twice its terms.
    clip
        Zones farther from the fit than this many robust standard deviations (1.4826
        median absolute deviations of the weighted residuals) in any column are left out
        and the fit repeated until none is: a sparse zone's fit caught in a wrong minimum
        must not bend the polynomial for all. None keeps every zone.

    Returns
    -------
    np.ndarray
        (n_side^2, q) the fitted polynomials at the zones (the input where no zone has
        weight).
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != n_side * n_side or weights.shape != (n_side * n_side,):
        raise ValueError(f"need (n_side^2 = {n_side * n_side}, q) values and (n_side^2,) weights, got "
                         f"{values.shape}, {weights.shape}")
    used = (weights > 0) & np.isfinite(weights) & np.isfinite(values).all(axis=1)
    while degree > 0 and (degree + 1) * (degree + 2) > used.sum():
        degree -= 1
    if not used.any():
        return values.copy()
    zy, zx = np.divmod(np.arange(n_side * n_side), n_side)
    u, v = (zx - (n_side - 1) / 2) / max((n_side - 1) / 2, 1), (zy - (n_side - 1) / 2) / max((n_side - 1) / 2, 1)
    design = np.column_stack([u**i * v**j for i in range(degree + 1) for j in range(degree + 1 - i)])
    root = np.sqrt(np.where(used, weights, 0.0))[:, None]
    for _ in range(10):
        coef = np.linalg.lstsq(design[used] * root[used], values[used] * root[used], rcond=None)[0]
        if clip is None:
            break
        resid = np.where(used[:, None], (values - design @ coef) * root, 0.0)
        scale = 1.4826 * np.median(np.abs(resid[used]), axis=0)
        far = used & np.any(np.abs(resid) > clip * np.where(scale > 0, scale, np.inf), axis=1)
        if not far.any() or used.sum() - far.sum() < design.shape[1] * 2:
            break
        used &= ~far
    return design @ coef


def deconvolve_zones(sums: np.ndarray, counts: np.ndarray, *, n_side: int, oversampling: int = 10,
                     degree: int = 3, size: int | None = None, **options: float) -> np.ndarray:
    """The optical PSF of every zone: a core + halo model smooth over the detector, plus
    one correction shared by the zones, deconvolved from all their stars.

    Parameters
    ----------
    sums, counts
        (n_side^2, S, S) accumulators of :func:`stack_stars`, zones running x-fast.
    n_side
        Zones per side.
    oversampling
        Stack bins per native pixel.
    degree
        Degree of the polynomials over the detector of the model's parameters
        (:func:`smooth_over_field`).
    size
        See :func:`deconvolve_pixel`.
    **options
        ``iterations``, ``smoothing``, ``compactness`` of :func:`deconvolve_pixel`.

    Returns
    -------
    np.ndarray
        (n_side^2, size, size) as :func:`deconvolve_pixel`; all-NaN for zones without
        samples.

    Notes
    -----
    As DAOPHOT's PSFs, an analytic function plus an empirical table: each zone's stack
    is fitted by :func:`fit_core_halo`; its parameters (the logarithms of the widths and
    of ``halo_scale - 1``, the halo's share and the total flux) are smoothed
    over the detector by polynomials of ``degree``, weighted by the zones' counts, as
    PSFEx models a PSF's variation. The zones' residuals from their models, pixel-convolved
    (``stack - K P0 K^T``), are added over all zones and deconvolved once
    (:func:`deconvolve_pixel`, the penalties acting on the correction, scaled by the
    band's mean width and total counts): the correction the analytic model misses is
    shared by the zones, its noise that of all their stars.

    The model carries what the pixel sees poorly, the width of a narrow core, from many
    samples per parameter; each zone deconvolved alone scattered 3 % in FWHM with ~1100
    stars per zone at sigma ~0.33 pixel, and the shared correction from all the zones'
    stars needs one deconvolution per band instead of one per zone.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    n_zones = n_side * n_side
    if sums.shape != counts.shape or sums.ndim != 3 or sums.shape[0] != n_zones:
        raise ValueError(f"need (n_side^2 = {n_zones}, S, S) sums and counts, got {sums.shape}, {counts.shape}")
    o = int(oversampling)
    weight = np.where(counts > 0, counts, 0.0).reshape(n_zones, -1).sum(axis=1)
    has_data = weight > 0
    start = fit_core_halo(sums.sum(axis=0), counts.sum(axis=0), oversampling=o)
    params = np.stack([fit_core_halo(sums[z], counts[z], oversampling=o, start=start) if has_data[z]
                       else np.full(5, np.nan) for z in range(n_zones)])
    sx, sy, k, a1, a2 = params.T
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = smooth_over_field(np.column_stack([np.log(sx), np.log(sy), np.log(k - 1.0), a2 / (a1 + a2), a1 + a2]),
                                   weight, n_side=n_side, degree=degree)
    total = smooth[:, 4]
    params = np.column_stack([np.exp(smooth[:, 0]), np.exp(smooth[:, 1]), 1.0 + np.exp(smooth[:, 2]),
                              total * (1.0 - smooth[:, 3]), total * smooth[:, 3]])
    basis = _basis(o, sums.shape[1])
    grid = basis.vec.shape[0]
    base = core_halo_planes(params, (np.arange(grid) - (grid - 1) / 2) / o, oversampling=o)
    base[~has_data] = 0.0
    model = _sandwich(basis.k, base, basis.k.T)
    good = counts > 0
    residual = np.where(good, sums - counts * model, 0.0).sum(axis=0)
    total_counts = np.where(good, counts, 0.0).sum(axis=0)
    reference = np.tensordot(weight / weight.sum(), base, axes=1) if has_data.any() else base[0]
    psf = deconvolve_pixel(residual + total_counts * (basis.k @ reference @ basis.k.T), total_counts,
                           oversampling=o, size=None, base=reference, **options)
    out = base + (psf - reference)
    out[~has_data] = np.nan
    if size is None:
        return out
    if size % 2 == 0 or size > grid:
        raise ValueError(f"size must be odd and at most the PSF grid's {grid}, got {size}")
    lo = (grid - size) // 2
    return out[:, lo:lo + size, lo:lo + size]


# --- measurement -----------------------------------------------------------------------
def _profile_fwhm(profile: np.ndarray) -> float:
    """FWHM [bins] of a 1-d peaked profile (around its brightest bin): half-maximum
    crossings of a cubic spline."""
    peak_i = int(np.nanargmax(profile))
    finite = np.isfinite(profile)
    # the contiguous finite run around the peak
    lo = peak_i
    while lo > 0 and finite[lo - 1]:
        lo -= 1
    hi = peak_i
    while hi < profile.size - 1 and finite[hi + 1]:
        hi += 1
    if hi - lo < 3:
        return math.nan
    pos = np.arange(lo, hi + 1, dtype=np.float64)
    spline = CubicSpline(pos, profile[lo:hi + 1])
    cand = [float(peak_i)] + [r for r in spline.derivative().roots(extrapolate=False) if abs(r - peak_i) <= 1.0]
    vals = spline(np.asarray(cand))
    x_peak = cand[int(np.argmax(vals))]
    half = 0.5 * float(np.max(vals))
    if not half > 0:
        return math.nan
    cross = spline.solve(half, extrapolate=False)
    left = cross[cross < x_peak]
    right = cross[cross > x_peak]
    if left.size == 0 or right.size == 0:
        return math.nan
    return float(right.min() - left.max())


def psf_fwhm_2d(psf: np.ndarray, *, oversampling: int = 10) -> tuple[float, float]:
    """FWHM of a PSF plane along x and y [native pixel].

    Parameters
    ----------
    psf
        (P, P) oversampled PSF plane (any normalisation).
    oversampling
        Bins per native pixel.

    Returns
    -------
    (fwhm_x, fwhm_y) : tuple of float
        Distance between the half-maximum crossings of the row and of the column through
        the brightest bin, each interpolated by a cubic spline (the peak is the spline's
        maximum within one bin of the brightest): errors scale as the 4th power of the
        bin width, far below 1e-4 relative for the archive's 0.1-pixel bins. NaN where a
        profile does not fall below half its peak on both sides. Of the tabulated
        values, i.e. of the bin-integrated PSF (wider than the PSF by ~``1 / (24 o^2
        sigma^2)``).
    """
    plane = np.asarray(psf, dtype=np.float64)
    if plane.ndim != 2:
        raise ValueError(f"psf must be a 2-d plane, got shape {plane.shape}")
    if not np.isfinite(plane).any():
        return math.nan, math.nan
    j0, i0 = np.unravel_index(int(np.nanargmax(plane)), plane.shape)
    return _profile_fwhm(plane[j0, :]) / oversampling, _profile_fwhm(plane[:, i0]) / oversampling
