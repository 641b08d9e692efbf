"""The on-board sample-up-the-ramp (SUR) slope fit and its noise.

SPHEREx reads every pixel once per frame (``TSAMP`` = 1.5349 s), discards the first
``SURDLY`` = 3 frames and fits a straight line to the remaining 74 by ordinary least
squares with equal weights. Frame ``k`` (0-based, counted from the reset) is read at
``t_k = k * frame_time``.

For a ramp of ``n`` equally spaced frames ``dt`` apart, read noise ``sigma_r`` per frame
and a current ``i`` (photons plus dark), the variance of the fitted slope is
(Rauscher et al. 2007; Robberto 2009, with one frame per group)::

    Var(i_hat) = 12 sigma_r^2 / (n (n^2 - 1) dt^2)  +  6 (n^2 + 1) i / (5 n (n^2 - 1) dt)

in (electron / s)^2. The Poisson term is 6/5 of the naive ``i / T`` because equal
weights ignore that the Poisson increments accumulate along the ramp.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["ols_weights", "slope_variance", "slope_variance_scalar"]


def ols_weights(first: int, last: int, *, frame_time: float) -> np.ndarray:
    """Weights ``w_k`` with slope = sum_k w_k q_k for frames ``first..last`` inclusive.

    Returns
    -------
    numpy.ndarray
        Shape ``(last - first + 1,)`` [1 / s].
    """
    if last <= first:
        raise ValueError(f"a slope needs at least two frames, got frames {first}..{last}")
    t = np.arange(first, last + 1, dtype=np.float64) * frame_time
    dt = t - t.mean()
    return dt / np.sum(dt * dt)


@numba.njit(inline="always")
def slope_variance_scalar(rate: float, read_noise: float, n: float, frame_time: float) -> float:
    """:func:`slope_variance` for one pixel, callable from numba kernels."""
    nn = n * (n * n - 1.0)
    return 12.0 * read_noise * read_noise / (nn * frame_time * frame_time) + 6.0 * (n * n + 1.0) * max(
        rate, 0.0) / (5.0 * nn * frame_time)


@numba.vectorize(["float64(float64, float64, float64, float64)"], cache=True)
def _slope_variance(rate, read_noise, n, frame_time):
    return slope_variance_scalar(rate, read_noise, n, frame_time)


def slope_variance(rate: np.ndarray, read_noise: np.ndarray, *, n_frames: int | np.ndarray,
                   frame_time: float) -> np.ndarray:
    """Variance of the OLS slope of an ``n_frames`` ramp [(electron / s)^2].

    Parameters
    ----------
    rate
        Current into the pixel (photocurrent plus dark) [electron / s]; negative values
        (noise in empty pixels) contribute no Poisson term.
    read_noise
        Read noise of one frame [electron].
    n_frames
        Frames in the fit (74 for a full SPHEREx ramp; fewer after an overflow).
    frame_time
        Interval between frames [s].
    """
    return _slope_variance(rate, read_noise, n_frames, frame_time)
