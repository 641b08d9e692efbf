"""The survey plan and spacecraft orbit of the simulator.

:func:`plan_survey` lays out a time-ordered sequence of exposures the way SPHEREx takes
them: *target groups* of up to nine exposures separated by small slews along the
focal-plane y axis (the spectral direction of the linear variable filters), so that a
source steps through the filters, and large slews between groups. Each exposure gets a
real-form observation id (``2025W51_1A_0684_2``), its times, the planned and the true
(after pointing errors) boresight and the spacecraft state from :func:`spacecraft_state`.

Frames
------
Equatorial
    ICRS-aligned (J2000 mean equator and equinox to ~0.02 arcsec); the spacecraft state
    is geocentric in these axes (GCRS-like, as the headers' ``GEOCENTER`` vectors).
Ecliptic
    The equatorial frame rotated about x by the fixed J2000 mean obliquity
    :data:`OBLIQUITY` (astropy's ``BarycentricMeanEcliptic`` axes to < 0.1 arcsec).
    Used for ``SPS_ELON``/``SPS_ELAT``/``SPS_EPA`` and the Sun.
Position angles
    PA of the focal-plane +y axis, east of north, as :func:`sphx.wcs.tan_wcs` takes it:
    +x lies at ``pa + 270`` deg, and ``x = b x y`` for boresight ``b`` (right-handed).

Attitude
--------
The spacecraft keeps the Sun on its -x side (sun shield): +x is the direction away from
the Sun projected on the sky. This reproduces the one real QR2 header in ``tests/data``
(boresight at the Sun's longitude + 116 deg, ``SPS_EPA = 180``). In all-sky mode the
boresight moves along the great circle 90 deg from the Sun through the ecliptic poles and
+y points along the direction of motion, so ``SPS_EPA`` is 180 on the leg at the Sun's
longitude + 90 deg (moving south) and 0 on the leg at - 90 deg (moving north).

Times are UTC MJD; leap seconds are ignored (a plan spanning one is 1 s off after it).
The plan does not check Earth, Moon or South Atlantic Anomaly avoidance against the orbit.
"""

from __future__ import annotations

import datetime as _dt
import math
import operator
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import pyarrow as pa

from ..errors import SimulationError
from ..instrument import Instrument

__all__ = [
    "J2",
    "LARGE_SLEW_ACCEL",
    "LARGE_SLEW_SETTLE",
    "MU_EARTH",
    "OBLIQUITY",
    "PLANNING_PERIOD_DAYS",
    "R_EARTH",
    "SMALL_SLEW_TIME",
    "SurveyPlan",
    "ecliptic_to_equatorial",
    "equatorial_to_ecliptic",
    "large_slew_time",
    "orbital_period",
    "plan_survey",
    "planning_period",
    "spacecraft_state",
    "sun_longitude_j2000",
    "sun_synchronous_inclination",
]

# --- constants -----------------------------------------------------------------------
MU_EARTH = 398600.4418
"""Earth's gravitational parameter [km^3 / s^2]."""
R_EARTH = 6378.137
"""Earth's equatorial radius (WGS 84) [km]."""
J2 = 1.08263e-3
"""Earth's oblateness coefficient; drives the node precession of the orbit."""
OBLIQUITY = 23.4392911
"""J2000 mean obliquity of the ecliptic [deg]; the ecliptic frame of this module."""
SMALL_SLEW_TIME = 8.0
"""Small slew and settle between exposures of a target group [s]."""
LARGE_SLEW_SETTLE = 40.0
"""Fixed part (settling) of a large slew between target groups [s]."""
LARGE_SLEW_ACCEL = 0.025
"""Angular acceleration of the bang-bang large-slew profile [deg / s^2]."""
PLANNING_PERIOD_DAYS = 3.5
"""Length of a planning period: two per ISO week [d]."""

_DAY = 86400.0
_MJD_J2000 = 51544.5  # MJD of J2000.0 (JD 2451545.0)
_MJD_ZERO = _dt.date(1858, 11, 17)
_SUN_MEAN_RATE = 0.9856474  # mean motion of the Sun in longitude, of date [deg / day]
_PRECESSION_RATE = 5028.796195 / 3600.0 / 36525.0  # general precession in longitude [deg / day]
_SMALL_SLEW_ARCMIN = 17.0  # SPHEREx small slew on its 2040-pixel detectors [arcmin]
_DEEP_DITHER_X = 0.25  # cross-dispersion dither half-range of deep groups [field]
_DEEP_REACH_Y = 0.48  # spectral-axis reach of deep exposures from the centre [field]
_DEEP_ELONGATION = 45.0  # a deep field must stay 90 +- this from the Sun [deg]
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

_COS_E, _SIN_E = math.cos(math.radians(OBLIQUITY)), math.sin(math.radians(OBLIQUITY))
# Columns: ecliptic unit axes in equatorial coordinates (equatorial = _ECL_TO_EQ @ ecliptic).
_ECL_TO_EQ = np.array([[1.0, 0.0, 0.0], [0.0, _COS_E, -_SIN_E], [0.0, _SIN_E, _COS_E]])

Mode = Literal["all_sky", "deep"]


# --- small vector helpers --------------------------------------------------------------
def _unit(lon: np.ndarray | float, lat: np.ndarray | float) -> np.ndarray:
    """Unit vectors (..., 3) of longitudes and latitudes [deg]."""
    lo, la = np.deg2rad(lon), np.deg2rad(lat)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def _wrap360(angle: np.ndarray) -> np.ndarray:
    """Angles in [0, 360) [deg]; ``np.mod`` alone maps -1e-17 to 360.0."""
    a = np.mod(angle, 360.0)
    return np.where(a >= 360.0, a - 360.0, a)


def _lonlat(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude in [0, 360) and latitude [deg] of vectors (..., 3)."""
    lon = np.rad2deg(np.arctan2(v[..., 1], v[..., 0]))
    lat = np.rad2deg(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return _wrap360(lon), lat


def _position_angle(b: np.ndarray, d: np.ndarray) -> np.ndarray:
    """PA of tangent vectors ``d`` at positions ``b``, east of the frame's north [deg].

    At the frame's pole the longitude convention of :func:`_lonlat` (``atan2(0, 0) = 0``)
    defines east and north, consistently with the returned longitude.
    """
    lon, lat = np.deg2rad(_lonlat(b)[0]), np.deg2rad(_lonlat(b)[1])
    east = np.stack([-np.sin(lon), np.cos(lon), np.zeros_like(lon)], axis=-1)
    north = np.stack([-np.sin(lat) * np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat)], axis=-1)
    return _wrap360(np.rad2deg(np.arctan2(np.sum(d * east, -1), np.sum(d * north, -1))))


def _separation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between vectors [deg]; atan2 keeps small angles accurate."""
    return np.rad2deg(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, -1)))


def _rotate(v: np.ndarray, axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate ``v`` about unit ``axis`` by ``angle`` [rad] (Rodrigues).

    A zero angle returns ``v`` bit for bit (``v * 1 + 0``), so zero pointing errors leave
    the planned pointing exactly unchanged.
    """
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    return v * c + np.cross(axis, v) * s + axis * np.sum(axis * v, -1, keepdims=True) * (1.0 - c)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --- frames and the Sun --------------------------------------------------------------
def ecliptic_to_equatorial(lon: np.ndarray | float, lat: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Ecliptic longitude and latitude to RA and Dec (fixed J2000 obliquity) [deg]."""
    return _lonlat(_unit(lon, lat) @ _ECL_TO_EQ.T)


def equatorial_to_ecliptic(ra: np.ndarray | float, dec: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec to ecliptic longitude and latitude (fixed J2000 obliquity) [deg]."""
    return _lonlat(_unit(ra, dec) @ _ECL_TO_EQ)


def _sun_elements(mjd: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Sun's J2000 ecliptic longitude and its rate [deg, deg / day]."""
    n = np.asarray(mjd, dtype=np.float64) - _MJD_J2000
    g = np.deg2rad(357.528 + 0.9856003 * n)
    lam = (
        280.460 + _SUN_MEAN_RATE * n + 1.915 * np.sin(g) + 0.020 * np.sin(2.0 * g)
        # The Almanac formula refers to the equinox of date; the plan's frame is J2000.
        - _PRECESSION_RATE * n
    )
    rate = _SUN_MEAN_RATE - _PRECESSION_RATE + np.deg2rad(0.9856003) * (1.915 * np.cos(g) + 0.040 * np.cos(2.0 * g))
    return lam, rate


def sun_longitude_j2000(mjd: np.ndarray | float) -> np.ndarray:
    """Apparent geocentric ecliptic longitude of the Sun, J2000 equinox [deg, 0..360).

    The Astronomical Almanac's low-precision formula (``L + 1.915 sin g + 0.020 sin 2g``,
    ~0.01 deg for 1950-2050) precessed from the equinox of date to J2000, so that it
    shares the axes of :func:`ecliptic_to_equatorial`. The Sun's latitude (< 1.2") is 0.

    Parameters
    ----------
    mjd
        UTC (or TT: the difference is negligible) Modified Julian Date [d].
    """
    return _wrap360(_sun_elements(mjd)[0])


def _sun_ra(mjd: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The Sun's right ascension and its rate [rad, rad / s]."""
    lam_deg, rate = _sun_elements(mjd)
    lam = np.deg2rad(lam_deg)
    ra = np.arctan2(_COS_E * np.sin(lam), np.cos(lam))
    # d(ra)/d(lam) for ra = atan2(cos(e) sin(lam), cos(lam)).
    dra = _COS_E / (np.cos(lam) ** 2 + (_COS_E * np.sin(lam)) ** 2)
    return ra, dra * np.deg2rad(rate) / _DAY


# --- orbit -----------------------------------------------------------------------------
def _semi_major_axis(altitude: float) -> float:
    if not (math.isfinite(altitude) and altitude > 0):
        raise SimulationError(f"altitude={altitude!r} must be a positive number of km")
    return R_EARTH + altitude


def orbital_period(altitude: float = 650.0) -> float:
    """Keplerian period of a circular orbit at ``altitude`` [km] above the equator [s]."""
    a = _semi_major_axis(altitude)
    return 2.0 * math.pi * math.sqrt(a**3 / MU_EARTH)


def sun_synchronous_inclination(altitude: float = 650.0) -> float:
    """Inclination whose J2 node precession follows the mean Sun [deg].

    Solves ``-3/2 n J2 (R/a)^2 cos i = dOmega/dt`` (circular orbit) with the Sun's mean
    motion for ``dOmega/dt``; 97.99 deg at 650 km.

    Raises
    ------
    SimulationError
        If no inclination is sun-synchronous at this altitude (above ~5970 km).
    """
    a = _semi_major_axis(altitude)
    n = math.sqrt(MU_EARTH / a**3)
    node_rate = math.radians(_SUN_MEAN_RATE) / _DAY
    cos_i = -node_rate / (1.5 * n * J2 * (R_EARTH / a) ** 2)
    if cos_i < -1.0:
        raise SimulationError(f"altitude={altitude} km: no sun-synchronous orbit exists that high")
    return math.degrees(math.acos(cos_i))


def spacecraft_state(
    mjd: np.ndarray | float,
    *,
    altitude: float = 650.0,
    ltan_hours: float = 6.0,
    epoch_mjd: float = 61000.0,
    phase: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Geocentric position and velocity on a circular sun-synchronous orbit.

    The orbit has radius ``a = R_EARTH + altitude``, Keplerian mean motion
    ``n = sqrt(MU_EARTH / a^3)`` (97.7 min at 650 km; J2 changes to the mean motion are
    ignored) and :func:`sun_synchronous_inclination`. Its ascending node follows the Sun:
    ``Omega = RA_sun + (ltan_hours - 12) * 15 deg``, with the Sun of
    :func:`sun_longitude_j2000`, so the local time of the node stays ``ltan_hours``
    (the true Sun, not the mean Sun: the node follows the equation of time).
    The argument of latitude is ``u = phase + n (t - epoch_mjd)``.

    Parameters
    ----------
    mjd
        UTC MJD [d], any shape.
    altitude
        Height above the equatorial radius [km].
    ltan_hours
        Local time of the ascending node [h]. The default 6 follows the real QR2
        header state in ``tests/data``, whose node is 90.7 deg west of the Sun (a
        dawn-dusk orbit; 18 is the same plane flown the other way round).
    epoch_mjd, phase
        The argument of latitude is ``phase`` [deg] at ``epoch_mjd`` [d].

    Returns
    -------
    position, velocity : numpy.ndarray
        Equatorial (ICRS-aligned, geocentric) vectors [km] and [km / s], shape
        ``np.shape(mjd) + (3,)``. The velocity is the analytic time derivative,
        node motion included (~1.4 m/s), so ``r . v = 0`` and ``|v| = a n`` to 3e-5.
    """
    for name, value in (("ltan_hours", ltan_hours), ("epoch_mjd", epoch_mjd), ("phase", phase)):
        if not math.isfinite(value):
            raise SimulationError(f"{name}={value!r} must be finite")
    t = np.asarray(mjd, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise SimulationError("mjd must be finite")
    a = _semi_major_axis(altitude)
    n = math.sqrt(MU_EARTH / a**3)
    inc = math.radians(sun_synchronous_inclination(altitude))
    ci, si = math.cos(inc), math.sin(inc)
    ra_sun, node_rate = _sun_ra(t)
    node = ra_sun + math.radians((ltan_hours - 12.0) * 15.0)
    u = math.radians(phase) + n * (t - epoch_mjd) * _DAY
    cn, sn, cu, su = np.cos(node), np.sin(node), np.cos(u), np.sin(u)
    zero = np.zeros_like(cn)
    p = np.stack([cn, sn, zero], axis=-1)  # towards the ascending node
    q = np.stack([-ci * sn, ci * cn, np.full_like(cn, si)], axis=-1)  # 90 deg ahead in the plane
    dp = np.stack([-sn, cn, zero], axis=-1)  # dp / dOmega
    dq = np.stack([-ci * cn, -ci * sn, zero], axis=-1)  # dq / dOmega
    cu, su, w = cu[..., None], su[..., None], node_rate[..., None]
    position = a * (cu * p + su * q)
    velocity = a * n * (-su * p + cu * q) + a * w * (cu * dp + su * dq)
    return position, velocity


# --- planning periods and slews --------------------------------------------------------
def planning_period(mjd: float) -> tuple[str, float, float]:
    """The planning period holding UTC MJD ``mjd``.

    Two per ISO week: ``1A`` from Monday 00:00 UTC for 3.5 days, ``2A`` for the rest.

    Returns
    -------
    label, start, end
        E.g. ``("2025W51_1A", 61024.0, 61027.5)``; ``start <= mjd < end`` [d].
    """
    day = math.floor(mjd)
    try:
        iso = (_MJD_ZERO + _dt.timedelta(days=day)).isocalendar()
    except OverflowError:
        raise SimulationError(f"MJD {mjd} is outside the calendar") from None
    if not 1000 <= iso.year <= 9999:
        raise SimulationError(f"MJD {mjd} falls in ISO year {iso.year}; observation ids need four digits")
    monday = float(day - (iso.weekday - 1))
    half = 1 if mjd - monday < PLANNING_PERIOD_DAYS else 2
    start = monday + PLANNING_PERIOD_DAYS * (half - 1)
    return f"{iso.year:04d}W{iso.week:02d}_{half}A", start, start + PLANNING_PERIOD_DAYS


def large_slew_time(angle: np.ndarray | float) -> np.ndarray:
    """Duration of a large slew through ``angle`` [deg], settling included [s].

    A bang-bang profile (accelerate half way, decelerate the rest) at
    :data:`LARGE_SLEW_ACCEL` plus :data:`LARGE_SLEW_SETTLE`: 79 s for the 9.6 deg
    between SPHEREx's default all-sky groups, 49 s for 0.5 deg, 210 s for 180 deg.
    """
    return LARGE_SLEW_SETTLE + 2.0 * np.sqrt(np.abs(np.asarray(angle, dtype=np.float64)) / LARGE_SLEW_ACCEL)


# --- the plan --------------------------------------------------------------------------
_UNITS = {
    "mjd_beg": "d", "mjd_avg": "d", "mjd_end": "d",
    "planned_ra": "deg", "planned_dec": "deg", "planned_pa": "deg",
    "planned_elon": "deg", "planned_elat": "deg", "planned_epa": "deg",
    "true_ra": "deg", "true_dec": "deg", "true_pa": "deg",
}
_EPOCHS = ("start", "mid", "end")


@dataclass(frozen=True, eq=False)
class SurveyPlan:
    """One row per exposure, in time order (arrays of length n, read-only).

    Attributes
    ----------
    obsid
        Observation ids in the real form, e.g. ``2025W51_1A_0684_2`` (str).
    target
        Large-slew counter within the planning period, from 1 (int64).
    step
        Small-slew step within the target group, 1..exposures_per_group (int64).
    group
        Running target-group index over the whole plan, from 0 (int64).
    mjd_beg, mjd_avg, mjd_end
        UTC MJD of the start, midpoint and end of the integration [d];
        ``mjd_end - mjd_beg`` is the instrument's ``exposure_time``. The ramp
        (``TELAPSE``) starts ``elapsed_time - exposure_time`` before ``mjd_beg``.
    planned_ra, planned_dec, planned_pa
        Planned boresight and PA of the focal-plane +y axis east of north [deg].
    planned_elon, planned_elat, planned_epa
        The same in ecliptic coordinates (``SPS_ELON``, ``SPS_ELAT``, ``SPS_EPA``) [deg];
        ``planned_epa`` is 0 or 180 in all-sky mode.
    true_ra, true_dec, true_pa
        Actual boresight and PA after the pointing and roll errors [deg].
    sc_position, sc_velocity
        Geocentric equatorial spacecraft state at (start, mid, end) of each exposure,
        shape (n, 3, 3) [km] and [km / s].
    mode
        ``"all_sky"`` or ``"deep"``.
    """

    obsid: np.ndarray
    target: np.ndarray
    step: np.ndarray
    group: np.ndarray
    mjd_beg: np.ndarray
    mjd_avg: np.ndarray
    mjd_end: np.ndarray
    planned_ra: np.ndarray
    planned_dec: np.ndarray
    planned_pa: np.ndarray
    planned_elon: np.ndarray
    planned_elat: np.ndarray
    planned_epa: np.ndarray
    true_ra: np.ndarray
    true_dec: np.ndarray
    true_pa: np.ndarray
    sc_position: np.ndarray
    sc_velocity: np.ndarray
    mode: str

    def __post_init__(self) -> None:
        n = len(self.obsid)
        for f in fields(self):
            if f.name == "mode":
                continue
            arr = np.asarray(getattr(self, f.name))
            want = (n, 3, 3) if f.name.startswith("sc_") else (n,)
            if arr.shape != want:
                raise SimulationError(f"SurveyPlan.{f.name} has shape {arr.shape}, expected {want}")
            arr = arr.copy() if arr is getattr(self, f.name) and arr.flags.writeable else arr
            arr.flags.writeable = False  # a frozen plan: no one edits the pointing in place
            object.__setattr__(self, f.name, arr)
        if self.mode not in ("all_sky", "deep"):
            raise SimulationError(f"SurveyPlan.mode={self.mode!r} must be 'all_sky' or 'deep'")

    def __len__(self) -> int:
        return len(self.obsid)

    def to_table(self) -> pa.Table:
        """The plan as a flat Arrow table, units in each field's metadata.

        The spacecraft state becomes ``sc_x_start`` .. ``sc_z_end`` and ``sc_vx_start``
        .. ``sc_vz_end`` (the headers' ``X_SC_START``, ``X_SC``, ``X_SC_END``, ...); the
        schema metadata holds the mode and the frame.
        """
        columns: dict[str, tuple[np.ndarray, str | None]] = {"obsid": (self.obsid.astype(str), None)}
        for name in ("target", "step", "group"):
            columns[name] = (getattr(self, name), None)
        for name, unit in _UNITS.items():
            columns[name] = (getattr(self, name), unit)
        for prefix, arr, unit in (("sc_", self.sc_position, "km"), ("sc_v", self.sc_velocity, "km / s")):
            for e, epoch in enumerate(_EPOCHS):
                for c, axis in enumerate("xyz"):
                    columns[f"{prefix}{axis}_{epoch}"] = (arr[:, e, c], unit)
        schema_fields, arrays = [], []
        for name, (values, unit) in columns.items():
            array = pa.array(values)
            schema_fields.append(pa.field(name, array.type, metadata={"unit": unit} if unit else None))
            arrays.append(array)
        meta = {
            "mode": self.mode,
            "frame": "equatorial: ICRS-aligned, geocentric for sc_*; ecliptic: J2000 mean obliquity 23.4392911 deg",
        }
        return pa.Table.from_arrays(arrays, schema=pa.schema(schema_fields, metadata=meta))


def _default_small_slew(instrument: Instrument) -> float:
    """SPHEREx's 17 arcmin small slew scaled to the detector size [arcmin]."""
    return _SMALL_SLEW_ARCMIN * instrument.n_active / 2040.0


def _check_plan_args(
    instrument: Instrument, n_exposures: int, start_mjd: float, exposures_per_group: int, mode: str,
    small_slew: float, group_step: float, pointing_error: float, roll_error: float,
    deep_field: tuple[float, float], field: float,
) -> None:
    """Raise :class:`SimulationError` naming the first impossible setting."""
    if not isinstance(instrument, Instrument):
        raise SimulationError(f"instrument must be an Instrument, got {type(instrument).__name__}")
    if n_exposures < 1:
        raise SimulationError(f"n_exposures={n_exposures} must be at least 1")
    if not 1 <= exposures_per_group <= 9:
        raise SimulationError(f"exposures_per_group={exposures_per_group} must be 1..9 (one obsid digit)")
    if mode not in ("all_sky", "deep"):
        raise SimulationError(f"mode={mode!r} must be 'all_sky' or 'deep'")
    if not math.isfinite(start_mjd):
        raise SimulationError(f"start_mjd={start_mjd!r} must be finite")
    for name, value in (("pointing_error", pointing_error), ("roll_error", roll_error)):
        if not (math.isfinite(value) and value >= 0):
            raise SimulationError(f"{name}={value!r} must be finite and >= 0")
    if not (math.isfinite(small_slew) and 0 < small_slew / 60.0 < field):
        raise SimulationError(
            f"small_slew={small_slew!r} arcmin must be positive and smaller than the detector field "
            f"({field * 60.0:.2f} arcmin)"
        )
    if not (math.isfinite(group_step) and 0 < group_step <= 180.0):
        raise SimulationError(f"group_step={group_step!r} deg must lie in (0, 180]")
    if len(deep_field) != 2 or not all(math.isfinite(v) for v in deep_field):
        raise SimulationError(f"deep_field={deep_field!r} must be a finite (RA, Dec) pair [deg]")
    if not -90.0 <= deep_field[1] <= 90.0:
        raise SimulationError(f"deep_field Dec={deep_field[1]} must lie in [-90, 90]")


def _all_sky_group(g: int, mjd: float, group_step: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and +y axis (ecliptic vectors) of all-sky group ``g`` planned at ``mjd``.

    The boresight walks the great circle 90 deg from the Sun through the ecliptic poles,
    ``b(psi) = cos(psi) e - sin(psi) N`` with ``e`` at the Sun's longitude + 90 deg and
    ``N`` the ecliptic pole: ``psi = g * group_step`` starts on the ecliptic and heads
    south. +y = db/dpsi, so +x = b x y points away from the Sun.
    """
    lam = math.radians(float(sun_longitude_j2000(mjd)))
    e = np.array([-math.sin(lam), math.cos(lam), 0.0])
    north = np.array([0.0, 0.0, 1.0])
    psi = math.radians(g * group_step)
    return math.cos(psi) * e - math.sin(psi) * north, -math.sin(psi) * e - math.cos(psi) * north


def _sun_constrained_axes(b: np.ndarray, mjd: float) -> tuple[np.ndarray, np.ndarray, float]:
    """+x (away from the Sun), +y axes at boresight ``b`` and the solar elongation [deg]."""
    sun = _unit(float(sun_longitude_j2000(mjd)), 0.0)
    x = -(sun - np.dot(sun, b) * b)
    norm = float(np.linalg.norm(x))
    elongation = math.degrees(math.acos(max(-1.0, min(1.0, float(np.dot(sun, b))))))
    if norm < 1e-9:
        return x, x, elongation
    x = x / norm
    return x, np.cross(x, b), elongation


def _deep_group(
    g: int, mjd: float, centre: np.ndarray, dither: tuple[float, float], deep_field: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Centre and +y axis (ecliptic vectors) of deep group ``g`` planned at ``mjd``.

    The focal plane keeps the Sun on its -x side, so its roll follows the Sun's
    longitude (~1 deg / day at the ecliptic poles). The group centre is offset from the
    field centre by ``dither`` (x, y) [deg] in that focal-plane frame.
    """
    x_c, y_c, elongation = _sun_constrained_axes(centre, mjd)
    if abs(elongation - 90.0) > _DEEP_ELONGATION:
        raise SimulationError(
            f"deep_field={deep_field} is {elongation:.1f} deg from the Sun at MJD {mjd:.3f}; "
            f"the sun-constrained attitude needs 90 +- {_DEEP_ELONGATION:.0f} deg"
        )
    dx, dy = np.deg2rad(dither)
    b0 = _normalize(centre + math.tan(dx) * x_c + math.tan(dy) * y_c)
    _, y0, _ = _sun_constrained_axes(b0, mjd)
    return b0, y0


def plan_survey(
    *,
    instrument: Instrument,
    n_exposures: int,
    start_mjd: float = 61024.0,
    exposures_per_group: int = 4,
    mode: Mode = "all_sky",
    small_slew: float | None = None,
    group_step: float | None = None,
    pointing_error: float = 2.0,
    roll_error: float = 0.1,
    deep_field: tuple[float, float] = (270.0, 66.56),
    seed: int = 0,
) -> SurveyPlan:
    """Plan a time-ordered survey of ``n_exposures`` exposures.

    Timing: exposures of a target group start ``elapsed_time + SMALL_SLEW_TIME`` apart
    (126.19 s for SPHEREx); between groups the spacecraft slews for
    :func:`large_slew_time` of the angle between the last and the next boresight, and the
    next ramp starts then (its integration ``elapsed_time - exposure_time`` later). A
    group whose exposures would start in two planning periods waits for the second, so
    every exposure's obsid follows its own start time. The last group may be short.

    Modes:

    ``"all_sky"``
        Group ``g`` is centred ``g * group_step`` along the great circle 90 deg from the
        Sun (Sun position taken when the slew to the group begins), starting on the
        ecliptic at the Sun's longitude + 90 deg and sweeping over the poles.
    ``"deep"``
        Every group is centred near ``deep_field`` with a sun-constrained roll (which
        advances with the Sun's longitude, ~1 deg / day near the ecliptic poles), offset
        by a random cross-dispersion (x) dither of +-0.25 field and a spectral-axis (y)
        dither that cycles through a golden-ratio sequence from a random phase, so that
        the field centre falls on every spectral channel again and again while staying
        within 0.48 field of the detector centre. ``group_step`` is not used.

    Within a group the boresight steps by ``small_slew`` along the focal-plane +y axis
    (a rotation about the fixed x axis), centred on the group centre: a fixed sky point
    moves by ``-small_slew / pixel_scale`` pixels in y per step and stays put in x.

    Parameters
    ----------
    instrument
        Sets the detector field (``n_active * pixel_scale``) and the exposure timing.
    n_exposures
        Number of exposures (rows).
    start_mjd
        UTC MJD of the first exposure's ``mjd_beg`` [d] (postponed to the next planning
        period if its group would straddle a boundary). 61024.0 is Monday 2025-12-15.
    exposures_per_group
        Small-slew steps per target group, 1..9.
    mode
        ``"all_sky"`` or ``"deep"``.
    small_slew
        Small-slew step [arcmin]; default 17 arcmin x n_active / 2040. Must be smaller
        than the detector field.
    group_step
        Step between all-sky group centres [deg]; default 3 detector fields.
    pointing_error
        RMS boresight offset of the true from the planned pointing [arcmin]; random
        direction, Rayleigh-distributed size (Gaussian with rms/sqrt(2) per axis).
    roll_error
        RMS roll error about the boresight [deg] (Gaussian).
    deep_field
        RA, Dec of the deep-field centre [deg]; the north ecliptic pole by default.
    seed
        Seeds the only random generators used (dithers and pointing errors draw from
        separate streams): the same arguments give the same plan, bit for bit.

    Returns
    -------
    SurveyPlan

    Raises
    ------
    SimulationError
        For an impossible setting, named in the message.
    """
    try:
        n_exposures = operator.index(n_exposures)
        exposures_per_group = operator.index(exposures_per_group)
        seed = operator.index(seed)
    except TypeError as exc:
        raise SimulationError(f"n_exposures, exposures_per_group and seed must be integers: {exc}") from None
    field = instrument.n_active * instrument.pixel_scale / 3600.0 if isinstance(instrument, Instrument) else 1.0
    small = _default_small_slew(instrument) if small_slew is None and isinstance(instrument, Instrument) else small_slew
    step_deg = 3.0 * field if group_step is None else group_step
    _check_plan_args(
        instrument, n_exposures, float(start_mjd), exposures_per_group, mode,
        float(small if small is not None else 0.0), float(step_deg), float(pointing_error), float(roll_error),
        tuple(deep_field), field,
    )
    m = exposures_per_group
    small_deg = float(small) / 60.0
    offsets = np.deg2rad((np.arange(m) - (m - 1) / 2.0) * small_deg)  # along +y from the group centre
    rng_dither, rng_point = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    n_groups = -(-n_exposures // m)
    centre = _unit(*equatorial_to_ecliptic(*deep_field))
    if mode == "deep":
        reach_y = max(0.0, _DEEP_REACH_Y * field - (m - 1) * small_deg / 2.0)
        phase = rng_dither.random()
        dither_x = rng_dither.uniform(-_DEEP_DITHER_X, _DEEP_DITHER_X, n_groups) * field
        dither_y = reach_y * (2.0 * np.mod(phase + _GOLDEN * np.arange(n_groups), 1.0) - 1.0)

    cadence = (instrument.elapsed_time + SMALL_SLEW_TIME) / _DAY
    lead = (instrument.elapsed_time - instrument.exposure_time) / _DAY  # discarded frames before mjd_beg
    duration = instrument.exposure_time / _DAY

    beg = np.empty(n_exposures)
    b_ecl = np.empty((n_exposures, 3))
    y_ecl = np.empty((n_exposures, 3))
    target = np.empty(n_exposures, np.int64)
    step = np.empty(n_exposures, np.int64)
    group = np.empty(n_exposures, np.int64)
    obsid: list[str] = []
    period, counter = "", 0
    prev_end, prev_b = float(start_mjd), None
    for g in range(n_groups):
        lo, k = g * m, min(m, n_exposures - g * m)
        # The group is planned when the slew to it begins (the Sun moves 0.001 deg in a slew).
        if mode == "all_sky":
            b0, y0 = _all_sky_group(g, prev_end, step_deg)
        else:
            b0, y0 = _deep_group(g, prev_end, centre, (dither_x[g], dither_y[g]), tuple(deep_field))
        o = offsets[:k, None]
        b = np.cos(o) * b0 + np.sin(o) * y0  # rotation about x = b0 x y0, which stays fixed
        y = -np.sin(o) * b0 + np.cos(o) * y0
        if prev_b is None:
            first = float(start_mjd)
        else:
            first = prev_end + float(large_slew_time(_separation(prev_b, b[0]))) / _DAY + lead
        label, _, end = planning_period(first)
        if first + (k - 1) * cadence >= end:  # would straddle two planning periods: wait
            first = end
            label, _, _ = planning_period(first)
        if label != period:
            period, counter = label, 0
        counter += 1
        if counter > 9999:
            raise SimulationError(f"more than 9999 target groups in planning period {label}")
        sl = slice(lo, lo + k)
        beg[sl] = first + np.arange(k) * cadence
        b_ecl[sl], y_ecl[sl] = b, y
        target[sl], step[sl], group[sl] = counter, np.arange(1, k + 1), g
        obsid.extend(f"{label}_{counter:04d}_{s}" for s in range(1, k + 1))
        prev_end, prev_b = float(beg[lo + k - 1]) + duration, b[-1]

    # Pointing errors: rotate the whole focal plane (boresight and +y axis) by an offset of
    # Rayleigh-distributed size in a uniform direction, then roll it about the boresight.
    x_ecl = np.cross(b_ecl, y_ecl)
    z = rng_point.standard_normal((n_exposures, 3))
    sigma = pointing_error / 60.0 / math.sqrt(2.0)
    size = np.deg2rad(np.hypot(z[:, 0], z[:, 1]) * sigma)
    angle = np.arctan2(z[:, 1], z[:, 0])
    direction = np.cos(angle)[:, None] * x_ecl + np.sin(angle)[:, None] * y_ecl
    axis = np.cross(b_ecl, direction)
    b_true = _rotate(b_ecl, axis, size)
    y_true = _rotate(y_ecl, axis, size)
    roll = z[:, 2] * roll_error

    b_eq, y_eq = b_ecl @ _ECL_TO_EQ.T, y_ecl @ _ECL_TO_EQ.T
    bt_eq, yt_eq = b_true @ _ECL_TO_EQ.T, y_true @ _ECL_TO_EQ.T
    ra, dec = _lonlat(b_eq)
    elon, elat = _lonlat(b_ecl)
    if mode == "all_sky":
        epa = np.where(y_ecl[:, 2] >= 0.0, 0.0, 180.0)  # exactly, by construction
    else:
        epa = _position_angle(b_ecl, y_ecl)
    true_ra, true_dec = _lonlat(bt_eq)

    end = beg + duration
    epochs = np.stack([beg, beg + duration / 2.0, end], axis=1)
    position, velocity = spacecraft_state(epochs)
    return SurveyPlan(
        obsid=np.array(obsid, dtype=np.str_),
        target=target,
        step=step,
        group=group,
        mjd_beg=beg,
        mjd_avg=epochs[:, 1].copy(),
        mjd_end=end,
        planned_ra=ra,
        planned_dec=dec,
        planned_pa=_position_angle(b_eq, y_eq),
        planned_elon=elon,
        planned_elat=elat,
        planned_epa=epa,
        true_ra=true_ra,
        true_dec=true_dec,
        true_pa=_wrap360(_position_angle(bt_eq, yt_eq) + roll),
        sc_position=position,
        sc_velocity=velocity,
        mode=mode,
    )
