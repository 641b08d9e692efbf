"""Two-body heliocentric orbits: propagation, light time and astrometric directions.

Every orbit is handled in *perihelion form*: perihelion distance ``q`` [AU],
eccentricity ``e``, time of perihelion ``tp`` [TT MJD] and the orientation (``i``,
``Omega``, ``omega``). Positions follow from the universal-variable form of Kepler's
equation measured from perihelion,

.. math::  k\\,(t - t_p) = q\\,\\chi + e\\,\\chi^3 S(\\alpha\\chi^2), \\qquad \\alpha = (1 - e) / q,

with the Stumpff functions ``C`` and ``S``. One equation covers ellipses, the parabola
and hyperbolas alike with no loss of precision near ``e = 1`` (the series of the
Stumpff functions replace their closed forms for small arguments). Its left side is
monotonic in ``chi`` (its derivative is the radius ``r``), so a Halley iteration kept
inside a bracket converges for every orbit; elliptic times are first reduced to within
half a period of perihelion. The perifocal position is then

.. math::  x = q - \\chi^2 C, \\qquad y = \\chi\\sqrt{q(1+e)}\\,(1 - zS),

both free of cancellation. MPC-style elements (``a``, ``e``, mean anomaly ``M`` at an
epoch) convert to perihelion form with :func:`perihelion_form`.

Frames and constants
--------------------
* ``GM_sun = k**2`` with Gauss's constant ``k = 0.01720209895`` [AU^3 / d^2]; the mass
  of the body is neglected (``1 + m = 1``).
* Elements are referred to the J2000 ecliptic and equinox; positions are returned on
  ICRS-equatorial axes, rotated about x by the J2000 obliquity 84381.448". The ~20 mas
  frame bias between the dynamical J2000 frame and the ICRS is **not** applied: MPC and
  JPL elements are computed in the ICRF (DE ephemerides) and their "J2000 ecliptic" is
  the ICRF equator rotated by that obliquity, so applying the bias would add, not remove,
  a 20 mas error.
* Times are TT (TDB is taken as TT, under 2 ms).

Astrometric directions (:func:`astrometric`) are geometric: the body's barycentric
position at the emission time ``t - tau`` minus the observer's at ``t``, iterated to
convergence of the light time ``tau``; no aberration nor light deflection, as for the
catalogue stars that fix the image WCS.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "C_AU_PER_DAY",
    "GAUSS_K",
    "GM_SUN",
    "OBLIQUITY_J2000",
    "astrometric",
    "ecliptic_to_equatorial",
    "perifocal_basis",
    "perihelion_form",
    "propagate",
    "state_to_elements",
]

GAUSS_K = 0.01720209895
"""Gaussian gravitational constant [AU^(3/2) / d]; ``GM_sun = k**2``."""
GM_SUN = GAUSS_K**2
"""Heliocentric gravitational parameter [AU^3 / d^2]."""
OBLIQUITY_J2000 = 84381.448 / 3600.0
"""J2000 mean obliquity of the ecliptic (IAU 1976/2000) [deg]."""
C_AU_PER_DAY = 299_792.458 * 86_400.0 / 149_597_870.700
"""Speed of light [AU / d]."""

_COS_E, _SIN_E = math.cos(math.radians(OBLIQUITY_J2000)), math.sin(math.radians(OBLIQUITY_J2000))
_MAX_ITER = 200  # a safeguarded Newton step at least bisects: 200 is far beyond any need


def ecliptic_to_equatorial(v: np.ndarray) -> np.ndarray:
    """Rotate J2000 ecliptic cartesian vectors (..., 3) to ICRS-equatorial axes."""
    v = np.asarray(v, dtype=np.float64)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([x, _COS_E * y - _SIN_E * z, _SIN_E * y + _COS_E * z], axis=-1)


def _equatorial_to_ecliptic(v: np.ndarray) -> np.ndarray:
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([x, _COS_E * y + _SIN_E * z, -_SIN_E * y + _COS_E * z], axis=-1)


def perifocal_basis(incl: np.ndarray, node: np.ndarray, peri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors towards perihelion (P) and 90 deg ahead in the orbit plane (Q).

    Parameters
    ----------
    incl, node, peri
        Inclination, longitude of the ascending node and argument of perihelion,
        J2000 ecliptic [deg].

    Returns
    -------
    p, q : numpy.ndarray
        Shape ``(n, 3)``, ICRS-equatorial axes; the position is ``x * p + y * q``.
    """
    i, o, w = (np.deg2rad(np.atleast_1d(np.asarray(v, dtype=np.float64))) for v in (incl, node, peri))
    ci, si, co, so, cw, sw = np.cos(i), np.sin(i), np.cos(o), np.sin(o), np.cos(w), np.sin(w)
    p = np.stack([co * cw - so * sw * ci, so * cw + co * sw * ci, sw * si], axis=-1)
    q = np.stack([-co * sw - so * cw * ci, -so * sw + co * cw * ci, cw * si], axis=-1)
    return ecliptic_to_equatorial(p), ecliptic_to_equatorial(q)


def perihelion_form(
    *, a: np.ndarray, e: np.ndarray, mean_anomaly: np.ndarray, epoch: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Perihelion distance and time from semi-major axis and mean anomaly.

    Parameters
    ----------
    a
        Semi-major axis [AU]; for hyperbolas (``e > 1``) its sign is ignored (JPL writes
        it negative).
    e
        Eccentricity; ``e = 1`` has no finite ``a`` (give ``q`` and ``tp`` instead), and
        ellipses need ``a > 0``: both give NaN.
    mean_anomaly
        Mean anomaly at ``epoch`` [deg] (hyperbolic mean anomaly for ``e > 1``).
    epoch
        [TT MJD].

    Returns
    -------
    q, tp : numpy.ndarray
        [AU] and [TT MJD]. For ellipses ``tp`` is the perihelion nearest the epoch.
    """
    a, e, m, t0 = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, e, mean_anomaly, epoch)))
    bad = (e == 1.0) | ((e < 1.0) & ~(a > 0.0))  # an ellipse needs a > 0
    a = np.abs(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = a * np.abs(1.0 - e)
        n = GAUSS_K / a**1.5  # mean motion [rad / d]
        # ellipses: the nearest perihelion keeps |t - tp| (and the solver's bracket) small
        m_rad = np.deg2rad(np.where(e < 1.0, (m + 180.0) % 360.0 - 180.0, m))
        tp = t0 - m_rad / n
    return np.where(bad, np.nan, q), np.where(bad, np.nan, tp)


@numba.njit(inline="always")
def _stumpff(z):
    """Stumpff functions C(z), S(z): series near 0, closed forms elsewhere."""
    if abs(z) < 0.5:
        # C = sum (-z)^k / (2k+2)!,  S = sum (-z)^k / (2k+3)!; 12 terms: < 1e-30 relative
        c, s = 0.0, 0.0
        term_c, term_s = 0.5, 1.0 / 6.0
        for k in range(12):
            c += term_c
            s += term_s
            term_c *= -z / ((2 * k + 3) * (2 * k + 4))
            term_s *= -z / ((2 * k + 4) * (2 * k + 5))
        return c, s
    if z > 0.0:
        sz = math.sqrt(z)
        return (1.0 - math.cos(sz)) / z, (sz - math.sin(sz)) / (z * sz)
    sz = math.sqrt(-z)
    return (math.cosh(sz) - 1.0) / -z, (math.sinh(sz) - sz) / (-z * sz)


@numba.njit(inline="always")
def _initial_chi(q, e, alpha, ktau):
    """A starting value of chi for the universal Kepler equation (kt = q chi + e chi^3 S)."""
    if abs(1.0 - e) < 0.05:
        # parabola: chi^3 + 6 q chi = 6 k tau, solved in closed form
        p = 6.0 * q
        return 2.0 * math.sqrt(p / 3.0) * math.sinh(math.asinh(9.0 * ktau / p * math.sqrt(3.0 / p)) / 3.0)
    sa = math.sqrt(1.0 / abs(alpha))
    m = ktau * abs(alpha) ** 1.5  # mean anomaly [rad]
    if e < 1.0:
        # Danby's starter for the eccentric anomaly (chi = sqrt(a) E)
        return sa * (m + 0.85 * e * (1.0 if math.sin(m) >= 0.0 else -1.0))
    h = math.log(2.0 * abs(m) / e + 1.8)  # hyperbolic anomaly (chi = sqrt(-a) H)
    return sa * (h if m >= 0.0 else -h)


@numba.njit(parallel=True, nogil=True, cache=True)
def _propagate(q, e, tp, pv, qv, t, chi_guess, out_pos, out_vel, out_chi):
    k = 0.01720209895
    twopi = 2.0 * math.pi
    for j in numba.prange(q.size):
        qj, ej = q[j], e[j]
        if not (qj > 0.0 and ej >= 0.0 and math.isfinite(tp[j]) and math.isfinite(t[j])):
            out_pos[j, :] = math.nan
            out_vel[j, :] = math.nan
            out_chi[j] = math.nan
            continue
        alpha = (1.0 - ej) / qj  # 1 / a [1 / AU]
        tau = t[j] - tp[j]
        chi_max = math.inf
        if alpha > 0.0:
            # ellipse: reduce to within half a period of perihelion, |E| <= pi
            period = twopi / (k * alpha**1.5)
            tau -= period * math.floor(tau / period + 0.5)
            chi_max = math.pi / math.sqrt(alpha)
        ktau = k * tau
        sign = 1.0 if ktau >= 0.0 else -1.0
        target = abs(ktau)  # solve for chi >= 0, odd symmetry gives the rest
        # F(chi) >= q chi for chi >= 0 (S > 0), and >= e chi^3 / 6 on hyperbolas (S >= 1/6)
        hi = min(target / qj, chi_max)
        if alpha <= 0.0 and ej > 0.0:
            hi = min(hi, (6.0 * target / ej) ** (1.0 / 3.0))
        lo = 0.0
        g = chi_guess[j]
        chi = abs(g) if math.isfinite(g) else abs(_initial_chi(qj, ej, alpha, target))
        if not (lo < chi < hi):
            chi = 0.5 * (lo + hi)
        for _ in range(_MAX_ITER):
            z = alpha * chi * chi
            c, s = _stumpff(z)
            f = qj * chi + ej * chi * chi * chi * s - target
            if f == 0.0:
                break
            if f < 0.0:
                lo = chi
            else:
                hi = chi
            d1 = qj + ej * chi * chi * c  # F' = r > 0
            d2 = ej * chi * (1.0 - z * s)  # F''
            newton = f / d1
            den = 1.0 - 0.5 * newton * d2 / d1
            step = newton / den if den > 0.5 else newton  # Halley, Newton where Halley is wild
            new = chi - step
            if lo <= new <= hi and abs(step) <= 1e-9 * new:
                # cubic convergence: the error left after a 1e-9 step is far below 1 ulp
                chi = new
                break
            if not (lo < new < hi):
                new = 0.5 * (lo + hi)  # the step left the bracket: bisect
            if hi - lo <= 4e-16 * hi:
                chi = new
                break
            chi = new
        chi *= sign
        z = alpha * chi * chi
        c, s = _stumpff(z)
        r = qj + ej * chi * chi * c
        one_zs = 1.0 - z * s
        v0 = math.sqrt(qj * (1.0 + ej))
        x = qj - chi * chi * c
        y = v0 * chi * one_zs
        vx = -k * chi * one_zs / r
        vy = k * v0 / qj * (1.0 - chi * chi * c / r)
        for i in range(3):
            out_pos[j, i] = x * pv[j, i] + y * qv[j, i]
            out_vel[j, i] = vx * pv[j, i] + vy * qv[j, i]
        out_chi[j] = chi


def propagate(
    q: np.ndarray,
    e: np.ndarray,
    tp: np.ndarray,
    p: np.ndarray,
    qv: np.ndarray,
    t: float | np.ndarray,
    *,
    chi: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heliocentric positions and velocities of two-body orbits at time(s) ``t``.

    Parameters
    ----------
    q, e, tp
        Perihelion distance [AU], eccentricity and time of perihelion [TT MJD], shape (n,).
    p, qv
        Perifocal unit vectors from :func:`perifocal_basis`, shape (n, 3).
    t
        Time [TT MJD]: one for all orbits or one per orbit.
    chi
        Optional starting values of the universal anomaly (from a previous call at a
        nearby time); any value works, good ones save iterations.

    Returns
    -------
    position, velocity, chi
        ``(n, 3)`` [AU] and [AU / d] on the axes of ``p`` and ``qv``; the universal
        anomaly [AU^(1/2)]. Rows with invalid elements (``q <= 0``, ``e < 0``, NaN) are NaN.
    """
    q = np.ascontiguousarray(q, dtype=np.float64).ravel()
    n = q.size
    e = np.ascontiguousarray(e, dtype=np.float64).ravel()
    tp = np.ascontiguousarray(tp, dtype=np.float64).ravel()
    tt = np.ascontiguousarray(np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)))
    guess = np.full(n, np.nan) if chi is None else np.ascontiguousarray(chi, dtype=np.float64).ravel()
    p = np.ascontiguousarray(p, dtype=np.float64).reshape(n, 3)
    qv = np.ascontiguousarray(qv, dtype=np.float64).reshape(n, 3)
    position, velocity, out_chi = np.empty((n, 3)), np.empty((n, 3)), np.empty(n)
    if n:
        _propagate(q, e, tp, p, qv, tt, guess, position, velocity, out_chi)
    return position, velocity, out_chi


def astrometric(
    q: np.ndarray,
    e: np.ndarray,
    tp: np.ndarray,
    p: np.ndarray,
    qv: np.ndarray,
    t: float,
    *,
    observer: np.ndarray,
    sun: np.ndarray,
    sun_velocity: np.ndarray,
    iterations: int = 3,
) -> dict[str, np.ndarray]:
    """Astrometric (light-time corrected, geometric) positions seen by an observer.

    Parameters
    ----------
    q, e, tp, p, qv
        Orbits in perihelion form (see :func:`propagate`).
    t
        Observation time [TT MJD].
    observer
        Barycentric observer position at ``t`` [AU], shape (3,).
    sun, sun_velocity
        Barycentric position [AU] and velocity [AU / d] of the Sun at ``t``; the Sun at
        the emission time is ``sun - tau * sun_velocity`` (its motion over a light time
        of hours is linear to well under a metre).
    iterations
        Light-time iterations after the geometric start; each divides the error by about
        ``c / v`` (> 1e3), three reach double precision.

    Returns
    -------
    dict
        ``direction`` (n, 3) unit vectors from observer to body (ICRS axes);
        ``relative`` (n, 3) that vector [AU]; ``helio`` (n, 3) heliocentric position at
        emission [AU]; ``velocity`` (n, 3) heliocentric velocity at emission [AU / d];
        ``delta`` and ``r`` (n,) observer and Sun distances [AU]; ``light_time`` [d].
    """
    observer = np.asarray(observer, dtype=np.float64)
    sun = np.asarray(sun, dtype=np.float64)
    sun_velocity = np.asarray(sun_velocity, dtype=np.float64)
    helio, vel, chi = propagate(q, e, tp, p, qv, t)
    tau = np.zeros(helio.shape[0])
    for k in range(iterations + 1):
        rel = sun - tau[:, None] * sun_velocity + helio - observer
        delta = np.sqrt(np.einsum("ij,ij->i", rel, rel))
        if k == iterations:
            break
        tau = delta / C_AU_PER_DAY
        helio, vel, chi = propagate(q, e, tp, p, qv, t - tau, chi=chi)
    with np.errstate(invalid="ignore", divide="ignore"):
        direction = rel / delta[:, None]
    r = np.sqrt(np.einsum("ij,ij->i", helio, helio))
    return {"direction": direction, "relative": rel, "helio": helio, "velocity": vel, "delta": delta, "r": r,
            "light_time": tau}


def state_to_elements(position: np.ndarray, velocity: np.ndarray, t: float | np.ndarray) -> dict[str, np.ndarray]:
    """Osculating heliocentric elements of states on ICRS-equatorial axes.

    Parameters
    ----------
    position, velocity
        Heliocentric state, shape (n, 3) or (3,), [AU] and [AU / d], ICRS axes.
    t
        Time of the state [TT MJD].

    Returns
    -------
    dict
        ``q`` [AU], ``e``, ``incl``, ``node``, ``peri`` [deg, J2000 ecliptic], ``tp``
        [TT MJD], ``a`` [AU] (negative for hyperbolas, inf for the parabola) and
        ``mean_anomaly`` at ``t`` [deg] (NaN for the parabola). Equatorial orbits get node
        0 and circular ones perihelion at the node (or at the x axis), as is usual.
    """
    r = _equatorial_to_ecliptic(np.atleast_2d(np.asarray(position, dtype=np.float64)))
    v = _equatorial_to_ecliptic(np.atleast_2d(np.asarray(velocity, dtype=np.float64)))
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), r.shape[:1])
    mu = GM_SUN
    rn = np.linalg.norm(r, axis=1)
    h = np.cross(r, v)
    hn = np.linalg.norm(h, axis=1)
    ecc_vec = np.cross(v, h) / mu - r / rn[:, None]
    e = np.linalg.norm(ecc_vec, axis=1)
    q = hn**2 / mu / (1.0 + e)
    incl = np.degrees(np.arccos(np.clip(h[:, 2] / hn, -1.0, 1.0)))
    node_vec = np.stack([-h[:, 1], h[:, 0], np.zeros_like(hn)], axis=1)
    nn = np.linalg.norm(node_vec, axis=1)
    flat = nn < 1e-14 * hn
    node_vec = np.where(flat[:, None], np.array([1.0, 0.0, 0.0]), node_vec / np.where(flat, 1.0, nn)[:, None])
    node = np.degrees(np.arctan2(node_vec[:, 1], node_vec[:, 0])) % 360.0
    # argument of perihelion: angle from the node to the eccentricity vector in the plane
    hu = h / hn[:, None]
    round_ = e < 1e-14
    ev = np.where(round_[:, None], node_vec, ecc_vec / np.where(round_, 1.0, e)[:, None])
    peri = np.degrees(np.arctan2(np.einsum("ij,ij->i", np.cross(node_vec, ev), hu),
                                 np.einsum("ij,ij->i", node_vec, ev))) % 360.0
    # true anomaly, then time from perihelion through the universal anomaly
    nu = np.arctan2(np.einsum("ij,ij->i", np.cross(ev, r), hu), np.einsum("ij,ij->i", ev, r))
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(np.abs(1.0 - e) < 1e-15, np.inf, q / (1.0 - e))
    tan_half = np.tan(nu / 2.0)
    beta = np.sqrt(np.abs(1.0 - e) / (1.0 + e))
    # chi from the true anomaly: chi = sqrt(a) E, sqrt(-a) H, or sqrt(2q) tan(nu/2) for e = 1
    chi = np.empty_like(e)
    ell, hyp, par = e < 1.0 - 1e-15, e > 1.0 + 1e-15, np.abs(1.0 - e) <= 1e-15
    chi[ell] = np.sqrt(a[ell]) * 2.0 * np.arctan2(beta[ell] * np.sin(nu[ell] / 2), np.cos(nu[ell] / 2))
    chi[hyp] = np.sqrt(-a[hyp]) * 2.0 * np.arctanh(beta[hyp] * tan_half[hyp])
    chi[par] = np.sqrt(2.0 * q[par]) * tan_half[par]
    alpha = (1.0 - e) / q
    z = alpha * chi**2
    s = _stumpff_s(z)
    ktau = q * chi + e * chi**3 * s
    tp = t - ktau / GAUSS_K
    with np.errstate(invalid="ignore", divide="ignore"):
        n = GAUSS_K * np.abs(alpha) ** 1.5
        mean_anomaly = np.where(par, np.nan, np.degrees(n * (t - tp)))
    mean_anomaly = np.where(ell, mean_anomaly % 360.0, mean_anomaly)
    return {"q": q, "e": e, "incl": incl, "node": node, "peri": peri, "tp": tp, "a": a,
            "mean_anomaly": mean_anomaly}


def _stumpff_s(z: np.ndarray) -> np.ndarray:
    """Stumpff S(z) on arrays (numpy twin of the kernel's ``_stumpff``)."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    small = np.abs(z) < 0.5
    zs = z[small]
    term, acc = np.full(zs.shape, 1.0 / 6.0), np.zeros(zs.shape)
    for k in range(12):
        acc += term
        term = term * -zs / ((2 * k + 4) * (2 * k + 5))
    out[small] = acc
    pos, neg = (z >= 0.5), (z <= -0.5)
    sz = np.sqrt(z[pos])
    out[pos] = (sz - np.sin(sz)) / (z[pos] * sz)
    sz = np.sqrt(-z[neg])
    out[neg] = (np.sinh(sz) - sz) / (-z[neg] * sz)
    return out
