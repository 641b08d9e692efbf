"""One processing level as a Zarr v3 group that grows along ``obs``.

Layout
------
``<repo>/<level>.zarr`` is an ordinary Zarr v3 group written with xarray's conventions,
so ``xarray.open_zarr("<repo>/l1.zarr")`` opens it without sphx. Each pixel variable is
chunked one image per chunk, ``(1, 1, ny, nx)``; absent (band, obs) images are never
written and read back as the fill value (NaN, FLAGS = MISSING_DATA). The ``band`` axis
always holds all the instrument's detectors. Small per-observation and per-image
variables are chunked ``1024`` observations at a time and written by the client.

Write protocol
--------------
A write never changes a complete image unless asked to, so re-ingesting data changes
nothing, and it survives being killed at any point:

1. take the level's lock (a stale lock of a dead process on this host is broken);
2. plan: which (band, obs) images are new or incomplete; refuse new observations earlier
   than the last stored one, and ids that clash with stored ones;
3. append the new observations' metadata, guarded by a journal that lets the next
   writer or reader roll back a half-done resize;
4. mark every image about to be written as pending (``write_id = -1``);
5. compute and store the images, one task per dask block; as blocks finish, the client
   writes their per-image metadata and marks them complete (``write_id`` = the write's
   number, which names its provenance record).

Readers of :meth:`LevelStore.open` see only complete images; a rerun of the same write
rewrites just the pending ones.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.callbacks import Callback

from .. import flags as _flags
from .._progress import Progress, ProgressSpec
from ..errors import (
    CubeValidationError,
    DuplicateExposureError,
    IncompleteWriteWarning,
    LevelNotFoundError,
    OrderError,
    RepositoryLockedError,
    SelectionError,
    WriteError,
)
from ..instrument import Instrument
from ..levels import get_level, same_unit
from ..validate import validate_cube
from .codecs import compressors_for
from .location import Location
from .provenance import make_record, utc_now, write_record

__all__ = ["LevelStore", "WriteReport"]

OBS_CHUNK = 1024
FLUSH_SECONDS = 2.0  # how often a running write records the images it has completed
FORMAT = 1
_FLAGS_FILL = int(_flags.Flag.MISSING_DATA)
_INDEX = {"band", "obs", "write_id"}


def var_kind(dims: Sequence[str]) -> str:
    """How a variable is stored: ``image``, ``cell`` (per image), ``obs`` or ``static``."""
    dims = tuple(dims)
    if "obs" not in dims:
        return "static"
    if dims[0] == "obs":
        return "obs"
    if dims[:2] == ("band", "obs"):
        return "image" if "y" in dims else "cell"
    raise CubeValidationError([f"dims {dims}: 'obs' must come first, or second after 'band'"])


def _fill(dtype: np.dtype, name: str) -> Any:
    if name == "FLAGS":
        return _FLAGS_FILL
    if dtype.kind == "f":
        return np.nan
    if dtype.kind in "OTU":
        return ""
    if dtype.kind == "b":
        return False
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclass
class WriteReport:
    """What a write did.

    Attributes
    ----------
    level
        Level written.
    write_id
        Number of this write in the level (names its provenance record); None if
        nothing needed writing.
    written
        Images (band x obs) stored.
    skipped
        Images already complete and left unchanged.
    new_obs
        Observations appended.
    elapsed
        Wall time [s].
    """

    level: str
    write_id: int | None
    written: int
    skipped: int
    new_obs: int
    elapsed: float
    written_obs: list[str] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return (
            f"{self.level}: {self.written} image(s) written ({self.new_obs} new observation(s)), "
            f"{self.skipped} already present, {self.elapsed:.1f} s"
        )


@dataclass
class _Index:
    bands: np.ndarray
    keys: np.ndarray
    obsid: np.ndarray
    mjd: np.ndarray
    write_id: np.ndarray


@dataclass
class _Plan:
    cube_obs: np.ndarray  # positions in the cube of observations with work to do
    store_obs: np.ndarray  # their positions in the store
    new: np.ndarray  # which of them are appended
    todo: np.ndarray  # (cube band, planned obs) images to write
    band_pos: np.ndarray  # store position of each cube band
    skipped: int


def _current_client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _store_block(band_pos, obs_pos, todo, *blocks, targets, n_images, meta_names):
    """Write the images of one dask block into their zarr chunks (runs on a worker)."""
    for target, block in zip(targets, blocks[:n_images], strict=True):
        for i, bp in enumerate(band_pos.tolist()):
            for j, op in enumerate(obs_pos.tolist()):
                if todo[i, j]:
                    target[bp : bp + 1, op : op + 1] = block[i : i + 1, j : j + 1]
    meta = {name: np.asarray(b) for name, b in zip(meta_names, blocks[n_images:], strict=True)}
    return {"band_pos": np.asarray(band_pos), "obs_pos": np.asarray(obs_pos), "todo": np.asarray(todo), "meta": meta}


def _select(var: xr.Variable, band_idx: np.ndarray, obs_idx: np.ndarray, chunks: Mapping[str, int]) -> xr.Variable:
    """Chunk a lazily loaded pixel variable and keep the given bands and observations."""
    want = {d: chunks.get(d, 1 if d in ("band", "obs") else -1) for d in var.dims}
    data = var.chunk(want).data
    for axis, (dim, idx) in enumerate((d, {"band": band_idx, "obs": obs_idx}.get(d)) for d in var.dims):
        if idx is None or (idx.size == data.shape[axis] and np.array_equal(idx, np.arange(idx.size))):
            continue
        picker = (slice(None),) * axis + (idx,)
        data = data.blocks[picker] if want[dim] == 1 and idx.size else data[picker]
    return xr.Variable(var.dims, data, var.attrs, var.encoding)


class LevelStore:
    """Read and write one level of a repository.

    Parameters
    ----------
    loc
        The repository root.
    name
        Level name (``raw``, ``l1``, ``l2a``, ``l2`` or a custom name).
    instrument
        The repository's instrument.
    """

    def __init__(self, loc: Location, name: str, instrument: Instrument) -> None:
        self.loc, self.name, self.instrument = loc, name, instrument
        self.level = get_level(name)
        self.dirname = f"{name}.zarr"

    # ------------------------------------------------------------------ helpers --
    @property
    def url(self) -> str:
        """Path or URL that ``xarray.open_zarr`` accepts."""
        return self.loc.url(self.dirname)

    def exists(self) -> bool:
        return self.loc.exists(self.dirname, "zarr.json")

    def _group(self, *, write: bool = False) -> zarr.Group:
        # Always the live metadata: the consolidated copy is a snapshot for plain readers.
        return zarr.open_group(self.loc.zarr_store(self.dirname, read_only=not write),
                               mode="r+" if write else "r", use_consolidated=False)

    def _consolidate(self) -> None:
        """Refresh the consolidated metadata that plain ``xarray.open_zarr`` reads first."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # "not part of the v3 spec yet"
            zarr.consolidate_metadata(self.loc.zarr_store(self.dirname))

    def _require(self) -> None:
        if not self.exists():
            raise LevelNotFoundError(f"level {self.name!r} is not in repository {self.loc.url()}")

    def schema(self) -> dict[str, dict[str, Any]]:
        """Stored variables with their dims, dtype and units, without reading data."""
        self._require()
        out = {}
        for name, arr in self._group().arrays():
            if name in _INDEX:
                continue
            out[name] = {
                "dims": tuple(arr.metadata.dimension_names),
                "dtype": arr.dtype,
                "units": arr.attrs.get("units"),
            }
        return out

    def reference_pixels(self) -> bool:
        """Whether the stored images carry the reference border (raw frame)."""
        return bool(self._group()["y"][0] < 0)

    def read_index(self) -> _Index:
        """Observation keys, ids, times and per-image write state, read directly from zarr."""
        g = self._group()
        return _Index(
            bands=g["band"][:],
            keys=g["obs"][:],
            obsid=np.asarray(g["obsid"][:], dtype=object) if "obsid" in g else np.array([], dtype=object),
            mjd=g["mjd_avg"][:] if "mjd_avg" in g else np.array([]),
            write_id=g["write_id"][:],
        )

    # -------------------------------------------------------------------- locks --
    def _lock_parts(self) -> tuple[str, ...]:
        return (".sphx", "locks", f"{self.name}.lock")

    def _journal_parts(self) -> tuple[str, ...]:
        return (".sphx", "journal", f"{self.name}.json")

    def _lock_holder(self) -> dict[str, Any] | None:
        """The live process holding the lock, or None (a dead holder's lock is removed)."""
        if not self.loc.exists(*self._lock_parts()):
            return None
        try:
            holder = self.loc.read_json(*self._lock_parts())
        except (ValueError, FileNotFoundError):
            return None
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                self.loc.remove(*self._lock_parts())
                return None
            except PermissionError:
                pass
        return holder

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": utc_now()}
        for _ in range(2):
            if self.loc.create_exclusive(json.dumps(me).encode(), *self._lock_parts()):
                return
            holder = self._lock_holder()
            if holder is not None:
                raise RepositoryLockedError(
                    f"level {self.name!r} of {self.loc.url()} is being written by pid {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('time')}; if that process is gone, delete "
                    f"{self.loc.path(*self._lock_parts())}"
                )
        raise RepositoryLockedError(f"could not lock level {self.name!r} of {self.loc.url()}")

    def _release(self) -> None:
        self.loc.remove(*self._lock_parts())

    def recover(self, *, locked: bool = False) -> bool:
        """Roll back an append that was interrupted while growing the arrays.

        Returns True if there was something to roll back. Unless the caller holds the
        level's lock (``locked``), refuses while a live writer holds it: it may be
        appending right now.
        """
        if not self.loc.exists(*self._journal_parts()):
            return False
        holder = None if locked else self._lock_holder()
        if holder is not None:
            raise RepositoryLockedError(
                f"level {self.name!r} is being appended by pid {holder.get('pid')} on {holder.get('host')}; "
                "open it again when the write has finished"
            )
        journal = self.loc.read_json(*self._journal_parts())
        n = int(journal["n_obs_before"])
        g = self._group(write=True)
        for _, arr in g.arrays():
            dims = tuple(arr.metadata.dimension_names)
            if "obs" in dims and arr.shape[dims.index("obs")] != n:
                shape = list(arr.shape)
                shape[dims.index("obs")] = n
                arr.resize(tuple(shape))
        self.loc.remove(*self._journal_parts())
        self._consolidate()
        return True

    # --------------------------------------------------------------------- read --
    def open(
        self,
        *,
        bands: Sequence[int] | None = None,
        obs: Sequence[int | str] | None = None,
        start: float | None = None,
        end: float | None = None,
        include_incomplete: bool = False,
        chunks: Mapping[str, int] | None = None,
    ) -> xr.Dataset:
        """Open the level as a lazy cube of the observations holding complete images.

        Parameters
        ----------
        bands
            Detector numbers to keep (default: those holding any complete image).
        obs
            Observations to keep, by key or observation id.
        start, end
            Keep observations with ``start <= mjd_avg <= end`` [MJD].
        include_incomplete
            Return the images of an interrupted write as stored (possibly partial); by
            default they read as absent (NaN, FLAGS = MISSING_DATA) with a warning.
        chunks
            Dask chunks of the pixel variables; default one image per chunk.

        Returns
        -------
        xarray.Dataset
            Pixel variables are dask arrays (nothing is computed); per-observation and
            per-image metadata are in memory.
        """
        self._require()
        self.recover()
        ds = xr.open_dataset(self.loc.zarr_store(self.dirname, read_only=True), engine="zarr", chunks=None,
                             cache=False, consolidated=False)
        wid = ds["write_id"].values
        present = (wid != 0) if include_incomplete else (wid > 0)
        chosen_obs = np.ones(wid.shape[1], dtype=bool)
        if obs is not None:
            wanted = set(obs)
            ids = ds["obsid"].values
            chosen_obs &= np.array([k in wanted or str(i) in wanted
                                    for k, i in zip(ds["obs"].values.tolist(), ids, strict=True)], dtype=bool)
        if start is not None or end is not None:
            t = ds["mjd_avg"].values
            chosen_obs &= (t >= (-np.inf if start is None else start)) & (t <= (np.inf if end is None else end))
        chosen_band = np.ones(wid.shape[0], dtype=bool)
        if bands is not None:
            unknown = sorted(set(bands) - set(ds["band"].values.tolist()))
            if unknown:
                raise SelectionError(f"band(s) {unknown} not in level {self.name!r} "
                                     f"(bands {ds['band'].values.tolist()})")
            chosen_band = np.isin(ds["band"].values, list(bands))
        keep_obs = chosen_obs & present[chosen_band].any(axis=0)
        keep_band = chosen_band & present[:, keep_obs].any(axis=1)
        n_interrupted = 0 if include_incomplete else int((wid[np.ix_(chosen_band, chosen_obs)] < 0).sum())
        band_idx, obs_idx = np.flatnonzero(keep_band), np.flatnonzero(keep_obs)
        hidden = (wid[np.ix_(band_idx, obs_idx)] < 0) & (not include_incomplete)
        # Pixel variables become dask arrays before selecting (whole blocks are picked, no
        # copies; selecting on the lazy backend first is 2-3x slower); the rest is loaded.
        pixel = {n: _select(v, band_idx, obs_idx, chunks or {})
                 for n, v in ds.variables.items() if "y" in v.dims and n not in ds.indexes}
        pixel_coords = [n for n in pixel if n in ds.coords]
        ds = ds.drop_vars([*pixel, "write_id"]).isel(band=band_idx, obs=obs_idx)
        for name, var in ds.variables.items():
            if name not in ds.indexes:
                var.load()
        ds = ds.assign_coords({n: pixel.pop(n) for n in pixel_coords}).assign(pixel)
        ds.attrs.pop("sphx", None)
        if n_interrupted:
            warnings.warn(
                f"level {self.name!r}: {n_interrupted} image(s) of an interrupted write read as missing; "
                "rerun the write to complete them",
                IncompleteWriteWarning,
                stacklevel=3,
            )
        if hidden.any():
            keep = xr.DataArray(~hidden, dims=("band", "obs"))
            for name in list(ds.data_vars):
                if ds[name].dims[:2] == ("band", "obs"):
                    masked = ds[name].where(keep, _fill(ds[name].dtype, str(name)))
                    ds[name] = masked.astype(ds[name].dtype).assign_attrs(ds[name].attrs)
        return ds

    def read_images(self, names: Sequence[str], *, band: int, obs: Sequence[int]) -> dict[str, np.ndarray]:
        """Read the pixels of some complete images of one band now, straight from Zarr.

        For a task that reads what it works on: its inputs are never separate tasks
        that a scheduler could run ahead of it, holding images in memory.

        Parameters
        ----------
        names
            Pixel variables.
        band
            Detector.
        obs
            Observation keys (the ``obs`` coordinate).

        Returns
        -------
        dict
            (len(obs), y, x) arrays as stored, in the order of ``obs``.

        Raises
        ------
        SelectionError
            If the band or an observation is not stored, or an image is absent or
            incomplete.
        """
        self._require()
        g = self._group()
        # the index arrays this needs, not read_index's five: a task per image pays for each
        bands, keys = g["band"][:].tolist(), {k: i for i, k in enumerate(g["obs"][:].tolist())}
        if band not in bands:
            raise SelectionError(f"band {band} not in level {self.name!r} (bands {bands})")
        missing = [o for o in obs if o not in keys]
        if missing:
            raise SelectionError(f"observation(s) {missing} not in level {self.name!r}")
        b, pos = bands.index(band), np.array([keys[o] for o in obs], dtype=np.int64)
        # consecutive observations (the usual batch) as one slice
        picker = slice(int(pos[0]), int(pos[-1]) + 1) if pos.size and np.array_equal(
            pos, np.arange(pos[0], pos[0] + pos.size)) else pos
        absent = [o for o, w in zip(obs, np.atleast_1d(g["write_id"].get_orthogonal_selection((b, picker))).tolist(),
                                    strict=True) if w <= 0]
        if absent:
            raise SelectionError(f"level {self.name!r} has no complete image of band {band} for observation(s) "
                                 f"{absent}")
        return {n: g[n].get_orthogonal_selection((b, picker)) for n in names}

    # -------------------------------------------------------------------- write --
    def write(
        self,
        cube: xr.Dataset,
        *,
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        progress: ProgressSpec = None,
        also: Sequence[Any] = (),
    ) -> WriteReport:
        """Store a cube's images; see the module docstring for the protocol.

        Parameters
        ----------
        cube
            Valid cube for this level (checked first; nothing is written if it is not).
        overwrite
            Rewrite images that are already complete (reprocessing).
        provenance
            Steps, configs, recipe, inputs and calibrations that produced the cube.
        progress
            Progress display: True, False, None (on a terminal) or ``f(done, total)``.
        also
            Further dask collections to compute in the same pass (results discarded).
        """
        t0 = time.monotonic()
        if self.level.custom:
            validate_cube(cube, instrument=self.instrument)
        else:
            validate_cube(cube, level=self.level, instrument=self.instrument)
        self._acquire()
        try:
            self.recover(locked=True)
            if not self.exists():
                self._create(cube)
            # Every check comes before the first change: a refused write leaves no trace.
            self._check_schema(cube)
            index = self.read_index()
            plan = self._plan(cube, index, overwrite=overwrite)
            n_todo = int(plan.todo.sum())
            if not n_todo:
                if also:
                    dask.compute(*also)
                return WriteReport(self.name, None, 0, plan.skipped, 0, time.monotonic() - t0)
            static = self._static_updates(cube, plan.band_pos)
            self._add_variables(cube)
            g = self._group(write=True)
            for name, bp, values in static:
                g[name][bp] = values
            meta = dict(g.attrs.get("sphx", {}))
            write_id = int(meta.get("writes", 0)) + 1
            meta.update({"writes": write_id, "updated": utc_now()})
            g.attrs["sphx"] = meta
            self._append(cube, plan, index)
            record = make_record(
                kind="level", target=self.name, record_id=write_id, provenance=provenance,
                images=n_todo, overwrite=overwrite,
                observations=[str(o) for o in cube["obsid"].values[plan.cube_obs]],
                bands=[int(b) for b in cube["band"].values],
            )
            try:
                done = self._store(cube, plan, write_id, Progress(f"{self.name}: images", n_todo, progress), also)
            except BaseException as exc:
                write_record(self.loc, {**record, "status": "failed", "error": repr(exc)})
                raise
            attrs = _jsonable(dict(cube.attrs))
            attrs["sphx"] = {**meta, "level": self.name, "format": FORMAT, "instrument": self.instrument.name}
            g.attrs.put(attrs)
            self._consolidate()
            write_record(self.loc, {**record, "status": "complete", "elapsed_s": time.monotonic() - t0})
            return WriteReport(
                self.name, write_id, done, plan.skipped, int(plan.new.sum()), time.monotonic() - t0,
                [str(o) for o in cube["obsid"].values[plan.cube_obs]],
            )
        finally:
            self._release()

    # create / evolve the schema ---------------------------------------------------
    def _template(self, cube: xr.Dataset, names: Sequence[str], n_obs: int) -> tuple[xr.Dataset, dict]:
        """Empty stand-ins for ``names`` at the store's shape, and their zarr encoding."""
        n_band = len(self.instrument.band_numbers)
        variables, encoding = {}, {}
        for name in names:
            var = cube.variables[name]
            kind = var_kind(var.dims)
            shape = tuple(n_band if d == "band" else n_obs if d == "obs" else var.shape[i]
                          for i, d in enumerate(var.dims))
            fill = _fill(var.dtype, str(name))
            enc: dict[str, Any] = {}
            if var.dtype.kind not in "OTU":
                enc["compressors"] = compressors_for(var.dtype)
            if name != "band" and name not in cube.indexes and var.dtype.kind != "f":
                enc["fill_value"] = fill
            if kind == "image" or (kind == "static" and var.dims[:1] == ("band",) and "y" in var.dims):
                enc["chunks"] = tuple(1 if d in ("band", "obs") else s for d, s in zip(var.dims, shape, strict=True))
                data = da.full(shape, fill, dtype=var.dtype, chunks=enc["chunks"]) if n_obs or kind == "static" \
                    else np.empty(shape, dtype=var.dtype)
            elif kind in ("cell", "obs"):
                enc["chunks"] = tuple(OBS_CHUNK if d == "obs" else s for d, s in zip(var.dims, shape, strict=True))
                data = np.full(shape, fill, dtype=var.dtype)
            else:
                data = np.asarray(var.values)
            variables[name] = xr.Variable(var.dims, data, dict(var.attrs))
            encoding[name] = enc
        coords = [n for n in names if n in cube.coords]
        ds = xr.Dataset({n: v for n, v in variables.items() if n not in coords},
                        coords={n: variables[n] for n in coords})
        return ds, encoding

    def _create(self, cube: xr.Dataset) -> None:
        names = [str(n) for n in cube.variables if n not in ("band", "obs")]
        tmpl, enc = self._template(cube, names, 0)
        tmpl = tmpl.assign_coords(
            band=("band", np.asarray(self.instrument.band_numbers, dtype=np.int64), dict(cube["band"].attrs)),
            obs=("obs", np.zeros(0, dtype=np.int64), dict(cube["obs"].attrs)),
        )
        tmpl["write_id"] = xr.Variable(
            ("band", "obs"), np.zeros((len(self.instrument.band_numbers), 0), dtype=np.int32),
            {"long_name": "write that completed the image (0: absent, -1: write interrupted)"},
        )
        enc["obs"] = {"chunks": (OBS_CHUNK,)}
        enc["write_id"] = {"chunks": (len(self.instrument.band_numbers), OBS_CHUNK), "fill_value": 0}
        tmpl.attrs = {**_jsonable(dict(cube.attrs)),
                      "sphx": {"level": self.name, "format": FORMAT, "instrument": self.instrument.name, "writes": 0}}
        tmpl.to_zarr(self.loc.zarr_store(self.dirname), mode="w-", compute=False, consolidated=False,
                     zarr_format=3, encoding=enc)
        self._consolidate()

    def _check_schema(self, cube: xr.Dataset) -> None:
        """Refuse a cube whose geometry, dims, dtypes or units differ from the stored ones."""
        stored = self.schema()
        g = self._group()
        problems = []
        for axis in ("y", "x"):
            if axis in g and not np.array_equal(g[axis][:], cube[axis].values):
                problems.append(f"{axis} coordinates differ from the level's ({g[axis].shape[0]} pixels stored)")
        for name, var in cube.variables.items():
            s = stored.get(str(name))
            if s is None or name in ("band", "obs"):
                continue
            if s["dims"] != var.dims:
                problems.append(f"{name} has dims {var.dims}, the level stores {s['dims']}")
            if s["dtype"].kind != var.dtype.kind or (var.dtype.kind not in "OTU" and s["dtype"] != var.dtype):
                problems.append(f"{name} has dtype {var.dtype}, the level stores {s['dtype']}")
            if "units" in var.attrs and not same_unit(var.attrs["units"], s["units"]):
                problems.append(f"{name} has units {var.attrs['units']!r}, the level stores {s['units']!r}")
        if problems:
            raise CubeValidationError(problems, level=self.name)

    def _add_variables(self, cube: xr.Dataset) -> None:
        """Create the arrays of variables the store does not have yet (filled)."""
        stored = self.schema()
        new = [str(n) for n in cube.variables if str(n) not in stored and n not in ("band", "obs")]
        if not new:
            return
        n_obs = self._group()["obs"].shape[0]
        tmpl, enc = self._template(cube, new, n_obs)
        tmpl.to_zarr(self.loc.zarr_store(self.dirname), mode="a", compute=False, consolidated=False,
                     zarr_format=3, encoding=enc)
        new_coords = [n for n in new if n in cube.coords and n not in cube.indexes]
        if new_coords:
            # xarray finds coordinates through each data variable's ``coordinates`` attribute.
            gw = self._group(write=True)
            for name, arr in gw.arrays():
                if name in cube.data_vars or name == "write_id":
                    have = arr.attrs.get("coordinates", "").split()
                    arr.attrs["coordinates"] = " ".join(sorted(set(have) | set(new_coords)))

    # plan -------------------------------------------------------------------------
    def _plan(self, cube: xr.Dataset, index: _Index, *, overwrite: bool) -> _Plan:
        stored_bands = index.bands.tolist()
        band_pos = np.array([stored_bands.index(int(b)) for b in cube["band"].values], dtype=np.int64)
        position = {int(k): i for i, k in enumerate(index.keys.tolist())}
        last = float(np.max(index.mjd)) if index.mjd.size else -np.inf
        last_id = str(index.obsid[int(np.argmax(index.mjd))]) if index.mjd.size else None
        keys, ids, mjd = cube["obs"].values, cube["obsid"].values, cube["mjd_avg"].values
        cube_obs, store_obs, new, todo, skipped = [], [], [], [], 0
        n_new = 0
        for j, k in enumerate(keys.tolist()):
            i = position.get(int(k))
            if i is not None:
                if str(index.obsid[i]) != str(ids[j]) or abs(float(index.mjd[i]) - float(mjd[j])) > 1e-8:
                    raise DuplicateExposureError(
                        f"observation {ids[j]} (obs={k}, MJD {mjd[j]:.8f}) clashes with the stored "
                        f"{index.obsid[i]} (MJD {index.mjd[i]:.8f}) in level {self.name!r}"
                    )
                col = np.ones(band_pos.size, bool) if overwrite else index.write_id[band_pos, i] <= 0
                skipped += int((~col).sum())
                if col.any():
                    cube_obs.append(j), store_obs.append(i), new.append(False), todo.append(col)
            else:
                if mjd[j] <= last:
                    raise OrderError(
                        f"observation {ids[j]} at MJD {mjd[j]:.6f} is not later than the last stored "
                        f"observation {last_id} at MJD {last:.6f}: level {self.name!r} of "
                        f"{self.loc.url()} appends in time order (write earlier data into a new level "
                        "or repository)"
                    )
                cube_obs.append(j), store_obs.append(index.keys.size + n_new), new.append(True)
                todo.append(np.ones(band_pos.size, bool))
                n_new += 1
        todo_arr = np.array(todo, dtype=bool).T.reshape(band_pos.size, len(cube_obs))
        return _Plan(np.array(cube_obs, dtype=np.int64), np.array(store_obs, dtype=np.int64),
                     np.array(new, dtype=bool), todo_arr, band_pos, skipped)

    # append -----------------------------------------------------------------------
    def _append(self, cube: xr.Dataset, plan: _Plan, index: _Index) -> None:
        g = self._group(write=True)
        n_old = index.keys.size
        n_new = int(plan.new.sum())
        if n_new:
            self.loc.write_json({"n_obs_before": n_old, "n_obs_after": n_old + n_new, "time": utc_now()},
                                *self._journal_parts())
            new_cube = plan.cube_obs[plan.new]
            for name, arr in g.arrays():
                dims = tuple(arr.metadata.dimension_names)
                if "obs" not in dims:
                    continue
                ax = dims.index("obs")
                shape = list(arr.shape)
                shape[ax] = n_old + n_new
                arr.resize(tuple(shape))
                kind = var_kind(dims)
                if kind == "obs":
                    if name in cube.variables:
                        arr[n_old:] = cube[name].values[new_cube]
                    else:
                        arr[n_old:] = np.full((n_new, *arr.shape[1:]), _fill(arr.dtype, name), dtype=arr.dtype)
                elif kind == "cell":
                    # Write fills explicitly: shrinking after a crash can leave stale values in a partial chunk.
                    arr[:, n_old:] = np.full((arr.shape[0], n_new, *arr.shape[2:]), _fill(arr.dtype, name), dtype=arr.dtype)
            self.loc.remove(*self._journal_parts())
        # Every image about to be written is pending until its data and metadata are stored.
        wid = g["write_id"]
        lo, hi = int(plan.store_obs.min()), int(plan.store_obs.max()) + 1
        block = wid[:, lo:hi]
        for j, op in enumerate(plan.store_obs):
            rows = plan.band_pos[plan.todo[:, j]]
            block[rows, op - lo] = -1
        wid[:, lo:hi] = block

    def _static_updates(self, cube: xr.Dataset, band_pos: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
        """Per-band static maps (CWAVE, CBAND...) to store; refuses maps that differ from stored ones."""
        g = self._group()
        updates = []
        for name, var in cube.variables.items():
            if var_kind(var.dims) != "static" or var.dims[:1] != ("band",) or name in cube.indexes:
                continue
            values = np.asarray(var.values)
            for i, bp in enumerate(band_pos.tolist()):
                stored = g[str(name)][bp] if str(name) in g else None
                if stored is None or np.all(stored == _fill(var.dtype, str(name))) or (
                        var.dtype.kind == "f" and np.all(np.isnan(stored))):
                    updates.append((str(name), bp, values[i]))
                elif not np.array_equal(stored, values[i], equal_nan=var.dtype.kind == "f"):
                    raise CubeValidationError(
                        [(f"{name} of band {int(cube['band'][i])} differs from the map stored with level "
                          f"{self.name!r}; a changed static map needs a new level or repository")],
                        level=self.name,
                    )
        return updates

    # store images -----------------------------------------------------------------
    def _store(self, cube: xr.Dataset, plan: _Plan, write_id: int, progress: Progress,
               also: Sequence[Any] = ()) -> int:
        sub = cube.isel(obs=plan.cube_obs)
        images = [str(n) for n, v in sub.data_vars.items() if var_kind(v.dims) == "image"]
        cells = [str(n) for n, v in sub.data_vars.items() if var_kind(v.dims) == "cell"]
        lazy_cells = [n for n in cells if dask.is_dask_collection(sub[n].data)]
        eager_cells = [n for n in cells if n not in lazy_cells]

        ref = sub["IMAGE"].data
        if dask.is_dask_collection(ref):
            bchunks, ochunks = ref.chunks[0], ref.chunks[1]
        else:
            bchunks, ochunks = (1,) * ref.shape[0], (1,) * ref.shape[1]

        def aligned(var: xr.Variable) -> da.Array:
            chunks = (bchunks, ochunks, *[-1] * (var.ndim - 2))
            if dask.is_dask_collection(var.data):
                return var.data.rechunk(chunks)
            return da.from_array(np.asarray(var.data), chunks=chunks)

        letters = iter("cdefghijklmnpqrstuvwz")
        dim_letter: dict[str, str] = {}

        def index(dims: Sequence[str]) -> str:
            return "bo" + "".join(dim_letter.setdefault(d, next(letters)) for d in dims[2:])

        g = self._group(write=True)
        args: list[Any] = [
            da.from_array(plan.band_pos, chunks=(bchunks,)), "b",
            da.from_array(plan.store_obs, chunks=(ochunks,)), "o",
            da.from_array(plan.todo, chunks=(bchunks, ochunks)), "bo",
        ]
        for n in images + lazy_cells:
            args += [aligned(sub[n].variable), index(sub[n].dims)]
        blocks = da.blockwise(
            _store_block, "bo", *args,
            targets=tuple(g[n] for n in images), n_images=len(images), meta_names=tuple(lazy_cells),
            concatenate=True, meta=np.empty((0, 0), dtype=object),
            name=f"sphx-store-{self.name}-{dask.base.tokenize(*args)}",
        )
        delayed = list(blocks.to_delayed().ravel())
        eager = {n: np.asarray(sub[n].values) for n in eager_cells}
        cube_band = {int(bp): i for i, bp in enumerate(plan.band_pos)}
        cube_obs = {int(op): j for j, op in enumerate(plan.store_obs)}
        done = 0

        def flush(results: list[dict[str, Any]]) -> None:
            nonlocal done
            if not results:
                return
            cells_done: list[tuple[int, int]] = []
            values: dict[str, list[Any]] = {n: [] for n in cells}
            for r in results:
                for i, bp in enumerate(r["band_pos"]):
                    for j, op in enumerate(r["obs_pos"]):
                        if not r["todo"][i, j]:
                            continue
                        cells_done.append((int(bp), int(op)))
                        for n in lazy_cells:
                            values[n].append(r["meta"][n][i, j])
                        for n in eager_cells:
                            values[n].append(eager[n][cube_band[int(bp)], cube_obs[int(op)]])
            for n in cells:
                self._write_cells(g[n], cells_done, values[n])
            self._write_cells(g["write_id"], cells_done, [write_id] * len(cells_done))
            done += len(cells_done)
            results.clear()

        pending: list[dict[str, Any]] = []
        last_flush = time.monotonic()

        def record(result: dict[str, Any]) -> None:
            # Runs on the client thread in both modes, so writing metadata here is safe.
            nonlocal last_flush
            pending.append(result)
            progress.update(int(result["todo"].sum()))
            if time.monotonic() - last_flush > FLUSH_SECONDS:
                flush(pending)
                last_flush = time.monotonic()

        client = _current_client()
        try:
            if client is not None:
                from distributed import as_completed

                futures = client.compute([*delayed, *also])
                try:
                    for fut in as_completed(futures[:len(delayed)]):
                        record(fut.result())
                    client.gather(futures[len(delayed):])
                except BaseException:
                    client.cancel(futures)
                    raise
            else:
                keys = {d.key for d in delayed}
                # Local schedulers call back on the thread that runs the graph.
                with Callback(posttask=lambda key, result, *_: record(result) if key in keys else None):
                    dask.compute(*delayed, *also)
        except BaseException as exc:
            flush(pending)
            total = int(plan.todo.sum())
            raise WriteError(
                f"writing level {self.name!r} stopped after {done} of {total} image(s): {exc!r}. "
                "Completed images are kept; rerun the same write to complete the rest."
            ) from exc
        flush(pending)
        return done

    @staticmethod
    def _write_cells(arr: zarr.Array, cells: list[tuple[int, int]], values: list[Any]) -> None:
        """Set ``arr[band, obs]`` for several images with one read and one write per array."""
        if not cells:
            return
        obs = [c[1] for c in cells]
        lo, hi = min(obs), max(obs) + 1
        block = arr[:, lo:hi]
        for (bp, op), v in zip(cells, values, strict=True):
            block[bp, op - lo] = v
        arr[:, lo:hi] = block

