"""Level 3 as a scatter-gather (paper section 4.3): 3a per image, 3b per sky tile.

**3a** runs one task per (detector, observation) image of a level: it reads the image,
queries the reference catalogue over its footprint, estimates the background, performs
forced photometry and writes one Parquet piece per HEALPix NSIDE=64 tile the image's
sources fall in (table ``l3a_photometry``, partition ``healpix64``, key
``<OBSID>_D<detector>``). Images whose pieces exist are skipped unless reprocessing.

**3b** runs one task per tile touched by 3a (or without catalogs yet): it reads the
tile's pieces and writes the primary, secondary and high-reliability catalogs as tables
``l3_primary``, ``l3_secondary``, ``l3_high_reliability`` (partition ``healpix64``, key
``tile``). Rerunning after new images arrive therefore redoes only the new images and
the tiles they touch; the three HATS catalogs (``<repo>/hats/<table>``) have those
tiles replaced.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import pyarrow.compute as pc
import pydantic

from .. import flags as _flags
from ..io.hats import write_hats
from ..io.repository import Repository, open_repository
from .background import estimate_background
from .catalogs import high_reliability_catalog, primary_catalog, secondary_catalog
from .photometry import L3_NSIDE, PHOTOMETRY_MASK, image_catalog, photometer_image, split_by_tile

__all__ = ["CATALOG_TABLES", "PHOTOMETRY_TABLE", "Level3Config", "Level3Report", "run_level3"]

PHOTOMETRY_TABLE = "l3a_photometry"
CATALOG_TABLES = ("l3_primary", "l3_secondary", "l3_high_reliability")
_TILE = f"healpix{L3_NSIDE}"
_CALIBRATIONS = ("average_psf", "solid_angle_pixel_map", "spectral_wcs")


class Level3Config(pydantic.BaseModel):
    """Options of Level 3 (unknown keys are errors)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    reprocess: bool = False
    require_astrometry: bool = True  # skip images whose fine astrometry failed (FINAST != 0)
    background_box: int = 10
    background_filter: int = 3
    max_source_fraction: float = 0.75
    min_usable: float = 0.9
    refine_background: bool = True  # estimate it again without the fitted sources, and fit again
    photometry_mask: tuple[str, ...] = tuple(f.name for f in _flags.REGISTRY if f.value & int(PHOTOMETRY_MASK))
    half_size: int = 7
    bright_snr: float = 100.0
    n_reference_bands: int = 10
    variability_threshold: float = 5.0
    hats: bool = True


@dataclass
class Level3Report:
    """What :func:`run_level3` did."""

    images: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tiles: list[dict[str, Any]] = field(default_factory=list)
    catalogs: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0

    def __str__(self) -> str:
        rows = sum(i["rows"] for i in self.images)
        return (f"level 3: {len(self.images)} image(s) photometered ({rows} measurements), {len(self.skipped)} "
                f"skipped, {len(self.tiles)} tile(s) catalogued in {self.elapsed:.1f} s")


def photometer(repo: Repository, level: str, band: int, obsid: str, config: Level3Config) -> dict[str, Any]:
    """Level 3a of one image: background, forced photometry, one piece per tile."""
    t0 = time.perf_counter()
    cube = repo.open_level(level, bands=[band], obs=[obsid])
    obs = int(cube["obs"].values[0])
    calib = {name: repo.open_calibration(name).sel(band=[band]).load() for name in _CALIBRATIONS}
    catalog = image_catalog(repo.open_table("refcat"), cube, band=band, obs=obs)
    pixels = cube[["IMAGE", "FLAGS", "ZODI"]].sel(band=band, obs=obs).load()
    cwave = calib["spectral_wcs"]["CWAVE"].sel(band=band).values
    x0, y0 = int(cube["x"].values[0]), int(cube["y"].values[0])
    ny, nx = pixels["IMAGE"].shape
    background = functools.partial(
        estimate_background, flags=pixels["FLAGS"].values, zodi=pixels["ZODI"].values,
        wavelength=cwave[y0:y0 + ny, x0:x0 + nx], box_size=config.background_box,
        filter_size=config.background_filter, max_source_fraction=config.max_source_fraction,
        min_usable=config.min_usable)
    estimate = background(pixels["IMAGE"].values)
    table = photometer_image(cube, catalog, band=band, obs=obs, psf=calib["average_psf"],
                             sapm=calib["solid_angle_pixel_map"], spectral_wcs=calib["spectral_wcs"],
                             background=estimate.background, mask=int(_flags.mask(*config.photometry_mask)),
                             local_background=estimate.method == "local",
                             refine_background=(lambda image: background(image).background)
                             if config.refine_background else None,
                             half_size=config.half_size)
    provenance = {"step": "perform_forced_photometry", "level": level, "band": band, "obsid": obsid,
                  "background": estimate.method, "usable_fraction": estimate.usable_fraction,
                  "calibrations": {n: repo.calibration_versions(n)[-1] for n in _CALIBRATIONS}}
    tiles = split_by_tile(table)
    for tile, piece in tiles.items():  # the tile is the partition (not a column as well)
        repo.write_table(PHOTOMETRY_TABLE, piece.drop_columns([_TILE]), key=f"{obsid}_D{band}",
                         partition={_TILE: tile}, provenance=provenance)
    return {"band": band, "obsid": obsid, "rows": table.num_rows, "tiles": sorted(tiles),
            "background": estimate.method, "usable_fraction": estimate.usable_fraction,
            "seconds": time.perf_counter() - t0}


def catalog_tile(repo: Repository, tile: int, config: Level3Config) -> dict[str, Any]:
    """Level 3b of one tile: the primary, secondary and high-reliability catalogs."""
    pieces = repo.read_table(PHOTOMETRY_TABLE, filter=pc.field(_TILE) == tile)
    primary = primary_catalog([pieces])
    secondary = secondary_catalog(primary, repo.instrument, bright_snr=config.bright_snr,
                                  n_reference_bands=config.n_reference_bands,
                                  threshold=config.variability_threshold)
    reliable = high_reliability_catalog(secondary)
    inputs = sorted({str(o) + "_D" + str(b) for o, b in zip(primary.column("obsid").to_pylist(),
                                                           primary.column("band").to_pylist(), strict=True)})
    provenance = {"step": "create_catalogs", "tile": tile, "inputs": inputs}
    for name, table in zip(CATALOG_TABLES, (primary, secondary, reliable), strict=True):
        if _TILE in table.column_names:
            table = table.drop_columns([_TILE])
        repo.write_table(name, table, key="tile", partition={_TILE: tile}, provenance=provenance)
    return {"tile": tile, "measurements": primary.num_rows, "sources": secondary.num_rows,
            "high_reliability": reliable.num_rows, "variable": int(pc.sum(secondary.column("variable")).as_py() or 0)}


def _images(repo: Repository, level: str, select: Mapping[str, Any], config: Level3Config) -> list[tuple[int, str]]:
    cube = repo.open_level(level, **{k: v for k, v in select.items() if v is not None})
    out = []
    finast = cube["finast"].values if "finast" in cube else np.zeros((cube.sizes["band"], cube.sizes["obs"]))
    for i, band in enumerate(cube["band"].values):
        for j, obsid in enumerate(cube["obsid"].values):
            if config.require_astrometry and finast[i, j] != 0:
                continue
            out.append((int(band), str(obsid)))
    return out


def _pending_tiles(repo: Repository, touched: set[int]) -> list[int]:
    """Tiles touched now, or with photometry but no catalog yet."""
    have = {int(p[_TILE]) for p, _ in repo.table_pieces(PHOTOMETRY_TABLE)}
    done = {int(p[_TILE]) for p, _ in repo.table_pieces(CATALOG_TABLES[1])}
    return sorted(touched | (have - done))


def run_level3(
    repository: Repository | str,
    config: Level3Config | Mapping[str, Any] | None = None,
    *,
    level: str = "l2",
    select: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Level3Report:
    """Run Level 3a on every selected image not yet photometered, then 3b on the tiles
    that changed, on the current Dask scheduler (one task per image, then per tile).

    Parameters
    ----------
    repository
        Repository holding the input level, the ``refcat`` table and the calibration
        products ``average_psf``, ``solid_angle_pixel_map`` and ``spectral_wcs``.
    config
        :class:`Level3Config` or a mapping of its fields.
    level
        The input level (spectral images in MJy/sr with VARIANCE, FLAGS and ZODI).
    select
        Which images: ``bands``, ``obs``, ``start``, ``end`` as for
        :meth:`sphx.io.repository.Repository.open_level`.
    log
        Receives one-line progress messages.

    Returns
    -------
    Level3Report
    """
    t0 = time.monotonic()
    repo = repository if isinstance(repository, Repository) else open_repository(repository)
    config = config if isinstance(config, Level3Config) else Level3Config(**dict(config or {}))
    report = Level3Report()
    done = {key for _, key in repo.table_pieces(PHOTOMETRY_TABLE)}
    todo = []
    for band, obsid in _images(repo, level, select or {}, config):
        key = f"{obsid}_D{band}"
        if key in done and not config.reprocess:
            report.skipped.append(key)
        else:
            todo.append((band, obsid))
    log(f"level 3a: {len(todo)} image(s) to photometer, {len(report.skipped)} already done")
    location = repo.location
    tasks = [dask.delayed(_photometer_task)(location, level, band, obsid, config,
                                            dask_key_name=f"l3a-{obsid}-D{band}") for band, obsid in todo]
    report.images = list(dask.compute(*tasks)) if tasks else []
    touched = {t for image in report.images for t in image["tiles"]}
    tiles = _pending_tiles(repo, touched)
    log(f"level 3b: {len(tiles)} tile(s) to catalogue")
    tile_tasks = [dask.delayed(_catalog_task)(location, tile, config, dask_key_name=f"l3b-{tile}") for tile in tiles]
    report.tiles = list(dask.compute(*tile_tasks)) if tile_tasks else []
    if config.hats and tiles:
        for name in CATALOG_TABLES:
            path = _update_hats(repo, name, tiles)
            if path is None:
                log(f"  {name}: no rows, no HATS catalog")
            else:
                report.catalogs[name] = str(path)
    report.elapsed = time.monotonic() - t0
    log(str(report))
    return report


def _photometer_task(location: str, level: str, band: int, obsid: str, config: Level3Config) -> dict[str, Any]:
    return photometer(open_repository(location), level, band, obsid, config)


def _catalog_task(location: str, tile: int, config: Level3Config) -> dict[str, Any]:
    return catalog_tile(open_repository(location), tile, config)


def _update_hats(repo: Repository, name: str, tiles: list[int]):
    """Replace the changed tiles of the HATS catalog ``name`` (the whole catalog when it
    is new, or when a row's position lies in an unchanged tile); None: no rows."""
    table = repo.read_table(name, filter=pc.field(_TILE).isin(tiles))
    if not table.num_rows:
        return None
    by_tile = {int(t): table.filter(pc.equal(table.column(_TILE), t)).drop_columns([_TILE]) for t in tiles}
    path = repo.catalog_path(name)
    try:
        return write_hats(path, by_tile, name=f"sphx_{name}", update=True)
    except ValueError:
        table = repo.read_table(name)
        by_tile = {int(t): table.filter(pc.equal(table.column(_TILE), t)).drop_columns([_TILE])
                   for t in np.unique(table.column(_TILE).to_numpy())}
        return write_hats(path, by_tile, name=f"sphx_{name}", overwrite=True)
