"""Image persistence as a charge-trap model carried from exposure to exposure.

Each pixel holds ``K`` families of traps (time constants ``tau_k`` from seconds to hours,
as in the multi-exponential trap models of Tulloch & George 2019 and the JWST trap
model). The state is the trapped charge ``N_k`` [electron] per family. For every
exposure, in time order:

1. **release before**: between the end of the previous exposure and the start of this
   one (``gap`` seconds, detector reset) the traps empty as ``N_k *= exp(-gap/tau_k)``;
2. **release during**: in the integration (``exposure`` seconds) they release
   ``E_k = N_k (1 - exp(-exposure/tau_k))``, which the ramp records as a persistent
   current ``sum_k E_k / exposure`` [electron / s];
3. **capture**: the charge ``Q`` collected in this exposure fills each family up to its
   equilibrium ``c_k D Q`` (traps already fuller keep their charge):
   ``N_k = max(N_k - E_k, c_k D Q)``, with the per-family capture fractions ``c_k`` and
   the per-pixel trap density ``D`` (median 1).

The scan is per pixel and sequential in time; these kernels advance it by one exposure
in place, so a survey of any length runs in the memory of one state.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["capture", "expose", "release"]


@numba.njit(inline="always")
def _release_pixel(state, out, y, x, keep_gap, keep_exp):
    """Steps 1-2 for one pixel: ``out`` gets the state after them; returns the charge released."""
    total = 0.0
    for k in range(state.shape[0]):
        n = state[k, y, x] * keep_gap[k]
        emitted = n * (1.0 - keep_exp[k])
        out[k, y, x] = n - emitted
        total += emitted
    return total


@numba.njit(inline="always")
def _capture_pixel(state, y, x, q, fractions, density):
    """Step 3 for one pixel with collected charge ``q`` > 0."""
    for k in range(state.shape[0]):
        state[k, y, x] = max(state[k, y, x], fractions[k] * density * q)


@numba.njit(parallel=True, nogil=True, cache=True)
def _release(state, keep_gap, keep_exp, exposure, out):
    for y in numba.prange(state.shape[1]):
        for x in range(state.shape[2]):
            out[y, x] = _release_pixel(state, state, y, x, keep_gap, keep_exp) / exposure


@numba.njit(parallel=True, nogil=True, cache=True)
def _capture(state, fluence, fractions, density):
    for y in numba.prange(state.shape[1]):
        for x in range(state.shape[2]):
            q = fluence[y, x]
            if q > 0.0:  # not NaN
                _capture_pixel(state, y, x, q, fractions, density[y, x])


def release(state: np.ndarray, *, gap: float, exposure: float, taus: np.ndarray) -> np.ndarray:
    """Advance ``state`` through a gap and an integration; return the persistent current.

    Parameters
    ----------
    state
        Trapped charge per family, shape (K, ny, nx) [electron]; updated in place.
    gap
        Time from the end of the previous exposure to the start of this one [s] (>= 0).
    exposure
        Integration time [s].
    taus
        Release time constant of each family, shape (K,) [s].

    Returns
    -------
    numpy.ndarray
        Mean persistent current during the integration, shape (ny, nx) [electron / s].
    """
    if gap < 0:
        raise ValueError(f"exposures must be in time order: gap of {gap} s before this one")
    taus = np.asarray(taus, dtype=np.float64)
    out = np.empty(state.shape[1:], dtype=state.dtype)
    _release(state, np.exp(-gap / taus), np.exp(-exposure / taus), float(exposure), out)
    return out


def capture(state: np.ndarray, fluence: np.ndarray, *, fractions: np.ndarray, density: np.ndarray) -> None:
    """Fill the traps with the charge collected in an exposure (in place).

    Parameters
    ----------
    state
        Trapped charge per family, shape (K, ny, nx) [electron].
    fluence
        Charge collected in the exposure, shape (ny, nx) [electron].
    fractions
        Equilibrium fraction of the collected charge each family traps, shape (K,).
    density
        Relative trap density per pixel, shape (ny, nx).
    """
    _capture(state, np.asarray(fluence, dtype=state.dtype), np.asarray(fractions, dtype=np.float64),
             np.asarray(density, dtype=state.dtype))


@numba.njit(parallel=True, nogil=True, cache=True)
def _exposure(state, rate, flags, density, saturation, keep_gap, keep_exp, exposure, fractions, saturated_bits,
              threshold, persist_bit, new_state, current, new_flags):
    t = np.float32(exposure)
    for y in numba.prange(state.shape[1]):
        for x in range(state.shape[2]):
            c = np.float32(_release_pixel(state, new_state, y, x, keep_gap, keep_exp) / exposure)
            current[y, x] = c
            f = flags[y, x]
            new_flags[y, x] = f | persist_bit if c > threshold else f
            a = rate[y, x]
            if np.isfinite(a):
                q = min(np.float32(a * t), saturation[y, x])
            elif f & saturated_bits:
                q = saturation[y, x]
            else:
                continue
            if q > 0.0:
                _capture_pixel(new_state, y, x, q, fractions, density[y, x])


def expose(state: np.ndarray, rate: np.ndarray, flags: np.ndarray, *, density: np.ndarray, saturation: np.ndarray,
           gap: float, exposure: float, taus: np.ndarray, fractions: np.ndarray, saturated_bits: int,
           threshold: float, persist_bit: int,
           out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One exposure of the scan in one pass: :func:`release`, flagging, :func:`capture`.

    Parameters
    ----------
    state
        Trapped charge before the gap, (K, ny, nx) float32 [electron]; not modified.
    rate, flags
        The exposure's measured current [electron / s] and FLAGS, (ny, nx).
    density, saturation
        Relative trap density and the fluence that fills the traps [electron], (ny, nx).
    saturated_bits
        FLAGS bits of pixels without a slope that overflowed: they collected
        ``saturation``.
    threshold, persist_bit
        ``persist_bit`` is set where the persistent current exceeds ``threshold``
        [electron / s].

    out
        Arrays (views allowed) to write the results to, as returned.

    Returns
    -------
    new_state, current, new_flags
        The state after the exposure, the persistent current during it [electron / s]
        and the flags with ``persist_bit`` added. The same numbers as :func:`release`
        then :func:`capture` on a float32 state, with a float32 fluence.
    """
    if gap < 0:
        raise ValueError(f"exposures must be in time order: gap of {gap} s before this one")
    taus = np.asarray(taus, dtype=np.float64)
    if out is None:
        out = (np.empty(state.shape, np.float32), np.empty(rate.shape, np.float32), np.empty(flags.shape, flags.dtype))
    new_state, current, new_flags = out
    _exposure(state, rate, flags, density, saturation, np.exp(-gap / taus), np.exp(-exposure / taus), float(exposure),
              np.asarray(fractions, dtype=np.float64), flags.dtype.type(saturated_bits), np.float32(threshold),
              flags.dtype.type(persist_bit), new_state, current, new_flags)
    return new_state, current, new_flags
