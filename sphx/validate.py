"""Check that a Dataset follows the exposure-cube data model.

The validator reads only coordinates and attributes, never pixel data, so it is safe on
lazy cubes of any size. It reports every problem at once, each naming the variable,
band or observation concerned.
"""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr

from .cube import CUBE_DIMS, OBS_COORDS, PIXEL_VARIABLES, SPACECRAFT_VARIABLES, STATIC_MAPS
from .errors import CubeValidationError, ObservationIdError
from .instrument import Instrument
from .levels import Level, get_level, same_unit
from .obsid import obs_key
from .wcs import WCS_VARIABLES

__all__ = ["validate_cube"]

_KNOWN = {**PIXEL_VARIABLES, **OBS_COORDS, **SPACECRAFT_VARIABLES, **STATIC_MAPS}


def _values(var: xr.DataArray) -> np.ndarray | None:
    """In-memory values of a small variable, or None when they would need a compute."""
    return None if dask.is_dask_collection(var.variable._data) else np.asarray(var.values)


def validate_cube(
    ds: xr.Dataset,
    *,
    level: str | Level | None = None,
    instrument: Instrument | None = None,
    full_frame: bool = True,
) -> None:
    """Raise :class:`~sphx.errors.CubeValidationError` if ``ds`` is not a valid cube.

    Parameters
    ----------
    ds
        The cube.
    level
        Level whose variables and units the cube must have; without it only the
        structure is checked.
    instrument
        Geometry the bands and pixel coordinates must match.
    full_frame
        Require the whole frame of the level (raw or active); otherwise any contiguous
        sub-image inside it (a cutout) is accepted.
    """
    lvl = get_level(level) if isinstance(level, str) else level
    problems: list[str] = []
    add = problems.append

    if not isinstance(ds, xr.Dataset):
        raise CubeValidationError([f"expected an xarray.Dataset, got {type(ds).__name__}"])
    missing_dims = [d for d in CUBE_DIMS if d not in ds.dims]
    if missing_dims:
        add(f"missing dimension(s) {missing_dims}; a cube has dimensions {list(CUBE_DIMS)}")

    # --- variables: presence, dims, dtype, units -----------------------------------
    required = dict(lvl.variables) if lvl else {"IMAGE": None}
    for name in required:
        if name not in ds.variables:
            add(f"missing variable {name} (level {lvl.name!r} needs {', '.join(required)})" if lvl
                else f"missing variable {name}")
    for name, var in ds.variables.items():
        spec = _KNOWN.get(str(name))
        if spec is None:
            continue
        if var.dims != spec.dims:
            add(f"{name} has dims {var.dims}, expected {spec.dims}")
        if var.dtype != spec.dtype and not (spec.dtype.kind == "T" and var.dtype.kind in "OTU"):
            add(f"{name} has dtype {var.dtype}, expected {spec.dtype}")
        if name in PIXEL_VARIABLES and name != "FLAGS":
            expected = lvl.units(str(name)) if lvl else None
            got = var.attrs.get("units")
            if got is None:
                add(f"{name} has no 'units' attribute" + (f" (expected {expected!r})" if expected else ""))
            elif expected is not None and not same_unit(got, expected):
                add(f"{name} has units {got!r}, expected {expected!r} at level {lvl.name!r}")
            elif expected is None and not same_unit(got, got):  # only fails when unparsable
                add(f"{name} has units {got!r}, which astropy cannot parse")
        elif spec.units is not None and "units" in var.attrs and not same_unit(var.attrs["units"], spec.units):
            add(f"{name} has units {var.attrs['units']!r}, expected {spec.units!r}")
    if lvl and "PHANTOM" in ds.variables and "PHANTOM" not in lvl.optional:
        add(f"PHANTOM reads are not kept at level {lvl.name!r}")
    for name in WCS_VARIABLES:
        if name in ds.variables and ds[name].dtype != np.float64:
            add(f"{name} has dtype {ds[name].dtype}, expected float64")

    # --- band ----------------------------------------------------------------------
    if "band" in ds.coords:
        bands = ds["band"].values
        if bands.dtype.kind not in "iu":
            add(f"band coordinate has dtype {bands.dtype}, expected integer detector numbers")
        elif len(set(bands.tolist())) != bands.size or np.any(np.diff(bands) <= 0):
            add(f"band values {bands.tolist()} must be unique and increasing")
        elif instrument is not None:
            unknown = sorted(set(bands.tolist()) - set(instrument.band_numbers))
            if unknown:
                add(f"band(s) {unknown} not in instrument {instrument.name!r} (bands {list(instrument.band_numbers)})")
    elif "band" in ds.dims:
        add("band dimension has no coordinate")

    # --- obs -----------------------------------------------------------------------
    _check_obs(ds, add)

    # --- pixel coordinates ---------------------------------------------------------
    for axis in ("y", "x"):
        if axis not in ds.dims:
            continue
        if axis not in ds.coords:
            add(f"{axis} dimension has no coordinate (labelled pixel coordinates are required)")
            continue
        c = ds[axis].values
        if c.dtype.kind not in "iu":
            add(f"{axis} coordinate has dtype {c.dtype}, expected integer pixel labels")
            continue
        if c.size and np.any(np.diff(c) != 1):
            add(f"{axis} coordinate must be contiguous increasing pixel labels")
            continue
        if instrument is None or not c.size:
            continue
        raw = lvl.reference_pixels if lvl and not lvl.custom else bool(c[0] < 0 or c[-1] >= instrument.n_active)
        frame = instrument.pixel_coords(reference_pixels=raw)
        what = "raw frame with reference border" if raw else "active frame"
        if full_frame and not np.array_equal(c, frame):
            add(f"{axis} runs {c[0]}..{c[-1]}, expected the {what} {frame[0]}..{frame[-1]}")
        elif not full_frame and (c[0] < frame[0] or c[-1] > frame[-1]):
            add(f"{axis} runs {c[0]}..{c[-1]}, outside the {what} {frame[0]}..{frame[-1]}")

    if problems:
        raise CubeValidationError(problems, level=lvl.name if lvl else None)


def _check_obs(ds: xr.Dataset, add) -> None:
    if "obs" not in ds.dims:
        return
    if "obs" not in ds.coords:
        add("obs dimension has no coordinate (observation keys)")
        return
    keys = ds["obs"].values
    if keys.dtype != np.int64:
        add(f"obs coordinate has dtype {keys.dtype}, expected int64 observation keys")
        return
    obsid = _values(ds["obsid"]) if "obsid" in ds.coords else None
    if "obsid" not in ds.coords:
        add("missing obsid coordinate (observation ids)")
    label = (lambda i: f"{obsid[i]} (obs={keys[i]})") if obsid is not None else (lambda i: f"obs={keys[i]}")

    seen: dict[int, int] = {}
    for i, k in enumerate(keys.tolist()):
        if k in seen:
            add(f"duplicate observation {label(i)} at positions {seen[k]} and {i}")
        seen.setdefault(k, i)
    if obsid is not None:
        first: dict[str, int] = {}
        for i, o in enumerate(obsid.tolist()):
            if o in first and keys[first[o]] != keys[i]:
                add(f"duplicate observation id {o!r} at positions {first[o]} and {i}")
            first.setdefault(o, i)
            try:
                if obs_key(o) != keys[i]:
                    add(f"obs={keys[i]} does not match observation id {o!r} (key {obs_key(o)})")
            except ObservationIdError as e:
                add(e.problems[0])

    if "mjd_avg" not in ds.coords:
        add("missing mjd_avg coordinate (mid-exposure times order the obs axis)")
        return
    t = _values(ds["mjd_avg"])
    if t is None:
        return
    if not np.all(np.isfinite(t)):
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        add(f"mjd_avg of {label(bad)} is not finite")
    elif t.size > 1 and np.any(np.diff(t) <= 0):
        i = int(np.flatnonzero(np.diff(t) <= 0)[0])
        add(
            f"obs not sorted by time: {label(i + 1)} at MJD {t[i + 1]:.6f} follows "
            f"{label(i)} at MJD {t[i]:.6f}"
        )
