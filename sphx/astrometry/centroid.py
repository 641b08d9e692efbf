"""Stars in an image: peak detection and PSF-fitted centroids (numba).

SPHEREx pixels (6.15") undersample the PSF (FWHM about 5" in the blue): a first-moment
centroid is pulled toward the centre of the brightest pixel by up to a quarter pixel.
:func:`fit_centroids` therefore fits every star with a circular Gaussian integrated
over the pixels (error functions) plus a constant background, by Gauss-Newton on a
small stamp weighted by the inverse variance; the fitted width absorbs the PSF's
variation over the detector and with wavelength. Flagged and NaN pixels get zero
weight. The formal errors come from the normal matrix scaled by the reduced chi-square
when that exceeds one.

:func:`find_peaks` lists local maxima above a signal-to-noise threshold over a
background of 64-pixel block medians, the bright end of which feeds the blind pattern
match.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..kernels.select import median

__all__ = ["FIT_FIELDS", "background_blocks", "find_peaks", "fit_centroids"]

# columns of fit_centroids' output
FIT_FIELDS = ("x", "y", "flux", "sigma", "background", "x_error", "y_error", "flux_error", "chi2", "status")
X, Y, FLUX, SIGMA, BACKGROUND, X_ERROR, Y_ERROR, FLUX_ERROR, CHI2, STATUS = range(len(FIT_FIELDS))
# fit status
OK, NO_DATA, FLAGGED_CORE, NOT_CONVERGED, MOVED = 0, 1, 2, 3, 4
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_BLOCK = 64


@numba.njit(nogil=True, cache=True)
def background_blocks(image, flags, bad):  # pragma: no cover - compiled
    """Median of the good pixels of every 64 x 64 block (NaN where a block has none)."""
    ny, nx = image.shape
    by, bx = (ny + _BLOCK - 1) // _BLOCK, (nx + _BLOCK - 1) // _BLOCK
    out = np.full((by, bx), np.nan)
    buf = np.empty(_BLOCK * _BLOCK, np.float32)
    for j in range(by):
        for i in range(bx):
            n = 0
            for y in range(j * _BLOCK, min(ny, (j + 1) * _BLOCK)):
                for x in range(i * _BLOCK, min(nx, (i + 1) * _BLOCK)):
                    v = image[y, x]
                    if (flags[y, x] & bad) == 0 and math.isfinite(v):
                        buf[n] = v
                        n += 1
            if n:
                out[j, i] = median(buf[:n])
    return out


@numba.njit(nogil=True, cache=True)
def find_peaks(image, variance, flags, bad, threshold, border):  # pragma: no cover - compiled
    """Local maxima whose height over the block background exceeds ``threshold`` sigma.

    Parameters
    ----------
    image, variance
        2-d float arrays; variance in the image's unit squared.
    flags, bad
        FLAGS and the bits that make a pixel unusable (it is never a peak).
    threshold
        Signal-to-noise of the peak pixel over the background.
    border
        Pixels within this distance of the edge are not searched.

    Returns
    -------
    x, y : int64 arrays
        Peak pixel indices.
    height : float64 array
        Peak value minus the background [image unit].
    """
    ny, nx = image.shape
    bg = background_blocks(image, flags, bad)
    xs = np.empty(4096, np.int64)
    ys = np.empty(4096, np.int64)
    hs = np.empty(4096, np.float64)
    n = 0
    for y in range(border, ny - border):
        for x in range(border, nx - border):
            v = image[y, x]
            if not math.isfinite(v) or (flags[y, x] & bad) != 0:
                continue
            b = bg[y // _BLOCK, x // _BLOCK]
            var = variance[y, x]
            if not (var > 0 and v - b > threshold * math.sqrt(var)):
                continue
            peak = True
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    if dy == 0 and dx == 0:
                        continue
                    w = image[y + dy, x + dx]
                    # ties go to the first pixel in scan order
                    if w > v or (w == v and (dy < 0 or (dy == 0 and dx < 0))):
                        peak = False
            if not peak:
                continue
            if n == xs.size:
                xs = np.concatenate((xs, np.empty(n, np.int64)))
                ys = np.concatenate((ys, np.empty(n, np.int64)))
                hs = np.concatenate((hs, np.empty(n, np.float64)))
            xs[n], ys[n], hs[n] = x, y, v - b
            n += 1
    return xs[:n], ys[:n], hs[:n]


@numba.njit(inline="always")
def _pixel_integral(centre, lo, sigma):
    """Integral of a unit Gaussian over [lo, lo + 1], and its derivatives in centre and sigma."""
    s2 = _SQRT2 * sigma
    a, b = (lo - centre), (lo + 1.0 - centre)
    value = 0.5 * (math.erf(b / s2) - math.erf(a / s2))
    ga = _INV_SQRT_2PI / sigma * math.exp(-0.5 * (a / sigma) ** 2)
    gb = _INV_SQRT_2PI / sigma * math.exp(-0.5 * (b / sigma) ** 2)
    d_centre = ga - gb
    d_sigma = -(b * gb - a * ga) / sigma
    return value, d_centre, d_sigma


@numba.njit(nogil=True, cache=True)
def _solve(matrix, rhs):  # pragma: no cover - compiled
    """Solve ``matrix @ x = rhs`` (rhs may have several columns) by Gaussian elimination with
    partial pivoting; ``ok`` is False for a singular matrix."""
    n = matrix.shape[0]
    m = matrix.copy()
    x = rhs.copy()
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(m[r, c]) > abs(m[p, c]):
                p = r
        if not abs(m[p, c]) > 1e-300:
            return x, False
        if p != c:
            for k in range(n):
                m[c, k], m[p, k] = m[p, k], m[c, k]
            for k in range(x.shape[1]):
                x[c, k], x[p, k] = x[p, k], x[c, k]
        for r in range(n):
            if r != c:
                f = m[r, c] / m[c, c]
                for k in range(c, n):
                    m[r, k] -= f * m[c, k]
                for k in range(x.shape[1]):
                    x[r, k] -= f * x[c, k]
    for c in range(n):
        for k in range(x.shape[1]):
            x[c, k] /= m[c, c]
    return x, True


@numba.njit(nogil=True, cache=True, error_model="numpy")
def fit_centroids(image, variance, flags, bad, core_bad, x0, y0, half, sigma0, max_shift):  # pragma: no cover
    """PSF-fitted positions of stars near ``(x0, y0)``.

    Parameters
    ----------
    image, variance, flags
        The image [any unit], its variance [unit^2] and FLAGS.
    bad
        Bits that give a pixel zero weight.
    core_bad
        Bits that reject the star when set within one pixel of its peak (saturation,
        non-linearity: the profile there is not the PSF's).
    x0, y0
        First guesses [pixel, 0-based array indices].
    half
        Stamp half-size [pixel]: the fit uses (2 half + 1)^2 pixels around the guess.
    sigma0
        Starting Gaussian width [pixel].
    max_shift
        Fits that end farther than this from the guess are rejected [pixel].

    Returns
    -------
    numpy.ndarray
        (n, len(FIT_FIELDS)) float64; ``status`` 0 marks a good fit.
    """
    ny, nx = image.shape
    out = np.full((x0.size, len(FIT_FIELDS)), np.nan)
    size = 2 * half + 1
    px = np.empty((size, 3))
    py = np.empty((size, 3))
    for s in range(x0.size):
        cx, cy = math.floor(x0[s] + 0.5), math.floor(y0[s] + 0.5)
        out[s, STATUS] = NO_DATA
        if cx - half < 0 or cy - half < 0 or cx + half >= nx or cy + half >= ny:
            continue
        flagged = False
        lo_v = np.inf
        hi_v = -np.inf
        n_good = 0
        for j in range(-half, half + 1):
            for i in range(-half, half + 1):
                f = flags[cy + j, cx + i]
                if abs(i) <= 1 and abs(j) <= 1 and (f & core_bad) != 0:
                    flagged = True
                v = image[cy + j, cx + i]
                if (f & bad) == 0 and math.isfinite(v) and variance[cy + j, cx + i] > 0:
                    n_good += 1
                    lo_v = min(lo_v, v)
                    hi_v = max(hi_v, v)
        if flagged:
            out[s, STATUS] = FLAGGED_CORE
            continue
        if n_good < 9:
            continue
        # parameters: x, y, flux, sigma, background
        p = np.array([x0[s], y0[s], 0.0, sigma0, lo_v])
        p[2] = max(hi_v - lo_v, 0.0) * 2.0 * math.pi * sigma0 * sigma0 + 1e-30
        converged = False
        normal = np.zeros((5, 5))
        chi2 = 0.0
        for _ in range(30):
            for k in range(size):
                px[k, 0], px[k, 1], px[k, 2] = _pixel_integral(p[0], cx - half + k - 0.5, p[3])
                py[k, 0], py[k, 1], py[k, 2] = _pixel_integral(p[1], cy - half + k - 0.5, p[3])
            normal[:] = 0.0
            rhs = np.zeros(5)
            chi2 = 0.0
            for j in range(size):
                for i in range(size):
                    f = flags[cy - half + j, cx - half + i]
                    v = image[cy - half + j, cx - half + i]
                    var = variance[cy - half + j, cx - half + i]
                    if (f & bad) != 0 or not math.isfinite(v) or not var > 0:
                        continue
                    w = 1.0 / var
                    g = px[i, 0] * py[j, 0]
                    r = v - (p[2] * g + p[4])
                    d = (p[2] * px[i, 1] * py[j, 0], p[2] * px[i, 0] * py[j, 1], g,
                         p[2] * (px[i, 2] * py[j, 0] + px[i, 0] * py[j, 2]), 1.0)
                    for a in range(5):
                        rhs[a] += w * d[a] * r
                        for b in range(a, 5):
                            normal[a, b] += w * d[a] * d[b]
                    chi2 += w * r * r
            for a in range(5):
                for b in range(a):
                    normal[a, b] = normal[b, a]
            damped = normal.copy()
            for a in range(5):
                damped[a, a] *= 1.0 + 1e-3
            solution, ok = _solve(damped, rhs.reshape(5, 1))
            if not ok:  # singular: no star here
                break
            step = solution[:, 0]
            # keep the width physical and the steps small while far from the solution
            shift = math.hypot(step[0], step[1])
            if shift > 0.5:
                step *= 0.5 / shift
            p += step
            p[3] = min(max(p[3], 0.15), 4.0)
            if shift < 1e-5 and abs(step[3]) < 1e-5:
                converged = True
                break
        out[s, STATUS] = NOT_CONVERGED
        if not converged:
            continue
        dof = n_good - 5
        scale = max(chi2 / dof, 1.0) if dof > 0 else 1.0
        cov, ok = _solve(normal, np.eye(5))
        if not ok:
            continue
        out[s, X], out[s, Y], out[s, FLUX], out[s, SIGMA], out[s, BACKGROUND] = p[0], p[1], p[2], p[3], p[4]
        out[s, X_ERROR] = math.sqrt(max(cov[0, 0], 0.0) * scale)
        out[s, Y_ERROR] = math.sqrt(max(cov[1, 1], 0.0) * scale)
        out[s, FLUX_ERROR] = math.sqrt(max(cov[2, 2], 0.0) * scale)
        out[s, CHI2] = chi2 / dof if dof > 0 else np.nan
        moved = math.hypot(p[0] - x0[s], p[1] - y0[s])
        out[s, STATUS] = MOVED if moved > max_shift else OK
    return out
