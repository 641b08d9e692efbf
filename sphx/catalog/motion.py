"""Catalogue positions at another epoch and seen from another place: proper motion and parallax.

The catalogue's positions are barycentric directions at ``ref_epoch`` (as Gaia's). A
source at barycentric distance ``1 / parallax`` [AU, parallax in radians] along the
unit vector ``u`` (``u`` moved to the epoch by its proper motion) is seen by an observer
at barycentric position ``o`` [AU] in the direction of ``u / parallax - o``, i.e. of
``u - parallax * o``: this is the annual parallax for an observer at the Earth, plus the
spacecraft's own (tiny) parallax when ``o`` includes the spacecraft's geocentric
position (see :func:`sphx.ephemeris.observer_barycentric`). Aberration and light
deflection are not applied; positions stay astrometric (ICRS, BCRS axes).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import StepError

__all__ = ["propagate"]

_MAS_TO_RAD = math.pi / (180.0 * 3600.0 * 1000.0)


def propagate(
    ra,
    dec,
    pmra,
    pmdec,
    parallax=None,
    *,
    ref_epoch,
    epoch,
    observer=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions at another epoch from proper motions, exact on the sphere, with parallax.

    The unit vector is rotated along the great circle of the proper motion by
    ``|mu| (epoch - ref_epoch)``, so the motion is exact at any separation and
    declination, poles included (a uniform rotation; radial velocity and perspective
    acceleration are not modelled). With ``parallax`` and ``observer`` the direction
    is then that of ``u / parallax - observer`` (annual and spacecraft parallax).

    Parameters
    ----------
    ra, dec : array_like [deg]
        Barycentric positions at ``ref_epoch``.
    pmra, pmdec : array_like [mas/yr]
        Proper motion; ``pmra`` includes the cos(dec) factor.
    parallax : array_like [mas], optional
        Parallax; NaN, zero or negative means unknown (no parallax applied: a negative
        parallax is a noisy measurement of a distant source, not a direction to shift).
    ref_epoch, epoch : float or array_like [Julian year]
        Epoch of the given positions and the epoch wanted.
    observer : array_like [AU], optional
        Barycentric position of the observer on ICRS axes, shape ``(3,)`` or
        ``(..., 3)`` broadcast against the other arguments (last axis x, y, z). None
        (default): the barycentre, i.e. no parallax.

    Returns
    -------
    ra, dec : numpy.ndarray of float64 [deg]
        ``ra`` in [0, 360); all arguments broadcast. Where the motion is zero and no
        parallax is applied the input is returned unchanged; where no parallax is
        applied the result is bit-identical to that without ``parallax``/``observer``.

    Raises
    ------
    StepError
        ``observer`` whose last axis is not of length 3, or shapes that do not broadcast.
    """
    values = [np.asarray(x, dtype=np.float64) for x in (ra, dec, pmra, pmdec, ref_epoch, epoch)]
    use_parallax = parallax is not None and observer is not None
    if use_parallax:
        obs = np.asarray(observer, dtype=np.float64)
        if obs.ndim == 0 or obs.shape[-1] != 3:
            raise StepError(f"observer: must have shape (3,) or (..., 3) [AU], got {obs.shape}")
        values += [np.asarray(parallax, dtype=np.float64), obs[..., 0], obs[..., 1], obs[..., 2]]
    try:
        arrays = np.broadcast_arrays(*values)
    except ValueError as err:
        shapes = ", ".join(str(v.shape) for v in values)
        raise StepError(f"propagate: argument shapes {shapes} do not broadcast") from err
    a, d, mx, my, t0, t1 = arrays[:6]
    ar, dr = np.radians(a), np.radians(d)
    ca, sa, cd, sd = np.cos(ar), np.sin(ar), np.cos(dr), np.sin(dr)
    mu = np.hypot(mx, my)  # [mas/yr]
    dt = t1 - t0
    theta = mu * dt * _MAS_TO_RAD  # [rad] angle travelled
    # sin(theta) / mu, with its limit dt * mas where mu = 0 (no division by zero).
    scale = np.divide(np.sin(theta), mu, out=np.array(dt * _MAS_TO_RAD, dtype=np.float64), where=mu > 0)
    ct = np.cos(theta)
    # r' = r cos(theta) + (pmra * east + pmdec * north) * sin(theta) / mu
    x = cd * ca * ct + (-sa * mx - sd * ca * my) * scale
    y = cd * sa * ct + (ca * mx - sd * sa * my) * scale
    z = sd * ct + cd * my * scale
    still = theta == 0
    if use_parallax:
        plx, ox, oy, oz = arrays[6:]
        # Parallax in radians where it is known and positive, else 0, so that
        # x - 0 * ox == x bit for bit and such rows equal the proper-motion result.
        w = np.where(plx > 0, plx, 0.0) * _MAS_TO_RAD  # NaN > 0 is False
        # u - w o has the direction of u / w - o (the source seen from the observer);
        # scaling by w keeps the numbers near 1 instead of 1 / w ~ 1e8 AU.
        x, y, z = x - w * ox, y - w * oy, z - w * oz
        still = still & (w == 0)
    ra_out = np.degrees(np.arctan2(y, x)) % 360.0
    ra_out = np.where(ra_out >= 360.0, 0.0, ra_out)  # -1e-17 % 360 == 360.0
    dec_out = np.degrees(np.arctan2(z, np.hypot(x, y)))  # arcsin loses precision at the poles
    return np.where(still, a, ra_out), np.where(still, d, dec_out)
