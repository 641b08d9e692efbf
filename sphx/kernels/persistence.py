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

__all__ = ["capture", "release"]


@numba.njit(parallel=True, nogil=True, cache=True)
def _release(state, keep_gap, keep_exp, exposure, out):
    k_n, ny, nx = state.shape
    for y in numba.prange(ny):
        for x in range(nx):
            total = 0.0
            for k in range(k_n):
                n = state[k, y, x] * keep_gap[k]
                emitted = n * (1.0 - keep_exp[k])
                state[k, y, x] = n - emitted
                total += emitted
            out[y, x] = total / exposure


@numba.njit(parallel=True, nogil=True, cache=True)
def _capture(state, fluence, fractions, density):
    k_n, ny, nx = state.shape
    for y in numba.prange(ny):
        for x in range(nx):
            q = fluence[y, x]
            if not q > 0.0:  # also skips NaN
                continue
            for k in range(k_n):
                state[k, y, x] = max(state[k, y, x], fractions[k] * density[y, x] * q)


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
