"""Estimate Fine Astrometry for one image: blind pattern match, then iterative refinement.

The detector distortion (SIP, fixed calibration product) and the pixel scale are known;
what the coarse WCS gets wrong is where the detector points and how it is rolled. The
solution is therefore a rotation and a shift of the tangent plane (optionally a scale):

1. **Blind stage** (the role of astrometry.net in the paper). The brightest unsaturated
   stars of the image are matched to the catalogue stars of the same brightness,
   projected with the coarse WCS over the image and a ``search_radius`` around it: by
   offset voting within ``search_radius`` and ``max_rotation``
   (:func:`~sphx.astrometry.pattern.match_offsets`, robust to crowding), else by similar
   triangles (:func:`~sphx.astrometry.pattern.match_patterns`, no bound on the rotation).
2. **Refinement** (the role of scamp). Astrometric calibrators are selected as in the
   paper: stars with good catalogue astrometry (``pos_error``), not predicted to
   saturate (no catalogue flux point above ``saturation_flux``), with no catalogued
   source within ``isolation_radius`` brighter than ``isolation_ratio`` of them, and a
   measured SNR above ``min_snr``. Each is fitted at its predicted position
   (:func:`~sphx.astrometry.centroid.fit_centroids`), the rigid transform is fitted by
   weighted least squares in the tangent plane, outliers are clipped, and the loop is
   repeated, re-measuring when the solution has moved the predictions.

The result is never silently wrong: every failure sets a FINAST bit (:data:`FINAST_BITS`)
and keeps the coarse WCS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..wcs import arrays_to_wcs
from .catalog import (
    CATALOG_WAVELENGTHS,
    DEC,
    EPOCH,
    F0,
    KIND,
    PMDEC,
    PMRA,
    POS_ERROR,
    RA,
    UX,
    UZ,
    interpolate_flux,
    pixels_at_epoch,
    sources_in_image,
)
from .centroid import FLUX, FLUX_ERROR, OK, STATUS, X_ERROR, Y_ERROR, X, Y, find_peaks, fit_centroids
from .pattern import match_offsets, match_patterns

__all__ = ["DIAGNOSTICS", "FINAST_BITS", "SolveOptions", "describe_finast", "fit_rotation", "solve_image"]

FINAST_BITS = {
    1: "no usable pixels in the image",
    2: "too few catalogue stars on the image",
    4: "the blind pattern match found no solution",
    8: "too few astrometric calibrators matched",
    16: "residual rms at or above max_rms",
    32: "expected error of the solution above max_error",
}
NO_PIXELS, NO_CATALOG, NO_PATTERN, FEW_MATCHES, HIGH_RMS, POOR_SOLUTION = FINAST_BITS
DIAGNOSTICS = ("finast", "rms", "error", "n_match", "n_blind", "offset", "rotation", "scale")
_MAS_TO_RAD = math.pi / (180.0 * 3600.0 * 1000.0)


@dataclass(frozen=True)
class SolveOptions:
    """Options of :func:`solve_image` (see :class:`sphx.level2.fine_astrometry.FineAstrometryConfig`)."""

    pixel_scale: float  # [arcsec / pixel]
    bad: int
    saturated: int
    search_radius: float = 15.0  # [arcmin]
    blind_stars: int = 60
    blind_threshold: float = 10.0
    blind_flux_margin: float = 1.3
    max_rotation: float = 2.0  # [deg]
    match_radius: float = 2.0  # [pixel]
    min_snr: float = 10.0
    saturation_flux: float = 3e4  # [uJy]
    max_pos_error: float = 10.0  # [mas]
    isolation_radius: float = 2.0  # [pixel]
    isolation_ratio: float = 0.1
    max_calibrators: int = 1500
    min_matches: int = 10
    clip: float = 4.0
    systematic: float = 0.02  # [pixel]
    max_rms: float = 1.0  # [arcsec]
    max_error: float = 0.1  # [arcsec]
    fit_scale: bool = False
    stamp: int = 3


def _ujy_per_pixel(pixel_scale: float) -> float:
    """[uJy] of one pixel at 1 MJy/sr."""
    return 1e12 * math.radians(pixel_scale / 3600.0) ** 2


def describe_finast(finast: int) -> str:
    """The failures a FINAST value records, in words (``"good solution"`` for 0)."""
    if finast == 0:
        return "good solution"
    return "; ".join(text for bit, text in FINAST_BITS.items() if int(finast) & bit) or f"unknown code {finast}"


# --- geometry --------------------------------------------------------------------------------
def _sip(c: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u)
    for p in range(c.shape[0]):
        for q in range(c.shape[1] - p):
            if c[p, q]:
                out += c[p, q] * u**p * v**q
    return out


def _frame(crval: np.ndarray) -> np.ndarray:
    """Rows: the tangent point and the east and north directions there."""
    a, d = np.deg2rad(crval)
    return np.array([[math.cos(d) * math.cos(a), math.cos(d) * math.sin(a), math.sin(d)],
                     [-math.sin(a), math.cos(a), 0.0],
                     [-math.sin(d) * math.cos(a), -math.sin(d) * math.sin(a), math.cos(d)]])


def _gnomonic(u: np.ndarray, crval: np.ndarray) -> np.ndarray:
    """Tangent-plane (xi, eta) [deg] of unit vectors about ``crval``."""
    c, e, n = _frame(crval)
    depth = u @ c
    return np.degrees(np.column_stack([u @ e, u @ n]) / depth[:, None])


def _deproject(t: np.ndarray, crval: np.ndarray) -> np.ndarray:
    """RA, Dec [deg] of the tangent-plane point ``t`` [deg] about ``crval``."""
    c, e, n = _frame(crval)
    u = c + np.radians(t[0]) * e + np.radians(t[1]) * n
    u /= np.linalg.norm(u)
    return np.array([math.degrees(math.atan2(u[1], u[0])) % 360.0, math.degrees(math.asin(u[2]))])


def _unit_at_epoch(cat: np.ndarray, epoch: float) -> np.ndarray:
    """Unit vectors of catalogue rows moved by their proper motion to ``epoch`` (tangent step)."""
    u = cat[:, UX:UZ + 1].copy()
    step = (epoch - cat[:, EPOCH]) * _MAS_TO_RAD
    ra, dec = np.radians(cat[:, RA]), np.radians(cat[:, DEC])
    pe, pn = step * cat[:, PMRA], step * cat[:, PMDEC]
    u[:, 0] += -pe * np.sin(ra) - pn * np.sin(dec) * np.cos(ra)
    u[:, 1] += pe * np.cos(ra) - pn * np.sin(dec) * np.sin(ra)
    u[:, 2] += pn * np.cos(dec)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _rotation(theta: float, s: float = 1.0) -> np.ndarray:
    return s * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def fit_rotation(q: np.ndarray, xi: np.ndarray, weights: np.ndarray, *, scale: bool = False
                 ) -> tuple[float, float, np.ndarray]:
    """Weighted least-squares ``xi = s R(theta) q + t`` in the plane (closed form).

    Parameters
    ----------
    q, xi
        (n, 2) positions before and after the transform.
    weights
        (n,) inverse variances of each coordinate.
    scale
        Fit ``s``; otherwise ``s = 1`` (a rigid motion).

    Returns
    -------
    theta : float
        [rad], counter-clockwise in the plane.
    s : float
    t : numpy.ndarray
        (2,) shift.
    """
    w = weights / weights.sum()
    qm, xm = w @ q, w @ xi
    dq, dx = q - qm, xi - xm
    c = np.sum(w * (dq[:, 0] * dx[:, 0] + dq[:, 1] * dx[:, 1]))
    s_ = np.sum(w * (dq[:, 0] * dx[:, 1] - dq[:, 1] * dx[:, 0]))
    theta = math.atan2(s_, c)
    s = math.hypot(c, s_) / np.sum(w * (dq**2).sum(axis=1)) if scale else 1.0
    return theta, s, xm - _rotation(theta, s) @ qm


@dataclass
class _Solution:
    crval: np.ndarray
    cd: np.ndarray


def _refit(sol: _Solution, q_pixel: np.ndarray, u: np.ndarray, weights: np.ndarray, *, scale: bool) -> _Solution:
    """Rotate/shift the solution so that the pixels' intermediate coordinates hit the stars.

    ``q_pixel`` are the pixels' coordinates before the CD matrix (SIP applied); the fit
    runs in the tangent plane of the current reference point and is repeated about the
    moved point until the shift is below a microarcsecond.
    """
    for _ in range(6):
        q = q_pixel @ sol.cd.T
        xi = _gnomonic(u, sol.crval)
        theta, s, t = fit_rotation(q, xi, weights, scale=scale)
        sol = _Solution(_deproject(t, sol.crval), _rotation(theta, s) @ sol.cd)
        if np.hypot(*t) * 3600.0 < 1e-6 and abs(theta) < 1e-12:
            break
    return sol


def _residuals(sol: _Solution, q_pixel: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(n, 2) star minus measured position in the tangent plane [arcsec]."""
    return (_gnomonic(u, sol.crval) - q_pixel @ sol.cd.T) * 3600.0


def _pre_cd(x: np.ndarray, y: np.ndarray, crpix: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    u, v = x + 1.0 - crpix[0], y + 1.0 - crpix[1]
    return np.column_stack([u + _sip(a, u, v), v + _sip(b, u, v)])


def _isolated(x: np.ndarray, y: np.ndarray, flux: np.ndarray, candidates: np.ndarray, radius: float,
              ratio: float, wanted: int) -> np.ndarray:
    """The first ``wanted`` candidates with no other source within ``radius`` of ``ratio`` x their flux.

    Candidates are taken in their order, in batches, so that a crowded field with
    hundreds of thousands of catalogue stars only checks as many as it needs.
    """
    neighbours = 16
    kept = []
    n_kept = 0
    for start in range(0, candidates.size, 4 * wanted):
        batch = candidates[start:start + 4 * wanted]
        # only sources that could disqualify someone in the batch (a NaN flux could)
        relevant = np.flatnonzero(~(flux < ratio * np.nanmin(flux[batch])))
        tree = cKDTree(np.column_stack([x[relevant], y[relevant]]))
        dist, near = tree.query(np.column_stack([x[batch], y[batch]]), neighbours + 1, distance_upper_bound=radius)
        near = np.append(relevant, -1)[near]  # the tree's misses (index len(relevant)) become -1
        other = np.isfinite(dist) & (near != batch[:, None])
        brighter = np.zeros(other.shape, bool)
        # a neighbour with NaN flux is not trusted either
        brighter[other] = ~(flux[near[other]] < ratio * np.repeat(flux[batch], other.sum(axis=1)))
        # more neighbours than were looked at: too crowded to be a calibrator
        ok = ~brighter.any(axis=1) & ~np.isfinite(dist[:, -1])
        kept.append(batch[ok])
        n_kept += int(ok.sum())
        if n_kept >= wanted:
            break
    return np.concatenate(kept)[:wanted] if kept else candidates[:0]


def solve_image(image: np.ndarray, variance: np.ndarray, flags: np.ndarray, cwave: np.ndarray,
                crpix: np.ndarray, crval: np.ndarray, cd: np.ndarray, sip_a: np.ndarray, sip_b: np.ndarray,
                sip_ap: np.ndarray, sip_bp: np.ndarray, catalog: np.ndarray, epoch: float,
                options: SolveOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine astrometry of one image.

    Parameters
    ----------
    image, variance, flags
        The calibrated image [MJy/sr] (measured fluxes select the catalogue stars of the
        blind stage), its variance and FLAGS, on the active frame (pixel (0, 0) is active pixel x = 0, y = 0).
    cwave
        Central wavelength of every pixel [um] (catalogue fluxes are interpolated there).
    crpix, crval, cd, sip_a, sip_b, sip_ap, sip_bp
        The coarse WCS (numeric form of :mod:`sphx.wcs`).
    catalog
        Catalogue array (:func:`~sphx.astrometry.catalog.catalog_array`) of the image's
        target group.
    epoch
        Julian year of the exposure.
    options
        :class:`SolveOptions`.

    Returns
    -------
    crval : numpy.ndarray
        (2,) solved reference point [deg] (the coarse one on failure).
    cd : numpy.ndarray
        (2, 2) solved linear transform [deg / pixel].
    diagnostics : numpy.ndarray
        Values of :data:`DIAGNOSTICS`: FINAST, rms residual of the calibrators weighted
        by their inverse centroid variance [arcsec], expected rms error
        of the solution over the detector [arcsec], calibrators used, blind matches,
        shift of the image centre from the coarse WCS [arcsec], rotation from the coarse
        WCS [deg], scale relative to the coarse WCS.
    """
    o = options
    crpix, crval, cd = (np.asarray(v, dtype=np.float64) for v in (crpix, crval, cd))
    a, b, ap, bp = (np.ascontiguousarray(v, dtype=np.float64) for v in (sip_a, sip_b, sip_ap, sip_bp))
    coarse = _Solution(crval.copy(), cd.copy())
    diag = np.array([0, np.nan, np.nan, 0, 0, np.nan, np.nan, np.nan])

    def fail(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        diag[0] = int(diag[0]) | bits
        return coarse.crval, coarse.cd, diag

    ny, nx = image.shape
    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    flags = np.ascontiguousarray(flags, dtype=np.uint32)
    if not np.all(np.isfinite(crval)):
        return fail(NO_PIXELS)
    bad = np.uint32(o.bad)
    if not np.any(np.isfinite(image) & ((flags & bad) == 0)):
        return fail(NO_PIXELS)

    # catalogue stars near the image, projected with the coarse WCS
    margin = o.search_radius * 60.0 / o.pixel_scale
    wcs = arrays_to_wcs(crpix, crval, cd, sip_a, sip_b, sip_ap, sip_bp)
    rows, cx, cy = sources_in_image(catalog, wcs, (0, nx - 1), (0, ny - 1), epoch, margin)
    cat = catalog[rows]
    xi_, yi_ = np.clip(np.rint(cx), 0, nx - 1).astype(np.int64), np.clip(np.rint(cy), 0, ny - 1).astype(np.int64)
    lam = cwave[yi_, xi_].astype(np.float64)
    lam = np.where(np.isfinite(lam), lam, np.nanmedian(cwave))
    flux = interpolate_flux(cat[:, F0:F0 + len(CATALOG_WAVELENGTHS)], lam)  # [uJy]
    star = (cat[:, KIND] == 0) & np.isfinite(flux)
    inside = (cx >= 0) & (cx <= nx - 1) & (cy >= 0) & (cy <= ny - 1)
    if np.count_nonzero(star & inside) < o.min_matches:
        return fail(NO_CATALOG)

    # 1. blind stage: the brightest unsaturated stars of the image against catalogue stars
    # of the same brightness. Saturated stars give no usable peak, so in crowded fields
    # (the plane has hundreds per image) the brightest catalogue stars are absent from
    # the image's list: the catalogue list is the brightness range of the detections.
    px, py, height = find_peaks(image, variance, flags, bad, o.blind_threshold, o.stamp + 1)
    top = np.argsort(-height, kind="stable")[:4 * o.blind_stars]
    fits = fit_centroids(image, variance, flags, bad, np.uint32(o.saturated), px[top].astype(np.float64),
                         py[top].astype(np.float64), o.stamp, 1.0, 1.5)
    good = np.flatnonzero((fits[:, STATUS] == OK) & (fits[:, FLUX] > 0))[:o.blind_stars]
    if good.size < 3:
        return fail(NO_PATTERN)
    dx, dy = fits[good, X], fits[good, Y]
    measured = fits[good, FLUX] * _ujy_per_pixel(o.pixel_scale)
    in_range = np.flatnonzero(star & (flux >= measured.min() / o.blind_flux_margin)
                              & (flux <= measured.max() * o.blind_flux_margin))
    in_range = in_range[np.argsort(-flux[in_range], kind="stable")]
    min_blind = min(o.min_matches, 6)
    match = match_offsets(dx, dy, cx[in_range], cy[in_range], centre=((nx - 1) / 2.0, (ny - 1) / 2.0),
                          radius=margin, max_rotation=o.max_rotation, tolerance=o.match_radius, min_matches=min_blind)
    listed = in_range
    if match is None:  # a roll beyond max_rotation: similar triangles have no bound on it
        listed = in_range[:2 * o.blind_stars]
        match = match_patterns(dx, dy, cx[listed], cy[listed], tolerance=o.match_radius, min_matches=min_blind)
    if match is None:
        return fail(NO_PATTERN)
    diag[4] = len(match.pairs)
    det, ref = match.pairs[:, 0], listed[match.pairs[:, 1]]
    sol = _refit(coarse, _pre_cd(dx[det], dy[det], crpix, a, b), _unit_at_epoch(cat[ref], epoch), np.ones(det.size),
                 scale=False)

    # 2. refinement on the astrometric calibrators
    err = cat[:, POS_ERROR]
    peak_flux = np.nanmax(cat[:, F0:F0 + len(CATALOG_WAVELENGTHS)], axis=1)
    usable = star & inside & ~(err > o.max_pos_error) & (peak_flux < o.saturation_flux)
    candidates = np.flatnonzero(usable)
    candidates = candidates[np.argsort(-flux[candidates], kind="stable")]
    # projected positions are coarse here, but relative distances are what isolation needs
    candidates = _isolated(cx, cy, flux, candidates, o.isolation_radius, o.isolation_ratio, o.max_calibrators)
    if candidates.size < o.min_matches:
        return fail(FEW_MATCHES)
    u_cal = _unit_at_epoch(cat[candidates], epoch)
    sat = np.uint32(o.saturated)
    keep = np.zeros(0, np.int64)
    measured = None
    for _ in range(3):  # measure, fit and clip; measure again if the prediction moved
        pred_x, pred_y = pixels_at_epoch(cat, candidates, epoch, sol.crval, np.linalg.inv(sol.cd), crpix, a, b, ap, bp)
        if measured is not None and np.nanmax(np.hypot(pred_x - measured[0], pred_y - measured[1])) < 0.2:
            break
        measured = (pred_x, pred_y)
        fits = fit_centroids(image, variance, flags, bad, sat, pred_x, pred_y, o.stamp, 1.0, o.match_radius)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = fits[:, FLUX] / fits[:, FLUX_ERROR]
        ok = (fits[:, STATUS] == OK) & (snr >= o.min_snr)
        keep = np.flatnonzero(ok)
        if keep.size < o.min_matches:
            return fail(FEW_MATCHES)
        q_pix = _pre_cd(fits[:, X], fits[:, Y], crpix, a, b)
        sigma = np.hypot(np.hypot(fits[:, X_ERROR], fits[:, Y_ERROR]) / math.sqrt(2.0), o.systematic)
        weights = 1.0 / sigma**2
        for _ in range(5):
            sol = _refit(sol, q_pix[keep], u_cal[keep], weights[keep], scale=o.fit_scale)
            res = _residuals(sol, q_pix, u_cal) / (sigma[:, None] * o.pixel_scale)  # pulls
            pull = np.hypot(res[:, 0], res[:, 1])
            width = 1.4826 * np.median(np.abs(res[keep])) if keep.size else 1.0
            new = np.flatnonzero(ok & (pull <= o.clip * max(width, 1.0) * math.sqrt(2.0)))
            if np.array_equal(new, keep):
                break
            keep = new
            if keep.size < o.min_matches:
                return fail(FEW_MATCHES)

    res = _residuals(sol, q_pix[keep], u_cal[keep])
    w = weights[keep]
    # weighted by the centroid precision, so faint calibrators near the SNR cut do not dominate
    rms = float(np.sqrt(np.sum(w * np.sum(res**2, axis=1)) / w.sum()))
    chi2 = float(np.sum(w[:, None] * (res / o.pixel_scale) ** 2) / max(2 * keep.size - 3, 1))
    # expected rms error over the detector [pixel]: the shift's variance plus the
    # rotation's times the mean squared distance from the calibrators' weighted centre
    xy = np.column_stack([fits[keep, X], fits[keep, Y]])
    centre = (w @ xy) / w.sum()
    var_shift = 2.0 / w.sum() * max(chi2, 1.0)
    var_rotation = 1.0 / np.sum(w * np.sum((xy - centre) ** 2, axis=1)) * max(chi2, 1.0)  # [rad^2]
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 9), np.linspace(0, ny - 1, 9))
    spread = np.mean((gx - centre[0]) ** 2 + (gy - centre[1]) ** 2)
    error_px = math.sqrt(var_shift + var_rotation * spread)
    diag[1], diag[2], diag[3] = rms, error_px * o.pixel_scale, keep.size
    centre_pix = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    before = arrays_to_wcs(crpix, coarse.crval, coarse.cd).pixel_to_world_values(*centre_pix)
    after = arrays_to_wcs(crpix, sol.crval, sol.cd).pixel_to_world_values(*centre_pix)
    diag[5] = _separation(before, after) * 3600.0
    change = sol.cd @ np.linalg.inv(coarse.cd)  # s R(theta)
    diag[6] = math.degrees(math.atan2(change[1, 0], change[0, 0]))
    diag[7] = math.sqrt(abs(np.linalg.det(change)))
    bits = 0
    if rms >= o.max_rms:
        bits |= HIGH_RMS
    if diag[2] > o.max_error:
        bits |= POOR_SOLUTION
    diag[0] = bits
    if bits:
        return coarse.crval, coarse.cd, diag
    return sol.crval, sol.cd, diag


def _separation(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Angle between two (RA, Dec) [deg], in degrees."""
    ra1, d1, ra2, d2 = (math.radians(float(v)) for v in (*a, *b))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(ra1 - ra2)
    s = math.hypot(math.cos(d2) * math.sin(ra2 - ra1),
                   math.cos(d1) * math.sin(d2) - math.sin(d1) * math.cos(d2) * math.cos(ra2 - ra1))
    return math.degrees(math.atan2(s, c))
