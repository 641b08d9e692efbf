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

__all__ = ["SPATIAL_INDEX", "write_hats"]

SPATIAL_INDEX = "_healpix_29"  # nested HEALPix pixel at order 29, the HATS row index
_INDEX_NSIDE = 2**29


def write_hats(
    path: str | os.PathLike[str],
    tiles: Mapping[int, pa.Table],
    *,
    name: str,
    order: int = 6,
    ra_column: str = "ra",
    dec_column: str = "dec",
    overwrite: bool = False,
) -> Path:
    """Write per-tile tables as a HATS catalog.

    Parameters
    ----------
    path
        Catalog directory (written in a temporary sibling, then renamed into place).
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

    Returns
    -------
    Path
        The catalog directory.

    Raises
    ------
    ValueError
        Rows without a position, a column named ``_healpix_29``, or no rows at all.
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    from hats.catalog import CatalogType, PartitionInfo, TableProperties
    from hats.io import paths, write_parquet_metadata
    from hats.pixel_math import HealpixPixel

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tiles = {int(k): v for k, v in tiles.items() if v.num_rows}
    if not tiles:
        raise ValueError(f"catalog {name!r} has no rows")
    if any(SPATIAL_INDEX in t.column_names for t in tiles.values()):
        raise ValueError(f"catalog {name!r}: the column {SPATIAL_INDEX!r} is reserved for the HATS index")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        # rows are filed under the tile of their own position (a source whose mean
        # position moved across a tile edge goes to its neighbour)
        index = {}
        for pixel, table in tiles.items():
            ra = table.column(ra_column).to_numpy(zero_copy_only=False)
            dec = table.column(dec_column).to_numpy(zero_copy_only=False)
            if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
                raise ValueError(f"catalog {name!r}: tile {pixel} has rows without a position")
            index[pixel] = hp.ang2pix(_INDEX_NSIDE, ra, dec, lonlat=True, nest=True).astype(np.int64)
        shift = 2 * (29 - order)
        filed: dict[int, list[pa.Table]] = {}
        for pixel, table in tiles.items():
            own = index[pixel] >> shift
            with_index = table.append_column(SPATIAL_INDEX, pa.array(index[pixel]))
            for p in np.unique(own):
                filed.setdefault(int(p), []).append(with_index.filter(pa.array(own == p)))
        total = 0
        for pixel, parts in sorted(filed.items()):
            table = pa.concat_tables(parts)
            table = table.take(pc.sort_indices(table.column(SPATIAL_INDEX)))
            file = Path(paths.pixel_catalog_file(tmp, HealpixPixel(order, pixel)))
            file.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, file, compression="zstd")
            total += table.num_rows
        pixels = [HealpixPixel(order, p) for p in sorted(filed)]
        PartitionInfo.from_healpix(pixels).write_to_file(catalog_path=tmp)
        write_parquet_metadata(tmp)
        TableProperties(catalog_name=name, catalog_type=CatalogType.OBJECT, total_rows=total,
                        ra_column=ra_column, dec_column=dec_column, healpix_column=SPATIAL_INDEX,
                        healpix_order=29).to_properties_file(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
