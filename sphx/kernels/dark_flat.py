"""Kernels of Estimate Dark Current and Flat Field: per-pixel regression on a reference flux.

Each pixel's value ``y`` [electron/s] in image ``k`` is fitted as
``y = D + G x_k(u)``, where ``x_k(u)`` is the reference flux of the pixel's spectral
channel in that image: medians of the channel's pixels (dark subtracted and divided by
the prior flat) in
``n_segments`` stretches along the channel, fitted by a polynomial in the position
``u`` along the channel (degree 1 is the paper's median plus tilt from solar
elongation). Over many images the slope ``G`` is the pixel's response relative to the
channel's typical pixel (the flat field) and the intercept ``D`` its dark current.

The fit is a weighted least-squares fit from nine sums per pixel
(:data:`N_SUMS`: ``n, w, wx, wy, wxx, wxy, wyy, wvx, wcxy``), which one image or a batch
of images produces and which add up over any number of batches, in any order. Samples
more than ``clip`` standard deviations from a prior model ``D0 + G0 x`` (the previous
calibration, or a first pass) are left out.

**Errors in the reference.** The reference is itself measured: the median of the ``N``
pixels of a segment has the noise variance ``V = (pi/2) / (N mean(1/sigma)**2) * N / (N + a)``
(``sigma`` the pixels' noise in reference units; ``a`` = 0.47 for odd ``N``, 1.4 for even,
the finite-sample correction of a median of normal deviates), and the pixel's own noise
``e`` enters its own segment's median: ``cov(median, e) = sigma_pixel / sum(1/sigma)``
(exactly ``sigma**2 / N`` for equal normal noise). Propagated through the polynomial
along the channel these give, per sample, the variance ``v_x`` of the reference and its
covariance ``c_xy`` with the pixel's value; ``wvx = sum(w v_x)`` and
``wcxy = sum(w c_xy)`` are subtracted from ``wxx`` and ``wxy`` before solving (a
moment, or Deming, correction). Without them the slope is diluted by
``(G v_x - c_xy) / var(x)`` and the intercept pulled by the same amount times the mean
reference: negligible with thousands of pixels per segment, a fraction of the dark's
error with ~30 (a 248-pixel detector with 510 channels of 4 segments) where the sky is
faint. The pixel's own share ``c_xy`` offsets about 2/pi of ``G v_x``, so both are
needed. Where the reference's noise is most of its variance across the images (few
images of a sky that barely changes) the correction is capped (:func:`solve_sums`).
"""

from __future__ import annotations

import numba
import numpy as np

from .select import median

__all__ = ["N_SUMS", "SUM_NAMES", "accumulate_images", "channel_keys", "key_starts", "median_variance",
           "reference_fluxes", "reference_sample", "sampled_segments", "solve_sums"]

SUM_NAMES = ("n", "w", "wx", "wy", "wxx", "wxy", "wyy", "wvx", "wcxy")
N_SUMS = len(SUM_NAMES)

# N var(median) / (pi/2 sigma^2) = N / (N + a) for N normal deviates (Monte Carlo, 1e6 draws):
# a = 0.47 for odd N, 1.4 for even N (the median of two middle values); a -> const as N -> inf
_MEDIAN_A_ODD, _MEDIAN_A_EVEN = 0.47, 1.4


def median_variance(n: np.ndarray, inv_sigma_sum: np.ndarray) -> np.ndarray:
    """Noise variance of the median of ``n`` values with independent normal errors.

    ``inv_sigma_sum`` is ``sum(1 / sigma)`` over the values: asymptotically
    ``var = 1 / (4 n f(0)**2)`` with the mixture density ``f(0) = mean(1/sigma) / sqrt(2 pi)``,
    that is ``(pi/2) n / inv_sigma_sum**2`` (``(pi/2) sigma**2 / n`` for equal errors),
    times the finite-sample factor ``n / (n + a)``. NaN where ``n`` is 0.
    """
    n = np.asarray(n, dtype=np.float64)
    a = np.where(n % 2 == 1, _MEDIAN_A_ODD, _MEDIAN_A_EVEN)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 0.5 * np.pi * n / np.asarray(inv_sigma_sum, np.float64) ** 2 * n / (n + a), np.nan)


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


@numba.njit(inline="always")
def _prior(dark, gain):  # pragma: no cover - compiled
    # the prior dark (NaN: 0), flat (NaN: 0) and the flat's inverse (NaN where not positive)
    d = dark if np.isfinite(dark) else 0.0
    g = gain if np.isfinite(gain) else 0.0
    return d, g, 1.0 / g if g > 0 else np.nan


_BLOCK = 64  # pixels of a row taken or left together by the reference's sample


@numba.njit(inline="always")
def _in_sample(j, i, sample):  # pragma: no cover - compiled
    # one block of _BLOCK pixels in ``sample`` along each row, staggered from row to row:
    # every row of a channel (a few rows tall, its wavelength changing across them) is
    # represented alike, which every sample-th row would not be
    return (j + i // _BLOCK) % sample == 0


def reference_sample(shape: tuple[int, int], sample: int) -> np.ndarray:
    """(ny, nx) bool: the pixels the reference medians take (one in ``sample``, in
    blocks of 64 along each row, staggered from row to row)."""
    j, i = np.indices(shape)
    return (j + i // _BLOCK) % sample == 0


def sampled_segments(key: np.ndarray, u: np.ndarray, *, n_keys: int, sample: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the medians of a reference sample lie and how many pixels they take.

    Returns
    -------
    segment_u
        (n_keys,) mean ``u`` of each key's sampled pixels (NaN if none): a median lies
        where its pixels do (the sample's blocks do not centre on the segment's).
    starts
        :func:`key_starts` of the sampled pixels.
    """
    taken = reference_sample(key.shape, sample) & (key >= 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        segment_u = (np.bincount(key[taken], weights=u[taken], minlength=n_keys)
                     / np.bincount(key[taken], minlength=n_keys))
    return segment_u, key_starts(key[taken], n_keys)


@numba.njit(nogil=True, cache=True)
def _channel_stats(image, variance, flags, ref_mask, key, dark, gain, starts, n_segments, sample, nx, buf,
                   out_median, out_count, out_inv_sigma_sum, out_weight):  # pragma: no cover - compiled
    # Per key: the median, number and sum of 1/sigma (sigma = sqrt(variance) / gain, the
    # noise of the values) of the reference values (image - dark) / gain of the usable
    # pixels (flags & ref_mask == 0, finite value) of the sample (_in_sample); the sum is
    # scaled up from the pixels with a usable variance to all of them. Per channel: the
    # fit weight, the inverse of the mean variance of its usable pixels. One sequential
    # pass drops each value into its key's stretch of ``buf`` (pixel order within a key,
    # as a stable sort by key).
    n_keys = starts.size - 1
    var_sum = np.zeros(n_keys)
    var_n = np.zeros(n_keys)
    fill = np.zeros(n_keys, np.int64)
    known = np.zeros(n_keys, np.int64)
    s = np.zeros(n_keys)
    for j in range(image.size // nx):
        for block in range((sample - j % sample) % sample, -(-nx // _BLOCK), sample):  # _in_sample
            p0 = j * nx + block * _BLOCK
            for p in range(p0, p0 + min(_BLOCK, nx - block * _BLOCK)):
                g = key[p]
                if g < 0 or flags[p] & ref_mask:
                    continue
                v = np.float64(variance[p])
                if np.isfinite(v):
                    var_sum[g] += v
                    var_n[g] += 1.0
                d, flat, inverse = _prior(dark[p], gain[p])
                x = (np.float64(image[p]) - d) * inverse
                if not np.isfinite(x):
                    continue
                buf[starts[g] + fill[g]] = x
                fill[g] += 1
                if v > 0 and v < np.inf and flat > 0:
                    s[g] += flat / np.sqrt(v)
                    known[g] += 1
    for g in range(n_keys):
        k = fill[g]
        out_count[g] = k
        out_median[g] = median(buf[starts[g]:starts[g] + k])
        out_inv_sigma_sum[g] = s[g] * k / known[g] if known[g] > 0 else 0.0
    for c in range(out_weight.size):
        total = var_sum[c * n_segments:(c + 1) * n_segments].sum()
        out_weight[c] = var_n[c * n_segments:(c + 1) * n_segments].sum() / total if total > 0 else 0.0


@numba.njit(nogil=True, cache=True)
def _invert(a, out, work):  # pragma: no cover - compiled
    # Gauss-Jordan inverse of a small symmetric positive matrix without allocating; False
    # when singular
    m = a.shape[0]
    work[:] = a
    out[:] = 0.0
    for i in range(m):
        out[i, i] = 1.0
    for i in range(m):
        pivot = i
        for r in range(i + 1, m):
            if abs(work[r, i]) > abs(work[pivot, i]):
                pivot = r
        if not abs(work[pivot, i]) > 0.0:
            return False
        if pivot != i:
            for q in range(m):
                work[i, q], work[pivot, q] = work[pivot, q], work[i, q]
                out[i, q], out[pivot, q] = out[pivot, q], out[i, q]
        d = work[i, i]
        for q in range(m):
            work[i, q] /= d
            out[i, q] /= d
        for r in range(m):
            if r != i and work[r, i] != 0.0:
                f = work[r, i]
                for q in range(m):
                    work[r, q] -= f * work[i, q]
                    out[r, q] -= f * out[i, q]
    return True


@numba.njit(nogil=True, cache=True)
def _fit_channels(medians, counts, segment_u, seg_var, inv_sigma_sum, n_segments, degree, min_pixels, coef, var_poly,
                  cov_poly):  # pragma: no cover - compiled
    # Polynomial in u through the segment medians of each channel, weighted by their
    # numbers of pixels W: coef = M^-1 A^T W m with M = A^T W A. The variance of the
    # reference at u is a(u)^T C a(u), C = M^-1 (A^T W V W A) M^-1 with V the medians'
    # variances: var_poly holds it as a polynomial in u (degree 2 * degree). A pixel in
    # segment g enters that median with covariance sigma / inv_sigma_sum[g], and so the
    # reference at u with W_g a(u)^T M^-1 a(u_g) times that: cov_poly[g] holds
    # W_g M^-1 a(u_g) / inv_sigma_sum[g] (a polynomial in u, times the pixel's sigma).
    n_channels = coef.shape[0]
    m = degree + 1
    ata = np.empty((m, m))
    atb = np.empty(m)
    avb = np.empty((m, m))
    inv = np.empty((m, m))
    tmp = np.empty((m, m))
    for c in range(n_channels):
        ata[:] = 0.0
        atb[:] = 0.0
        avb[:] = 0.0
        used = 0
        for s in range(n_segments):
            g = c * n_segments + s
            cov_poly[g, :] = 0.0
            if counts[g] < min_pixels or not np.isfinite(medians[g]):
                continue
            used += 1
            w = float(counts[g])
            v = seg_var[g] if np.isfinite(seg_var[g]) else 0.0
            for i in range(m):
                ui = segment_u[g] ** i
                atb[i] += w * ui * medians[g]
                for j in range(m):
                    uij = ui * segment_u[g] ** j
                    ata[i, j] += w * uij
                    avb[i, j] += w * w * v * uij
        var_poly[c, :] = 0.0
        if used < m:
            coef[c, :] = np.nan
            continue
        if not _invert(ata, inv, tmp):
            coef[c, :] = np.nan
            continue
        for i in range(m):
            coef[c, i] = 0.0
            for j in range(m):
                coef[c, i] += inv[i, j] * atb[j]
        for i in range(m):  # tmp = inv avb; var_poly from tmp inv
            for j in range(m):
                t = 0.0
                for q in range(m):
                    t += inv[i, q] * avb[q, j]
                tmp[i, j] = t
        for i in range(m):
            for j in range(m):
                t = 0.0
                for q in range(m):
                    t += tmp[i, q] * inv[q, j]
                var_poly[c, i + j] += t
        for s in range(n_segments):
            g = c * n_segments + s
            if counts[g] < min_pixels or not np.isfinite(medians[g]) or not inv_sigma_sum[g] > 0:
                continue
            scale = float(counts[g]) / inv_sigma_sum[g]
            for i in range(m):
                h = 0.0
                for j in range(m):
                    h += inv[i, j] * segment_u[g] ** j
                cov_poly[g, i] = scale * h


def _reference(image, variance, flags, ref_mask, key, dark, gain, segment_u, *, n_segments, degree, min_pixels, starts,
               buf, sample, nx):
    """Coefficients of each channel's reference in one image, of its variance and
    covariance with a pixel's noise (see :func:`_fit_channels`), and the channel weights
    (see :func:`_channel_stats`; all raveled (ny * nx) arrays, rows of ``nx`` pixels)."""
    medians = np.empty(segment_u.size)
    counts = np.empty(segment_u.size, np.int64)
    inv_sigma_sum = np.empty(segment_u.size)
    n_channels, m = segment_u.size // n_segments, degree + 1
    weight = np.empty(n_channels)
    _channel_stats(image, variance, flags, ref_mask, key, dark, gain, starts, n_segments, sample, nx, buf, medians,
                   counts, inv_sigma_sum, weight)
    seg_var = np.nan_to_num(median_variance(counts, inv_sigma_sum), nan=0.0, posinf=0.0)
    coef, var_poly, cov_poly = np.empty((n_channels, m)), np.empty((n_channels, 2 * m - 1)), np.empty((segment_u.size, m))
    _fit_channels(medians, counts, np.nan_to_num(segment_u), seg_var, inv_sigma_sum, n_segments, degree, min_pixels,
                  coef, var_poly, cov_poly)
    return coef, var_poly, cov_poly, weight


def reference_fluxes(image: np.ndarray, usable: np.ndarray, key: np.ndarray, segment_u: np.ndarray, *,
                     n_segments: int, degree: int = 1, min_pixels: int = 20,
                     starts: np.ndarray | None = None) -> np.ndarray:
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
        Segments per channel and degree of the polynomial in ``u`` through their medians
        (weighted by their numbers of pixels).
    min_pixels
        A segment with fewer usable pixels gives no median.
    starts
        From :func:`key_starts` (computed when not given; pass it to reuse across images).

    Returns
    -------
    (n_channels, degree + 1) float64 coefficients, lowest power first; NaN rows for
    channels with fewer than ``degree + 1`` segments.
    """
    values = np.ascontiguousarray(image, dtype=np.float64).ravel()
    flags = (~np.asarray(usable, dtype=bool)).astype(np.uint8).ravel()
    flat_key = np.ascontiguousarray(key, dtype=np.int64).ravel()
    starts = starts if starts is not None else key_starts(flat_key, segment_u.size)
    zeros, ones = np.zeros(values.size), np.ones(values.size)
    return _reference(values, zeros, flags, np.uint8(1), flat_key, zeros, ones, segment_u, n_segments=n_segments,
                      degree=degree, min_pixels=min_pixels, starts=starts, buf=np.empty(values.size), sample=1,
                      nx=np.shape(image)[-1])[0]


def key_starts(flat_key: np.ndarray, n_keys: int) -> np.ndarray:
    """Where each key's pixels start in a list of the pixels sorted by key (key -1, the
    excluded pixels, left out): ``n_keys + 1`` int64 offsets."""
    counts = np.bincount(flat_key[flat_key >= 0], minlength=n_keys)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@numba.njit(inline="always")
def _poly(c, q, u):  # pragma: no cover - compiled
    # c[q] + c[q + 1] u + ... + c[q + n - 1] u^(n - 1) for a fixed-length padded stretch
    return c[q] + u * (c[q + 1] + u * (c[q + 2] + u * c[q + 3]))


@numba.njit(nogil=True, cache=True)
def _accumulate(images, variances, flags, fit_mask, ref_mask, key, u, coef, var_poly, cov_poly, weight, dark, gain,
                clip, n_segments, sample, sums):  # pragma: no cover - compiled
    # Pixel by pixel, all images of the batch into the nine sums. Along a row the pixels
    # come in runs of one key (a dozen runs per row), whose per-image polynomials are
    # gathered once per run. The sums that do not involve the pixel's value (n, w, wx,
    # wxx, wvx) are polynomials in u whose coefficients are summed over the images once
    # per run; per sample only the value's sums are added, and a rejected sample's share
    # taken off the others (samples are rejected rarely: sources, outliers).
    n_images, ny, nx = images.shape
    m = coef.shape[2]
    # per image: weight, then x (4), the covariance h (4) and the variance vx (8) of the
    # reference as polynomials in u padded with zeros to degree 3 (x, h) and 7 (vx)
    par = np.zeros((n_images, 17))
    # over the images: n, w, then w x (4), w x^2 (8) and w vx (8) as polynomials in u
    total = np.zeros(22)
    clip2 = clip * clip
    for j in range(ny):
        i0 = 0
        while i0 < nx:
            k = key[j, i0]
            i1 = i0 + 1
            while i1 < nx and key[j, i1] == k:
                i1 += 1
            if k < 0:
                i0 = i1
                continue
            c = k // n_segments
            total[:] = 0.0
            for b in range(n_images):
                par[b, :] = 0.0
                w = weight[b, c]
                if not (w > 0 and np.isfinite(coef[b, c, 0])):
                    continue  # no sample of this image enters (weight 0 marks it)
                par[b, 0] = w
                for p in range(m):
                    par[b, 1 + p] = coef[b, c, p]
                    par[b, 5 + p] = cov_poly[b, k, p]
                for p in range(2 * m - 1):
                    par[b, 9 + p] = var_poly[b, c, p]
                total[0] += 1.0
                total[1] += w
                for p in range(m):
                    total[2 + p] += w * coef[b, c, p]
                    for q in range(m):
                        total[6 + p + q] += w * coef[b, c, p] * coef[b, c, q]
                for p in range(2 * m - 1):
                    total[14 + p] += w * var_poly[b, c, p]
            for i in range(i0, i1):
                uu = u[j, i]
                d, g, inverse = _prior(dark[j, i], gain[j, i])
                in_ref = _in_sample(j, i, sample)  # the pixel may have entered its segment's median
                u4 = uu * uu * uu * uu
                s0, s1, s2 = total[0], total[1], _poly(total, 2, uu)
                s4 = _poly(total, 6, uu) + u4 * _poly(total, 10, uu)
                s7 = _poly(total, 14, uu) + u4 * _poly(total, 18, uu)
                s3 = s5 = s6 = s8 = 0.0
                for b in range(n_images):
                    w = par[b, 0]
                    if w == 0.0:
                        continue
                    x = _poly(par[b], 1, uu)
                    y = np.float64(images[b, j, i])
                    v = np.float64(variances[b, j, i])
                    f = flags[b, j, i]
                    r = y - (d + g * x)
                    # (also drops NaN values, references and variances)
                    if f & fit_mask or not np.isfinite(y) or not (r * r <= clip2 * v):
                        vx = _poly(par[b], 9, uu) + u4 * _poly(par[b], 13, uu)
                        s0 -= 1.0
                        s1 -= w
                        s2 -= w * x
                        s4 -= w * x * x
                        s7 -= w * vx
                        continue
                    wy = w * y
                    s3 += wy
                    s5 += wy * x
                    s6 += wy * y
                    # the covariance of the reference at u with this pixel's noise through
                    # the pixel's own segment median (if it entered it)
                    if in_ref and (f & ref_mask) == 0 and v > 0 and np.isfinite((y - d) * inverse):
                        s8 += w * _poly(par[b], 5, uu) * np.sqrt(v)
                sums[0, j, i] += s0
                sums[1, j, i] += s1
                sums[2, j, i] += s2
                sums[3, j, i] += s3
                sums[4, j, i] += s4
                sums[5, j, i] += s5
                sums[6, j, i] += s6
                sums[7, j, i] += s7
                sums[8, j, i] += s8
            i0 = i1


def accumulate_images(images: np.ndarray, variances: np.ndarray, fit_ok: np.ndarray | None = None,
                      ref_ok: np.ndarray | None = None, *, key: np.ndarray, u: np.ndarray, segment_u: np.ndarray,
                      dark0: np.ndarray, gain0: np.ndarray, n_segments: int, degree: int = 1, clip: float = 5.0,
                      min_pixels: int = 20, sample: int = 1, starts: np.ndarray | None = None,
                      sums: np.ndarray | None = None, flags: np.ndarray | None = None, fit_mask: int = 0,
                      ref_mask: int = 0) -> np.ndarray:
    """Regression sums of a batch of images of one detector.

    Parameters
    ----------
    images, variances
        (k, ny, nx) values [electron/s] and their variances [(electron/s)^2].
    fit_ok, ref_ok
        (k, ny, nx) bool: samples that may enter the fit, and pixels that may enter the
        reference medians. Or instead:
    flags, fit_mask, ref_mask
        (k, ny, nx) integer flags: a sample enters the fit where ``flags & fit_mask`` is
        0 and the reference medians where ``flags & ref_mask`` is 0 (no boolean copies
        of a batch of full-size images).
    key, u, segment_u
        From :func:`channel_keys`.
    dark0, gain0
        (ny, nx) prior dark [electron/s] and relative response: the reference is
        measured on ``(image - dark0) / gain0`` and samples farther than ``clip``
        standard deviations (square root of ``variances``) from ``dark0 + gain0 x`` are
        left out.
    n_segments, degree, min_pixels
        See :func:`reference_fluxes` (``degree`` at most 3).
    sample
        The reference medians take one pixel in ``sample`` (:func:`reference_sample`;
        ``segment_u`` and ``starts`` from :func:`sampled_segments`). A full-size
        detector has ~2000 pixels per segment: a quarter of them measure the median to
        1/20 of one pixel's noise.
    starts
        Where each key's pixels start in the sample sorted by key (computed when not
        given).
    sums
        (N_SUMS, ny, nx) float64 to add to in place (new zeros when None).

    Returns
    -------
    (N_SUMS, ny, nx) float64 sums, in the order of :data:`SUM_NAMES`. Each sample is
    weighted by the inverse of the mean variance of its channel in its image, which
    is free of the pixel's own noise (weights from a pixel's own variance would bias the
    fit toward its low values). ``wvx`` and ``wcxy`` are the weighted variance of the
    reference and its covariance with the pixel's value (the pixel's own noise in its
    segment's median), from ``variances``; :func:`solve_sums` removes them.
    """
    k, ny, nx = images.shape
    if not 0 <= degree <= 3:
        raise ValueError(f"degree must be 0 to 3, not {degree}")
    if sums is None:
        sums = np.zeros((N_SUMS, ny, nx))
    if flags is None:
        flags = (~np.asarray(fit_ok, dtype=bool)).astype(np.uint8) | ((~np.asarray(ref_ok, dtype=bool)) * np.uint8(2))
        fit_mask, ref_mask = 1, 2
    flag_type = flags.dtype.type
    key = np.ascontiguousarray(key, dtype=np.int64)
    if starts is None:
        starts = sampled_segments(key, np.broadcast_to(u, key.shape), n_keys=segment_u.size, sample=sample)[1]
    dark0, gain0 = (np.ascontiguousarray(a, dtype=np.float64) for a in (dark0, gain0))
    n_channels, m = segment_u.size // n_segments, degree + 1
    coef, var_poly = np.empty((k, n_channels, m)), np.empty((k, n_channels, 2 * m - 1))
    cov_poly, weight = np.empty((k, segment_u.size, m)), np.empty((k, n_channels))
    buf = np.empty(starts[-1])
    # Each image's reference is measured on it flat-fielded with the prior: the fitted
    # tilt cannot tell a gradient of the flat along the channel from the zodiacal
    # light's, so the prior sets the flat's large-scale shape along each channel and the
    # sky the rest.
    for b in range(k):
        coef[b], var_poly[b], cov_poly[b], weight[b] = _reference(
            images[b].ravel(), variances[b].ravel(), flags[b].ravel(), flag_type(ref_mask), key.ravel(), dark0.ravel(),
            gain0.ravel(), segment_u, n_segments=n_segments, degree=degree, min_pixels=min_pixels, starts=starts,
            buf=buf, sample=sample, nx=nx)
    _accumulate(images, variances, flags, flag_type(fit_mask), flag_type(ref_mask), key,
                np.ascontiguousarray(u, dtype=np.float64), coef, var_poly, cov_poly, weight, dark0, gain0, float(clip),
                n_segments, sample, sums)
    return sums


def solve_sums(sums: np.ndarray, *, min_samples: int = 3, dark_prior: np.ndarray | None = None,
               dark_prior_err: np.ndarray | None = None, reference_errors: bool = True,
               reliability_sigmas: float = 2.0) -> dict[str, np.ndarray]:
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
    reference_errors
        Remove the reference's own noise (``wvx`` from ``wxx``) and its covariance with
        the pixel (``wcxy`` from ``wxy``) before solving: a moment (Deming) correction
        of the regression dilution. False gives the plain least-squares fit.
    reliability_sigmas
        The corrected denominator ``Sxx - wvx`` (``Sxx = wxx - wx**2 / w``, the observed
        weighted variance of the reference) is kept at least this many of its own
        standard errors, about ``sqrt(2 / n) Sxx`` where the reference's noise dominates,
        above zero: the correction removes at most ``1 - reliability_sigmas sqrt(2 / n)``
        of ``Sxx`` (both terms scaled down alike). Where the reference's noise is most of
        its variance (few images of a sky that barely changes) the fully corrected slope
        is a ratio of two noisy numbers whose first-order errors no longer hold; there it
        is corrected in part (it lies between the plain and the corrected slope) and its
        errors stay right.

    Returns
    -------
    dict
        ``dark`` (intercept) [electron/s], ``flat`` (slope), ``dark_err``, ``flat_err``
        (1 sigma, scaled by the reduced chi-square of the pixel's own fit, so that they
        hold for pixels noisier than the weights assume), ``chi2`` (reduced
        chi-square) and ``n`` (samples used). The chi-square is that of the residuals
        about the solution with the noisy reference, which holds the reference's noise
        (times the slope) as well as the pixel's: the scatter that the errors of the
        corrected estimates follow. With the correction ``c`` (``wvx`` or its cap) the
        slope's variance is ``chi2 Sxx / (Sxx - c)**2``: the products of the two noises
        add about ``c chi2`` to the variance of the numerator.
    """
    sums = np.asarray(sums, dtype=np.float64)
    shape = sums.shape[1:]
    flat = np.ascontiguousarray(sums.reshape(N_SUMS, -1))
    use_prior = dark_prior is not None and dark_prior_err is not None
    prior, prior_err = ((np.ascontiguousarray(np.broadcast_to(np.asarray(a, np.float64), shape)).ravel()
                         for a in (dark_prior, dark_prior_err)) if use_prior else (np.zeros(1), np.zeros(1)))
    out = np.empty((5, flat.shape[1]))
    _solve(flat, prior, prior_err, use_prior, bool(reference_errors), float(reliability_sigmas),
           max(int(min_samples), 3), out)
    result = {k: out[i].reshape(shape) for i, k in enumerate(("dark", "flat", "dark_err", "flat_err", "chi2"))}
    result["n"] = sums[0]
    return result


@numba.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 gives inf or NaN, as in numpy
def _solve(sums, prior, prior_err, use_prior, reference_errors, reliability_sigmas, min_samples,
           out):  # pragma: no cover - compiled
    # solve_sums pixel by pixel in one pass: as numpy expressions on a full detector's
    # sums they took 0.9 s a band, a dozen temporaries of 4 million values each
    for q in range(sums.shape[1]):
        n, w, wx, wy, wxx, wxy, wyy, wvx, wcxy = sums[:, q]
        if use_prior:
            e = prior_err[q]
            p = 1.0 / (e * e) if e > 0 else 0.0
            p = p if np.isfinite(p) else 0.0
            d0 = prior[q] if np.isfinite(prior[q]) else 0.0
            w, wy, wyy = w + p, wy + p * d0, wyy + p * d0 * d0
        sxx = wxx - wx * wx / w  # observed weighted variance of the reference (times w)
        # the share f of the correction applied: 1 unless capped (then both terms alike, so
        # that the slope lies between the plain and the fully corrected one)
        f = 0.0
        if reference_errors:
            keep = min(max(reliability_sigmas * np.sqrt(2.0 / max(n - 2.0, 1.0)), 0.0), 1.0)
            f = min(max((1.0 - keep) * sxx / wvx, 0.0), 1.0) if wvx > 0 else 1.0
        cxx, cxy = wxx - f * wvx, wxy - f * wcxy
        det = w * cxx - wx * wx
        if not (n >= min_samples and det > 0):
            out[:, q] = np.nan
            continue
        slope = (w * cxy - wx * wy) / det
        intercept = (cxx * wy - wx * cxy) / det
        resid = (wyy - 2 * slope * wxy - 2 * intercept * wy + slope * slope * wxx + 2 * slope * intercept * wx
                 + intercept * intercept * w)
        chi2 = (resid if resid > 0 else 0.0) / (n - 2)
        den = det / w  # sxx - corr
        slope_var = chi2 * sxx / (den * den)
        out[0, q], out[1, q] = intercept, slope
        out[2, q] = np.sqrt(chi2 / w + (wx / w) ** 2 * slope_var)
        out[3, q] = np.sqrt(slope_var)
        out[4, q] = chi2
