"""Telescope and filter optics of the simulated instrument.

* **Linear variable filters.** The central wavelength of a pixel falls with its row
  (equal steps in log wavelength, longest at the bottom) and lines of constant wavelength
  are bowed: row ``y`` at column ``x`` sees the wavelength of row
  ``y + kappa n ((x - c) / (n / 2))^2`` (``kappa`` = 0.006, 12 rows at the edge of a
  2040-row detector). Bandwidth is wavelength / R.
* **PSF.** Two concentric Gaussians: a core holding 85 % of the light and a wing 2.5
  times wider. The full width at half maximum of the sum follows
  ``sqrt(a^2 + (b lambda)^2)`` with a = 4.544", b = 1.032"/um (4.61" at 0.75 um, 6.73"
  at 4.81 um, the pre-launch values). Across the field the widths grow toward the
  edges: ``sigma_x (1 + 0.1 u^2)`` and ``sigma_y (1 + 0.1 v^2)``, with (u, v) the
  position from the detector centre in units of its half-width. Sources are rendered by
  integrating the profile over each pixel (error functions), so a source's pixel fluxes
  sum to its flux; the ``average_psf`` product tabulates the same profile on the 11x11
  zone grid at 10x oversampling.
* **Focal plane.** Three detector pairs side by side along x (each SWIR detector shares
  its sky with its MWIR partner through the dichroic), with small fixed offsets and
  rotations, and a fixed third-order SIP distortion per detector (about 1.5 pixels at the
  corners of a full detector).
* **Solid angle** of every pixel from the distortion and the gnomonic projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from astropy.wcs import WCS

from ..instrument import Instrument
from ..wcs import SIP_ORDER

__all__ = [
    "FocalPlane",
    "focal_plane",
    "psf_cube",
    "psf_fwhm",
    "psf_sigmas",
    "psf_zone_centers",
    "render_point_sources",
    "solid_angle_map",
    "spectral_maps",
]

LVF_CURVATURE = 0.006
FWHM_A, FWHM_B = 4.544, 1.032  # [arcsec], [arcsec / um]
WING_FRACTION, WING_SCALE = 0.15, 2.5
FIELD_GROWTH = 0.1
DISTORTION = 1.5  # [pixel] at the corner of a 2040-pixel detector

_SQRT2 = math.sqrt(2.0)


def _fwhm_over_sigma() -> float:
    """FWHM of the two-Gaussian profile in units of the core sigma (fixed by its shape)."""
    f, s = WING_FRACTION, WING_SCALE

    def profile(r: float) -> float:
        return (1 - f) * math.exp(-0.5 * r * r) + f / s**2 * math.exp(-0.5 * r * r / s**2)

    half = 0.5 * profile(0.0)
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if profile(mid) > half else (lo, mid)
    return 2.0 * lo


_KAPPA = _fwhm_over_sigma()


# --- spectral maps -------------------------------------------------------------------
def spectral_maps(instrument: Instrument, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Central wavelength and bandwidth of every active pixel [um], shape (n, n) float32."""
    b = instrument.band(band)
    n = instrument.n_active
    c = (n - 1) / 2.0
    y = np.arange(n, dtype=np.float64)[:, None]
    x = np.arange(n, dtype=np.float64)[None, :]
    y_eff = y + LVF_CURVATURE * n * ((x - c) / (n / 2.0)) ** 2
    lam = b.wavelength_max * (b.wavelength_min / b.wavelength_max) ** ((y_eff + 0.5) / n)
    return lam.astype(np.float32), (lam / b.resolving_power).astype(np.float32)


# --- PSF -----------------------------------------------------------------------------
def psf_fwhm(wavelength: np.ndarray) -> np.ndarray:
    """FWHM of the PSF at the detector centre [arcsec] for ``wavelength`` [um]."""
    lam = np.asarray(wavelength, dtype=np.float64)
    return np.sqrt(FWHM_A**2 + (FWHM_B * lam) ** 2)


def psf_sigmas(wavelength: np.ndarray, x: np.ndarray, y: np.ndarray, *,
               instrument: Instrument) -> tuple[np.ndarray, np.ndarray]:
    """Core Gaussian widths (sigma_x, sigma_y) [pixel] at active pixel position (x, y)."""
    sigma = psf_fwhm(wavelength) / _KAPPA / instrument.pixel_scale
    half = instrument.n_active / 2.0
    u = (np.asarray(x, dtype=np.float64) - (half - 0.5)) / half
    v = (np.asarray(y, dtype=np.float64) - (half - 0.5)) / half
    return sigma * (1 + FIELD_GROWTH * u * u), sigma * (1 + FIELD_GROWTH * v * v)


@numba.njit(inline="always")
def _bin_integrals(center, sigma, start, count, step, out):
    """Integral of a unit Gaussian over ``count`` bins of width ``step`` from ``start``."""
    scale = 1.0 / (_SQRT2 * sigma)
    prev = math.erf((start - center) * scale)
    for k in range(count):
        nxt = math.erf((start + (k + 1) * step - center) * scale)
        out[k] = 0.5 * (nxt - prev)
        prev = nxt


@numba.njit(nogil=True, cache=True)
def _render(image, xs, ys, flux, sx, sy, f_wing, wing_scale, nsig):
    ny, nx = image.shape
    for s in range(xs.size):
        f = flux[s]
        if not (f > 0.0) or not np.isfinite(xs[s]) or not np.isfinite(ys[s]):
            continue
        h = math.ceil(nsig * wing_scale * max(sx[s], sy[s])) + 1
        x0 = math.floor(xs[s] + 0.5) - h
        y0 = math.floor(ys[s] + 0.5) - h
        m = 2 * h + 1
        if x0 + m <= 0 or y0 + m <= 0 or x0 >= nx or y0 >= ny:
            continue
        cx = np.empty(m)
        cy = np.empty(m)
        wx = np.empty(m)
        wy = np.empty(m)
        _bin_integrals(xs[s], sx[s], x0 - 0.5, m, 1.0, cx)
        _bin_integrals(ys[s], sy[s], y0 - 0.5, m, 1.0, cy)
        _bin_integrals(xs[s], sx[s] * wing_scale, x0 - 0.5, m, 1.0, wx)
        _bin_integrals(ys[s], sy[s] * wing_scale, y0 - 0.5, m, 1.0, wy)
        for j in range(m):
            yy = y0 + j
            if yy < 0 or yy >= ny:
                continue
            a = f * (1.0 - f_wing) * cy[j]
            b = f * f_wing * wy[j]
            for i in range(m):
                xx = x0 + i
                if 0 <= xx < nx:
                    image[yy, xx] += a * cx[i] + b * wx[i]


def render_point_sources(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                         sigma_x: np.ndarray, sigma_y: np.ndarray, *, n_sigma: float = 5.0) -> None:
    """Add point sources to ``image`` (in place), integrating the PSF over each pixel.

    Parameters
    ----------
    image
        2-d float array; pixel (j, i) covers x in [i - 0.5, i + 0.5), y likewise.
    x, y
        Source positions [pixel, 0-based].
    flux
        Source fluxes in the image's unit per pixel (summed over the stamp).
    sigma_x, sigma_y
        Core widths [pixel] (:func:`psf_sigmas`).
    n_sigma
        Stamp half-size in wing widths.
    """
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (x, y, flux, sigma_x, sigma_y)]
    _render(image, *arrays, WING_FRACTION, WING_SCALE, n_sigma)


def psf_zone_centers(instrument: Instrument) -> np.ndarray:
    """Zone centres along one axis [pixel, 0-based active]: ``(i + 0.5) n / zones - 0.5``."""
    z = instrument.psf_zones
    return (np.arange(z) + 0.5) * instrument.n_active / z - 0.5


def psf_plane(sx: float, sy: float, *, size: int, oversampling: int) -> np.ndarray:
    """The optical PSF (core plus wing, widths ``sx``, ``sy`` [pixel]) centred on a
    (size, size) stamp, integrated over pixels of 1 / ``oversampling`` of a native pixel."""
    step = 1.0 / oversampling
    start = -(size / 2.0) * step
    prof = []
    for sig in (sx, sy):
        core, wing = np.empty(size), np.empty(size)
        _bin_integrals(0.0, float(sig), start, size, step, core)
        _bin_integrals(0.0, float(sig) * WING_SCALE, start, size, step, wing)
        prof.append((core, wing))
    (cx, wx), (cy, wy) = prof
    return (1 - WING_FRACTION) * np.outer(cy, cx) + WING_FRACTION * np.outer(wy, wx)


def psf_cube(instrument: Instrument, cwave: np.ndarray) -> np.ndarray:
    """The ``average_psf`` of one detector: (zones^2, size, size) float32.

    Planes run x-fast (plane = iy * zones + ix), as in the corrected archive files.
    Each plane is the optical PSF at its zone centre and the wavelength there, integrated
    over oversampled pixels of ``pixel_scale / psf_oversampling``; planes sum to 1 up to
    the flux beyond the stamp.
    """
    centers = psf_zone_centers(instrument)
    size, over = instrument.psf_size, instrument.psf_oversampling
    out = np.empty((centers.size**2, size, size), dtype=np.float32)
    for iy, yc in enumerate(centers):
        for ix, xc in enumerate(centers):
            lam = cwave[round(yc), round(xc)]
            sx, sy = psf_sigmas(lam, xc, yc, instrument=instrument)
            plane = psf_plane(sx, sy, size=size, oversampling=over)
            out[iy * centers.size + ix] = plane
    return out


# --- focal plane ---------------------------------------------------------------------
@dataclass(frozen=True)
class FocalPlane:
    """Fixed geometry of one detector in the focal plane.

    Attributes
    ----------
    offset
        (u, v) of the detector centre from the boresight along focal-plane x and y [deg].
    rotation
        Detector roll in the focal plane [deg].
    sip
        SIP arrays ``a, b, ap, bp`` about the detector centre.
    """

    offset: tuple[float, float]
    rotation: float
    sip: dict[str, np.ndarray]


_ROTATION = {1: 0.020, 2: -0.015, 3: 0.010, 4: -0.030, 5: 0.025, 6: -0.010}  # [deg]
_MWIR_SHIFT = (2.0 / 3600, -3.0 / 3600)  # [deg]


def _sip(instrument: Instrument, band: int) -> dict[str, np.ndarray]:
    """A fixed order-3 distortion and its least-squares inverse."""
    n = instrument.n_active
    half = n / 2.0
    size = DISTORTION * n / 2040.0
    rng = np.random.default_rng(1000 + band)  # fixed per detector, independent of any simulation seed
    order = SIP_ORDER
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1) if 2 <= p + q <= order]
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    for p, q in terms:
        a[p, q] = size * rng.uniform(-1, 1) / 2 / half ** (p + q)
        b[p, q] = size * rng.uniform(-1, 1) / 2 / half ** (p + q)
    # Inverse on a grid: AP(U, V) = u - U where (U, V) = (u + A, v + B).
    g = np.linspace(-half, half, 41)
    uu, vv = np.meshgrid(g, g)
    du = sum(a[p, q] * uu**p * vv**q for p, q in terms)
    dv = sum(b[p, q] * uu**p * vv**q for p, q in terms)
    big_u, big_v = uu + du, vv + dv
    inv_terms = [(p, q) for p in range(order + 1) for q in range(order + 1) if 1 <= p + q <= order]
    design = np.stack([(big_u / half) ** p * (big_v / half) ** q for p, q in inv_terms], axis=-1).reshape(-1, len(inv_terms))
    ap = np.zeros_like(a)
    bp = np.zeros_like(b)
    for target, dest in ((-du, ap), (-dv, bp)):
        coef, *_ = np.linalg.lstsq(design, target.ravel(), rcond=None)
        for (p, q), c in zip(inv_terms, coef, strict=True):
            dest[p, q] = c / half ** (p + q)
    return {"a": a, "b": b, "ap": ap, "bp": bp}


def focal_plane(instrument: Instrument, band: int) -> FocalPlane:
    """The fixed focal-plane geometry of detector ``band`` (same for every simulation)."""
    b = instrument.band(band)
    field = instrument.n_active * instrument.pixel_scale / 3600.0
    pair = (min(b.number, b.dichroic_partner) - 1) % 3  # 0, 1, 2 across x
    u = (pair - 1) * field * 1.03
    v = 0.0
    if b.array == "MWIR":
        u, v = u + _MWIR_SHIFT[0], v + _MWIR_SHIFT[1]
    return FocalPlane((u, v), _ROTATION.get(b.number, 0.0), _sip(instrument, band))


def solid_angle_map(wcs: WCS, n_pixels: int) -> np.ndarray:
    """Solid angle of every pixel of an ``n_pixels`` square image [arcsec^2], float32.

    The Jacobian of the SIP distortion and the linear transform, times the gnomonic
    area factor ``(1 + xi^2 + eta^2)^(-3/2)``.
    """
    crpix = np.asarray(wcs.wcs.crpix) - 1.0
    cd = np.asarray(wcs.pixel_scale_matrix)
    g = np.arange(n_pixels, dtype=np.float64)
    u = (g - crpix[0])[None, :]
    v = (g - crpix[1])[:, None]
    fu, fv, gu, gv = (np.zeros((n_pixels, n_pixels)) for _ in range(4))
    du, dv = np.zeros_like(fu), np.zeros_like(fu)
    if wcs.sip is not None:
        for coeffs, val, d_u, d_v in ((wcs.sip.a, du, fu, fv), (wcs.sip.b, dv, gu, gv)):
            for p in range(coeffs.shape[0]):
                for q in range(coeffs.shape[1]):
                    c = coeffs[p, q]
                    if c == 0:
                        continue
                    val += c * u**p * v**q
                    if p:
                        d_u += c * p * u ** (p - 1) * v**q
                    if q:
                        d_v += c * q * u**p * v ** (q - 1)
    jac = (1 + fu) * (1 + gv) - fv * gu
    xi = np.deg2rad(cd[0, 0] * (u + du) + cd[0, 1] * (v + dv))
    eta = np.deg2rad(cd[1, 0] * (u + du) + cd[1, 1] * (v + dv))
    area = abs(np.linalg.det(cd)) * 3600.0**2 * np.abs(jac) / (1 + xi**2 + eta**2) ** 1.5
    return area.astype(np.float32)
