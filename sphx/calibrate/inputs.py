"""What a calibration solver reads: images of one or two levels, aligned, and their count."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import xarray as xr

from ..catalog.query import DEFAULT_MARGIN, query_catalog
from ..errors import CalibrationError
from ..instrument import Instrument
from ..io.repository import Repository
from ..wcs import cube_wcs

__all__ = ["SolverInputs", "band_maps", "batch_catalog", "catalog_epoch", "open_inputs", "read_images"]

T = TypeVar("T")


# per-image variables that place an image on the sky (the fine WCS) and in time
IMAGE_WCS = ("wcs_crpix", "wcs_crval", "wcs_cd", "wcs_sip_a", "wcs_sip_b", "wcs_sip_ap", "wcs_sip_bp", "finast",
             "sc_position")


@dataclass
class SolverInputs:
    """Lazy pixel variables of the images a solver uses, one cube (band, obs, y, x).

    Attributes
    ----------
    pixels
        The variables, from up to two levels, on the observations both hold.
    present
        (band, obs) bool: the image exists in every level read.
    spectral_wcs
        The ``spectral_wcs`` product (CWAVE, CBAND [um]) of the bands.
    levels
        Which level each variable was read from.
    """

    pixels: xr.Dataset
    present: xr.DataArray
    spectral_wcs: xr.Dataset
    levels: dict[str, str]
    instrument: Instrument

    @property
    def bands(self) -> list[int]:
        return [int(b) for b in self.pixels["band"].values]

    def n_images(self) -> dict[int, int]:
        """Images per band."""
        return {int(b): int(n) for b, n in zip(self.present["band"].values, self.present.sum("obs").values,
                                               strict=True)}

    def require_images(self, minimum: int, *, what: str) -> None:
        """Raise :class:`~sphx.errors.CalibrationError` unless every band has ``minimum`` images."""
        short = {b: n for b, n in self.n_images().items() if n < minimum}
        if short:
            listed = ", ".join(f"band {b} has {n}" for b, n in short.items())
            raise CalibrationError(f"{what} needs at least {minimum} images per band, but {listed} "
                                   f"(levels {sorted(set(self.levels.values()))}); select more exposures "
                                   "or lower min_images")

    def usable(self, *, require_astrometry: bool) -> np.ndarray:
        """(band, obs) bool: the image exists and, if asked, its fine astrometry succeeded
        (``finast == 0``; images without the variable count as solved)."""
        ok = self.present.values.copy()
        if require_astrometry and "finast" in self.pixels:
            ok &= self.pixels["finast"].values == 0
        return ok

    def image_metadata(self) -> xr.Dataset:
        """The per-image variables (WCS, times, positions) without the pixel variables."""
        px = self.pixels
        return px.drop_vars([n for n, v in px.variables.items() if "y" in v.dims and n not in px.indexes])

    def provenance(self) -> dict[str, Any]:
        obsid = self.pixels["obsid"].values
        return {"levels": self.levels, "images": self.n_images(),
                "first": str(obsid[0]) if obsid.size else None, "last": str(obsid[-1]) if obsid.size else None}


def open_inputs(repo: Repository, variables: Mapping[str, str], *, spectral_wcs: xr.Dataset,
                select: Mapping[str, Any] | None = None, extra: Sequence[str] = (),
                batch: int | None = None) -> SolverInputs:
    """Open ``variables`` (name -> level) on the observations every level holds.

    Parameters
    ----------
    repo
        The repository.
    variables
        Pixel variables to read and their level, e.g. ``{"IMAGE": "l2a", "FLAGS": "l2"}``.
    spectral_wcs
        The ``spectral_wcs`` product.
    select
        ``bands``, ``obs``, ``start``, ``end`` as for :meth:`Repository.open_level`.
    extra
        Per-image variables (``wcs_*``, ``finast``...) taken from the last level named.
    batch
        Observations per dask chunk of the pixel variables (default one): a solver that
        works on batches of images reads each batch in one task per variable, with no
        rechunking copy and a graph ``batch`` times smaller.

    Raises
    ------
    CalibrationError
        If a level is missing or lacks a variable, or no image is selected.
    """
    sel = {k: v for k, v in (select or {}).items() if v is not None}
    by_level: dict[str, list[str]] = {}
    for name, level in variables.items():
        by_level.setdefault(level, []).append(name)
    cubes, presence = {}, []
    obs: list[int] | None = None
    for level in by_level:
        if not repo.has_level(level):
            raise CalibrationError(f"the solver reads level {level!r}, which {repo.location} does not hold "
                                   f"(levels: {', '.join(repo.levels()) or 'none'})")
        chunks = {"obs": batch} if batch else None
        cube = repo.open_level(level, **sel, chunks=chunks) if obs is None else \
            repo.open_level(level, bands=sel.get("bands"), obs=obs, chunks=chunks)
        obs = [int(o) for o in cube["obs"].values]
        cubes[level] = cube
        presence.append(repo.image_presence(level))
    if not obs:
        raise CalibrationError(f"no image of levels {list(by_level)} matches the selection {sel or 'all'}")
    last = list(by_level)[-1]
    base = cubes[last]
    bands = [int(b) for b in base["band"].values]
    out = base[[n for n in by_level[last]] + [n for n in extra if n in base]]
    for level, cube in cubes.items():
        cube = cube.sel(band=bands, obs=out["obs"].values)
        for name in by_level[level]:
            if name not in cube:
                raise CalibrationError(f"level {level!r} has no variable {name} (it has {', '.join(cube.data_vars)})")
            out[name] = cube[name]
    present = np.logical_and.reduce([p.reindex(band=bands, obs=out["obs"].values, fill_value=False).values
                                     for p in presence])
    present = xr.DataArray(present, dims=("band", "obs"), coords={"band": bands, "obs": out["obs"].values})
    missing = sorted(set(bands) - set(spectral_wcs["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"spectral_wcs has no band(s) {missing}")
    # the wavelength maps define channels and zones when the graph is built: read them now
    return SolverInputs(out, present, spectral_wcs.sel(band=bands).load(), dict(variables), repo.instrument)


def read_images(repo: Repository, levels: Mapping[str, str], *, band: int,
                obs: Sequence[int]) -> dict[str, np.ndarray]:
    """Variables of some images of one band, read now (in the task that works on them):
    ``levels`` maps each variable to its level; (len(obs), y, x) arrays as stored."""
    by_level: dict[str, list[str]] = {}
    for name, level in levels.items():
        by_level.setdefault(level, []).append(name)
    out: dict[str, np.ndarray] = {}
    for level, names in by_level.items():
        out.update(repo.read_images(level, names, band=band, obs=obs))
    return out


def band_maps(inputs: SolverInputs, fn: Callable[[int, np.ndarray], T]) -> list[T]:
    """``fn(band, cwave)`` for every band, with the band's CWAVE map [um]."""
    return [fn(b, np.asarray(inputs.spectral_wcs["CWAVE"].sel(band=b).values, dtype=np.float64))
            for b in inputs.bands]


def catalog_epoch(refcat: Any) -> float | None:
    """The reference epoch every row of the catalogue has, from the Parquet statistics
    (file footers only); None when the rows differ or it cannot be told."""
    if not isinstance(refcat, pads.FileSystemDataset):
        return None
    epochs: set[float] = set()
    for fragment in refcat.get_fragments():
        if not isinstance(fragment, pads.ParquetFileFragment):
            return None
        meta = fragment.metadata
        if "ref_epoch" not in meta.schema.names:
            return None
        column = meta.schema.names.index("ref_epoch")
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max:
                return None
            epochs.update((float(stats.min), float(stats.max)))
        if len(epochs) > 1:
            return None
    return epochs.pop() if epochs else None


def _footprint(cube: xr.Dataset, *, band: int, obs: int) -> np.ndarray:
    """(4, 2) RA, Dec [deg] of the corners of one image (the outer pixel edges)."""
    wcs = cube_wcs(cube, band=band, obs=obs)
    x0, x1 = float(cube["x"].values[0]) - 0.5, float(cube["x"].values[-1]) + 0.5
    y0, y1 = float(cube["y"].values[0]) - 0.5, float(cube["y"].values[-1]) + 0.5
    return np.column_stack(wcs.all_pix2world(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]), 0))


def batch_catalog(location: str, meta: xr.Dataset, *, band: int, epoch: float,
                  columns: Sequence[str] | None = None) -> pa.Table:
    """The catalogue rows any of a batch of images can use, as stored, in one read.

    ``meta`` holds the images' WCS (:data:`IMAGE_WCS`); ``epoch`` is the catalogue's own
    reference epoch (:func:`catalog_epoch`), so the rows come back unmoved, and each
    image's :func:`~sphx.level3.photometry.image_catalog` on this table finds exactly the
    rows (and positions) it finds on the whole catalogue. One read per batch instead of
    one per image: a read cost about as much as a solver's work on the image.
    ``columns``: those to read (of those the catalogue holds; None: all).
    """
    from ..io.repository import open_repository

    refcat = open_repository(location).open_table("refcat")
    footprints = [_footprint(meta, band=band, obs=int(o)) for o in meta["obs"].values]
    if columns is not None:
        columns = [c for c in columns if c in refcat.schema.names]
    table, _ = query_catalog(refcat, footprints=footprints, epoch=epoch, margin=2 * DEFAULT_MARGIN, columns=columns)
    partitioning = getattr(refcat, "partitioning", None)
    if partitioning is not None:  # without it the per-image queries test every row: a few thousand
        table = table.drop_columns([n for n in partitioning.schema.names if n in table.column_names])
    return table
