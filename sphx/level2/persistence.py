"""Update Persistence: the charge-trap model as a scan over time, per band.

Charge trapped during bright exposures is released in later ones as a persistent
current. The model (:mod:`sphx.kernels.persistence`, parameters in the
``persistence_pars`` product) carries a per-pixel state, the trapped charge of each trap
family, from one exposure to the next. This step is that scan, lazily: per band a chain
of one task per exposure, each taking the previous state and the exposure's linearised
current, and returning the predicted persistent current during the exposure and the new
state. Bands (and nothing else) run in parallel; everything downstream of one exposure
can start as soon as its link is done.

- ``PERSIST_CURRENT`` (band, obs, y, x) [electron/s] is the predicted persistent current,
  kept in the cube so that it can be inspected; PERSIST is set where it exceeds
  ``threshold`` (the header's PSTHRESH, 0.1 electron/s).
- The state after the cube's last exposure is returned as ``TRAP_STATE`` (band, trap,
  state_y, state_x) [electron] with ``state_mjd_end`` and ``state_obsid`` (band): a runner stores it
  (repository state ``persistence``) and the next batch continues from it, giving the same
  result as processing both batches at once.
- The charge filling the traps is the exposure's current times its integration time,
  limited to ``TRAP_SATURATION`` where the product has it.

Exposures must come in time order after the state: a batch that starts before the
state's last exposure ended raises :class:`~sphx.errors.OrderError`.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pydantic
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import flags as _flags
from ..calibration import product_for
from ..cube import STRING_DTYPE
from ..errors import OrderError, StepError
from ..instrument import Instrument
from ..kernels import persistence as _model
from ..levels import ELECTRON_RATE
from ..pipeline.step import StepConfig, register_step
from ._frame import active_slice

__all__ = ["STATE_NAME", "STATE_VARIABLES", "PersistenceConfig", "advance", "update_persistence"]

STATE_NAME = "persistence"
STATE_VARIABLES = ("TRAP_STATE", "state_mjd_end", "state_obsid")


class PersistenceConfig(StepConfig):
    threshold: float = pydantic.Field(0.1, gt=0, description="PERSIST above this predicted current [electron/s]")


def advance(state: np.ndarray, image: np.ndarray, flags: np.ndarray, density: np.ndarray, saturation: np.ndarray,
            *, gap: float, exposure: float, taus: np.ndarray, fractions: np.ndarray, threshold: float,
            active: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One link of the scan: (new state, persistent current, FLAGS with PERSIST).

    ``state`` (K, n, n) [electron] is not modified; ``image`` and ``flags`` are the
    exposure's current [electron/s] and flags on the cube's grid, and so are the
    current (NaN outside the active pixels) and flags returned; ``density`` and
    ``saturation`` are active maps. A pixel that overflowed so early that the on-board fit
    gave no slope (NaN with OVERFLOW or SUR_ERROR) filled its traps to saturation.
    """
    current = np.full(image.shape, np.nan, np.float32)
    new_flags = flags.copy()
    new = np.empty(state.shape, np.float32)  # float32 as stored: a resumed scan must match an uninterrupted one
    _model.expose(state, image[active, active], flags[active, active], density=density, saturation=saturation,
                  gap=gap, exposure=exposure, taus=taus, fractions=fractions,
                  saturated_bits=int(_flags.Flag.OVERFLOW | _flags.Flag.SUR_ERROR), threshold=threshold,
                  persist_bit=int(_flags.Flag.PERSIST), out=(new, current[active, active], new_flags[active, active]))
    return new, current, new_flags


def _initial_state(state: xr.Dataset | None, ds: xr.Dataset, k: int, n: int,
                   active_coords: np.ndarray) -> tuple[da.Array, np.ndarray]:
    """The starting state per band and the end time [MJD] of its last exposure (NaN: none)."""
    bands = ds["band"].values.tolist()
    if state is None:
        return da.zeros((len(bands), k, n, n), dtype=np.float32, chunks=(1, k, n, n)), np.full(len(bands), np.nan)
    missing = [v for v in STATE_VARIABLES if v not in state]
    if missing:
        raise StepError(f"persistence state lacks {missing}")
    if state.sizes.get("trap") != k:
        raise StepError(f"persistence state has {state.sizes.get('trap')} trap families, persistence_pars {k}")
    held = state["band"].values.tolist()
    arrays, ends = [], []
    for b in bands:
        if b in held:
            s = state["TRAP_STATE"].sel(band=b).reindex(state_y=active_coords, state_x=active_coords, fill_value=0.0)
            arrays.append(s.data.astype(np.float32)[None] if isinstance(s.data, da.Array)
                          else da.from_array(np.asarray(s.values, np.float32)[None], chunks=(1, k, n, n)))
            ends.append(float(state["state_mjd_end"].sel(band=b)))
        else:
            arrays.append(da.zeros((1, k, n, n), dtype=np.float32, chunks=(1, k, n, n)))
            ends.append(np.nan)
    return da.concatenate(arrays).rechunk((1, k, n, n)), np.array(ends)


@register_step(
    "update_persistence",
    module="Update Persistence",
    config=PersistenceConfig,
    reads={"IMAGE": ELECTRON_RATE, "FLAGS": None},
    writes={"PERSIST_CURRENT": ELECTRON_RATE},
    calibrations=("persistence_pars",),
    state=STATE_NAME,
    state_variables=STATE_VARIABLES,
)
def update_persistence(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: PersistenceConfig, instrument: Instrument,
    state: xr.Dataset | None = None,
) -> xr.Dataset:
    """Predict the persistent current of every exposure and flag PERSIST (lazy scan).

    Parameters
    ----------
    ds
        Cube with the linearised current (IMAGE [electron/s]), in time order.
    state
        The state after an earlier batch (``TRAP_STATE``, ``state_mjd_end``,
        ``state_obsid``), or None to start with empty traps.

    Raises
    ------
    OrderError
        If an exposure starts before the previous one (or the state's last one) ended.
    """
    pars = product_for("persistence_pars", calib["persistence_pars"], ds, instrument=instrument)
    act = active_slice(ds, instrument)
    n, k = instrument.n_active, pars.sizes["trap"]
    active_coords = ds["x"].values[act]
    beg, end = ds["mjd_beg"].values, ds["mjd_end"].values
    ids = [str(o) for o in ds["obsid"].values]
    overlap = np.flatnonzero(beg[1:] < end[:-1])
    if overlap.size:
        j = int(overlap[0]) + 1
        raise OrderError(f"observation {ids[j]} starts (MJD {beg[j]:.6f}) before {ids[j - 1]} ends "
                         f"(MJD {end[j - 1]:.6f}): persistence needs exposures in time order")
    init, last_end = _initial_state(state, ds, k, n, active_coords)
    late = np.flatnonzero(last_end > beg[0]) if beg.size else []
    if len(late):
        b = ds["band"].values[late[0]]
        raise OrderError(f"observation {ids[0]} starts (MJD {beg[0]:.6f}) before the end of the last exposure "
                         f"in the persistence state of band {b} (MJD {last_end[late[0]]:.6f}, "
                         f"{state['state_obsid'].sel(band=b).values!s}): process exposures in time order "
                         "or start from an earlier state")

    image = ds["IMAGE"].data
    if not isinstance(image, da.Array):
        image = da.from_array(np.asarray(image), chunks=(1, 1, -1, -1))
    image = image.rechunk((1, 1, -1, -1))
    flags = da.asarray(ds["FLAGS"].data).rechunk(image.chunks)
    density = pars["TRAP_DENSITY"].data
    saturation = pars["TRAP_SATURATION"].data if "TRAP_SATURATION" in pars else \
        da.full(density.shape, np.inf, dtype=np.float32, chunks=density.chunks)
    density = da.asarray(density).rechunk((1, -1, -1))
    saturation = da.asarray(saturation).rechunk((1, -1, -1))
    taus = np.asarray(pars["TRAP_TAU"].values, np.float64)
    fractions = np.asarray(pars["TRAP_FRACTION"].values, np.float64)
    texp = ds["xposure"].values

    token = tokenize(image, flags, init, density, saturation, taus, fractions, beg, end, last_end, act, config.threshold)
    link, cur, fin = f"persistence-link-{token}", f"persistence-current-{token}", f"persistence-final-{token}"
    flg = f"persistence-flags-{token}"
    dsk: dict = {}
    final_dsk: dict = {}
    flags_dsk: dict = {}
    n_band, n_obs = image.numblocks[0], image.numblocks[1]
    for i in range(n_band):
        prev, prev_end = (link, i, -1), last_end[i]
        dsk[prev] = (_start, (init.name, i, 0, 0, 0))
        for j in range(n_obs):
            gap = 0.0 if np.isnan(prev_end) else (beg[j] - prev_end) * 86400.0
            dsk[(link, i, j)] = (_link, prev, (image.name, i, j, 0, 0), (flags.name, i, j, 0, 0), (density.name, i, 0, 0),
                                 (saturation.name, i, 0, 0), gap, float(texp[j]), taus[i], fractions[i],
                                 config.threshold, act)
            dsk[(cur, i, j, 0, 0)] = (_part, (link, i, j), 1)
            flags_dsk[(flg, i, j, 0, 0)] = (_part, (link, i, j), 2)
            prev, prev_end = (link, i, j), end[j]
        final_dsk[(fin, i, 0, 0, 0)] = (_part, prev, 0)
    graph = HighLevelGraph.from_collections(cur, dsk, dependencies=[image, flags, init, density, saturation])
    current = da.Array(graph, cur, chunks=image.chunks, dtype=np.float32)
    # the links live in the current's layer
    new_flags = da.Array(HighLevelGraph.from_collections(flg, flags_dsk, dependencies=[current]), flg,
                         chunks=image.chunks, dtype=flags.dtype)
    final = da.Array(HighLevelGraph.from_collections(fin, final_dsk, dependencies=[current, init]),
                     fin, chunks=((1,) * n_band, (k,), (n,), (n,)), dtype=np.float32)

    dims = ds["IMAGE"].dims
    out = ds.copy()
    out["PERSIST_CURRENT"] = xr.Variable(dims, current, {"long_name": "predicted persistent current",
                                                         "units": ELECTRON_RATE})
    out["FLAGS"] = xr.Variable(ds["FLAGS"].dims, new_flags, ds["FLAGS"].attrs)
    out = out.assign_coords(trap=("trap", np.arange(k)))
    out["TRAP_STATE"] = xr.DataArray(final, dims=("band", "trap", "state_y", "state_x"),
                                     coords={"state_y": active_coords, "state_x": active_coords},
                                     attrs={"long_name": "trapped charge per trap family after the last exposure",
                                            "units": "electron"})
    has_obs = ds.sizes["obs"] > 0
    out["state_mjd_end"] = ("band", np.where(has_obs, end[-1] if has_obs else np.nan, last_end),
                            {"units": "d", "long_name": "end of the last exposure in the state (MJD)"})
    out["state_obsid"] = ("band", np.array([ids[-1] if has_obs else "" for _ in range(n_band)], dtype=STRING_DTYPE))
    out.attrs["persistence_threshold"] = config.threshold
    return out


def _start(state):
    return np.asarray(state)[0], None


def _link(previous, image, flags, density, saturation, gap, exposure, taus, fractions, threshold, active):
    return advance(previous[0], np.asarray(image)[0, 0], np.asarray(flags)[0, 0], np.asarray(density)[0],
                   np.asarray(saturation)[0], gap=gap, exposure=exposure, taus=taus, fractions=fractions,
                   threshold=threshold, active=active)


def _part(result, index):
    return result[index][None] if index == 0 else result[index][None, None]
