"""The sphx data repository: levels, calibration products, scan state, tables, provenance.

A repository is a directory (local or fsspec URL)::

    sphx-repository.json       format version and instrument geometry
    raw.zarr l1.zarr ...       one Zarr v3 group per processing level
    calib/<product>/vNNNN.zarr calibration products, immutable numbered versions
    state/<name>/vNNNN.zarr    scan state (e.g. persistence) to resume from
    tables/<name>/...parquet   tables (catalogs, source lists, measurements)
    provenance/...             one JSON record per write
    .sphx/                     locks and journals of writes in progress

Every level opens with plain ``xarray.open_zarr(repo.level_url("l1"))``; sphx adds the
bookkeeping on top (which images are complete, versions, provenance).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import xarray as xr

from .. import __version__
from .._progress import ProgressSpec
from ..calibration import validate_product
from ..errors import RepositoryError, RepositoryNotFoundError
from ..instrument import SPHEREX, Instrument
from ..levels import get_level
from .levelstore import LevelStore, WriteReport
from .location import Location
from .products import PendingVersion, ProductStore
from .provenance import read_records, utc_now
from .tables import open_table, read_table, table_names, table_pieces, write_table

__all__ = ["Repository", "open_repository"]

MARKER = "sphx-repository.json"
FORMAT = 1


class Repository:
    """A sphx data repository. Use :meth:`create`, :meth:`open` or :func:`open_repository`.

    Attributes
    ----------
    instrument
        The geometry every level of the repository follows.
    location
        Where it is (local path or URL).
    """

    def __init__(self, loc: Location, instrument: Instrument) -> None:
        self._loc = loc
        self.instrument = instrument
        self._calib = ProductStore(loc, "calib")
        self._state = ProductStore(loc, "state")

    def __repr__(self) -> str:
        return f"<sphx.Repository {self.location!r} instrument={self.instrument.name!r} levels={self.levels()}>"

    @property
    def location(self) -> str:
        return self._loc.url()

    # ---------------------------------------------------------------- lifecycle --
    @classmethod
    def create(
        cls,
        location: str | os.PathLike[str],
        *,
        instrument: Instrument = SPHEREX,
        exist_ok: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> Repository:
        """Create a repository (and its directory).

        Parameters
        ----------
        location
            Local path or fsspec URL.
        instrument
            Geometry of all its data.
        exist_ok
            Open an existing repository of the same instrument instead of failing.
        """
        loc = Location(location, storage_options=storage_options)
        if loc.exists(MARKER):
            if not exist_ok:
                raise RepositoryError(f"a sphx repository already exists at {loc.url()}")
            repo = cls.open(location, storage_options=storage_options)
            if repo.instrument != instrument:
                raise RepositoryError(
                    f"repository {loc.url()} holds instrument {repo.instrument.name!r}, not {instrument.name!r}"
                )
            return repo
        if loc.exists() and loc.listdir():
            raise RepositoryError(f"{loc.url()} exists and is not empty; choose a new directory for the repository")
        loc.makedirs()
        loc.write_json(
            {"format": FORMAT, "created": utc_now(), "sphx_version": __version__, "instrument": instrument.to_dict()},
            MARKER,
        )
        return cls(loc, instrument)

    @classmethod
    def open(cls, location: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Repository:
        """Open an existing repository."""
        loc = Location(location, storage_options=storage_options)
        if not loc.exists(MARKER):
            raise RepositoryNotFoundError(f"no sphx repository at {loc.url()} ({MARKER} not found)")
        meta = loc.read_json(MARKER)
        if int(meta.get("format", 0)) > FORMAT:
            raise RepositoryError(
                f"repository {loc.url()} has format {meta['format']}; this sphx {__version__} reads up to {FORMAT}"
            )
        return cls(loc, Instrument.from_dict(meta["instrument"]))

    # ------------------------------------------------------------------- levels --
    def _level(self, name: str) -> LevelStore:
        try:
            get_level(name)
        except KeyError as e:
            raise RepositoryError(str(e.args[0])) from None
        return LevelStore(self._loc, name, self.instrument)

    def levels(self) -> list[str]:
        """Names of the levels present."""
        return [e[: -len(".zarr")] for e in self._loc.listdir() if e.endswith(".zarr")
                and self._loc.exists(e, "zarr.json")]

    def has_level(self, name: str) -> bool:
        return self._level(name).exists()

    def level_url(self, name: str) -> str:
        """Path or URL of a level's Zarr group, for ``xarray.open_zarr``."""
        return self._level(name).url

    def level_schema(self, name: str) -> dict[str, dict[str, Any]]:
        """Variables of a level with their dims, dtype and units, read from metadata only."""
        return self._level(name).schema()

    def level_summary(self, name: str) -> dict[str, Any]:
        """Observation count, complete and pending images per band, and the pixel frame."""
        store = self._level(name)
        store._require()
        idx = store.read_index()
        wid = idx.write_id
        return {
            "level": name,
            "reference_pixels": store.reference_pixels(),
            "observations": int(idx.keys.size),
            "bands": {int(b): {"complete": int((wid[i] > 0).sum()), "pending": int((wid[i] < 0).sum())}
                      for i, b in enumerate(idx.bands)},
            "first": str(idx.obsid[0]) if idx.keys.size else None,
            "last": str(idx.obsid[-1]) if idx.keys.size else None,
        }

    def open_level(
        self,
        name: str,
        *,
        bands: Sequence[int] | None = None,
        obs: Sequence[int | str] | None = None,
        start: float | None = None,
        end: float | None = None,
        include_incomplete: bool = False,
        chunks: Mapping[str, int] | None = None,
    ) -> xr.Dataset:
        """Open a level as a lazy exposure cube (see :meth:`LevelStore.open`)."""
        return self._level(name).open(bands=bands, obs=obs, start=start, end=end,
                                      include_incomplete=include_incomplete, chunks=chunks)

    def write_level(
        self,
        name: str,
        cube: xr.Dataset,
        *,
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        progress: ProgressSpec = None,
        also: Sequence[Any] = (),
    ) -> WriteReport:
        """Append a cube to a level (created on first write); complete images are kept.

        Observations already stored are skipped image by image (or rewritten with
        ``overwrite=True``); new observations must be later than every stored one.
        The cube's dask graph is computed on the current distributed client if there is
        one, otherwise on dask's default scheduler. ``also`` are further dask
        collections computed in the same pass (so that work they share with the cube,
        such as a scan state, is done once), even when no image needs writing.
        """
        return self._level(name).write(cube, overwrite=overwrite, provenance=provenance, progress=progress,
                                       also=also)

    def read_images(self, name: str, variables: Sequence[str], *, band: int,
                    obs: Sequence[int]) -> dict[str, np.ndarray]:
        """Pixels of some complete images of level ``name``, read now (see
        :meth:`LevelStore.read_images`): (len(obs), y, x) per variable."""
        return self._level(name).read_images(variables, band=band, obs=obs)

    def image_presence(self, name: str) -> xr.DataArray:
        """(band, obs) True where level ``name`` holds a complete image (index only, no pixels)."""
        store = self._level(name)
        store._require()
        idx = store.read_index()
        return xr.DataArray(idx.write_id > 0, dims=("band", "obs"),
                            coords={"band": np.asarray(idx.bands), "obs": np.asarray(idx.keys)})

    def image_provenance(self, name: str, *, band: int, obs: int | str) -> dict[str, Any]:
        """The provenance record of the write that produced one image."""
        store = self._level(name)
        store._require()
        idx = store.read_index()
        hits = [i for i, (k, o) in enumerate(zip(idx.keys.tolist(), idx.obsid.tolist(), strict=True))
                if obs in (k, o)]
        if not hits:
            raise KeyError(f"observation {obs!r} is not in level {name!r}")
        wid = int(idx.write_id[idx.bands.tolist().index(band), hits[0]])
        if wid <= 0:
            raise KeyError(f"image band {band} obs {obs!r} of level {name!r} is {'absent' if wid == 0 else 'incomplete'}")
        records = [r for r in read_records(self._loc, "level", name) if r["id"] == wid]
        return records[-1]

    # ------------------------------------------------------------- calibrations --
    def write_calibration(self, name: str, ds: xr.Dataset, *, provenance: Mapping[str, Any] | None = None) -> int:
        """Validate and store a calibration product as its next version; return the version."""
        validate_product(name, ds, instrument=self.instrument)
        return self._calib.write(name, ds, provenance=provenance)

    def open_calibration(self, name: str, version: int | str | None = None) -> xr.Dataset:
        """Open a calibration product (default the latest version), lazily."""
        return self._calib.open(name, version)

    def calibration_versions(self, name: str) -> list[int]:
        return self._calib.versions(name)

    def calibrations(self) -> dict[str, list[int]]:
        """Stored calibration products and their versions."""
        return {n: self._calib.versions(n) for n in self._calib.names()}

    # -------------------------------------------------------------------- state --
    def write_state(self, name: str, ds: xr.Dataset, *, provenance: Mapping[str, Any] | None = None) -> int:
        """Store scan state (e.g. persistence after the last exposure) as a new version."""
        return self._state.write(name, ds, provenance=provenance)

    def prepare_state(self, name: str, ds: xr.Dataset, *,
                      provenance: Mapping[str, Any] | None = None) -> PendingVersion:
        """Lay out the next version of a (lazy) state, to be computed with a level write.

        Compute ``pending.delayed`` (for example as ``also=`` of :meth:`write_level`),
        then call ``pending.commit()``; until then the version is invisible.
        """
        return self._state.prepare(name, ds, provenance=provenance)

    def open_state(self, name: str, version: int | str | None = None) -> xr.Dataset:
        return self._state.open(name, version)

    def state_versions(self, name: str) -> list[int]:
        return self._state.versions(name)

    # ------------------------------------------------------------------- tables --
    def write_table(self, name: str, data: Any, *, key: str, partition: Mapping[str, int | str] | None = None,
                    provenance: Mapping[str, Any] | None = None) -> str:
        """Write one piece of a Parquet table (see :func:`sphx.io.tables.write_table`)."""
        return write_table(self._loc, name, data, key=key, partition=partition, provenance=provenance)

    def read_table(self, name: str, *, columns: Sequence[str] | None = None, filter: Any = None) -> pa.Table:
        return read_table(self._loc, name, columns=columns, filter=filter)

    def open_table(self, name: str) -> pads.Dataset:
        """A table as a lazy ``pyarrow.dataset.Dataset`` (see :func:`sphx.io.tables.open_table`)."""
        return open_table(self._loc, name)

    def tables(self) -> list[str]:
        return table_names(self._loc)

    def table_pieces(self, name: str) -> list[tuple[dict[str, str], str]]:
        """``(partition values, key)`` of every piece of a table (see :func:`sphx.io.tables.table_pieces`)."""
        return table_pieces(self._loc, name)

    def catalog_path(self, name: str) -> str:
        """Directory of a HATS catalog in the repository (``<repo>/hats/<name>``); local
        repositories only, for now.

        Raises
        ------
        RepositoryError
            For a remote repository.
        """
        if not self._loc.local:
            raise RepositoryError(f"HATS catalogs are written to local repositories only, not {self._loc.url()}")
        return self._loc.path("hats", name)

    def table_path(self, name: str) -> str:
        """Directory of a table, for pyarrow/pandas/dask.dataframe readers."""
        return self._loc.url("tables", name)

    # --------------------------------------------------------------- provenance --
    def provenance(self, kind: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
        """Provenance records, oldest first, optionally of one kind (``level``, ``calibration``...)."""
        return read_records(self._loc, kind, target)


def open_repository(
    location: str | os.PathLike[str],
    *,
    create: bool = False,
    instrument: Instrument | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Repository:
    """Open a repository, or create it when ``create`` is true and none exists there.

    Raises
    ------
    RepositoryNotFoundError
        If there is no repository and ``create`` is false.
    """
    loc = Location(location, storage_options=storage_options)
    if loc.exists(MARKER):
        repo = Repository.open(location, storage_options=storage_options)
        if instrument is not None and repo.instrument != instrument:
            raise RepositoryError(f"repository {loc.url()} holds instrument {repo.instrument.name!r}, "
                                  f"not {instrument.name!r}")
        return repo
    if not create:
        raise RepositoryNotFoundError(f"no sphx repository at {loc.url()} (pass create=True to make one)")
    return Repository.create(location, instrument=instrument or SPHEREX, storage_options=storage_options)
