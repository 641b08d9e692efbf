"""Numpy kernels on xarray objects, one Dask task per block, without copies.

``xr.apply_ufunc(..., dask="parallelized")`` goes through ``dask.array.apply_gufunc``,
which contracts every core dimension in its ``blockwise`` call and so rebuilds each
input's core block with ``concatenate3``: a full copy of every image a kernel reads,
even when the core dimensions are a single chunk. With a dozen kernels per image that
was about a fifth of the Level 2 compute. :func:`apply_blocks` takes the same
arguments, makes the core dimensions one chunk, and hands the blocks to the kernel as
they are.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.utils import funcname

__all__ = ["apply_blocks", "per_image", "stack_images"]


def _unwrap(block: Any) -> Any:
    # blockwise(concatenate=False) nests one list per contracted (core) index
    while isinstance(block, list):
        (block,) = block
    return block


def apply_blocks(
    func: Callable[..., Any],
    *args: Any,
    input_core_dims: Sequence[Sequence[str]],
    output_core_dims: Sequence[Sequence[str]] = ((),),
    output_dtypes: Sequence[Any],
    output_sizes: Mapping[str, int] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Apply ``func`` to the blocks of xarray objects, like ``xr.apply_ufunc`` with
    ``dask="parallelized"``.

    ``func`` receives numpy arrays with the broadcast (loop) dimensions first, as
    ``apply_ufunc`` arranges them, and the core dimensions last, whole; it returns one
    array per entry of ``output_core_dims`` (a tuple when there are several). Without
    Dask inputs it is called once on the whole arrays.

    Parameters
    ----------
    output_sizes
        Sizes of output core dimensions that no input has.

    Returns
    -------
    DataArray or tuple of DataArray
        Lazy when any input is a Dask array.
    """
    kwargs = dict(kwargs or {})
    sizes = dict(output_sizes or {})
    for arg, dims in zip(args, input_core_dims, strict=True):
        if isinstance(arg, xr.DataArray | xr.Variable):
            sizes.update({d: arg.sizes[d] for d in dims})
    n_out = len(output_core_dims)

    def run(*data: Any) -> Any:
        if not any(isinstance(d, da.Array) for d in data):
            return func(*data, **kwargs)
        n_loop = max(np.ndim(d) - len(c) for d, c in zip(data, input_core_dims, strict=True))
        loop = tuple(f"loop{i}" for i in range(n_loop))
        pairs: list[Any] = []
        for d, core in zip(data, input_core_dims, strict=True):
            n_own = np.ndim(d) - len(core)
            if isinstance(d, da.Array):
                d = d.rechunk({ax: -1 for ax in range(n_own, d.ndim)})
            elif isinstance(d, np.ndarray):
                d = da.from_array(d, chunks=-1)
            pairs += [d, None] if np.ndim(d) == 0 else [d, loop[n_loop - n_own:] + tuple(core)]

        def block(*blocks: Any) -> Any:
            out = func(*(_unwrap(b) for b in blocks), **kwargs)
            return out if n_out > 1 else (out,)

        name = f"{funcname(func).lstrip('_')}-{tokenize(func, data, kwargs)}"
        tuples = da.blockwise(block, loop, *pairs, concatenate=False, dtype=object, name=name,
                              meta=np.empty((0,) * n_loop, object))
        outs = []
        for i, (core, dtype) in enumerate(zip(output_core_dims, output_dtypes, strict=True)):
            outs.append(tuples.map_blocks(
                operator.getitem, i, dtype=dtype, name=f"{name}-{i}",
                chunks=tuples.chunks + tuple((sizes[c],) for c in core),
                new_axis=list(range(n_loop, n_loop + len(core))),
                meta=np.empty((0,) * (n_loop + len(core)), dtype)))
        return tuple(outs) if n_out > 1 else outs[0]

    return xr.apply_ufunc(run, *args, input_core_dims=input_core_dims, output_core_dims=output_core_dims,
                          dask="allowed", keep_attrs=False)  # outputs are not the first input


def stack_images(parts: Sequence[np.ndarray], lead: tuple[int, ...]) -> np.ndarray:
    """Per-image results (in ``np.ndindex(*lead)`` order) as one ``lead + shape`` array;
    a single image is reshaped, not copied (one image per block is the common case)."""
    if len(parts) == 1:
        return parts[0].reshape(lead + parts[0].shape)
    return np.stack(parts).reshape(lead + parts[0].shape)


def per_image(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """Lift a kernel on (ny, nx) images to blocks with leading (band, obs) dims.

    Each array argument is indexed at the leading position, size-1 leading dims
    broadcasting (calibration maps have no ``obs``); the kernel returns an array or a
    tuple of arrays, stacked back along the leading dims.
    """

    @functools.wraps(kernel, updated=())  # not a numba kernel's __dict__: it does not pickle
    def run(*arrays: np.ndarray, **kwargs: Any) -> Any:
        lead = np.broadcast_shapes(*(a.shape[:-2] for a in arrays))
        results = []
        for idx in np.ndindex(*lead):
            args = []
            for a in arrays:
                own = idx[len(idx) - (a.ndim - 2):] if a.ndim > 2 else ()
                args.append(a[tuple(i if s > 1 else 0 for i, s in zip(own, a.shape[:-2], strict=True))])
            res = kernel(*args, **kwargs)
            results.append(res if isinstance(res, tuple) else (res,))
        outs = tuple(stack_images([np.asarray(r[k]) for r in results], lead) for k in range(len(results[0])))
        return outs if len(outs) > 1 else outs[0]

    return run
