"""Reference sky of the simulator: a deterministic catalog of stars and galaxies with spectra.

The sky is generated lazily, one HEALPix pixel (nested ordering) at a time: the sources
of a pixel are a pure function of ``(seed, nside, pixel)``, drawn from random streams
keyed on exactly those three numbers. Any survey region can therefore be built piece by
piece with bounded memory, a pixel's sources do not depend on which other pixels are
requested with it, and the same seed always gives the same bytes (for a given numpy
version, whose random algorithms are the only outside dependency).

Populations (densities are per square degree brighter than ``mag_limit`` at 1.6 um):

* **Stars**, ``star_density`` at the galactic poles, growing toward the plane as
  ``1 + plane_boost * exp(-|b| / plane_scale)``. Spectra are blackbodies
  ``F_nu ~ B_nu(Teff)`` with ``p(Teff) ~ Teff^-3`` on 3000-12000 K (two thirds cooler
  than 5000 K). A fraction ``ice_fraction`` are reddened background stars / young stellar
  objects seen through molecular clouds: extinction ``A(lambda) = A_K (lambda / 2.2 um)^-1.75``
  times ``exp(-tau(lambda))`` with Gaussian optical-depth profiles of H2O (3.05 um, FWHM
  0.30 um), CO2 (4.27 um, FWHM 0.020 um) and CO (4.67 um, FWHM 0.030 um) ice.
  Counts ``dN/dm ~ 10^(0.3 m)``. Proper motions: 3 mas/yr per component, and 2 % of the
  stars with 20-2000 mas/yr (log-uniform) in a random direction. Parallaxes
  ``4.74047 |mu| / v_tan`` [mas] with the tangential velocity ``v_tan`` log-normal about
  30 km/s (0.2 dex), capped at 800 mas: ~0.5 mas for the bulk, up to hundreds of mas
  for the fast movers (nearby stars).
* **Galaxies**, ``galaxy_density`` everywhere (no plane dependence), counts
  ``dN/dm ~ 10^(0.35 m)`` from ``max(mag_bright, 14)``. Redshift from a Gamma
  distribution (shape 2, mean 0.5) truncated at 3. Rest-frame continuum
  ``(1 - f) B_nu(T_pop, lambda) / B_nu(T_pop, 1.6 um) + f (lambda / 1.6 um)^alpha``: an old
  stellar population (``T_pop`` 4000-5000 K, which peaks near 1.1 um in F_nu) plus a
  power law (young stars, hot dust). Unresolved emission lines H-alpha 0.6563, Pa-beta
  1.2818, Pa-alpha 1.8751, Br-alpha 4.0523 um and the 3.3 um PAH feature, with log-normal
  equivalent widths; 10 % are strong-line galaxies (lines 6x stronger).
* **Calibrators**, ``calibrator_density`` everywhere, in addition to the stars: plain
  blackbody stars (no ice, no reddening) with Teff 5000-10000 K and mag 11-15, whose
  spectra are therefore known exactly.

Position uncertainties ``pos_error`` are Gaia-like functions of magnitude:
``sqrt(0.02^2 + 0.1 10^(0.4 (m - 21)) + 0.9 10^(0.8 (m - 21)))`` mas (0.02 mas bright,
0.1 mas at 18, 1 mas at 21), three times that (and at least 0.3 mas) for galaxies,
whose centroids are less sharp.

Every spectrum is normalised so that its monochromatic F_nu at 1.6 um equals the AB
magnitude ``mag_ab`` (``F_nu = 3631 Jy 10^(-0.4 mag_ab)``). :func:`sed_flux` evaluates
the spectra, monochromatic or averaged over top-hat bandpasses.

Positions are uniform inside each pixel, drawn exactly by picking one of the pixel's
equal-area order-29 descendants (0.4 mas across) and taking its centre; the star
density gradient is imposed by thinning candidates drawn at a bound of the density over
the pixel, so star positions follow ``1 + plane_boost exp(-|b| / plane_scale)`` exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import healpy as hp
import numba
import numpy as np
import pyarrow as pa
from scipy.special import gammainc, gammaincinv

from ..errors import SimulationError

__all__ = [
    "AB_ZERO_POINT_UJY",
    "CATALOG_NSIDE",
    "CATALOG_SCHEMA",
    "EMISSION_LINES",
    "ICE_FEATURES",
    "REFERENCE_WAVELENGTH",
    "WAVELENGTH_RANGE",
    "catalog_for_pixels",
    "pixels_in_footprint",
    "sed_flux",
]

CATALOG_NSIDE = 16  # default partitioning: 3072 pixels of 13.4 deg^2
REFERENCE_WAVELENGTH = 1.6  # [um] where mag_ab normalises every spectrum
AB_ZERO_POINT_UJY = 3631e6  # [uJy] F_nu of an AB magnitude 0 source
WAVELENGTH_RANGE = (0.5, 6.0)  # [um] where sed_flux may be evaluated

# Rest wavelengths [um] of the emission features; the order is that of the EW columns.
EMISSION_LINES = {"halpha": 0.6563, "pabeta": 1.2818, "paalpha": 1.8751, "bralpha": 4.0523, "pah33": 3.3}
# Ice absorption features: (centre, FWHM) [um]; the order is that of the tau columns.
ICE_FEATURES = {"h2o": (3.05, 0.30), "co2": (4.27, 0.020), "co": (4.67, 0.030)}

_ID_SHIFT = 24  # source_id = pixel * 2**24 + index inside the pixel
_KM_S_PER_AU_YR = 4.740470463533348  # 1 AU / Julian year [km/s]
_MAX_PARALLAX = 800.0  # [mas] about the nearest star's (Proxima Centauri: 768 mas)
_MAX_ORDER = 17  # nside <= 2**17 keeps pixel * 2**24 inside int64
_FINE_ORDER = 29  # the finest HEALPix order: positions are centres of order-29 pixels
_STREAM_TAG = 0x534B59  # 'SKY': keeps these random streams apart from other sphx streams
_STARS, _GALAXIES, _CALIBRATORS = 0, 1, 2  # random stream of each population

_C2 = 14387.768775039337  # second radiation constant h c / k [um K]
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_EXT_SLOPE, _EXT_PIVOT = -1.75, 2.2  # near-infrared extinction law A(lambda) / A_K

# Scalars for the numba kernels (globals are frozen into them at compile time).
_LREF = REFERENCE_WAVELENGTH
_H2O_C, _CO2_C, _CO_C = (c for c, _ in ICE_FEATURES.values())
_H2O_S, _CO2_S, _CO_S = (w * _SIGMA_PER_FWHM for _, w in ICE_FEATURES.values())
# Band averages use composite Gauss-Legendre quadrature. Sources with ice absorption:
# 16 nodes on panels of at most 0.04 um, which span the CO2 feature (sigma 0.0085 um)
# with 8 nodes per FWHM and integrate exp(-tau) to better than 1e-8. Smooth continua
# (blackbodies, power laws) are analytic with no singularity closer than zero
# wavelength, so on panels no longer than a quarter of the band's lower edge (Bernstein
# ellipse parameter above 17) 6 nodes converge to ~1e-11 or better.
_PANEL_ABSORBED, _PANEL_SMOOTH = 0.04, 0.25
_GL16_NODES, _GL16_WEIGHTS = np.polynomial.legendre.leggauss(16)
_GL6_NODES, _GL6_WEIGHTS = np.polynomial.legendre.leggauss(6)
_LINE_REST = np.array(list(EMISSION_LINES.values()))

# ICRS -> galactic rotation (Hipparcos definition, as used by astropy); only its third
# row is needed here: sin(b) = row . unit vector.
_GAL_Z = np.array([-0.8676661490190047, -0.1980763734312015, 0.4559837761750669])


# --- schema ---------------------------------------------------------------------------
def _field(name: str, type_: pa.DataType, unit: str, description: str) -> pa.Field:
    return pa.field(name, type_, nullable=False, metadata={"unit": unit, "description": description})


_EW_FIELDS = [
    _field(f"ew_{k}", pa.float32(), "um", f"observed-frame equivalent width of {k} at {v} um (rest); 0 stars")
    for k, v in EMISSION_LINES.items()
]
_TAU_FIELDS = [
    _field(f"tau_{k}", pa.float32(), "", f"peak optical depth of {k} ice at {c} um (FWHM {w} um); 0 if not ice")
    for k, (c, w) in ICE_FEATURES.items()
]
_FLUX_WAVELENGTHS = {"flux_1um": 1.0, "flux_2um": 2.0, "flux_3um": 3.0, "flux_4p5um": 4.5}

CATALOG_SCHEMA = pa.schema(
    [
        _field("source_id", pa.int64(), "", "unique id: HEALPix pixel (nested) * 2**24 + index in the pixel"),
        _field("ra", pa.float64(), "deg", "ICRS right ascension at ref_epoch"),
        _field("dec", pa.float64(), "deg", "ICRS declination at ref_epoch"),
        _field("ref_epoch", pa.float64(), "yr", "Julian year of ra, dec"),
        _field("pmra", pa.float64(), "mas/yr", "proper motion in right ascension, times cos(dec)"),
        _field("pmdec", pa.float64(), "mas/yr", "proper motion in declination"),
        _field("parallax", pa.float64(), "mas", "parallax; 0 unknown or none (galaxies)"),
        _field("pos_error", pa.float32(), "mas", "1-sigma position uncertainty per axis at ref_epoch"),
        _field("kind", pa.int8(), "", "0 star, 1 galaxy"),
        _field("calibrator", pa.bool_(), "", "spectrophotometric calibrator: an exact blackbody star"),
        _field("ice", pa.bool_(), "", "reddened star behind ice absorption"),
        _field("mag_ab", pa.float32(), "mag(AB)", "AB magnitude at 1.6 um, the normalisation of the spectrum"),
        _field("teff", pa.float32(), "K", "blackbody temperature of a star; NaN galaxies"),
        _field("redshift", pa.float32(), "", "galaxy redshift; NaN stars"),
        _field("pop_temp", pa.float32(), "K", "temperature of the galaxy's old-population blackbody; NaN stars"),
        _field("pl_frac", pa.float32(), "", "power-law share of the rest-frame 1.6 um galaxy continuum; NaN stars"),
        _field("pl_slope", pa.float32(), "", "galaxy power law F_nu ~ lambda**pl_slope (rest frame); NaN stars"),
        *_EW_FIELDS,
        _field("a_k", pa.float32(), "mag", "K-band extinction, A(lambda) = a_k (lambda / 2.2 um)**-1.75; 0 unreddened"),
        *_TAU_FIELDS,
        *(
            _field(k, pa.float32(), "uJy", f"monochromatic F_nu at {v} um")
            for k, v in _FLUX_WAVELENGTHS.items()
        ),
    ]
)

_DEFAULTS = {"pop_temp": 4500.0, "pl_frac": 0.0, "pl_slope": 0.0, "a_k": 0.0}  # optional SED columns
_REQUIRED = ("kind", "mag_ab", "teff", "redshift")


# --- spectra (numba) ------------------------------------------------------------------
# The continuum of a source is written with per-source coefficients so that each
# evaluation costs one expm1 (and one log and exp for galaxies), r = 1 / lambda [1/um]:
#   star     r^3 / expm1(cs r) * 10^(-0.4 A(lambda)) * exp(-tau(lambda)),  cs = c2 / Teff
#   galaxy   kb r^3 / expm1(cs r) + kp lambda^slope,                      cs = c2 (1 + z) / T_pop
# where kb and kp weigh the old population and the power law as (1 - f) : f in the rest
# frame at 1.6 um. Constant factors cancel in the normalisation at 1.6 um.
@numba.njit(cache=True, nogil=True)
def _coefficients(kind, teff, z, tpop, fpl, slope):  # pragma: no cover - compiled
    """(cs, kb, kp) of one source (see above)."""
    if kind == 1:
        opz = 1.0 + z
        kb = (1.0 - fpl) * (_LREF * opz) ** 3 * math.expm1(_C2 / (_LREF * tpop))
        kp = fpl * (_LREF * opz) ** -slope
        return _C2 * opz / tpop, kb, kp
    return _C2 / teff, 1.0, 0.0


@numba.njit(cache=True, nogil=True)
def _shape(kind, cs, kb, kp, slope, a_k, th2o, tco2, tco, lam):  # pragma: no cover - compiled
    """Unnormalised F_nu at observed wavelength lam [um], absorption included."""
    r = 1.0 / lam
    s = kb * r * r * r / math.expm1(cs * r)
    if kind == 1:
        if kp != 0.0:
            s += kp * math.exp(slope * math.log(lam))
        return s
    if a_k != 0.0:
        s *= 10.0 ** (-0.4 * a_k * (lam / _EXT_PIVOT) ** _EXT_SLOPE)
    tau = 0.0
    if th2o != 0.0:
        d = (lam - _H2O_C) / _H2O_S
        tau += th2o * math.exp(-0.5 * d * d)
    if tco2 != 0.0:
        d = (lam - _CO2_C) / _CO2_S
        tau += tco2 * math.exp(-0.5 * d * d)
    if tco != 0.0:
        d = (lam - _CO_C) / _CO_S
        tau += tco * math.exp(-0.5 * d * d)
    return s * math.exp(-tau) if tau != 0.0 else s


@numba.njit(cache=True, nogil=True)
def _flux_kernel(src, lam, bw, banded, fnu_ref, kind, teff, z, tpop, fpl, slope, a_k, th2o, tco2, tco,
                 ew, line_rest, nodes16, weights16, nodes6, weights6):  # pragma: no cover - compiled
    """F_nu [uJy] of source ``src[j]`` at ``lam[j]`` [um], averaged over ``bw[j]`` if banded."""
    n = fnu_ref.size
    cs, kb, kp, norm = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        cs[i], kb[i], kp[i] = _coefficients(kind[i], teff[i], z[i], tpop[i], fpl[i], slope[i])
        norm[i] = fnu_ref[i] / _shape(kind[i], cs[i], kb[i], kp[i], slope[i], a_k[i], th2o[i], tco2[i], tco[i],
                                      _LREF)
    out = np.empty(src.size)
    for j in range(src.size):
        i = src[j]
        k, c, b, pl, sl = kind[i], cs[i], kb[i], kp[i], slope[i]
        ak, t1, t2, t3 = a_k[i], th2o[i], tco2[i], tco[i]
        if not banded:
            out[j] = norm[i] * _shape(k, c, b, pl, sl, ak, t1, t2, t3, lam[j])
            continue
        width = bw[j]
        lo = lam[j] - 0.5 * width
        # Composite Gauss-Legendre (see _PANEL_ABSORBED): the bandwidth is below the
        # wavelength, so lo > width / 2 and a smooth continuum needs at most 8 panels.
        if t1 != 0.0 or t2 != 0.0 or t3 != 0.0:
            nodes, weights, hmax = nodes16, weights16, _PANEL_ABSORBED
        else:
            nodes, weights, hmax = nodes6, weights6, _PANEL_SMOOTH * lo
        npan = max(1, math.ceil(width / hmax))
        h = width / npan
        acc = 0.0
        for p in range(npan):
            mid = lo + h * (p + 0.5)
            for q in range(nodes.size):
                acc += weights[q] * _shape(k, c, b, pl, sl, ak, t1, t2, t3, mid + 0.5 * h * nodes[q])
        mean = acc / (2.0 * npan)  # the weights sum to 2 on each panel
        if k == 1:
            hi = lo + width
            zi = z[i]
            for m in range(line_rest.size):
                e = ew[i, m]
                if e != 0.0:
                    ll = line_rest[m] * (1.0 + zi)
                    if lo <= ll < hi:  # an unresolved line adds continuum * EW / width
                        mean += _shape(k, c, b, pl, sl, ak, t1, t2, t3, ll) * e / width
        out[j] = norm[i] * mean
    return out


# --- sed_flux ---------------------------------------------------------------------------
def _column(catalog: pa.Table | Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """A catalog column as a numpy array, or None when the catalog lacks it."""
    if isinstance(catalog, pa.Table):
        if name not in catalog.column_names:
            return None
        return catalog.column(name).to_numpy()
    if name not in catalog:
        return None
    return np.asarray(catalog[name])


def _sed_arrays(catalog: pa.Table | Mapping[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    """The float64 SED parameters of the selected sources (optional ones defaulted)."""
    missing = [c for c in _REQUIRED if _column(catalog, c) is None]
    if missing:
        raise SimulationError(f"catalog: lacks the column(s) {missing} that sed_flux needs")
    kind = np.asarray(_column(catalog, "kind"))
    n = kind.shape[0] if kind.ndim else 0
    if kind.ndim != 1:
        raise SimulationError(f"catalog: columns must be one-dimensional, 'kind' has shape {kind.shape}")
    index = _rows_index(rows, n)
    names = [*_REQUIRED, *_DEFAULTS, *(f.name for f in _EW_FIELDS), *(f.name for f in _TAU_FIELDS)]
    out: dict[str, np.ndarray] = {}
    for name in names:
        col = _column(catalog, name)
        if col is None:
            col = np.full(n, _DEFAULTS.get(name, 0.0))
        col = np.asarray(col)
        if col.shape != (n,):
            raise SimulationError(f"catalog: column {name!r} has shape {col.shape}, expected ({n},)")
        if index is not None:
            col = col[index]
        out[name] = np.ascontiguousarray(col, dtype=np.float64)
    kinds = out["kind"]
    if not np.isin(kinds, (0, 1)).all():
        raise SimulationError(f"catalog: 'kind' must be 0 (star) or 1 (galaxy), found {np.unique(kinds)}")
    out["kind"] = kinds.astype(np.int8)
    return out


def _rows_index(rows, n: int) -> np.ndarray | None:
    """Row selection as int64 indices (None: all rows)."""
    if rows is None:
        return None
    r = np.asarray(rows)
    if r.dtype == bool:
        if r.shape != (n,):
            raise SimulationError(f"rows: a boolean mask must have shape ({n},), got {r.shape}")
        return np.flatnonzero(r)
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise SimulationError(f"rows: must be integer indices or a boolean mask, got dtype {r.dtype}")
    r = r.astype(np.int64).ravel()
    if r.size and (r.min() < 0 or r.max() >= n):
        raise SimulationError(f"rows: indices must lie in [0, {n}), got {r.min()}..{r.max()}")
    return r


def _evaluate(p: dict[str, np.ndarray], wavelength, bandwidth) -> np.ndarray:
    """Validated wavelengths and bandwidths -> F_nu [uJy] (see :func:`sed_flux`)."""
    n = p["kind"].shape[0]
    lam = np.asarray(wavelength, dtype=np.float64)
    bw = None if bandwidth is None else np.asarray(bandwidth, dtype=np.float64)
    lo, hi = WAVELENGTH_RANGE
    bad = ~np.isfinite(lam) | (lam < lo) | (lam > hi)
    if bad.any():
        raise SimulationError(f"wavelength: must lie in {lo}-{hi} um, got {lam[bad].ravel()[0]!r}")
    if bw is not None:
        bad = ~np.isfinite(bw) | (bw <= 0)
        if bad.any():
            raise SimulationError(f"bandwidth: must be positive and finite [um], got {bw[bad].ravel()[0]!r}")
    ndim = max(lam.ndim, 0 if bw is None else bw.ndim, 1)
    # The source axis is the first axis of the result: wavelengths of shape (n,) or
    # (n, k) are per source, a common grid is passed as shape (1, k).
    src = np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (ndim - 1))
    try:
        arrays = np.broadcast_arrays(src, lam, lam if bw is None else bw)
    except ValueError as err:
        shapes = f"wavelength {lam.shape}" + ("" if bw is None else f", bandwidth {bw.shape}")
        raise SimulationError(
            f"wavelength: shapes {shapes} do not broadcast against {n} sources on the first axis "
            "(pass a common grid as shape (1, k))"
        ) from err
    shape = arrays[0].shape
    s, lm, bb = (np.ascontiguousarray(a).ravel() for a in arrays)
    if bw is not None and (bb >= lm).any():
        raise SimulationError("bandwidth: must be smaller than the wavelength (resolving power above 1)")
    ew = np.column_stack([p[f.name] for f in _EW_FIELDS]) if n else np.zeros((0, len(_EW_FIELDS)))
    fnu_ref = AB_ZERO_POINT_UJY * 10.0 ** (-0.4 * p["mag_ab"])
    out = _flux_kernel(
        s, lm, bb, bw is not None, fnu_ref, p["kind"], p["teff"], p["redshift"], p["pop_temp"],
        p["pl_frac"], p["pl_slope"], p["a_k"], p["tau_h2o"], p["tau_co2"], p["tau_co"],
        np.ascontiguousarray(ew), _LINE_REST, _GL16_NODES, _GL16_WEIGHTS, _GL6_NODES, _GL6_WEIGHTS,
    )
    return out.reshape(shape)


def sed_flux(catalog: pa.Table | Mapping[str, np.ndarray], wavelength, bandwidth=None, *, rows=None) -> np.ndarray:
    """Flux density of each source, monochromatic or averaged over a top-hat bandpass.

    Parameters
    ----------
    catalog : pyarrow.Table or mapping of column name to 1-d array
        Sources as made by :func:`catalog_for_pixels`. Needs ``kind``, ``mag_ab``,
        ``teff`` and ``redshift``; missing optional columns default to no lines, no
        absorption, no reddening, and a pure 4500 K old population for galaxies.
    wavelength : float or array [um]
        Centre of the bandpass, within 0.5-6 um. Broadcast against the source axis, which
        is the first axis: shape ``()`` for all sources, ``(n,)`` one per source,
        ``(n, k)`` k per source, ``(1, k)`` a common grid of k.
    bandwidth : float or array [um], optional
        Full width of the top-hat bandpass, broadcast like ``wavelength``; positive and
        below the wavelength. None (default) evaluates monochromatically.
    rows : int array or boolean mask, optional
        Evaluate only these rows of the catalog; ``n`` is then the number selected.

    Returns
    -------
    numpy.ndarray of float64 [uJy]
        ``F_nu`` averaged over wavelength within the bandpass, shape of the broadcast
        with the source axis first.

    Notes
    -----
    The continuum (with any absorption) is averaged with composite Gauss-Legendre
    quadrature: 16 nodes on panels of at most 0.04 um for sources with ice absorption,
    which resolves the 0.02 um wide CO2 feature at any resolving power, and 6 nodes on
    panels of at most a quarter of their lower edge for smooth continua (relative
    error ~1e-11). Emission lines are unresolved: a line of observed-frame equivalent width
    ``EW`` [um] at ``lambda_l`` inside ``[centre - width/2, centre + width/2)`` adds
    ``continuum(lambda_l) * EW / width`` exactly; monochromatic fluxes omit lines.

    Raises
    ------
    SimulationError
        A wavelength outside 0.5-6 um, a bandwidth not in (0, wavelength), shapes that do not
        broadcast, rows out of range, or a catalog lacking a needed column.
    """
    return _evaluate(_sed_arrays(catalog, rows), wavelength, bandwidth)


def _check_nside(nside) -> int:
    """nside as int, or SimulationError."""
    if isinstance(nside, bool) or not isinstance(nside, int | np.integer):
        raise SimulationError(f"nside: must be an integer power of two, got {nside!r}")
    nside = int(nside)
    if nside < 1 or nside & (nside - 1) or nside > 2**_MAX_ORDER:
        raise SimulationError(f"nside: must be a power of two between 1 and 2**{_MAX_ORDER}, got {nside}")
    return nside


def pixels_in_footprint(ra, dec, radius, *, nside: int = CATALOG_NSIDE) -> np.ndarray:
    """HEALPix pixels (nested) overlapping one or more discs on the sky.

    Parameters
    ----------
    ra, dec : float or array_like [deg]
        Disc centres (ICRS).
    radius : float or array_like [deg]
        Disc radii, broadcast against the centres, in [0, 180].
    nside : int
        HEALPix resolution of the catalog partition.

    Returns
    -------
    numpy.ndarray of int64
        Sorted unique pixels that overlap at least one disc (``healpy.query_disc`` with
        ``inclusive=True``: every pixel touching a disc, and possibly a few more).
    """
    nside = _check_nside(nside)
    ra, dec, radius = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (ra, dec, radius)))
    if not (np.isfinite(ra).all() and np.isfinite(dec).all()) or (np.abs(dec) > 90).any():
        raise SimulationError("ra, dec: disc centres must be finite with |dec| <= 90 deg")
    if not np.isfinite(radius).all() or (radius < 0).any() or (radius > 180).any():
        raise SimulationError(f"radius: must lie in 0-180 deg, got {radius.ravel()!r}")
    vec = hp.ang2vec(ra.ravel(), dec.ravel(), lonlat=True).reshape(-1, 3)
    found = [
        hp.query_disc(nside, v, math.radians(r), inclusive=True, nest=True)
        for v, r in zip(vec, radius.ravel(), strict=True)
    ]
    return np.unique(np.concatenate([np.zeros(0, np.int64), *found]).astype(np.int64))


# --- catalog generation -----------------------------------------------------------------
@dataclass(frozen=True)
class _SkyParams:
    star_density: float
    galaxy_density: float
    plane_boost: float
    plane_scale: float
    mag_bright: float
    mag_limit: float
    calibrator_density: float
    ice_fraction: float
    ref_epoch: float


def _validated(**kw) -> _SkyParams:
    """The generation parameters as floats, or SimulationError naming the bad one."""
    p = {}
    for k, v in kw.items():
        try:
            p[k] = float(v)
        except (TypeError, ValueError):
            raise SimulationError(f"{k}: must be a number, got {v!r}") from None
        if not math.isfinite(p[k]):
            raise SimulationError(f"{k}: must be finite, got {v!r}")
    for k in ("star_density", "galaxy_density", "calibrator_density", "plane_boost"):
        if p[k] < 0:
            raise SimulationError(f"{k}: must not be negative, got {p[k]}")
    if p["plane_scale"] <= 0:
        raise SimulationError(f"plane_scale: must be positive [deg], got {p['plane_scale']}")
    if p["mag_limit"] <= p["mag_bright"]:
        raise SimulationError(f"mag_limit: must be fainter than mag_bright={p['mag_bright']}, got {p['mag_limit']}")
    if not 0 <= p["ice_fraction"] <= 1:
        raise SimulationError(f"ice_fraction: must lie in [0, 1], got {p['ice_fraction']}")
    return _SkyParams(**p)


def _rng(seed: int, nside: int, pixel: int, population: int) -> np.random.Generator:
    """The random stream of one population in one pixel: a function of these numbers only."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_STREAM_TAG, nside, pixel, population)))
    )


def _uniform_in_pixel(rng: np.random.Generator, nside: int, pixel: int, n: int) -> np.ndarray:
    """n uniform points in a nested pixel, as unit vectors of shape (3, n).

    The descendants of a nested pixel at a finer order are a contiguous, equal-area
    range of indices, so picking one uniformly and taking its centre is exact sampling
    up to the 0.4 mas size of an order-29 pixel, with no rejection.
    """
    k = _FINE_ORDER - (nside.bit_length() - 1)
    sub = rng.integers(0, 4**k, size=n, dtype=np.int64)
    x, y, z = hp.pix2vec(2**_FINE_ORDER, np.int64(pixel) * np.int64(4**k) + sub, nest=True)
    return np.stack([np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(z)])


def _abs_latitude(vec: np.ndarray) -> np.ndarray:
    """|galactic latitude| [deg] of ICRS unit vectors of shape (3, n)."""
    return np.degrees(np.arcsin(np.clip(np.abs(_GAL_Z @ vec), 0.0, 1.0)))


def _plane_factor(abs_b, p: _SkyParams):
    """Star density relative to the pole: 1 + plane_boost exp(-|b| / plane_scale)."""
    return 1.0 + p.plane_boost * np.exp(-np.asarray(abs_b) / p.plane_scale)


def _plane_bound(nside: int, pixel: int, p: _SkyParams) -> float:
    """An upper bound of the plane factor over a pixel (for thinning).

    |b| changes by at most the angular distance moved, so |b| >= |b_centre| - r over
    the pixel, r the largest centre-to-corner distance; the margin of 1.5 covers the
    curved pixel edges.
    """
    centre = np.array(hp.pix2vec(nside, pixel, nest=True)).reshape(3, 1)
    rmax = 1.5 * math.degrees(hp.max_pixrad(nside))
    return float(_plane_factor(max(0.0, float(_abs_latitude(centre)[0]) - rmax), p))


def _power_law_mags(rng: np.random.Generator, n: int, slope: float, bright: float, faint: float) -> np.ndarray:
    """Magnitudes with dN/dm ~ 10^(slope m) on [bright, faint] (inverse CDF)."""
    u = rng.random(n)
    lo, hi = 10.0 ** (slope * bright), 10.0 ** (slope * faint)
    return np.log10(lo + u * (hi - lo)) / slope


def _proper_motions(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Star proper motions [mas/yr]: a 3 mas/yr core and a 2 % tail up to 2"/yr."""
    pmra, pmdec = rng.normal(0.0, 3.0, size=(2, n))
    fast = rng.random(n) < 0.02
    speed = 10.0 ** rng.uniform(math.log10(20.0), math.log10(2000.0), n)
    angle = rng.uniform(0.0, 2 * math.pi, n)
    pmra = np.where(fast, speed * np.sin(angle), pmra)
    pmdec = np.where(fast, speed * np.cos(angle), pmdec)
    return pmra, pmdec


def _parallax(rng: np.random.Generator, pmra: np.ndarray, pmdec: np.ndarray) -> np.ndarray:
    """Star parallaxes [mas] from the proper motions and a tangential velocity.

    ``v_tan = 4.74047 |mu| / parallax`` [km/s] with ``mu`` in mas/yr: drawing ``v_tan``
    about 30 km/s makes the fast movers the nearby stars. Drawn after every other
    column of the population so that adding parallaxes left the earlier draws as they were.
    """
    v_tan = 30.0 * 10.0 ** rng.normal(0.0, 0.2, pmra.size)  # [km/s]
    return np.minimum(_KM_S_PER_AU_YR * np.hypot(pmra, pmdec) / v_tan, _MAX_PARALLAX)


def _pos_error(mag: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Gaia-like position uncertainty [mas] against magnitude; galaxies 3x, at least 0.3 mas."""
    f = 10.0 ** (0.4 * (np.asarray(mag, dtype=np.float64) - 21.0))  # flux relative to mag 21
    star = np.sqrt(0.02**2 + 0.1 * f + 0.9 * f * f)  # photon- then background-limited
    return np.where(kind == 1, np.maximum(3.0 * star, 0.3), star)


def _radec(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ICRS ra, dec [deg] of unit vectors of shape (3, n)."""
    x, y, z = vec
    ra = np.degrees(np.arctan2(y, x)) % 360.0
    return np.where(ra >= 360.0, 0.0, ra), np.degrees(np.arctan2(z, np.hypot(x, y)))


def _empty_columns(n: int) -> dict[str, np.ndarray]:
    """Defaults of the per-population columns (NaN where not applicable)."""
    nan = np.full(n, np.nan)
    cols = {
        "pmra": np.zeros(n), "pmdec": np.zeros(n), "parallax": np.zeros(n),
        "calibrator": np.zeros(n, bool), "ice": np.zeros(n, bool),
        "teff": nan, "redshift": nan, "pop_temp": nan, "pl_frac": nan, "pl_slope": nan, "a_k": np.zeros(n),
    }
    for f in (*_EW_FIELDS, *_TAU_FIELDS):
        cols[f.name] = np.zeros(n)
    return cols


def _stars(rng: np.random.Generator, nside: int, pixel: int, area: float, p: _SkyParams) -> dict[str, np.ndarray]:
    """Field stars of one pixel, thinned to the latitude-dependent density."""
    fmax = _plane_bound(nside, pixel, p)
    cand = int(rng.poisson(p.star_density * area * fmax))
    _check_count(cand, nside)
    vec = _uniform_in_pixel(rng, nside, pixel, cand)
    keep = rng.random(cand) * fmax < _plane_factor(_abs_latitude(vec), p)
    vec = vec[:, keep]
    n = vec.shape[1]
    c = _empty_columns(n)
    c["ra"], c["dec"] = _radec(vec)
    c["kind"] = np.zeros(n, np.int8)
    c["mag_ab"] = _power_law_mags(rng, n, 0.3, p.mag_bright, p.mag_limit)
    # p(T) ~ T^-3 on 3000-12000 K by inverse CDF: cool stars dominate.
    t1, t2 = 3000.0**-2, 12000.0**-2
    c["teff"] = (t1 + rng.random(n) * (t2 - t1)) ** -0.5
    c["pmra"], c["pmdec"] = _proper_motions(rng, n)
    # Ice parameters are drawn for every star so that raising ice_fraction only adds
    # ice stars and leaves the others' draws unchanged.
    ice = rng.random(n) < p.ice_fraction
    a_k = rng.uniform(0.5, 3.0, n)
    tau = 10.0 ** rng.uniform(-1.0, math.log10(2.0), n)
    c["ice"] = ice
    c["a_k"] = np.where(ice, a_k, 0.0)
    c["tau_h2o"] = np.where(ice, tau, 0.0)
    c["tau_co2"] = np.where(ice, tau * rng.uniform(0.8, 2.5, n), 0.0)
    c["tau_co"] = np.where(ice, tau * rng.uniform(0.1, 1.0, n), 0.0)
    c["parallax"] = _parallax(rng, c["pmra"], c["pmdec"])
    return c


def _galaxies(rng: np.random.Generator, nside: int, pixel: int, area: float, p: _SkyParams) -> dict[str, np.ndarray]:
    """Galaxies of one pixel: uniform density, redshifted continua with lines."""
    n = int(rng.poisson(p.galaxy_density * area))
    _check_count(n, nside)
    c = _empty_columns(n)
    c["ra"], c["dec"] = _radec(_uniform_in_pixel(rng, nside, pixel, n))
    c["kind"] = np.ones(n, np.int8)
    bright = max(p.mag_bright, 14.0) if p.mag_limit > 14.0 else p.mag_bright
    c["mag_ab"] = _power_law_mags(rng, n, 0.35, bright, p.mag_limit)
    # Gamma(shape 2, scale 0.25) (mean 0.5) truncated at z = 3 by inverse CDF.
    c["redshift"] = 0.25 * gammaincinv(2.0, rng.random(n) * gammainc(2.0, 3.0 / 0.25))
    c["pop_temp"] = rng.uniform(4000.0, 5000.0, n)
    c["pl_frac"] = rng.uniform(0.0, 0.5, n)
    c["pl_slope"] = rng.uniform(-0.5, 2.0, n)
    strong = rng.random(n) < 0.10
    # Rest-frame H-alpha EW ~ 16 A median (0.35 dex scatter); strong-line galaxies 6x.
    ha = 10.0 ** rng.normal(math.log10(16e-4), 0.35, n) * np.where(strong, 6.0, 1.0)
    ratios = {"halpha": 1.0, "pabeta": 0.12, "paalpha": 0.35, "bralpha": 0.08}
    one_plus_z = 1.0 + c["redshift"]
    for name, ratio in ratios.items():
        scatter = 10.0 ** rng.normal(0.0, 0.15, n) if name != "halpha" else 1.0
        c[f"ew_{name}"] = ha * ratio * scatter * one_plus_z
    pah = 10.0 ** rng.normal(math.log10(0.03), 0.3, n) * np.where(strong, 2.0, 1.0)
    c["ew_pah33"] = pah * one_plus_z
    return c


def _calibrators(rng: np.random.Generator, nside: int, pixel: int, area: float, p: _SkyParams) -> dict[str, np.ndarray]:
    """Calibrator stars of one pixel: plain blackbodies, mag 11-15, Teff 5000-10000 K."""
    n = int(rng.poisson(p.calibrator_density * area))
    _check_count(n, nside)
    c = _empty_columns(n)
    c["ra"], c["dec"] = _radec(_uniform_in_pixel(rng, nside, pixel, n))
    c["kind"] = np.zeros(n, np.int8)
    c["calibrator"] = np.ones(n, bool)
    c["mag_ab"] = _power_law_mags(rng, n, 0.3, 11.0, 15.0)
    c["teff"] = rng.uniform(5000.0, 10000.0, n)
    c["pmra"], c["pmdec"] = _proper_motions(rng, n)
    c["parallax"] = _parallax(rng, c["pmra"], c["pmdec"])
    return c


def _check_count(n: int, nside: int) -> None:
    if n >= 2**_ID_SHIFT:
        raise SimulationError(
            f"nside: {n} sources in one pixel of nside={nside} overflow the 2**{_ID_SHIFT} ids per pixel; "
            "use a larger nside or lower densities"
        )


def _pixel_columns(seed: int, nside: int, pixel: int, p: _SkyParams) -> dict[str, np.ndarray]:
    """All columns of one pixel's sources, in schema types."""
    area = hp.nside2pixarea(nside, degrees=True)
    parts = [
        make(_rng(seed, nside, pixel, stream), nside, pixel, area, p)
        for make, stream in ((_stars, _STARS), (_galaxies, _GALAXIES), (_calibrators, _CALIBRATORS))
    ]
    n = sum(len(part["ra"]) for part in parts)
    _check_count(n, nside)
    cols: dict[str, np.ndarray] = {
        "source_id": np.int64(pixel) * 2**_ID_SHIFT + np.arange(n, dtype=np.int64),
        "ref_epoch": np.full(n, p.ref_epoch),
    }
    for field in CATALOG_SCHEMA:
        if field.name in parts[0]:
            dtype = field.type.to_pandas_dtype()
            cols[field.name] = np.concatenate([part[field.name] for part in parts]).astype(dtype)
    cols["pos_error"] = _pos_error(cols["mag_ab"], cols["kind"]).astype(np.float32)
    # Reference fluxes from the stored (float32) parameters, so that they equal
    # sed_flux of the table itself.
    sed = _sed_arrays(cols, None)
    for name, lam in _FLUX_WAVELENGTHS.items():
        cols[name] = _evaluate(sed, lam, None).astype(np.float32)
    return cols


def catalog_for_pixels(
    pixels,
    *,
    seed: int,
    nside: int = CATALOG_NSIDE,
    star_density: float = 1500.0,
    galaxy_density: float = 2500.0,
    plane_boost: float = 30.0,
    plane_scale: float = 5.0,
    mag_bright: float = 8.0,
    mag_limit: float = 21.0,
    calibrator_density: float = 0.5,
    ice_fraction: float = 0.01,
    ref_epoch: float = 2016.0,
) -> pa.Table:
    """Stars, galaxies and calibrators in the given HEALPix pixels (nested ordering).

    Each pixel's sources are a pure function of ``(seed, nside, pixel)`` and the
    options, so a region can be built piece by piece and a pixel's rows do not depend
    on the other pixels requested.

    Parameters
    ----------
    pixels : int or array_like of int
        Nested HEALPix pixel numbers at ``nside``; duplicates are dropped and rows come
        in increasing pixel order (then star, galaxy, calibrator order within a pixel).
    seed : int
        Non-negative seed of the sky.
    nside : int
        HEALPix resolution of the partition, a power of two up to 2**17.
    star_density : float [deg^-2]
        Stars brighter than ``mag_limit`` at the galactic poles.
    galaxy_density : float [deg^-2]
        Galaxies brighter than ``mag_limit`` (uniform on the sky).
    plane_boost, plane_scale : float [-], [deg]
        The star density is ``star_density (1 + plane_boost exp(-|b| / plane_scale))``
        at galactic latitude ``b``.
    mag_bright, mag_limit : float [mag(AB) at 1.6 um]
        Magnitude range; counts rise as 10^(0.3 m) for stars and 10^(0.35 m) for
        galaxies, whose bright end is ``max(mag_bright, 14)``.
    calibrator_density : float [deg^-2]
        Calibrator stars (mag 11-15, Teff 5000-10000 K, exact blackbodies), in addition
        to ``star_density``.
    ice_fraction : float
        Fraction of the (non-calibrator) stars that are reddened and show ice absorption.
    ref_epoch : float [Julian year]
        Epoch of the positions.

    Returns
    -------
    pyarrow.Table
        One row per source with the columns of :data:`CATALOG_SCHEMA` (units in each
        field's metadata); the schema metadata ``sphx.sky`` records seed, nside and the
        options as JSON.

    Raises
    ------
    SimulationError
        Negative densities, ``mag_limit <= mag_bright``, ``nside`` not a power of two,
        pixels out of range, a negative seed, or more than 2**24 sources in a pixel.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise SimulationError(f"seed: must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    nside = _check_nside(nside)
    p = _validated(
        star_density=star_density, galaxy_density=galaxy_density, plane_boost=plane_boost,
        plane_scale=plane_scale, mag_bright=mag_bright, mag_limit=mag_limit,
        calibrator_density=calibrator_density, ice_fraction=ice_fraction, ref_epoch=ref_epoch,
    )
    pix = _check_pixels(pixels, nside)
    chunks = [_pixel_columns(seed, nside, int(q), p) for q in pix]
    arrays = []
    for field in CATALOG_SCHEMA:
        parts = [c[field.name] for c in chunks]
        values = np.concatenate(parts) if parts else np.zeros(0, field.type.to_pandas_dtype())
        arrays.append(pa.array(values, type=field.type))
    meta = {"sphx.sky": json.dumps({"seed": seed, "nside": nside, **asdict(p)})}
    return pa.Table.from_arrays(arrays, schema=CATALOG_SCHEMA.with_metadata(meta))


def _check_pixels(pixels, nside: int) -> np.ndarray:
    """Sorted unique int64 pixel numbers, or SimulationError."""
    arr = np.atleast_1d(np.asarray(pixels))
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer)
        or (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
    ):
        raise SimulationError(f"pixels: must be integer HEALPix pixel numbers, got {pixels!r}")
    arr = arr.astype(np.int64).ravel()
    npix = 12 * nside * nside
    bad = (arr < 0) | (arr >= npix)
    if bad.any():
        raise SimulationError(f"pixels: must lie in [0, {npix}) for nside={nside}, got {arr[bad][0]}")
    return np.unique(arr)
