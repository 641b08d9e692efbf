"""Catalogue sources on an image: the catalogue as one array, moved to an epoch and projected.

Create Source Mask and Estimate Fine Astrometry both place catalogued sources on
images. The catalogue (``srccat`` from Query Reference Catalog, or a ``refcat`` piece)
travels to the per-image tasks as one float64 array whose columns are
:data:`ARRAY_FIELDS`; :func:`pixels_at_epoch` moves rows to the image's epoch and
projects them through its TAN-SIP WCS in numba (agreeing with astropy's
``all_world2pix`` to 1e-5 pixel at far less cost).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import xarray as xr

from ..catalog.motion import propagate
from ..errors import StepError
from ..wcs import SIP_ORDER

__all__ = [
    "ARRAY_FIELDS",
    "CATALOG_COLUMNS",
    "CATALOG_WAVELENGTHS",
    "SRCCAT_DIM",
    "SRCCAT_ROWS",
    "catalog_array",
    "catalog_inputs",
    "image_rows",
    "interpolate_flux",
    "near_rows",
    "pixels_at_epoch",
    "sources_in_image",
    "unit_vectors",
]

CATALOG_WAVELENGTHS = {"flux_1um": 1.0, "flux_2um": 2.0, "flux_3um": 3.0, "flux_4p5um": 4.5}  # [um]
CATALOG_COLUMNS = ("ra", "dec", "ref_epoch", "pmra", "pmdec", *CATALOG_WAVELENGTHS)
# Optional columns: ``kind`` (0 star; galaxies are no astrometric calibrators) and
# ``pos_error`` [mas]; absent ones read as a star with an unknown error (NaN).
ARRAY_FIELDS = ("ux", "uy", "uz", "ra", "dec", "ref_epoch", "pmra", "pmdec", *CATALOG_WAVELENGTHS,
                "kind", "pos_error")
UX, UY, UZ, RA, DEC, EPOCH, PMRA, PMDEC, F0 = range(9)
KIND, POS_ERROR = F0 + len(CATALOG_WAVELENGTHS), F0 + len(CATALOG_WAVELENGTHS) + 1
# Query Reference Catalog puts the target groups' source lists into the cube as
# ``srccat_<column>`` variables along SRCCAT_DIM, rows of one group contiguous, and
# SRCCAT_ROWS (band, obs, 2) gives the [start, stop) rows of each image's group.
SRCCAT_DIM = "srccat_source"
SRCCAT_ROWS = "srccat_rows"
_MAS_TO_RAD = math.pi / (180.0 * 3600.0 * 1000.0)
_TINY_FLUX = 1e-30  # [uJy] floor under log(flux) for catalogue points at zero


def interpolate_flux(fluxes: np.ndarray, wavelength: np.ndarray) -> np.ndarray:
    """F_nu at ``wavelength`` from the catalogue's four monochromatic points.

    Parameters
    ----------
    fluxes
        (n, 4) F_nu at 1, 2, 3 and 4.5 um [uJy].
    wavelength
        (n,) [um].

    Returns
    -------
    numpy.ndarray
        (n,) [uJy]: linear in log F_nu against log wavelength between the two points
        around ``wavelength``, the end segments extended outside 1-4.5 um. Points at or
        below zero count as 1e-30 uJy; NaN points give NaN.
    """
    lw = np.log(np.array(list(CATALOG_WAVELENGTHS.values())))
    lf = np.log(np.maximum(np.asarray(fluxes, dtype=np.float64), _TINY_FLUX))
    x = np.log(np.asarray(wavelength, dtype=np.float64))
    seg = np.clip(np.searchsorted(lw, x) - 1, 0, lw.size - 2)
    t = (x - lw[seg]) / (lw[seg + 1] - lw[seg])
    rows = np.arange(lf.shape[0])
    return np.exp(lf[rows, seg] + t * (lf[rows, seg + 1] - lf[rows, seg]))


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Cartesian unit vectors (..., 3) of positions [deg]."""
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=-1)


@numba.njit(nogil=True, cache=True)
def near_rows(cat, centre, reach, epoch):  # pragma: no cover - compiled
    """Rows of the catalogue array within ``reach`` [rad] of ``centre`` once moved to ``epoch``."""
    cos_reach = math.cos(reach)
    out = np.empty(cat.shape[0], np.int64)
    n = 0
    for r in range(cat.shape[0]):
        cos_d = cat[r, UX] * centre[0] + cat[r, UY] * centre[1] + cat[r, UZ] * centre[2]
        if not cos_d >= cos_reach:  # the motion since the catalogue epoch may still bring it in (NaN: never)
            motion = math.hypot(cat[r, PMRA], cat[r, PMDEC]) * abs(epoch - cat[r, EPOCH]) * _MAS_TO_RAD
            if not (motion > 0.0 and math.acos(min(cos_d, 1.0)) <= reach + motion):
                continue
        out[n] = r
        n += 1
    return out[:n]


@numba.njit(inline="always")
def _sip_poly(c, u, v):  # pragma: no cover - compiled
    """SIP polynomial sum_{p,q} c[p, q] u^p v^q and its derivatives along u and v."""
    f = du = dv = 0.0
    up, up_1 = 1.0, 0.0  # u^p and u^(p-1)
    for p in range(c.shape[0]):
        vq, vq_1 = 1.0, 0.0
        for q in range(c.shape[1] - p):
            f += c[p, q] * up * vq
            du += p * c[p, q] * up_1 * vq
            dv += q * c[p, q] * up * vq_1
            vq, vq_1 = vq * v, vq
        up, up_1 = up * u, up
    return f, du, dv


@numba.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 is inf, as in numpy
def pixels_at_epoch(cat, rows, epoch, crval, cd_inverse, crpix, a, b, ap, bp):  # pragma: no cover - compiled
    """0-based pixel coordinates of catalogue rows moved to ``epoch`` [Julian year].

    Linear proper motion along the tangent plane at the source, then the gnomonic (TAN)
    projection about ``crval`` [deg], the inverse CD matrix, and the SIP distortion
    inverted by Newton's method from the ``ap``/``bp`` first guess (to 1e-6 pixel).
    NaN for sources on the far hemisphere.
    """
    a0, d0 = math.radians(crval[0]), math.radians(crval[1])
    centre = (math.cos(d0) * math.cos(a0), math.cos(d0) * math.sin(a0), math.sin(d0))
    east0 = (-math.sin(a0), math.cos(a0), 0.0)
    north0 = (-math.sin(d0) * math.cos(a0), -math.sin(d0) * math.sin(a0), math.cos(d0))
    x = np.empty(rows.size)
    y = np.empty(rows.size)
    for i in range(rows.size):
        r = rows[i]
        sx, sy, sz = cat[r, UX], cat[r, UY], cat[r, UZ]
        step = (epoch - cat[r, EPOCH]) * _MAS_TO_RAD
        if step != 0.0 and (cat[r, PMRA] != 0.0 or cat[r, PMDEC] != 0.0):
            ra, dec = math.radians(cat[r, RA]), math.radians(cat[r, DEC])
            pe, pn = step * cat[r, PMRA], step * cat[r, PMDEC]
            sx += -pe * math.sin(ra) - pn * math.sin(dec) * math.cos(ra)
            sy += pe * math.cos(ra) - pn * math.sin(dec) * math.sin(ra)
            sz += pn * math.cos(dec)
            norm = math.sqrt(sx * sx + sy * sy + sz * sz)
            sx, sy, sz = sx / norm, sy / norm, sz / norm
        depth = sx * centre[0] + sy * centre[1] + sz * centre[2]
        if not depth > 0.0:
            x[i] = y[i] = np.nan
            continue
        xi = math.degrees((sx * east0[0] + sy * east0[1]) / depth)
        eta = math.degrees((sx * north0[0] + sy * north0[1] + sz * north0[2]) / depth)
        fu = cd_inverse[0, 0] * xi + cd_inverse[0, 1] * eta
        fv = cd_inverse[1, 0] * xi + cd_inverse[1, 1] * eta
        u = fu + _sip_poly(ap, fu, fv)[0]
        v = fv + _sip_poly(bp, fu, fv)[0]
        for _ in range(10):
            fa, fa_u, fa_v = _sip_poly(a, u, v)
            fb, fb_u, fb_v = _sip_poly(b, u, v)
            r1, r2 = u + fa - fu, v + fb - fv
            j11, j12, j21, j22 = 1.0 + fa_u, fa_v, fb_u, 1.0 + fb_v
            det = j11 * j22 - j12 * j21
            du, dv = (j22 * r1 - j12 * r2) / det, (j11 * r2 - j21 * r1) / det
            u, v = u - du, v - dv
            if abs(du) < 1e-6 and abs(dv) < 1e-6:
                break
        x[i] = u + crpix[0] - 1.0
        y[i] = v + crpix[1] - 1.0
    return x, y


def sources_in_image(cat: np.ndarray, wcs: Any, x_range: tuple[float, float], y_range: tuple[float, float],
                      epoch: float, margin: float, *, parallax: np.ndarray | None = None,
                      observer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the catalogue array near the image, and their pixel labels (x, y) at ``epoch``.

    ``x_range``, ``y_range`` are the first and last pixel labels of the image; sources
    within ``margin`` pixels of it are kept. ``wcs`` is a TAN or TAN-SIP WCS as built by
    :func:`sphx.wcs.arrays_to_wcs`. With ``parallax`` (per row [mas]) and ``observer``
    (barycentric position [AU]) the sources are seen from the observer
    (:func:`sphx.catalog.motion.propagate`, as :func:`sphx.catalog.query.query_catalog`
    moves them); only the rows near the image are moved.
    """
    (xa, xb), (ya, yb) = x_range, y_range
    ra, dec = wcs.all_pix2world(np.array([(xa + xb) / 2, xa, xb, xa, xb]),
                                np.array([(ya + yb) / 2, ya, ya, yb, yb]), 0)
    u = unit_vectors(ra, dec)
    corner = float(np.arccos(np.clip(u[1:] @ u[0], -1.0, 1.0)).max())
    scale = math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * math.pi / 180.0  # [rad / pixel]
    reach = corner + (margin + 2.0) * scale
    seen_from = parallax is not None and observer is not None
    if seen_from:  # the parallactic shift is at most parallax x |observer|
        largest = float(np.nanmax(parallax, initial=0.0)) * float(np.linalg.norm(observer)) * _MAS_TO_RAD
        reach += max(largest, 0.0)
    near = near_rows(cat, u[0], min(reach, math.pi), epoch)
    moved = cat
    if seen_from and near.size:
        moved = cat[near]
        mra, mdec = propagate(moved[:, RA], moved[:, DEC], moved[:, PMRA], moved[:, PMDEC], parallax[near],
                              ref_epoch=moved[:, EPOCH], epoch=epoch, observer=observer)
        moved[:, RA], moved[:, DEC], moved[:, EPOCH] = mra, mdec, epoch
        moved[:, UX:UZ + 1] = unit_vectors(mra, mdec)
    order = SIP_ORDER + 1
    sip = wcs.sip
    a, b, ap, bp = (np.zeros((order, order)) if sip is None or getattr(sip, k) is None else
                    np.ascontiguousarray(getattr(sip, k), dtype=np.float64) for k in ("a", "b", "ap", "bp"))
    x, y = pixels_at_epoch(moved, np.arange(near.size) if moved is not cat else near, epoch, wcs.wcs.crval,
                           np.linalg.inv(wcs.wcs.get_pc() * wcs.wcs.cdelt[:, None]), wcs.wcs.crpix, a, b, ap, bp)
    keep = (np.isfinite(x) & np.isfinite(y) & (x >= xa - 0.5 - margin) & (x <= xb + 0.5 + margin)
            & (y >= ya - 0.5 - margin) & (y <= yb + 0.5 + margin))
    return near[keep], x[keep], y[keep]


def catalog_array(table: Any, *, name: str = "catalogue") -> np.ndarray:
    """The catalogue as one (n, len(ARRAY_FIELDS)) float64 array for the per-image tasks.

    Parameters
    ----------
    table
        A pyarrow Table (or a mapping of columns) with at least :data:`CATALOG_COLUMNS`:
        positions [deg] at ``ref_epoch`` [Julian year], proper motions [mas / yr] and
        F_nu [uJy]; optionally ``kind`` and ``pos_error`` [mas].
    name
        What the table is called in error messages.

    Notes
    -----
    Sources without a full astrometric solution (NaN motion or epoch) stay where listed.
    An empty catalogue gives one all-NaN row (dask cannot chunk an empty core dimension;
    a NaN row lies nowhere on the sky).

    Raises
    ------
    StepError
        If a needed column is missing.
    """
    names = list(getattr(table, "column_names", None) or table.keys())
    missing = [c for c in CATALOG_COLUMNS if c not in names]
    if missing:
        raise StepError(f"table {name!r} lacks the column(s) {missing}; it needs {list(CATALOG_COLUMNS)}")

    def column(c: str, default: float) -> np.ndarray:
        if c not in names:
            return np.full(len(ra), default)
        col = table.column(c) if hasattr(table, "column") else table[c]
        col = col.to_numpy(zero_copy_only=False) if hasattr(col, "to_numpy") else col
        return np.asarray(col, dtype=np.float64).reshape(-1)

    ra, dec = column("ra", np.nan), column("dec", np.nan)
    epoch, pmra, pmdec = column("ref_epoch", np.nan), column("pmra", np.nan), column("pmdec", np.nan)
    still = ~(np.isfinite(epoch) & np.isfinite(pmra) & np.isfinite(pmdec))
    epoch, pmra, pmdec = np.where(still, 2000.0, epoch), np.where(still, 0.0, pmra), np.where(still, 0.0, pmdec)
    out = np.column_stack([unit_vectors(ra, dec), ra, dec, epoch, pmra, pmdec,
                           *(column(c, np.nan) for c in CATALOG_WAVELENGTHS),
                           column("kind", 0.0), column("pos_error", np.nan)])
    return out if len(out) else np.full((1, len(ARRAY_FIELDS)), np.nan)


def catalog_inputs(ds: xr.Dataset, tables: Any, *, step: str) -> tuple[xr.Variable, xr.DataArray]:
    """The catalogue array and each image's rows of it, for a step's per-image tasks.

    The target groups' source lists in the cube (from Query Reference Catalog) are
    preferred; otherwise a ``srccat`` or ``refcat`` table serves every image whole.

    Returns
    -------
    catalog : xarray.Variable
        ("catalog_source", "catalog_field") float64, one chunk (shared by all tasks).
    rows : xarray.DataArray
        (band, obs, "srccat_bound") int64 [start, stop) of each image's rows.

    Raises
    ------
    StepError
        If there is no catalogue at all, or it lacks needed columns.
    """
    tables = tables or {}
    if SRCCAT_ROWS in ds:
        columns = {v[len("srccat_"):]: ds[v].values for v in ds.data_vars
                   if v.startswith("srccat_") and ds[v].dims == (SRCCAT_DIM,)}
        array = catalog_array(columns, name="srccat (in the cube)")
        rows = ds[SRCCAT_ROWS]
    else:
        name = next((t for t in ("srccat", "refcat") if tables.get(t) is not None), None)
        if name is None:
            raise StepError(f"step {step!r} needs a source catalogue: run query_reference_catalog first, or pass "
                            "tables={'srccat': ...} or tables={'refcat': ...}")
        table = tables[name]
        if hasattr(table, "to_table"):  # a pyarrow dataset: read the columns used
            have = set(table.schema.names)
            table = table.to_table(columns=[c for c in (*CATALOG_COLUMNS, "kind", "pos_error") if c in have])
        array = catalog_array(table, name=name)
        n = 0 if np.all(np.isnan(array)) else len(array)
        rows = xr.DataArray(np.array([0, n], np.int64), dims="srccat_bound").broadcast_like(
            ds["band"]).broadcast_like(ds["obs"]).transpose("band", "obs", "srccat_bound")
    catalog = xr.Variable(("catalog_source", "catalog_field"), array).chunk(-1)
    return catalog, rows.chunk({"band": 1, "obs": 1})


def image_rows(catalog: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The rows [start, stop) of the catalogue array (a NaN row when there are none)."""
    start, stop = int(rows[0]), int(rows[1])
    return catalog[start:stop] if stop > start else np.full((1, catalog.shape[1]), np.nan)
