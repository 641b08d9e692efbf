"""Kernels of Estimate Dark Current and Flat Field: per-pixel regression on a reference flux.

Each pixel's value ``y`` [electron/s] in image ``k`` is fitted as
``y = D + G x_k(u)``, where ``x_k(u)`` is the reference flux of the pixel's spectral
channel in that image: medians of the channel's pixels (dark subtracted and divided by
the prior flat) in
``n_segments`` stretches along the channel, fitted by a polynomial in the position
``u`` along the channel (degree 1 is the paper's median plus tilt from solar
elongation). Over many images the slope ``G`` is the pixel's response relative to the
channel's typical pixel (the flat field) and the intercept ``D`` its dark current.

The fit is a weighted least-squares fit from seven sums per pixel
(:data:`N_SUMS`: ``n, w, wx, wy, wxx, wxy, wyy``), which one image or a batch of
images produces and which add up over any number of batches, in any order (a tree
reduction). Samples more than ``clip`` standard deviations from a prior model
``D0 + G0 x`` (the previous calibration, or a first pass) are left out.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["N_SUMS", "SUM_NAMES", "accumulate_images", "channel_keys", "key_order", "reference_fluxes", "solve_sums"]

SUM_NAMES = ("n", "w", "wx", "wy", "wxx", "wxy", "wyy")
N_SUMS = len(SUM_NAMES)


def channel_keys(cwave: np.ndarray, *, n_channels: int, n_segments: int,
                 excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectral channel and segment of every pixel, and the position along its channel.

    Parameters
    ----------
    cwave
        (ny, nx) central wavelength of every pixel [um] (NaN: no wavelength).
    n_channels
        Channels per band: equal steps in log wavelength between the band's extremes.
    n_segments
        Stretches per channel along x, each giving one median.
    excluded
        (ny, nx) bool, pixels never used (key -1).

    Returns
    -------
    key
        (ny, nx) int64 ``channel * n_segments + segment``, -1 where excluded.
    u
        (ny, nx) float64 position along the channel, -1 at its first column and +1 at
        its last.
    segment_u
        (n_channels * n_segments,) mean ``u`` of each key's pixels (NaN if none).
    """
    lam = np.asarray(cwave, dtype=np.float64)
    ny, nx = lam.shape
    good = np.isfinite(lam) & (lam > 0)
    if excluded is not None:
        good &= ~np.asarray(excluded, dtype=bool)
    lo, hi = np.log(lam[good].min()), np.log(lam[good].max())
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (np.log(lam) - lo) / max(hi - lo, 1e-12)
    channel = np.clip(np.floor(frac * n_channels), 0, n_channels - 1)
    u = np.broadcast_to(np.linspace(-1.0, 1.0, nx)[None, :], (ny, nx))
    segment = np.clip(np.floor((u + 1.0) / 2.0 * n_segments), 0, n_segments - 1)
    key = np.where(good, channel * n_segments + segment, -1).astype(np.int64)
    n_keys = n_channels * n_segments
    counts = np.bincount(key[good], minlength=n_keys)
    with np.errstate(invalid="ignore"):
        segment_u = np.bincount(key[good], weights=u[good], minlength=n_keys) / counts
    return key, np.ascontiguousarray(u), segment_u


@numba.njit(nogil=True, cache=True)
def _group_medians(values, ok, order, starts, out_median, out_count):  # pragma: no cover - compiled
    buf = np.empty(order.size, np.float64)
    for g in range(starts.size - 1):
        k = 0
        for t in range(starts[g], starts[g + 1]):
            p = order[t]
            if ok[p]:
                buf[k] = values[p]
                k += 1
        out_count[g] = k
        out_median[g] = np.median(buf[:k]) if k > 0 else np.nan


@numba.njit(nogil=True, cache=True)
def _fit_channels(medians, counts, segment_u, n_segments, degree, min_pixels, coef):  # pragma: no cover
    n_channels = coef.shape[0]
    m = degree + 1
    for c in range(n_channels):
        ata = np.zeros((m, m))
        atb = np.zeros(m)
        used = 0
        for s in range(n_segments):
            g = c * n_segments + s
            if counts[g] < min_pixels or not np.isfinite(medians[g]):
                continue
            used += 1
            w = float(counts[g])
            for i in range(m):
                ui = segment_u[g] ** i
                atb[i] += w * ui * medians[g]
                for j in range(m):
                    ata[i, j] += w * ui * segment_u[g] ** j
        if used < m:
            coef[c, :] = np.nan
        else:
            coef[c, :] = np.linalg.solve(ata, atb)


def reference_fluxes(image: np.ndarray, usable: np.ndarray, key: np.ndarray, segment_u: np.ndarray, *,
                     n_segments: int, degree: int = 1, min_pixels: int = 20,
                     order: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Polynomial coefficients of each channel's reference flux along ``u``.

    Parameters
    ----------
    image
        (ny, nx) values with the dark subtracted [electron/s].
    usable
        (ny, nx) bool: pixels that may enter the medians (no sources, no bad pixels).
    key, segment_u
        From :func:`channel_keys`.
    n_segments, degree
        Segments per channel and degree of the polynomial in ``u`` through their medians.
    min_pixels
        A segment with fewer usable pixels gives no median.
    order
        ``(order, starts)``: pixels sorted by key and where each key starts (computed
        when not given; pass it to reuse across images).

    Returns
    -------
    (n_channels, degree + 1) float64 coefficients, lowest power first; NaN rows for
    channels with fewer than ``degree + 1`` segments.
    """
    flat_key = key.ravel()
    if order is None:
        order = key_order(flat_key, segment_u.size)
    idx, starts = order
    values = np.ascontiguousarray(image, dtype=np.float64).ravel()
    ok = (np.asarray(usable, dtype=bool) & np.isfinite(image)).ravel()
    medians = np.empty(segment_u.size)
    counts = np.empty(segment_u.size, np.int64)
    _group_medians(values, ok, idx, starts, medians, counts)
    coef = np.empty((segment_u.size // n_segments, degree + 1))
    _fit_channels(medians, counts, np.nan_to_num(segment_u), n_segments, degree, min_pixels, coef)
    return coef


def key_order(flat_key: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """All pixel indices sorted by key and where each key starts.

    Excluded pixels (key -1) sort first and belong to no key; the arrays have the same
    size for every detector, so those of several bands stack.
    """
    idx = np.argsort(flat_key, kind="stable")
    starts = np.searchsorted(flat_key[idx], np.arange(n_keys + 1))
    return idx.astype(np.int64), starts.astype(np.int64)


@numba.njit(nogil=True, cache=True)
def _accumulate(image, variance, fit_ok, key, u, coef, weight, dark0, gain0, clip, n_segments, sums):  # pragma: no cover
    ny, nx = image.shape
    m = coef.shape[1]
    for j in range(ny):
        for i in range(nx):
            k = key[j, i]
            if k < 0 or not fit_ok[j, i]:
                continue
            c = k // n_segments
            w = weight[c]
            y = np.float64(image[j, i])
            if not (w > 0) or not np.isfinite(y) or not np.isfinite(coef[c, 0]):
                continue
            x = 0.0
            for p in range(m - 1, -1, -1):
                x = x * u[j, i] + coef[c, p]
            r = y - (dark0[j, i] + gain0[j, i] * x)
            v = np.float64(variance[j, i])
            if not (r * r <= clip * clip * v):  # also drops NaN variance
                continue
            sums[0, j, i] += 1.0
            sums[1, j, i] += w
            sums[2, j, i] += w * x
            sums[3, j, i] += w * y
            sums[4, j, i] += w * x * x
            sums[5, j, i] += w * x * y
            sums[6, j, i] += w * y * y


def accumulate_images(images: np.ndarray, variances: np.ndarray, fit_ok: np.ndarray, ref_ok: np.ndarray, *,
                      key: np.ndarray, u: np.ndarray, segment_u: np.ndarray, dark0: np.ndarray,
                      gain0: np.ndarray, n_segments: int, degree: int = 1, clip: float = 5.0,
                      min_pixels: int = 20, order: tuple[np.ndarray, np.ndarray] | None = None,
                      sums: np.ndarray | None = None) -> np.ndarray:
    """Regression sums of a batch of images of one detector.

    Parameters
    ----------
    images, variances
        (k, ny, nx) values [electron/s] and their variances [(electron/s)^2].
    fit_ok, ref_ok
        (k, ny, nx) bool: samples that may enter the fit, and pixels that may enter the
        reference medians.
    key, u, segment_u
        From :func:`channel_keys`.
    dark0, gain0
        (ny, nx) prior dark [electron/s] and relative response: the reference is
        measured on ``(image - dark0) / gain0`` and samples farther than ``clip``
        standard deviations (square root of ``variances``) from ``dark0 + gain0 x`` are
        left out.
    n_segments, degree, min_pixels, order
        See :func:`reference_fluxes` (``order`` from :func:`key_order`, computed when
        not given).
    sums
        (N_SUMS, ny, nx) float64 to add to in place (new zeros when None).

    Returns
    -------
    (N_SUMS, ny, nx) float64 sums, in the order of :data:`SUM_NAMES`. Each sample is
    weighted by the inverse of the mean variance of its channel in its image, which
    is free of the pixel's own noise (weights from a pixel's own variance would bias the
    fit toward its low values).
    """
    k, ny, nx = images.shape
    if sums is None:
        sums = np.zeros((N_SUMS, ny, nx))
    if order is None:
        order = key_order(key.ravel(), segment_u.size)
    n_channels = segment_u.size // n_segments
    channel = np.where(key >= 0, key // n_segments, n_channels)
    d0 = np.nan_to_num(np.asarray(dark0, dtype=np.float64))
    g0 = np.nan_to_num(np.asarray(gain0, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(g0 > 0, 1.0 / g0, np.nan)
    for b in range(k):
        image = images[b]
        # Measured on the image flat-fielded with the prior: the fitted tilt cannot tell a
        # gradient of the flat along the channel from the zodiacal light's, so the prior
        # sets the flat's large-scale shape along each channel and the sky the rest.
        coef = reference_fluxes((image - d0) * inverse, ref_ok[b], key, segment_u, n_segments=n_segments,
                                degree=degree, min_pixels=min_pixels, order=order)
        use = ref_ok[b] & np.isfinite(variances[b]) & (key >= 0)
        var_sum = np.bincount(channel[use], weights=variances[b][use], minlength=n_channels + 1)[:n_channels]
        var_n = np.bincount(channel[use], minlength=n_channels + 1)[:n_channels]
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = np.where(var_n > 0, var_n / var_sum, 0.0)
        _accumulate(image, variances[b], fit_ok[b], key, u, coef, weight, d0, g0, float(clip), n_segments, sums)
    return sums


def solve_sums(sums: np.ndarray, *, min_samples: int = 3, dark_prior: np.ndarray | None = None,
               dark_prior_err: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Dark, flat and their uncertainties from the regression sums.

    Parameters
    ----------
    sums
        (N_SUMS, ...) from :func:`accumulate_images`, summed over all batches.
    min_samples
        Pixels with fewer samples get NaN.
    dark_prior, dark_prior_err
        An independent measurement of the dark [electron/s] (a dark-frame calibration)
        and its 1-sigma error: it enters as one more sample at zero reference flux with
        weight ``1 / dark_prior_err**2``. The sky alone constrains the intercept poorly
        (the reference flux never reaches zero), so the prior mostly sharpens the slope.

    Returns
    -------
    dict
        ``dark`` (intercept) [electron/s], ``flat`` (slope), ``dark_err``, ``flat_err``
        (1 sigma, scaled by the reduced chi-square of the pixel's own fit, so that they
        hold for pixels noisier than the weights assume), ``chi2`` (reduced
        chi-square) and ``n`` (samples used).
    """
    n, w, wx, wy, wxx, wxy, wyy = (np.asarray(s, dtype=np.float64) for s in sums)
    if dark_prior is not None and dark_prior_err is not None:
        with np.errstate(divide="ignore"):
            p = np.where(dark_prior_err > 0, 1.0 / np.asarray(dark_prior_err, np.float64) ** 2, 0.0)
        d0 = np.nan_to_num(np.asarray(dark_prior, np.float64))
        p = np.where(np.isfinite(p), p, 0.0)
        w, wy, wyy = w + p, wy + p * d0, wyy + p * d0 * d0
    with np.errstate(invalid="ignore", divide="ignore"):
        det = w * wxx - wx * wx
        slope = (w * wxy - wx * wy) / det
        intercept = (wxx * wy - wx * wxy) / det
        resid = wyy - 2 * slope * wxy - 2 * intercept * wy + slope**2 * wxx + 2 * slope * intercept * wx \
            + intercept**2 * w
        chi2 = np.maximum(resid, 0.0) / (n - 2)
        ok = (n >= max(min_samples, 3)) & (det > 0)
        out = {
            "dark": intercept, "flat": slope,
            "dark_err": np.sqrt(chi2 * wxx / det), "flat_err": np.sqrt(chi2 * w / det),
            "chi2": chi2,
        }
    out = {k: np.where(ok, v, np.nan) for k, v in out.items()}
    out["n"] = n
    return out
