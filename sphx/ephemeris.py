"""Where the observer is: time scales and the Earth's and Sun's barycentric positions, offline.

Astrometry needs the observer's position for stellar parallax and for the light time
and geometry of solar-system objects. Everything here runs offline: the Earth's
position comes from ERFA's ``epv00`` (the VSOP2000-based series, a few km from DE405
over 1900-2100), and UTC is converted with ERFA's built-in leap-second table. The
spacecraft position (geocentric, ICRS axes, as in the real headers' ``X_SC, Y_SC,
Z_SC``) is added to the Earth's. All vectors are ICRS-aligned (BCRS) cartesian [AU].

TDB is taken as TT: they differ by under 2 ms, a few km of Earth motion.
"""

from __future__ import annotations

import warnings

import erfa
import numpy as np

__all__ = [
    "AU_KM",
    "C_AU_PER_DAY",
    "earth_sun_barycentric",
    "julian_year",
    "observer_barycentric",
    "tt_from_utc",
]

AU_KM = 149_597_870.700  # IAU 2012 [km]
C_AU_PER_DAY = 299_792.458 * 86_400.0 / AU_KM  # speed of light [AU / day]
_MJD0 = 2_400_000.5


def tt_from_utc(mjd_utc: float | np.ndarray) -> np.ndarray:
    """TT Modified Julian Date from UTC (leap seconds from ERFA's table).

    Parameters
    ----------
    mjd_utc
        UTC [MJD].

    Returns
    -------
    numpy.ndarray
        TT [MJD], float64, same shape.
    """
    mjd = np.asarray(mjd_utc, dtype=np.float64)
    whole = np.floor(mjd)
    with warnings.catch_warnings():
        # ERFA calls dates past its leap-second table "dubious"; the last offset still holds.
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        tai1, tai2 = erfa.utctai(_MJD0 + whole, mjd - whole)
        tt1, tt2 = erfa.taitt(tai1, tai2)
    return (tt1 - _MJD0) + tt2


def julian_year(mjd_utc: float | np.ndarray) -> np.ndarray:
    """Julian epoch (J2000.0 + days / 365.25) of a UTC time, the unit of catalogue epochs."""
    return 2000.0 + (tt_from_utc(mjd_utc) - 51544.5) / 365.25


def earth_sun_barycentric(mjd_utc: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric positions of the Earth and the Sun.

    Parameters
    ----------
    mjd_utc
        UTC [MJD].

    Returns
    -------
    earth, sun : numpy.ndarray
        Shape ``np.shape(mjd_utc) + (3,)``, ICRS axes [AU].
    """
    tt = tt_from_utc(mjd_utc)
    whole = np.floor(tt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)  # outside 1900-2100 the series degrades slowly
        helio, bary = erfa.epv00(_MJD0 + whole, tt - whole)
    earth = np.asarray(bary["p"], dtype=np.float64)
    return earth, earth - np.asarray(helio["p"], dtype=np.float64)


def observer_barycentric(mjd_utc: float | np.ndarray, sc_position_km: np.ndarray | None = None) -> np.ndarray:
    """Barycentric position of a spacecraft given its geocentric position.

    Parameters
    ----------
    mjd_utc
        UTC [MJD].
    sc_position_km
        Geocentric position, ICRS axes [km], shape ``np.shape(mjd_utc) + (3,)``; ``None``
        (or NaN) for the geocentre.

    Returns
    -------
    numpy.ndarray
        [AU], shape ``np.shape(mjd_utc) + (3,)``.
    """
    earth, _ = earth_sun_barycentric(mjd_utc)
    if sc_position_km is None:
        return earth
    sc = np.nan_to_num(np.asarray(sc_position_km, dtype=np.float64), nan=0.0)
    return earth + sc / AU_KM
