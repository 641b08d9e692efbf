"""H2RG non-linearity: the functional form sphx simulates and inverts.

The charge a pixel reports, ``g(Q)``, falls below the collected charge ``Q`` [electron]
once ``Q`` passes the onset ``Q_nl``::

    g(Q) = Q                                            Q <= Q_nl
    g(Q) = Q_nl + d (1 + b1 d + b2 d^2 + b3 d^3)        d = Q - Q_nl > 0

with per-pixel ``b1`` [1/electron], ``b2`` [1/electron^2], ``b3`` [1/electron^3]
(the parameter names of the SPHEREx ``nonlinear_pars`` product: ``Q_nl, b1, b2, b3,
Qmax``). ``g`` and its slope are continuous at the onset. ``Qmax`` is the largest
charge for which the correction is trusted (the pipeline sets NONLINEAR above it).
Where the polynomial turns over (its slope reaches zero) the pixel is full: ``g``
stays at that largest value, its full well (:func:`full_well`); a reported charge
never falls as charge collects.

Slopes are fitted on board, so non-linearity acts on the *fitted rate*: a pixel with
true current ``i`` reports the ordinary least-squares slope of ``g(i t_k)`` over the
fitted frames (:mod:`sphx.kernels.ramp`), truncated at the first frame whose raw value
reaches the overflow limit. :func:`measured_rate` is that forward map;
:func:`true_rate` inverts it by Newton's method.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["charge_at_slope", "full_well", "measured_rate", "nonlinear_charge", "true_rate"]


@numba.njit(inline="always")
def _slope(d, b1, b2, b3):
    # dg/dQ of the polynomial at d = Q - Q_nl
    return 1.0 + d * (2.0 * b1 + d * (3.0 * b2 + d * 4.0 * b3))


@numba.njit(nogil=True, cache=True)
def _at_slope(d, b1, b2, b3, slope):  # pragma: no cover - compiled
    # where the polynomial's slope falls to ``slope`` (< 1) in (0, d]; d if it stays above
    # (bisection: the slope is 1 at the onset; one root where it falls monotonically, as
    # for the parameters the simulator draws)
    if _slope(d, b1, b2, b3) > slope:
        return d
    lo, hi = 0.0, d
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _slope(mid, b1, b2, b3) > slope:
            lo = mid
        else:
            hi = mid
    return lo


@numba.njit(inline="always")
def _g(q, q_nl, b1, b2, b3):
    if q <= q_nl:
        return q
    d = q - q_nl
    if _slope(d, b1, b2, b3) <= 0.0:  # past the full well
        d = _at_slope(d, b1, b2, b3, 0.0)
    return q_nl + d * (1.0 + d * (b1 + d * (b2 + d * b3)))


@numba.njit(inline="always")
def _dg(q, q_nl, b1, b2, b3):
    if q <= q_nl:
        return 1.0
    return max(_slope(q - q_nl, b1, b2, b3), 0.0)


@numba.njit(nogil=True, cache=True)
def _charge(q, q_nl, b1, b2, b3, out):  # pragma: no cover - compiled
    for k in range(out.size):
        out[k] = _g(q[k], q_nl[k], b1[k], b2[k], b3[k])


def nonlinear_charge(q: np.ndarray, q_nl: np.ndarray, b1: np.ndarray, b2: np.ndarray, b3: np.ndarray) -> np.ndarray:
    """Reported charge ``g(Q)`` for collected charge ``q`` [electron] (broadcasting)."""
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (q, q_nl, b1, b2, b3)))
    out = np.empty(arrays[0].shape)
    _charge(*(np.ascontiguousarray(a).ravel() for a in arrays), out.ravel())
    return out


@numba.njit(nogil=True, cache=True)
def _charges_at_slope(q_nl, b1, b2, b3, slope, out):  # pragma: no cover - compiled
    for k in range(out.size):
        out[k] = q_nl[k] + _at_slope(1e6, b1[k], b2[k], b3[k], slope)


def charge_at_slope(q_nl: np.ndarray, b1: np.ndarray, b2: np.ndarray, b3: np.ndarray, slope: float) -> np.ndarray:
    """Collected charge [electron] where ``dg/dQ`` falls to ``slope`` (< 1; at most 10^6
    electrons past the onset): ``Qmax`` at 0.7, the full well's charge at 0."""
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (q_nl, b1, b2, b3)))
    out = np.empty(arrays[0].shape)
    _charges_at_slope(*(np.ascontiguousarray(a).ravel() for a in arrays), float(slope), out.ravel())
    return out


def full_well(q_nl: np.ndarray, b1: np.ndarray, b2: np.ndarray, b3: np.ndarray) -> np.ndarray:
    """The largest charge a pixel reports, ``g`` at its turnover [electron] (its value
    10^7 electrons past the onset if it has not turned over by then)."""
    return nonlinear_charge(np.asarray(q_nl, np.float64) + 1e7, q_nl, b1, b2, b3)


@numba.njit(parallel=True, nogil=True, cache=True)
def _measured(rate, q_nl, b1, b2, b3, limit, first, last, frame_time, out, n_used):
    ny, nx = rate.shape
    for y in numba.prange(ny):
        for x in range(nx):
            i = rate[y, x]
            t_last = last * frame_time
            if not np.isfinite(i) or (i * t_last <= q_nl[y, x] and i * t_last < limit[y, x]):
                out[y, x] = i
                n_used[y, x] = last - first + 1
                continue
            # OLS slope over the frames read before the first overflowing one.
            n = 0
            st = sy = stt = sty = 0.0
            for k in range(first, last + 1):
                t = k * frame_time
                q = _g(i * t, q_nl[y, x], b1[y, x], b2[y, x], b3[y, x])
                if q >= limit[y, x]:
                    break
                n += 1
                st += t
                sy += q
                stt += t * t
                sty += t * q
            n_used[y, x] = n
            if n < 2:
                out[y, x] = np.nan
            else:
                out[y, x] = (n * sty - st * sy) / (n * stt - st * st)


def measured_rate(
    rate: np.ndarray,
    q_nl: np.ndarray,
    b1: np.ndarray,
    b2: np.ndarray,
    b3: np.ndarray,
    *,
    limit: np.ndarray | float = np.inf,
    first: int = 3,
    last: int = 76,
    frame_time: float = 1.5349,
) -> tuple[np.ndarray, np.ndarray]:
    """The on-board slope of a pixel with true current ``rate`` [electron / s].

    Parameters
    ----------
    rate
        True current (photocurrent plus dark plus persistence), 2-d [electron / s].
    q_nl, b1, b2, b3
        Non-linearity parameters (see the module docstring), same shape.
    limit
        Overflow limit in reported charge [electron] (the ADU limit times the gain);
        frames at or above it are not fitted.
    first, last
        First and last fitted frame (0-based from the reset; SPHEREx: 3 and 76).
    frame_time
        Interval between frames [s].

    Returns
    -------
    measured, n_used
        Fitted slope [electron / s] (NaN when fewer than two frames were below the
        limit) and the number of frames fitted.
    """
    rate = np.ascontiguousarray(rate, dtype=np.float64)
    shape = rate.shape
    args = [np.broadcast_to(np.asarray(a, dtype=np.float64), shape) for a in (q_nl, b1, b2, b3, limit)]
    out = np.empty(shape, dtype=np.float64)
    n_used = np.empty(shape, dtype=np.int32)
    _measured(rate, *args, first, last, float(frame_time), out, n_used)
    return out, n_used


@numba.njit(parallel=True, nogil=True, cache=True)
def _invert(measured, q_nl, b1, b2, b3, first, last, frame_time, iterations, out):
    ny, nx = measured.shape
    tbar = 0.5 * (first + last) * frame_time
    s_tt = 0.0
    for k in range(first, last + 1):
        s_tt += (k * frame_time - tbar) ** 2
    for y in numba.prange(ny):
        for x in range(nx):
            m = measured[y, x]
            if not np.isfinite(m) or m * last * frame_time <= q_nl[y, x]:
                out[y, x] = m
                continue
            i = m
            for _ in range(iterations):
                f = 0.0
                df = 0.0
                for k in range(first, last + 1):
                    t = k * frame_time
                    w = (t - tbar) / s_tt
                    f += w * _g(i * t, q_nl[y, x], b1[y, x], b2[y, x], b3[y, x])
                    df += w * t * _dg(i * t, q_nl[y, x], b1[y, x], b2[y, x], b3[y, x])
                if df <= 0.0:
                    i = np.nan  # beyond the turnover of g: no unique solution
                    break
                step = (f - m) / df
                i -= step
                if abs(step) <= 1e-10 * abs(i):
                    break
            out[y, x] = i


def true_rate(
    measured: np.ndarray,
    q_nl: np.ndarray,
    b1: np.ndarray,
    b2: np.ndarray,
    b3: np.ndarray,
    *,
    first: int = 3,
    last: int = 76,
    frame_time: float = 1.5349,
    iterations: int = 30,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Invert :func:`measured_rate` for ramps fitted over all frames (no overflow).

    Returns the true current [electron / s]; NaN where the measured slope lies beyond
    the turnover of ``g`` (where the pixel must be flagged NONLINEAR anyway). With
    ``out`` (2-D, any float dtype) the arrays are used as they are, without float64
    copies (the parameters must then have the shape of ``measured``); the arithmetic is
    float64 either way.
    """
    if out is not None:
        _invert(measured, q_nl, b1, b2, b3, first, last, float(frame_time), iterations, out)
        return out
    measured = np.ascontiguousarray(measured, dtype=np.float64)
    shape = measured.shape
    args = [np.broadcast_to(np.asarray(a, dtype=np.float64), shape) for a in (q_nl, b1, b2, b3)]
    out = np.empty(shape, dtype=np.float64)
    _invert(measured, *args, first, last, float(frame_time), iterations, out)
    return out
