"""Compute Known Solar System Object Positions: which catalogued SSOs fall on each image.

The paper's module lists the Solar System Objects of the SSO catalogue that fall in
each SPHEREx frame, with their astrometric coordinates during the integration and the
UTC time of the observation, stored as an ancillary Parquet table per image. Here:

1. the elements table (:data:`sphx.io.mpcorb.ELEMENTS_SCHEMA`, e.g. from
   :func:`~sphx.io.mpcorb.read_mpcorb`) is prepared once (:func:`prepare_orbits`);
2. per exposure, **every** object is propagated once to the mid-exposure time with the
   built-in two-body propagator (:mod:`sphx.kernels.kepler`, offline, no data files)
   and kept as a candidate if it lies within the field radius of any of the exposure's
   images plus a per-object allowance for its light-time shift (``|v| / c``) and its
   motion over half the exposure;
3. the candidates are computed exactly (light time iterated) at ``mjd_beg``,
   ``mjd_avg`` and ``mjd_end``, projected through each image's WCS, and kept where any
   of the three positions falls on the image (``-margin <= x, y <= n_pixels - 1 +
   margin``, 0-based pixels).

Positions are *astrometric*: the geometric position at the emission time seen from the
spacecraft (the Earth from :mod:`sphx.ephemeris` plus the header's geocentric
``sc_position``), without aberration, as the catalogue stars that fix the WCS. Being
two-body, they ignore planetary perturbations: with elements at an epoch within a
month or two of the observation (as MPCORB's are), that costs of order arcseconds for
main-belt objects, more after close approaches to planets. The propagator itself
agrees with a numerical integration of the two-body problem to ~1e-7 arcsec over +-30
days for elliptic, near-parabolic and hyperbolic orbits (see ``tests/test_sso.py``).
``kete`` or another n-body propagator is not used even where installed.

Predicted brightness: the IAU H-G system (Bowell et al. 1989, the two-parameter
exponential phase functions) for minor planets; ``m = H + 5 log10(delta) + 2.5 G
log10(r)`` for comets (the MPC's law). Predicted fluxes in the SPHEREx bands are not
computed.

The simulator writes an ``sso_elements`` table (:mod:`sphx.simulate.sso`) whose
objects cross the simulated fields; they are not rendered into the simulated images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import xarray as xr
from astropy.time import Time
from astropy.wcs import WCS

from .ephemeris import earth_sun_barycentric, observer_barycentric, tt_from_utc
from .errors import OrbitElementsError
from .instrument import Instrument
from .kernels.kepler import C_AU_PER_DAY, astrometric, perifocal_basis, perihelion_form, propagate
from .wcs import WCS_VARIABLES, arrays_to_wcs

__all__ = [
    "SSO_SCHEMA",
    "Orbits",
    "prepare_orbits",
    "sso_exposure",
    "sso_positions",
    "sso_table",
]

_RAD_TO_ARCSEC = 180.0 / math.pi * 3600.0
_REQUIRED = ("designation", "e", "incl_deg", "node_deg", "peri_deg")
_MEAN_FORM = ("a_au", "mean_anomaly_deg", "epoch_mjd_tt")
_PERI_FORM = ("q_au", "tp_mjd_tt")
_SAFETY = 2.0 / _RAD_TO_ARCSEC  # slack of the pre-selection beyond the computed allowance [rad]


def _field(name: str, type_: pa.DataType, unit: str | None, doc: str) -> pa.Field:
    return pa.field(name, type_, metadata={"doc": doc, **({"unit": unit} if unit else {})})


SSO_SCHEMA = pa.schema(
    [
        _field("designation", pa.string(), None, "designation of the object in the elements table"),
        _field("utc", pa.string(), None, "UTC of mid-exposure, ISO 8601"),
        _field("mjd_avg", pa.float64(), "d", "UTC MJD of mid-exposure"),
        _field("ra", pa.float64(), "deg", "astrometric ICRS right ascension at mid-exposure"),
        _field("dec", pa.float64(), "deg", "astrometric ICRS declination at mid-exposure"),
        _field("ra_beg", pa.float64(), "deg", "right ascension at the start of the integration"),
        _field("dec_beg", pa.float64(), "deg", "declination at the start of the integration"),
        _field("ra_end", pa.float64(), "deg", "right ascension at the end of the integration"),
        _field("dec_end", pa.float64(), "deg", "declination at the end of the integration"),
        _field("x", pa.float64(), "pixel", "0-based active-pixel column at mid-exposure"),
        _field("y", pa.float64(), "pixel", "0-based active-pixel row at mid-exposure"),
        _field("rate", pa.float64(), "arcsec / h", "apparent rate over the integration (NaN if it has no length)"),
        _field("r_helio", pa.float64(), "AU", "heliocentric distance"),
        _field("delta", pa.float64(), "AU", "distance from the spacecraft"),
        _field("phase_angle", pa.float64(), "deg", "Sun-object-spacecraft angle"),
        _field("v_mag", pa.float64(), "mag", "predicted V magnitude (H-G system; comets: total magnitude law)"),
    ],
    metadata={"frame": "ICRS, astrometric (light time, no aberration)", "propagator": "two-body (sphx.kernels.kepler)"},
)
"""Columns of one image's SSO table (``sso_table`` adds ``obsid`` and ``band`` in front)."""


@dataclass(frozen=True, eq=False)
class Orbits:
    """Orbits ready to propagate: perihelion form and orientation, one row per object.

    Attributes
    ----------
    designation
        Arrow string array.
    q, e, tp
        Perihelion distance [AU], eccentricity, time of perihelion [TT MJD], shape (n,).
    p, qv
        Perifocal unit vectors on ICRS axes, shape (n, 3).
    h, g, comet
        Absolute magnitude, slope parameter and whether the comet law applies, (n,).
    """

    designation: pa.Array
    q: np.ndarray
    e: np.ndarray
    tp: np.ndarray
    p: np.ndarray
    qv: np.ndarray
    h: np.ndarray
    g: np.ndarray
    comet: np.ndarray

    def __len__(self) -> int:
        return int(self.q.size)

    def take(self, index: np.ndarray) -> Orbits:
        """The orbits at integer positions ``index``."""
        index = np.asarray(index, dtype=np.int64)
        return Orbits(self.designation.take(pa.array(index)), self.q[index], self.e[index], self.tp[index],
                      self.p[index], self.qv[index], self.h[index], self.g[index], self.comet[index])


def _column(table: pa.Table, name: str, default: float = np.nan) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, default)
    col = table.column(name)
    if pa.types.is_boolean(col.type):
        return col.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    return col.cast(pa.float64()).fill_null(default).to_numpy(zero_copy_only=False)


def prepare_orbits(elements: pa.Table | pads.Dataset | Orbits) -> Orbits:
    """Check an elements table and convert it for propagation (do it once per run).

    Parameters
    ----------
    elements
        :data:`~sphx.io.mpcorb.ELEMENTS_SCHEMA` rows (a ``pyarrow.dataset.Dataset`` is
        read whole). Required: ``designation``, ``e``, ``incl_deg``, ``node_deg``,
        ``peri_deg`` and either ``a_au``, ``mean_anomaly_deg``, ``epoch_mjd_tt`` or
        ``q_au``, ``tp_mjd_tt``; ``H``, ``G`` and ``comet`` are optional.

    Raises
    ------
    OrbitElementsError
        Missing columns, or rows with neither complete form of the elements or with
        impossible ones (named by designation).
    """
    if isinstance(elements, Orbits):
        return elements
    if isinstance(elements, pads.Dataset):
        elements = elements.to_table()
    if not isinstance(elements, pa.Table):
        raise TypeError(f"elements must be a pyarrow Table or Dataset, got {type(elements).__name__}")
    names = set(elements.column_names)
    missing = [c for c in _REQUIRED if c not in names]
    if not (set(_MEAN_FORM) <= names or set(_PERI_FORM) <= names):
        missing.append(f"either ({', '.join(_MEAN_FORM)}) or ({', '.join(_PERI_FORM)})")
    if missing:
        raise OrbitElementsError(f"the elements table lacks column(s) {', '.join(missing)}; "
                                 f"it has {sorted(names)}")
    e = _column(elements, "e")
    q_given, tp_given = _column(elements, "q_au"), _column(elements, "tp_mjd_tt")
    q_mean, tp_mean = perihelion_form(a=_column(elements, "a_au"), e=e,
                                      mean_anomaly=_column(elements, "mean_anomaly_deg"),
                                      epoch=_column(elements, "epoch_mjd_tt"))
    peri_form = np.isfinite(q_given) & np.isfinite(tp_given)
    q = np.where(peri_form, q_given, q_mean)
    tp = np.where(peri_form, tp_given, tp_mean)
    incl, node, peri = (_column(elements, c) for c in ("incl_deg", "node_deg", "peri_deg"))
    bad = ~(np.isfinite(q) & (q > 0.0) & np.isfinite(tp) & (e >= 0.0)
            & np.isfinite(incl) & np.isfinite(node) & np.isfinite(peri))
    designation = elements.column("designation").combine_chunks().cast(pa.string())
    if np.any(bad):
        rows = np.flatnonzero(bad)
        names_ = [str(designation[int(i)]) for i in rows[:5]]
        raise OrbitElementsError(
            f"{rows.size} row(s) of the elements table have no usable orbit (need e >= 0, finite angles and "
            f"a > 0 with a mean anomaly and epoch, or q > 0 with a perihelion time): {', '.join(names_)}"
            + (" ..." if rows.size > 5 else ""))
    p, qv = perifocal_basis(incl, node, peri)
    return Orbits(designation, q, e, tp, p, qv, _column(elements, "H"), _column(elements, "G", 0.15),
                  _column(elements, "comet", False).astype(bool))


# --- geometry ------------------------------------------------------------------------

def _unit_radec(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.rad2deg(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.rad2deg(np.arctan2(v[:, 2], np.hypot(v[:, 0], v[:, 1])))
    return ra, dec


def _separation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between unit vectors (n, 3) [rad], accurate at small angles."""
    return 2.0 * np.arcsin(np.clip(np.linalg.norm(a - b, axis=-1) / 2.0, 0.0, 1.0))


def _footprint(wcs: WCS, n_pixels: int, margin: float) -> tuple[np.ndarray, float]:
    """Centre direction and radius [rad] of an image grown by ``margin`` pixels."""
    lo, hi = -margin - 0.5, n_pixels - 0.5 + margin
    edge = np.linspace(lo, hi, 9)
    xs = np.concatenate([edge, edge, np.full(9, lo), np.full(9, hi)])
    ys = np.concatenate([np.full(9, lo), np.full(9, hi), edge, edge])
    c = (n_pixels - 1) / 2.0
    ra, dec = wcs.all_pix2world(np.append(xs, c), np.append(ys, c), 0)
    v = _unit_radec(np.asarray(ra), np.asarray(dec))
    radius = float(np.max(_separation(v[:-1], v[-1][None, :])))
    return v[-1], radius * 1.02  # SIP edges may bulge between the sampled points


def _hg_magnitude(h: np.ndarray, g: np.ndarray, r: np.ndarray, delta: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """IAU H-G system: V = H + 5 log10(r delta) - 2.5 log10((1 - G) phi1 + G phi2)."""
    t = np.tan(phase / 2.0)
    phi1 = np.exp(-3.33 * t**0.63)
    phi2 = np.exp(-1.87 * t**1.22)
    with np.errstate(divide="ignore", invalid="ignore"):
        return h + 5.0 * np.log10(r * delta) - 2.5 * np.log10((1.0 - g) * phi1 + g * phi2)


def _comet_magnitude(h: np.ndarray, g: np.ndarray, r: np.ndarray, delta: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return h + 5.0 * np.log10(delta) + 2.5 * g * np.log10(r)


@dataclass
class _Epochs:
    """Observer and Sun at the start, middle and end of one exposure."""

    utc: np.ndarray         # (3,) UTC MJD
    tt: np.ndarray          # (3,) TT MJD
    observer: np.ndarray    # (3, 3) barycentric [AU]
    sun: np.ndarray         # (3, 3) barycentric [AU]
    sun_velocity: np.ndarray  # (3, 3) [AU / d]


def _epochs(mjd_beg: float, mjd_avg: float, mjd_end: float, sc_position_km: Any) -> _Epochs:
    utc = np.array([mjd_beg, mjd_avg, mjd_end], dtype=np.float64)
    if not np.all(np.isfinite(utc)):
        raise ValueError(f"exposure times must be finite, got mjd_beg/avg/end = {utc.tolist()}")
    if not (utc[0] <= utc[1] <= utc[2]):
        raise ValueError(f"exposure times must satisfy mjd_beg <= mjd_avg <= mjd_end, got {utc.tolist()}")
    if sc_position_km is None:
        sc = None
    else:
        sc = np.asarray(sc_position_km, dtype=np.float64)
        if sc.shape == (3,):
            sc = np.broadcast_to(sc, (3, 3))
        if sc.shape != (3, 3):
            raise ValueError(f"sc_position_km must have shape (3,) or (3 epochs, 3) [km], got {sc.shape}")
    _, sun = earth_sun_barycentric(utc)
    _, sun_before = earth_sun_barycentric(utc - 0.5)
    _, sun_after = earth_sun_barycentric(utc + 0.5)
    return _Epochs(utc, tt_from_utc(utc), observer_barycentric(utc, sc), sun, sun_after - sun_before)


def _candidates(orbits: Orbits, ep: _Epochs, footprints: list[tuple[np.ndarray, float]]) -> list[np.ndarray]:
    """Per image, the objects that may fall on it (one propagation of all objects)."""
    pos, vel, _ = propagate(orbits.q, orbits.e, orbits.tp, orbits.p, orbits.qv, ep.tt[1])
    rel = ep.sun[1] + pos - ep.observer[1]
    delta = np.linalg.norm(rel, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        direction = rel / delta[:, None]
    speed = np.linalg.norm(vel, axis=1)
    span = max(ep.utc[1] - ep.utc[0], ep.utc[2] - ep.utc[1])
    v_obs = 0.0
    if ep.utc[2] > ep.utc[0]:
        v_obs = float(np.linalg.norm(ep.observer[2] - ep.observer[0]) / (ep.utc[2] - ep.utc[0]))
    # the light-time shift moves an object by at most |v| tau / delta = |v| / c on the sky;
    # over half the exposure by at most (|v| + |v_obs|) span / delta
    with np.errstate(invalid="ignore", divide="ignore"):
        allowance = 1.1 * speed / C_AU_PER_DAY + (speed + v_obs) * span / delta + _SAFETY
    out = []
    for centre, radius in footprints:
        cos_sep = direction @ centre
        limit = np.cos(np.minimum(radius + allowance, np.pi))
        out.append(np.flatnonzero(cos_sep >= limit))
    return out


def _empty() -> pa.Table:
    return SSO_SCHEMA.empty_table()


def _on_images(orbits: Orbits, ep: _Epochs, wcs: Sequence[WCS], n_pixels: int, margin: float,
               candidates: list[np.ndarray]) -> list[pa.Table]:
    union = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
    if union.size == 0:
        return [_empty() for _ in wcs]
    sub = orbits.take(union)
    per_epoch = [astrometric(sub.q, sub.e, sub.tp, sub.p, sub.qv, float(ep.tt[k]), observer=ep.observer[k],
                             sun=ep.sun[k], sun_velocity=ep.sun_velocity[k]) for k in range(3)]
    radec = [_radec(r["direction"]) for r in per_epoch]
    mid = per_epoch[1]
    duration_h = (ep.utc[2] - ep.utc[0]) * 24.0
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = (_separation(per_epoch[0]["direction"], per_epoch[2]["direction"]) * _RAD_TO_ARCSEC / duration_h
                if duration_h > 0 else np.full(union.size, np.nan))
        cos_phase = np.einsum("ij,ij->i", mid["helio"], mid["relative"]) / (mid["r"] * mid["delta"])
    phase = np.arccos(np.clip(cos_phase, -1.0, 1.0))
    vmag = np.where(sub.comet, _comet_magnitude(sub.h, sub.g, mid["r"], mid["delta"]),
                    _hg_magnitude(sub.h, sub.g, mid["r"], mid["delta"], phase))
    utc = Time(ep.utc[1], format="mjd", scale="utc").isot
    lo, hi = -margin, n_pixels - 1 + margin
    tables = []
    for w, cand in zip(wcs, candidates, strict=True):
        if cand.size == 0:
            tables.append(_empty())
            continue
        rows = np.searchsorted(union, cand)  # union is sorted and holds every candidate
        inside = np.zeros(rows.size, bool)
        pix = []
        for ra, dec in radec:
            x, y = w.all_world2pix(ra[rows], dec[rows], 0, quiet=True)
            x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            inside |= (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)
            pix.append((x, y))
        keep = rows[inside]
        x_mid, y_mid = pix[1][0][inside], pix[1][1][inside]
        columns = {
            "designation": sub.designation.take(pa.array(keep)),
            "utc": pa.array([utc] * keep.size, pa.string()),
            "mjd_avg": np.full(keep.size, ep.utc[1]),
            "ra": radec[1][0][keep], "dec": radec[1][1][keep],
            "ra_beg": radec[0][0][keep], "dec_beg": radec[0][1][keep],
            "ra_end": radec[2][0][keep], "dec_end": radec[2][1][keep],
            "x": x_mid, "y": y_mid,
            "rate": rate[keep],
            "r_helio": mid["r"][keep], "delta": mid["delta"][keep],
            "phase_angle": np.rad2deg(phase[keep]),
            "v_mag": vmag[keep],
        }
        tables.append(pa.Table.from_pydict(columns, schema=SSO_SCHEMA))
    return tables


def sso_exposure(
    elements: pa.Table | pads.Dataset | Orbits,
    *,
    wcs: Sequence[WCS],
    n_pixels: int,
    mjd_beg: float,
    mjd_avg: float,
    mjd_end: float,
    sc_position_km: np.ndarray | None = None,
    margin: float = 0.5,
) -> list[pa.Table]:
    """The SSOs on each image of one exposure (all objects propagated once, shared).

    Parameters
    ----------
    elements
        Orbital elements (see :func:`prepare_orbits`; pass its result when calling for
        many exposures).
    wcs
        Celestial WCS of each image (0-based active pixels, as :func:`sphx.wcs.cube_wcs`).
    n_pixels
        Active pixels per side of the images.
    mjd_beg, mjd_avg, mjd_end
        UTC MJD of the start, middle and end of the integration [d].
    sc_position_km
        Geocentric spacecraft position on ICRS axes [km], shape (3,) or (3, 3) for
        (beg, avg, end); ``None`` observes from the geocentre.
    margin
        Pixels beyond the pixel centres ``0 .. n_pixels - 1`` that still count as on the
        image; the default 0.5 is the detector's physical edge.

    Returns
    -------
    list of pyarrow.Table
        One :data:`SSO_SCHEMA` table per WCS, in the elements' order; an object is
        listed where its position at the start, middle or end falls on the image.
    """
    if n_pixels <= 0:
        raise ValueError(f"n_pixels={n_pixels} must be positive")
    if not margin >= 0:
        raise ValueError(f"margin={margin!r} must be >= 0 pixels")
    orbits = prepare_orbits(elements)
    wcs = list(wcs)
    if not wcs:
        return []
    if len(orbits) == 0:
        return [_empty() for _ in wcs]
    ep = _epochs(mjd_beg, mjd_avg, mjd_end, sc_position_km)
    footprints = [_footprint(w, n_pixels, margin) for w in wcs]
    return _on_images(orbits, ep, wcs, n_pixels, margin, _candidates(orbits, ep, footprints))


def sso_positions(
    elements: pa.Table | pads.Dataset | Orbits,
    *,
    wcs: WCS,
    n_pixels: int,
    mjd_beg: float,
    mjd_avg: float,
    mjd_end: float,
    sc_position_km: np.ndarray | None = None,
    margin: float = 0.5,
) -> pa.Table:
    """The SSOs on one image (see :func:`sso_exposure` for the parameters).

    Returns
    -------
    pyarrow.Table
        :data:`SSO_SCHEMA`: designation, utc, mjd_avg, ra, dec, ra_beg, dec_beg, ra_end,
        dec_end [deg], x, y [0-based pixel, mid-exposure], rate [arcsec / h], r_helio,
        delta [AU], phase_angle [deg], v_mag [mag].
    """
    return sso_exposure(elements, wcs=[wcs], n_pixels=n_pixels, mjd_beg=mjd_beg, mjd_avg=mjd_avg,
                        mjd_end=mjd_end, sc_position_km=sc_position_km, margin=margin)[0]


def _n_pixels(level: xr.Dataset) -> int:
    inst = level.attrs.get("instrument")
    if isinstance(inst, Mapping):
        return Instrument.from_dict(inst).n_active
    x = np.asarray(level["x"].values)
    return int(np.count_nonzero(x >= 0))  # no geometry recorded: the active columns labelled >= 0


def sso_table(
    level: xr.Dataset,
    elements: pa.Table | pads.Dataset | Orbits,
    *,
    margin: float = 0.5,
    n_pixels: int | None = None,
) -> dict[str, pa.Table]:
    """One SSO table per image of a Level 2 cube, keyed ``f"{obsid}_D{band}"``.

    Parameters
    ----------
    level
        A Level 2 exposure cube with its ``wcs_*`` variables and the ``mjd_beg``,
        ``mjd_avg``, ``mjd_end`` and ``obsid`` coordinates; ``sc_position`` is used where
        present (otherwise the geocentre observes). Only the small metadata are loaded.
    elements
        Orbital elements: a pyarrow Table or Dataset, or :func:`prepare_orbits`' result.
    margin
        See :func:`sso_exposure` [pixel].
    n_pixels
        Active pixels per side; default from the cube's ``instrument`` attribute.

    Returns
    -------
    dict
        ``{"2025W51_1A_0684_2_D3": table}`` for every image with a WCS (images whose
        ``wcs_crval`` is NaN are skipped); each table is :data:`SSO_SCHEMA` preceded by
        ``obsid`` (string) and ``band`` (int8, the detector number) columns, empty where
        no object falls on the image.

    Raises
    ------
    OrbitElementsError
        If the elements table lacks columns or holds unusable orbits.
    KeyError
        If the cube has no WCS or lacks the time coordinates.
    """
    missing = [v for v in (*WCS_VARIABLES[:3], "mjd_beg", "mjd_avg", "mjd_end", "obsid") if v not in level.variables]
    if missing:
        raise KeyError(f"the cube lacks {', '.join(missing)}, needed to place solar-system objects on its images")
    orbits = prepare_orbits(elements)
    n = int(n_pixels) if n_pixels is not None else _n_pixels(level)
    names = [v for v in WCS_VARIABLES if v in level.data_vars]
    meta = level[names].load()
    bands = [int(b) for b in level["band"].values]
    obsids = [str(o) for o in level["obsid"].values]
    times = {k: np.asarray(level[k].values, dtype=np.float64) for k in ("mjd_beg", "mjd_avg", "mjd_end")}
    sc = None
    if "sc_position" in level.variables:
        sc_var = level["sc_position"]
        if "sc_epoch" in sc_var.dims:
            sc_var = sc_var.sel(sc_epoch=["beg", "avg", "end"])
        sc = np.asarray(sc_var.transpose("obs", ...).values, dtype=np.float64)
    out: dict[str, pa.Table] = {}
    for j in range(level.sizes["obs"]):
        images: list[tuple[int, WCS]] = []
        for i, b in enumerate(bands):
            cell = {k: np.asarray(meta[k].values[i, j]) for k in names}
            if not np.all(np.isfinite(cell["wcs_crval"])):
                continue
            images.append((b, arrays_to_wcs(cell["wcs_crpix"], cell["wcs_crval"], cell["wcs_cd"],
                                            *(cell.get(f"wcs_sip_{k}") for k in ("a", "b", "ap", "bp")))))
        if not images:
            continue
        tables = sso_exposure(orbits, wcs=[w for _, w in images], n_pixels=n, mjd_beg=times["mjd_beg"][j],
                              mjd_avg=times["mjd_avg"][j], mjd_end=times["mjd_end"][j],
                              sc_position_km=None if sc is None else sc[j], margin=margin)
        for (b, _), table in zip(images, tables, strict=True):
            k = table.num_rows
            table = table.add_column(0, pa.field("band", pa.int8(), metadata={"doc": "detector number"}),
                                     pa.array(np.full(k, b, np.int8)))
            table = table.add_column(0, pa.field("obsid", pa.string(), metadata={"doc": "observation id"}),
                                     pa.array([obsids[j]] * k, pa.string()))
            out[f"{obsids[j]}_D{b}"] = table
    return out
