"""Forced PSF photometry: joint weighted least squares on cutouts around catalogue positions.

For every source, the sources whose positions fall inside a (2h+1)^2 cutout around it are
fitted together, ``flux = F^-1 A^T W d`` with ``F = A^T W A`` (A: unit-flux templates on
native pixels, W: inverse variances, d: background-subtracted pixels). The source's error
is ``sqrt([F^-1]_00)``, from the full covariance of the joint fit: the Fisher diagonal
``1 / F_00`` that Tractor reports is smaller in blends (Huai et al. 2025).

Templates come from an oversampled PSF whose values are integrals over oversampled
pixels (the archive's PSF cube): at the sub-pixel positions where the oversampled grid
lines up with native pixel boundaries, a native pixel is exactly a sum of o x o
oversampled values. In between, the template is interpolated in position with 4-point
Lagrange weights. (Linear interpolation, which is the exact integral of a PSF constant
inside each oversampled pixel, biases the flux of an undersampled PSF by up to 0.5 %.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from .background import box_background

__all__ = ["PHOT_STATUS", "TemplateBank", "forced_photometry", "local_backgrounds", "render_sources", "template_bank"]

_STRIP = 64  # rows of targets whose templates are built together

# Status bits of one measurement (a source is still reported when any is set).
PHOT_STATUS = {
    "OUTSIDE": 1,        # position outside the image (no flux)
    "EDGE": 2,           # cutout clipped by the image edge
    "NO_DATA": 4,        # no usable pixel under the source's template (no flux)
    "SINGULAR": 8,       # the joint fit could not be solved (no flux)
    "CENTER_MASKED": 16,  # the pixel under the source has no weight (flagged or NaN)
    "NO_PSF": 32,        # no PSF zone for the source (no flux)
    "CROWDED": 64,       # more sources in the cutout than the fit takes: the nearest kept
    "MASKED_PIXELS": 128,  # some cutout pixels have no weight (flagged, NaN or no variance)
}


class TemplateBank(NamedTuple):
    """Native-pixel templates of every PSF zone at the aligned sub-pixel offsets.

    ``templates[zone, my + 1, mx + 1]`` is the (S, S) native-pixel template of a source at
    ``n + (m + phi) / o`` along each axis (o the oversampling, m = -1..o+1: the ends are
    the neighbouring pixels' offsets in this pixel's frame, for the interpolation); its
    first pixel is ``n + d_min``.
    """

    templates: np.ndarray
    phi: float
    d_min: int


def _assignment(size: int, centre: float, oversampling: int, phi: float, d_min: int, n_out: int) -> np.ndarray:
    """(o + 3, n_out, size) 0/1 matrices: oversampled bin k -> native pixel, per offset
    m = -1..o+1."""
    o = oversampling
    out = np.zeros((o + 3, n_out, size))
    k = np.arange(size)
    for m in range(-1, o + 2):
        d = np.floor((m + phi + k - centre) / o + 0.5).astype(np.int64) - d_min
        out[m + 1, d, k] = 1.0
    return out


def template_bank(psf: np.ndarray, *, oversampling: int) -> TemplateBank:
    """Native-pixel templates of an oversampled PSF cube at all aligned sub-pixel offsets.

    Parameters
    ----------
    psf
        (zone, P, P) oversampled PSF, each value the PSF integrated over one oversampled
        pixel; the centre is at index (P - 1) / 2 in both axes; sums to 1 per zone.
    oversampling
        Oversampled pixels per native pixel (10 for the QR2 PSF cube).

    Returns
    -------
    TemplateBank
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 3 or psf.shape[1] != psf.shape[2]:
        raise ValueError(f"PSF must be a (zone, P, P) cube, got shape {psf.shape}")
    size, o = psf.shape[-1], int(oversampling)
    centre = (size - 1) / 2.0
    # sub-pixel offsets f = (m + phi) / o put oversampled-pixel edges on native edges
    phi = (centre + 0.5 - o / 2.0) % 1.0
    d_min = math.floor((phi - 1 - centre) / o + 0.5)
    d_max = math.floor((o + 1 + phi + size - 1 - centre) / o + 0.5)
    n_out = d_max - d_min + 1
    assign = _assignment(size, centre, o, phi, d_min, n_out)  # (o+3, S, P)
    # T[z, my, mx] = A[my] @ psf[z] @ A[mx]^T, for all offsets in two matrix products
    stacked = assign.reshape(-1, size)  # ((o+3) S, P)
    both = stacked @ psf @ stacked.T  # (z, (o+3) S, (o+3) S)
    n_m = o + 3
    templates = both.reshape(-1, n_m, n_out, n_m, n_out).transpose(0, 1, 3, 2, 4)  # (z, my, mx, S, S)
    return TemplateBank(np.ascontiguousarray(templates), float(phi), int(d_min))


@numba.njit(inline="always")
def _axis(pos, o, phi):
    g = pos * o - phi
    b = math.floor(g)
    t = g - b
    b = np.int64(b)
    n = b // o
    return n, b - n * o, t


@numba.njit(inline="always")
def _lagrange(t, w):
    """4-point Lagrange weights at nodes -1, 0, 1, 2 for 0 <= t < 1."""
    w[0] = -t * (t - 1) * (t - 2) / 6
    w[1] = (t + 1) * (t - 1) * (t - 2) / 2
    w[2] = -(t + 1) * t * (t - 2) / 2
    w[3] = (t + 1) * t * (t - 1) / 6


@numba.njit(nogil=True)
def _stamp(templates, zones, zone_weights, x, y, phi, d_min, out):
    """The source's native-pixel template into ``out``, blended over its zones with their
    weights; returns its first pixel (x0, y0)."""
    o = templates.shape[1] - 3
    nx, mx, tx = _axis(x, o, phi)
    ny, my, ty = _axis(y, o, phi)
    wx, wy = np.empty(4), np.empty(4)
    _lagrange(tx, wx)
    _lagrange(ty, wy)
    out[:] = 0.0
    s = out.shape[0]
    for z in range(zones.size):
        if zones[z] < 0 or zone_weights[z] == 0.0:
            continue
        # node q of the weights is offset m + q - 1, stored at index m + q
        for qy in range(4):
            for qx in range(4):
                w = zone_weights[z] * wy[qy] * wx[qx]
                t = templates[zones[z], my + qy, mx + qx]
                for j in range(s):
                    for i in range(s):
                        out[j, i] += w * t[j, i]
    return nx + d_min, ny + d_min


@numba.njit(parallel=True, nogil=True, cache=True)
def _build_stamps(templates, zones, zone_weights, xs, ys, phi, d_min, which, stamps, origins):
    """Templates of sources ``which`` into ``stamps[k]`` (their first pixels into ``origins``)."""
    for k in numba.prange(which.size):
        j = which[k]
        if zones[j, 0] < 0 or not (np.isfinite(xs[j]) and np.isfinite(ys[j])):
            continue
        x0, y0 = _stamp(templates, zones[j], zone_weights[j], xs[j], ys[j], phi, d_min, stamps[k])
        origins[k, 0], origins[k, 1] = x0, y0


@numba.njit(nogil=True)
def _cholesky_inverse(f, k):
    """Inverse of the leading (k, k) block of a symmetric positive-definite matrix, or
    False when it is not positive definite (in a copy: ``f`` is kept)."""
    lo = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1):
            s = f[i, j]
            for p in range(j):
                s -= lo[i, p] * lo[j, p]
            if i == j:
                if not (s > 1e-300):
                    return np.zeros((k, k)), False
                lo[i, i] = math.sqrt(s)
            else:
                lo[i, j] = s / lo[j, j]
    # inverse of L, then F^-1 = L^-T L^-1
    li = np.zeros((k, k))
    for i in range(k):
        li[i, i] = 1.0 / lo[i, i]
        for j in range(i):
            s = 0.0
            for p in range(j, i):
                s -= lo[i, p] * li[p, j]
            li[i, j] = s / lo[i, i]
    inv = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1):
            s = 0.0
            for p in range(i, k):
                s += li[p, i] * li[p, j]
            inv[i, j] = s
            inv[j, i] = s
    return inv, True


@numba.njit(parallel=True, nogil=True, cache=True)
def _forced(image, weight, flags, xs, ys, zones, targets, order, cell_start, cell, half, halo, max_members,
            max_neighbours, stamps, origins, slot, centre_half, pedestal, pedestal_var,
            flux, error, error_diag, chi2, npix, agg_flags, status, n_members, nb_index, nb_cov):
    ny, nx = image.shape
    ncy = (ny + cell - 1) // cell
    ncx = (nx + cell - 1) // cell
    s_size = stamps.shape[-1]
    for t in numba.prange(targets.size):
        s = targets[t]
        flux[s], error[s], error_diag[s], chi2[s] = np.nan, np.nan, np.nan, np.nan
        x, y = xs[s], ys[s]
        if not (np.isfinite(x) and np.isfinite(y)):
            status[s] |= 1
            continue
        cx, cy = np.int64(math.floor(x + 0.5)), np.int64(math.floor(y + 0.5))
        if cx < 0 or cy < 0 or cx >= nx or cy >= ny:
            status[s] |= 1
            continue
        if zones[s, 0] < 0:
            status[s] |= 32
            continue
        x0, x1 = max(cx - half, 0), min(cx + half, nx - 1)
        y0, y1 = max(cy - half, 0), min(cy + half, ny - 1)
        if x1 - x0 < 2 * half or y1 - y0 < 2 * half:
            status[s] |= 2
        # members: this source first, then every other source centred inside the cutout
        # or within ``halo`` pixels of it (their light reaches in), nearest first when
        # there are more than the fit takes
        mx0, mx1, my0, my1 = x0 - halo, x1 + halo, y0 - halo, y1 + halo
        count = 0
        for gy in range(max(my0 // cell, 0), min(my1 // cell, ncy - 1) + 1):
            for gx in range(max(mx0 // cell, 0), min(mx1 // cell, ncx - 1) + 1):
                c = gy * ncx + gx
                count += cell_start[c + 1] - cell_start[c]
        cand = np.empty(count, np.int64)
        dist = np.empty(count)
        count = 0
        for gy in range(max(my0 // cell, 0), min(my1 // cell, ncy - 1) + 1):
            for gx in range(max(mx0 // cell, 0), min(mx1 // cell, ncx - 1) + 1):
                c = gy * ncx + gx
                for q in range(cell_start[c], cell_start[c + 1]):
                    j = order[q]
                    if j == s or zones[j, 0] < 0:
                        continue
                    jx, jy = math.floor(xs[j] + 0.5), math.floor(ys[j] + 0.5)
                    if mx0 <= jx <= mx1 and my0 <= jy <= my1:
                        cand[count] = j
                        dist[count] = (xs[j] - x) ** 2 + (ys[j] - y) ** 2
                        count += 1
        if count + 1 > max_members:
            status[s] |= 64
            keep = np.argsort(dist[:count])[: max_members - 1]
            cand = cand[:count][keep]
            count = max_members - 1
        k = count + 1
        members = np.empty(k, np.int64)
        members[0] = s
        members[1:] = cand[:count]
        w_cut, h_cut = x1 - x0 + 1, y1 - y0 + 1
        npx = w_cut * h_cut
        design = np.zeros((npx, k))
        for m in range(k):
            c = slot[members[m]]
            stamp = stamps[c]
            sx0, sy0 = origins[c, 0], origins[c, 1]
            for jj in range(s_size):
                yy = sy0 + jj
                if yy < y0 or yy > y1:
                    continue
                for ii in range(s_size):
                    xx = sx0 + ii
                    if x0 <= xx <= x1:
                        design[(yy - y0) * w_cut + (xx - x0), m] = stamp[jj, ii]
        fisher = np.zeros((k, k))
        rhs = np.zeros(k)
        ones = np.zeros(k)  # A^T W 1: how a pedestal moves the fit
        used = 0
        for p in range(npx):
            yy, xx = y0 + p // w_cut, x0 + p % w_cut
            w = weight[yy, xx]
            d = image[yy, xx] - pedestal[s]
            if not (w > 0) or not np.isfinite(d):
                status[s] |= 128
                continue
            used += 1
            for a in range(k):
                va = design[p, a]
                if va == 0.0:
                    continue
                rhs[a] += w * va * d
                ones[a] += w * va
                for b in range(a + 1):
                    fisher[a, b] += w * va * design[p, b]
        for a in range(k):
            for b in range(a):
                fisher[b, a] = fisher[a, b]
        npix[s] = used
        n_members[s] = k - 1
        cw, ch = min(cx + centre_half, nx - 1), min(cy + centre_half, ny - 1)
        f_or = np.uint32(0)
        for yy in range(max(cy - centre_half, 0), ch + 1):
            for xx in range(max(cx - centre_half, 0), cw + 1):
                f_or |= flags[yy, xx]
        agg_flags[s] = f_or
        if not (weight[cy, cx] > 0) or not np.isfinite(image[cy, cx]):
            status[s] |= 16
        if not (fisher[0, 0] > 0):
            status[s] |= 4
            continue
        # neighbours with no data under them leave the fit (their row and column are 0)
        active = np.empty(k, np.int64)
        na = 0
        for a in range(k):
            if fisher[a, a] > 0:
                active[na] = a
                na += 1
        fa = np.empty((na, na))
        for a in range(na):
            for b in range(na):
                fa[a, b] = fisher[active[a], active[b]]
        inv, ok = _cholesky_inverse(fa, na)
        if not ok:
            status[s] |= 8
            continue
        coef = np.zeros(k)
        for a in range(na):
            acc = 0.0
            for b in range(na):
                acc += inv[a, b] * rhs[active[b]]
            coef[active[a]] = acc
        flux[s] = coef[0]
        # a pedestal b moves the fit by -F^-1 A^T W 1 b: its variance adds through that
        gain = 0.0
        for a in range(na):
            gain += inv[0, a] * ones[active[a]]
        extra = gain * gain * pedestal_var[s] if pedestal_var[s] > 0 else 0.0
        error[s] = math.sqrt(inv[0, 0] + extra)
        error_diag[s] = 1.0 / math.sqrt(fisher[0, 0])
        resid = 0.0
        for p in range(npx):
            yy, xx = y0 + p // w_cut, x0 + p % w_cut
            w = weight[yy, xx]
            d = image[yy, xx] - pedestal[s]
            if not (w > 0) or not np.isfinite(d):
                continue
            model = 0.0
            for a in range(k):
                model += design[p, a] * coef[a]
            resid += w * (d - model) ** 2
        dof = used - na
        chi2[s] = resid / dof if dof > 0 else np.nan
        # the most correlated neighbours, with their covariance
        if na > 1 and max_neighbours > 0:
            rho = np.empty(na - 1)
            for a in range(1, na):
                rho[a - 1] = -abs(inv[0, a]) / math.sqrt(inv[0, 0] * inv[a, a])
            best = np.argsort(rho)[:max_neighbours]
            for q in range(best.size):
                a = best[q] + 1
                nb_index[s, q] = members[active[a]]
                nb_cov[s, q] = inv[0, a]


def forced_photometry(
    image: np.ndarray,
    weight: np.ndarray,
    flags: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    zone: np.ndarray,
    bank: TemplateBank,
    *,
    zone_weight: np.ndarray | None = None,
    half_size: int = 7,
    halo: int = 3,
    max_members: int = 64,
    max_neighbours: int = 4,
    centre_half: int = 1,
    targets: np.ndarray | None = None,
    pedestal: np.ndarray | None = None,
    pedestal_variance: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Forced PSF photometry of every source on one background-subtracted image.

    Parameters
    ----------
    image
        (ny, nx) background-subtracted surface brightness (any unit u).
    weight
        (ny, nx) inverse variance [u^-2]; 0 for pixels that must not be used.
    flags
        (ny, nx) uint32 FLAGS, OR-ed over the central pixels of each source.
    x, y
        Source positions [pixel, 0-based, pixel centres at integers].
    zone
        PSF zone of each source (index into the bank; -1: none), or (n, k) zones whose
        templates are blended with ``zone_weight`` (e.g. the four around the source).
    bank
        :func:`template_bank` of the image's PSF.
    zone_weight
        (n, k) weights of ``zone`` (summing to 1 per source); None for one zone each.
    half_size
        The cutout is (2 half_size + 1)^2 pixels around the source's pixel (15 x 15).
    halo
        Sources centred up to this many pixels outside the cutout join the fit: their
        light reaches into it.
    max_members
        Most sources fitted jointly in one cutout (the nearest are kept).
    max_neighbours
        Neighbours reported per source, the most correlated first.
    centre_half
        Flags are aggregated over (2 centre_half + 1)^2 central pixels.
    targets
        Indices of the sources to measure (default all); the others still join the fits
        as neighbours, and their rows are left NaN with status 0.
    pedestal, pedestal_variance
        (n,) constant [u] subtracted from the cutout of each source before its fit (the
        local background of a crowded image), and its variance [u^2], propagated into
        ``flux_error``; None for none.

    Returns
    -------
    dict of arrays
        ``flux`` [u pixel] (the template sums to 1, so this is the total flux in units of
        u times one pixel's solid angle), ``flux_error`` (full covariance),
        ``flux_error_diag`` (Fisher diagonal only, for comparison), ``chi2`` (reduced,
        over the cutout), ``npix`` (pixels used), ``flags`` (aggregated FLAGS),
        ``status`` (:data:`PHOT_STATUS` bits), ``n_blend`` (other sources in the fit),
        ``neighbour`` (source indices, -1 padded) and ``neighbour_cov`` [u^2 pixel^2].
    """
    image = np.ascontiguousarray(image)
    ny, nx = image.shape
    for name, a in (("weight", weight), ("flags", flags)):
        if np.shape(a) != image.shape:
            raise ValueError(f"{name} has shape {np.shape(a)}, image has {image.shape}")
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.ascontiguousarray(y, dtype=np.float64)
    zones, weights = _zones_2d(zone, zone_weight, xs.size)
    if not (xs.shape == ys.shape == zones.shape[:1]) or xs.ndim != 1:
        raise ValueError(f"x, y and zone must be 1-d of one length, got {xs.shape}, {ys.shape}, {zones.shape}")
    templates, phi, d_min = bank
    if zones.size and zones.max() >= templates.shape[0]:
        raise ValueError(f"zone index {int(zones.max())} but the PSF has {templates.shape[0]} zones")
    n = xs.size
    # sources sorted into square cells so that a cutout visits only nearby ones; sources
    # just off the image (within the halo) go to the border cells: their light is on it
    cell = 8
    ncy, ncx = -(-ny // cell), -(-nx // cell)
    finite = np.isfinite(xs) & np.isfinite(ys)
    px = np.where(finite, np.floor(np.where(finite, xs, 0) + 0.5), -(10**9)).astype(np.int64)
    py = np.where(finite, np.floor(np.where(finite, ys, 0) + 0.5), -(10**9)).astype(np.int64)
    near = (px >= -halo) & (px < nx + halo) & (py >= -halo) & (py < ny + halo)
    gx = np.clip(px, 0, nx - 1) // cell
    gy = np.clip(py, 0, ny - 1) // cell
    cell_id = np.where(near, gy * ncx + gx, ncy * ncx)
    order = np.argsort(cell_id, kind="stable")
    cell_start = np.searchsorted(cell_id[order], np.arange(ncy * ncx + 1)).astype(np.int64)
    out = {
        "flux": np.empty(n), "flux_error": np.empty(n), "flux_error_diag": np.empty(n), "chi2": np.empty(n),
        "npix": np.zeros(n, np.int32), "flags": np.zeros(n, np.uint32), "status": np.zeros(n, np.int32),
        "n_blend": np.zeros(n, np.int32), "neighbour": np.full((n, max_neighbours), -1, np.int64),
        "neighbour_cov": np.full((n, max_neighbours), np.nan),
    }
    targets = np.arange(n) if targets is None else np.ascontiguousarray(targets, dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= n):
        raise ValueError(f"targets must index the {n} sources")
    out["flux"][:] = out["flux_error"][:] = out["flux_error_diag"][:] = out["chi2"][:] = np.nan
    # Each source's template is built once, not once per cutout it appears in: targets
    # go in strips of rows, with the templates of every source that can join their fits
    # (memory bounded by a strip, not by the catalogue).
    pedestals = np.zeros(n) if pedestal is None else np.nan_to_num(np.asarray(pedestal, dtype=np.float64))
    pedestal_vars = np.zeros(n) if pedestal_variance is None else np.nan_to_num(
        np.asarray(pedestal_variance, dtype=np.float64))
    if pedestals.shape != (n,) or pedestal_vars.shape != (n,):
        raise ValueError(f"pedestal has shape {pedestals.shape} (variance {pedestal_vars.shape}), expected ({n},)")
    reach = half_size + halo + 1
    by_row = np.argsort(py, kind="stable")
    rows_sorted = py[by_row]
    target_rows = py[targets]
    slot = np.full(n, -1, np.int64)
    s_size = templates.shape[-1]
    for start in range(0, ny, _STRIP):
        here = targets[(target_rows >= start) & (target_rows < start + _STRIP)]
        if not here.size:
            continue
        lo, hi = np.searchsorted(rows_sorted, [start - reach, start + _STRIP + reach])
        which = by_row[lo:hi]
        stamps = np.zeros((which.size, s_size, s_size))
        origins = np.zeros((which.size, 2), np.int64)
        _build_stamps(templates, zones, weights, xs, ys, float(phi), int(d_min), which, stamps, origins)
        slot[which] = np.arange(which.size)
        _forced(image, np.ascontiguousarray(weight), np.ascontiguousarray(flags, dtype=np.uint32),
                xs, ys, zones, here, order, cell_start, cell, int(half_size), int(halo), int(max_members),
                int(max_neighbours), stamps, origins, slot, int(centre_half), pedestals, pedestal_vars,
                out["flux"], out["flux_error"], out["flux_error_diag"], out["chi2"], out["npix"], out["flags"],
                out["status"], out["n_blend"], out["neighbour"], out["neighbour_cov"])
        slot[which] = -1
    # targets off the image rows still get their status
    off = targets[(target_rows < 0) | (target_rows >= ny)]
    out["status"][off] |= PHOT_STATUS["OUTSIDE"]
    return out


@numba.njit(nogil=True, cache=True)
def _render(out, xs, ys, zones, zone_weights, flux, templates, phi, d_min):
    ny, nx = out.shape
    s_size = templates.shape[-1]
    stamp = np.empty((s_size, s_size))
    for s in range(xs.size):
        f = flux[s]
        if not (np.isfinite(f) and np.isfinite(xs[s]) and np.isfinite(ys[s])) or zones[s, 0] < 0 or f == 0.0:
            continue
        x0, y0 = _stamp(templates, zones[s], zone_weights[s], xs[s], ys[s], phi, d_min, stamp)
        for j in range(s_size):
            yy = y0 + j
            if 0 <= yy < ny:
                for i in range(s_size):
                    xx = x0 + i
                    if 0 <= xx < nx:
                        out[yy, xx] += f * stamp[j, i]


def render_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, zone: np.ndarray, flux: np.ndarray,
                   bank: TemplateBank, *, zone_weight: np.ndarray | None = None) -> np.ndarray:
    """The image of point sources drawn with the photometry templates.

    Parameters
    ----------
    shape
        (ny, nx) of the image.
    x, y, zone, zone_weight
        As for :func:`forced_photometry`.
    flux
        Per source, in the unit of the result times one pixel; NaN draws nothing.

    Returns
    -------
    numpy.ndarray
        float64 (ny, nx).
    """
    out = np.zeros(shape)
    templates, phi, d_min = bank
    zones, weights = _zones_2d(zone, zone_weight, np.size(x))
    _render(out, np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64),
            zones, weights, np.ascontiguousarray(flux, dtype=np.float64), templates, float(phi), int(d_min))
    return out


def _zones_2d(zone: np.ndarray, zone_weight: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) zones and weights from one zone per source or from zones with weights."""
    zones = np.asarray(zone, dtype=np.int64)
    if zones.ndim == 1:
        zones = zones[:, None]
    weights = np.ones(zones.shape) if zone_weight is None else np.asarray(zone_weight, dtype=np.float64)
    if zones.ndim != 2 or weights.shape != zones.shape or zones.shape[0] != n:
        raise ValueError(f"zone {np.shape(zone)} and zone_weight {np.shape(zone_weight)} must be (n,) or "
                         f"(n, k) for n = {n} sources")
    return np.ascontiguousarray(zones), np.ascontiguousarray(weights)


@numba.njit(parallel=True, nogil=True, cache=True)
def _local(residual, masked, xs, ys, half, sigma, maxiters, min_pixels, out, out_var):
    ny, nx = residual.shape
    for s in numba.prange(xs.size):
        out[s], out_var[s] = np.nan, np.nan
        if not (np.isfinite(xs[s]) and np.isfinite(ys[s])):
            continue
        cx, cy = np.int64(math.floor(xs[s] + 0.5)), np.int64(math.floor(ys[s] + 0.5))
        y0, y1 = max(cy - half, 0), min(cy + half, ny - 1)
        x0, x1 = max(cx - half, 0), min(cx + half, nx - 1)
        if x1 < x0 or y1 < y0:
            continue
        values = np.empty((y1 - y0 + 1) * (x1 - x0 + 1))
        n = 0
        for yy in range(y0, y1 + 1):
            for xx in range(x0, x1 + 1):
                v = residual[yy, xx]
                if np.isfinite(v) and not masked[yy, xx]:
                    values[n] = v
                    n += 1
        if n < min_pixels:
            continue
        out[s], out_var[s] = box_background(values[:n], sigma, maxiters)


def local_backgrounds(residual: np.ndarray, mask: np.ndarray, x: np.ndarray, y: np.ndarray, *,
                      half_size: int = 7, sigma: float = 3.0, maxiters: int = 10,
                      min_pixels: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The background of each source's own cutout, for crowded images.

    The statistic of photutils' ``Background2D`` boxes
    (:func:`sphx.kernels.background.box_background`: sigma clipping about the median,
    then 2.5 median - 1.5 mean, or the median for skewed pixels), taken over the
    (2 half_size + 1)^2 region centred on each source instead of a fixed grid of boxes.

    Parameters
    ----------
    residual
        (ny, nx) image minus the smooth background model [any unit u].
    mask
        (ny, nx) bool: pixels left out (sources, bad pixels).
    x, y
        Source positions [pixel].
    min_pixels
        Fewer usable pixels give NaN (the caller falls back to no pedestal).

    Returns
    -------
    level, variance : numpy.ndarray
        (n,) float64 [u] and [u^2]: each cutout's level and its variance.
    """
    residual = np.ascontiguousarray(residual, dtype=np.float64)
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.shape != residual.shape:
        raise ValueError(f"mask has shape {mask.shape}, residual has {residual.shape}")
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.ascontiguousarray(y, dtype=np.float64)
    out, out_var = np.empty(xs.size), np.empty(xs.size)
    _local(residual, mask, xs, ys, int(half_size), float(sigma), int(maxiters), int(min_pixels), out, out_var)
    return out, out_var
