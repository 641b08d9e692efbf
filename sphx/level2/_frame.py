"""Pixel-grid helpers shared by the Level 2 steps."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from ..errors import StepError
from ..instrument import Instrument


def active_slice(ds: xr.Dataset, instrument: Instrument) -> slice:
    """Index range of the active pixels along ``y`` and ``x`` of ``ds`` (raw or active frame)."""
    x = ds["x"].values
    start = int(-x[0]) if x.size else -1
    if start < 0 or x.size != instrument.n_active + 2 * start or ds.sizes["y"] != x.size:
        raise StepError(f"the cube's pixel grid ({ds.sizes['y']}x{x.size}, x from {x[0] if x.size else None}) is "
                        f"neither the active nor the raw frame of {instrument.name!r}")
    return slice(start, start + instrument.n_active)


def per_image(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """Lift a kernel on (ny, nx) images to blocks with leading (band, obs) dims.

    Each array argument is indexed at the leading position, size-1 leading dims
    broadcasting (calibration maps have no ``obs``); the kernel returns an array or a
    tuple of arrays, stacked back along the leading dims.
    """

    @functools.wraps(kernel)
    def run(*arrays: np.ndarray, **kwargs: Any) -> Any:
        lead = np.broadcast_shapes(*(a.shape[:-2] for a in arrays))
        outs: tuple[np.ndarray, ...] = ()
        for idx in np.ndindex(*lead):
            args = []
            for a in arrays:
                own = idx[len(idx) - (a.ndim - 2):] if a.ndim > 2 else ()
                args.append(a[tuple(i if s > 1 else 0 for i, s in zip(own, a.shape[:-2], strict=True))])
            res = kernel(*args, **kwargs)
            res = res if isinstance(res, tuple) else (res,)
            if not outs:
                outs = tuple(np.empty(lead + r.shape, r.dtype) for r in res)
            for o, r in zip(outs, res, strict=True):
                o[idx] = r
        return outs if len(outs) > 1 else outs[0]

    return run
