"""Celestial WCS stored as numbers in the cube, recoverable as :class:`astropy.wcs.WCS`.

Each (band, obs) image carries a gnomonic (TAN) projection with optional SIP
distortion of order up to :data:`SIP_ORDER`, as in the real Level 2 headers, held in
small data variables so that they are written, appended and selected with the images:

=============  ==============================  =========================================
variable       dims                            meaning
=============  ==============================  =========================================
wcs_crpix      band, obs, wcs_axis             reference pixel (FITS, 1-based)
wcs_crval      band, obs, wcs_axis             RA, Dec of the reference pixel [deg]
wcs_cd         band, obs, wcs_axis, wcs_pix    linear transform [deg / pixel]
wcs_sip_a/b    band, obs, sip_p, sip_q         SIP pixel-to-sky coefficients
wcs_sip_ap/bp  band, obs, sip_p, sip_q         SIP sky-to-pixel coefficients
=============  ==============================  =========================================

Pixel coordinates are those of the active array: astropy's 0-based pixel (0, 0) is
active pixel ``x = 0, y = 0``, so ``wcs.pixel_to_world(ds.x, ds.y)`` works on labelled
coordinates directly (also on raw frames, whose border has negative labels). NaN in
``wcs_crval`` means "no WCS for this image".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
from astropy.wcs import WCS, Sip

from .errors import CubeValidationError

__all__ = [
    "SIP_ORDER",
    "WCS_VARIABLES",
    "arrays_to_wcs",
    "cube_wcs",
    "focal_plane_wcs",
    "tan_wcs",
    "wcs_to_arrays",
    "wcs_variables",
]

SIP_ORDER = 3
_NSIP = SIP_ORDER + 1
_SIP_KEYS = ("a", "b", "ap", "bp")
WCS_VARIABLES = ("wcs_crpix", "wcs_crval", "wcs_cd", *tuple(f"wcs_sip_{k}" for k in _SIP_KEYS))
_DIMS = {
    "wcs_crpix": ("wcs_axis",),
    "wcs_crval": ("wcs_axis",),
    "wcs_cd": ("wcs_axis", "wcs_pix"),
    **{f"wcs_sip_{k}": ("sip_p", "sip_q") for k in _SIP_KEYS},
}
_UNITS = {"wcs_crpix": "pixel", "wcs_crval": "deg", "wcs_cd": "deg / pixel"}


def tan_wcs(
    *,
    ra: float,
    dec: float,
    pa: float,
    pixel_scale: float,
    n_pixels: int,
) -> WCS:
    """A TAN WCS centred on an ``n_pixels`` square image.

    Parameters
    ----------
    ra, dec
        Sky position of the image centre [deg].
    pa
        Position angle of the image +y axis, east of north [deg].
    pixel_scale
        [arcsec / pixel].
    n_pixels
        Active pixels per side.

    Notes
    -----
    The parity is the sky's (east to the left of north, as in the real images, whose
    MWIR frames are flipped to match): +y points to position angle ``pa`` and +x to
    ``pa + 270`` deg.
    """
    s = pixel_scale / 3600.0
    t = np.deg2rad(pa)
    # Columns are the (east, north) directions of +x and +y.
    cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra % 360.0, dec]
    w.wcs.crpix = [(n_pixels + 1) / 2.0, (n_pixels + 1) / 2.0]
    w.wcs.pc = cd
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


def focal_plane_wcs(
    *,
    ra: float,
    dec: float,
    pa: float,
    offset: tuple[float, float],
    rotation: float,
    pixel_scale: float,
    n_pixels: int,
    sip: Mapping[str, np.ndarray] | None = None,
) -> WCS:
    """The WCS of one detector of a focal plane pointed at a boresight.

    Parameters
    ----------
    ra, dec
        Boresight [deg].
    pa
        Position angle of the focal-plane +y axis at the boresight, east of north [deg].
    offset
        Focal-plane position (u along +x, v along +y) of the detector centre relative to
        the boresight [deg], in the telescope's gnomonic projection.
    rotation
        The detector's own rotation in the focal plane, +y towards east [deg].
    pixel_scale, n_pixels
        [arcsec / pixel] and active pixels per side.
    sip
        Optional distortion ``{"a", "b", "ap", "bp"}`` (SIP arrays about the detector
        centre, as in the real headers).

    Notes
    -----
    This is the geometry of the paper's coarse astrometry: planned boresight and roll
    plus the fixed detector offsets give each image's WCS to the accuracy of the pointing.
    """
    t = np.deg2rad(pa)
    u, v = np.deg2rad(offset[0]), np.deg2rad(offset[1])

    def sky(du: float, dv: float) -> tuple[float, float]:
        # focal-plane (x, y) -> tangent-plane (east, north) -> sphere
        xi = (u + du) * -np.cos(t) + (v + dv) * np.sin(t)
        eta = (u + du) * np.sin(t) + (v + dv) * np.cos(t)
        d0, a0 = np.deg2rad(dec), np.deg2rad(ra)
        den = np.cos(d0) - eta * np.sin(d0)
        a = a0 + np.arctan2(xi, den)
        d = np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, den))
        return float(a), float(d)

    a_c, d_c = sky(0.0, 0.0)
    a_y, d_y = sky(0.0, 1e-4)
    # position angle of the detector's +y direction at its own centre
    pa_c = np.arctan2(np.sin(a_y - a_c) * np.cos(d_y),
                      np.cos(d_c) * np.sin(d_y) - np.sin(d_c) * np.cos(d_y) * np.cos(a_y - a_c))
    w = tan_wcs(ra=float(np.rad2deg(a_c)), dec=float(np.rad2deg(d_c)), pa=float(np.rad2deg(pa_c)) + rotation,
                pixel_scale=pixel_scale, n_pixels=n_pixels)
    if sip is None:
        return w
    arr = wcs_to_arrays(w)
    return arrays_to_wcs(arr["wcs_crpix"], arr["wcs_crval"], arr["wcs_cd"],
                         *(_pad(sip.get(k)) for k in _SIP_KEYS))


def _pad(coeffs: np.ndarray | None) -> np.ndarray:
    out = np.zeros((_NSIP, _NSIP))
    if coeffs is not None:
        c = np.asarray(coeffs, dtype=np.float64)
        if c.shape[0] > _NSIP:
            if np.any(c[_NSIP:, :]) or np.any(c[:, _NSIP:]):
                raise ValueError(f"SIP order {c.shape[0] - 1} exceeds the supported order {SIP_ORDER}")
            c = c[:_NSIP, :_NSIP]
        out[: c.shape[0], : c.shape[1]] = c
    return out


def wcs_to_arrays(wcs: WCS | None) -> dict[str, np.ndarray]:
    """The numeric form of one celestial WCS (all NaN for ``None``)."""
    if wcs is None:
        return {
            "wcs_crpix": np.full(2, np.nan),
            "wcs_crval": np.full(2, np.nan),
            "wcs_cd": np.full((2, 2), np.nan),
            **{f"wcs_sip_{k}": np.zeros((_NSIP, _NSIP)) for k in _SIP_KEYS},
        }
    if wcs.naxis != 2 or not wcs.wcs.ctype[0].startswith("RA---TAN"):
        raise ValueError(f"only 2-d TAN celestial WCSs are stored, got ctype {list(wcs.wcs.ctype)}")
    sip = wcs.sip
    out = {
        "wcs_crpix": np.array(wcs.wcs.crpix, dtype=np.float64),
        "wcs_crval": np.array(wcs.wcs.crval, dtype=np.float64),
        "wcs_cd": np.array(wcs.pixel_scale_matrix, dtype=np.float64),
    }
    for k in _SIP_KEYS:
        out[f"wcs_sip_{k}"] = _pad(getattr(sip, k) if sip is not None else None)
    return out


def arrays_to_wcs(
    crpix: Any,
    crval: Any,
    cd: Any,
    sip_a: Any = None,
    sip_b: Any = None,
    sip_ap: Any = None,
    sip_bp: Any = None,
) -> WCS:
    """Build an :class:`astropy.wcs.WCS` from the numeric form (inverse of :func:`wcs_to_arrays`)."""
    crval = np.asarray(crval, dtype=np.float64)
    if not np.all(np.isfinite(crval)):
        raise ValueError("no celestial WCS stored for this image (wcs_crval is NaN)")
    w = WCS(naxis=2)
    has_sip = sip_a is not None and (np.any(sip_a) or np.any(sip_b))
    suffix = "-SIP" if has_sip else ""
    w.wcs.ctype = ["RA---TAN" + suffix, "DEC--TAN" + suffix]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crpix = np.asarray(crpix, dtype=np.float64)
    w.wcs.crval = crval
    w.wcs.pc = np.asarray(cd, dtype=np.float64)
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.radesys = "ICRS"
    if has_sip:
        inv = sip_ap is not None and (np.any(sip_ap) or np.any(sip_bp))
        w.sip = Sip(
            np.asarray(sip_a, dtype=np.float64),
            np.asarray(sip_b, dtype=np.float64),
            np.asarray(sip_ap, dtype=np.float64) if inv else None,
            np.asarray(sip_bp, dtype=np.float64) if inv else None,
            w.wcs.crpix,
        )
    w.wcs.set()
    return w


def wcs_variables(wcs: Mapping[tuple[int, int], WCS | None], bands: Any, obs: Any) -> dict[str, xr.Variable]:
    """Cube variables for a grid of WCSs.

    Parameters
    ----------
    wcs
        ``{(band, obs_key): WCS}``; images without an entry get no WCS (NaN).
    bands, obs
        The cube's ``band`` and ``obs`` coordinate values.
    """
    bands, obs = list(np.asarray(bands)), list(np.asarray(obs))
    unknown = [k for k in wcs if k[0] not in bands or k[1] not in obs]
    if unknown:
        raise CubeValidationError([f"WCS given for (band, obs) {unknown[:3]} not in the cube"])
    grid = [[wcs_to_arrays(wcs.get((b, o))) for o in obs] for b in bands]
    out = {}
    for name, dims in _DIMS.items():
        data = np.array([[cell[name] for cell in row] for row in grid], dtype=np.float64)
        data = data.reshape((len(bands), len(obs), *data.shape[2:]))
        attrs = {"units": _UNITS[name]} if name in _UNITS else {}
        out[name] = xr.Variable(("band", "obs", *dims), data, attrs)
    return out


def cube_wcs(ds: xr.Dataset, *, band: int, obs: int) -> WCS:
    """The celestial WCS of one image of a cube (loads a few numbers).

    Parameters
    ----------
    ds
        An exposure cube holding the ``wcs_*`` variables.
    band, obs
        Labels of the image (detector number, observation key).
    """
    missing = [v for v in WCS_VARIABLES[:3] if v not in ds]
    if missing:
        raise KeyError(f"the cube has no celestial WCS (missing {', '.join(missing)})")
    cell = ds[[v for v in WCS_VARIABLES if v in ds]].sel(band=band, obs=obs)
    values = {k: np.asarray(v.values) for k, v in cell.data_vars.items()}
    return arrays_to_wcs(
        values["wcs_crpix"],
        values["wcs_crval"],
        values["wcs_cd"],
        *(values.get(f"wcs_sip_{k}") for k in _SIP_KEYS),
    )
