"""Write catalogs as HATS (HEALPix-partitioned Parquet) that ``lsdb.open_catalog`` opens.

The Level 3 catalogs are already partitioned by HEALPix NSIDE=64 tiles (order 6), which
is a valid HATS partitioning: each tile becomes ``dataset/Norder=6/Dir=D/Npix=N.parquet``
with its rows sorted by the ``_healpix_29`` spatial index; ``partition_info.csv``,
``properties`` and the ``_metadata``/``_common_metadata`` files are written by the
``hats`` library, so the layout follows the format's own implementation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hats.catalog import CatalogType, PartitionInfo, TableProperties
from hats.io import paths, write_parquet_metadata
from hats.pixel_math import HealpixPixel

__all__ = ["SPATIAL_INDEX", "write_hats"]

SPATIAL_INDEX = "_healpix_29"  # nested HEALPix pixel at order 29, the HATS row index
_INDEX_NSIDE = 2**29


def _file_by_position(tiles: Mapping[int, pa.Table], name: str, order: int, ra_column: str,
                      dec_column: str) -> dict[int, pa.Table]:
    """Rows filed under the tile of their own position, with the spatial index, sorted by it
    (a source whose mean position moved across a tile edge goes to its neighbour)."""
    shift = 2 * (29 - order)
    filed: dict[int, list[pa.Table]] = {}
    for pixel, table in tiles.items():
        ra = table.column(ra_column).to_numpy(zero_copy_only=False)
        dec = table.column(dec_column).to_numpy(zero_copy_only=False)
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError(f"catalog {name!r}: tile {pixel} has rows without a position")
        index = hp.ang2pix(_INDEX_NSIDE, ra, dec, lonlat=True, nest=True).astype(np.int64)
        own = index >> shift
        with_index = table.append_column(SPATIAL_INDEX, pa.array(index))
        for p in np.unique(own):
            filed.setdefault(int(p), []).append(with_index.filter(pa.array(own == p)))
    out = {}
    for pixel, parts in filed.items():
        table = pa.concat_tables(parts)
        out[pixel] = table.take(pc.sort_indices(table.column(SPATIAL_INDEX)))
    return out


def _write_pixel(root: Path, order: int, pixel: int, table: pa.Table) -> None:
    file = Path(paths.pixel_catalog_file(root, HealpixPixel(order, pixel)))
    file.parent.mkdir(parents=True, exist_ok=True)
    part = file.with_name(f".{file.name}.part")
    pq.write_table(table, part, compression="zstd")
    os.replace(part, file)


def _write_layout(root: Path, *, name: str, order: int, ra_column: str, dec_column: str) -> None:
    """partition_info.csv, _metadata/_common_metadata and properties of every pixel file."""
    pixels = sorted(int(f.stem.split("=")[1]) for f in (root / "dataset").glob(f"Norder={order}/Dir=*/Npix=*.parquet"))
    PartitionInfo.from_healpix([HealpixPixel(order, p) for p in pixels]).write_to_file(catalog_path=root)
    total = write_parquet_metadata(root)
    TableProperties(catalog_name=name, catalog_type=CatalogType.OBJECT, total_rows=total, ra_column=ra_column,
                    dec_column=dec_column, healpix_column=SPATIAL_INDEX, healpix_order=29).to_properties_file(root)


def write_hats(
    path: str | os.PathLike[str],
    tiles: Mapping[int, pa.Table],
    *,
    name: str,
    order: int = 6,
    ra_column: str = "ra",
    dec_column: str = "dec",
    overwrite: bool = False,
    update: bool = False,
) -> Path:
    """Write per-tile tables as a HATS catalog, or replace some tiles of one.

    Parameters
    ----------
    path
        Catalog directory. A new catalog is written in a temporary sibling, then renamed
        into place; an update replaces each tile's file atomically, then rewrites the
        catalog's layout files.
    tiles
        ``{nested HEALPix pixel at `order`: table}``; rows are filed under the tile of
        their position.
    name
        Catalog name (``obs_collection``).
    order
        HEALPix order of the tiles (6: NSIDE 64).
    ra_column, dec_column
        Position columns [deg].
    overwrite
        Replace an existing catalog.
    update
        Replace only these tiles of an existing catalog (written whole when none exists).

    Returns
    -------
    Path
        The catalog directory.

    Raises
    ------
    ValueError
        Rows without a position, a column named ``_healpix_29``, no rows at all, or (on
        update) rows whose position lies in a tile not being replaced.
    FileExistsError
        ``path`` exists and neither ``overwrite`` nor ``update`` is set.
    """
    path = Path(path)
    if path.exists() and not (overwrite or update):
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tiles = {int(k): v for k, v in tiles.items() if v.num_rows}
    if not tiles:
        raise ValueError(f"catalog {name!r} has no rows")
    if any(SPATIAL_INDEX in t.column_names for t in tiles.values()):
        raise ValueError(f"catalog {name!r}: the column {SPATIAL_INDEX!r} is reserved for the HATS index")
    filed = _file_by_position(tiles, name, order, ra_column, dec_column)
    layout = {"name": name, "order": order, "ra_column": ra_column, "dec_column": dec_column}
    if update and (path / "properties").exists():
        strays = sorted(set(filed) - set(tiles))
        if strays:
            raise ValueError(f"catalog {name!r}: rows lie in tile(s) {strays}, which this update does not replace")
        for pixel, table in filed.items():
            _write_pixel(path, order, pixel, table)
        _write_layout(path, **layout)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for pixel, table in filed.items():
            _write_pixel(tmp, order, pixel, table)
        _write_layout(tmp, **layout)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
