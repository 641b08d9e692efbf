"""Compiled per-pixel steps of the simulator: photocurrent, ramp noise, readout to ADU.

Each is one pass over the image so that a full 2048x2048 detector costs a few tens of
milliseconds; the physics is documented in :mod:`sphx.simulate.simulator` and the forms
they share with the pipeline live in :mod:`sphx.kernels`.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels.ramp import slope_variance_scalar

__all__ = ["add_ramp_noise", "expose", "read_out"]


@numba.njit(parallel=True, nogil=True, cache=True)
def expose(zodi, src, omega, response, dark, persist, dead, out):
    """Current into each pixel [electron/s]: (zodi x solid angle + sources) x response + dark + persistence."""
    ny, nx = out.shape
    for y in numba.prange(ny):
        for x in range(nx):
            if dead[y, x]:
                out[y, x] = 0.0
            else:
                out[y, x] = (zodi[y, x] * omega[y, x] + src[y, x]) * response[y, x] + dark[y, x] + persist[y, x]


@numba.njit(parallel=True, nogil=True, cache=True)
def add_ramp_noise(measured, n_used, read_noise, z, ref, frame_time, out):
    """On-board slope plus SUR noise; ``read_noise`` and ``z`` are raw-frame (border ``ref``)."""
    ny, nx = out.shape
    for y in numba.prange(ny):
        for x in range(nx):
            m = measured[y, x]
            n = max(n_used[y, x], 2)
            var = slope_variance_scalar(m, read_noise[y + ref, x + ref], n, frame_time)
            out[y, x] = m + np.sqrt(var) * z[y + ref, x + ref]


@numba.njit(parallel=True, nogil=True, cache=True)
def read_out(value, offsets, column_channel, gain, read_noise, z, ref, n_frames, frame_time, out):
    """Raw frame [adu/s]: active slopes and noise-only border through gains and channel offsets.

    ``offsets`` is (raw rows, channels) [adu/s]; border pixels get the read-noise-only
    slope noise of an ``n_frames`` ramp, drawn from ``z`` at the same raw position.
    """
    nr = out.shape[0]
    na = value.shape[0]
    for r in numba.prange(nr):
        for c in range(nr):
            ch = column_channel[c]
            y, x = r - ref, c - ref
            if 0 <= y < na and 0 <= x < na:
                v = value[y, x]
            else:
                v = np.sqrt(slope_variance_scalar(0.0, read_noise[r, c], n_frames, frame_time)) * z[r, c]
            out[r, c] = v / gain[ch] + offsets[r, ch]
