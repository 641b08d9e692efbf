"""Storage layout of the reference catalogue: HEALPix partitions sorted by a fine HEALPix index.

The catalogue is a Parquet dataset with one Hive partition per coarse nested HEALPix
pixel (``healpix16=1234/``, the number is the nside). Inside each partition file the
rows are sorted by :data:`FINE_COLUMN`, the nested pixel of the position at order
:data:`FINE_ORDER` (nside 8192, 26" pixels), and written in row groups of at most
:data:`ROW_GROUP_SIZE` rows. Because nested indices of nearby points are close, each
row group covers a compact patch of sky and its Parquet min/max statistics of the fine
index bound that patch, so a reader skips row groups by statistics as well as whole
partitions by directory (see :func:`sphx.catalog.query.query_catalog`).

The order of the fine index is stored in the field's metadata (``order``) and, with
the partition nside, in the schema metadata under :data:`LAYOUT_KEY`, so readers never
have to guess it.
"""

from __future__ import annotations

import json

import healpy as hp
import numpy as np
import pyarrow as pa

from ..errors import StepError

__all__ = [
    "FINE_COLUMN",
    "FINE_ORDER",
    "LAYOUT_KEY",
    "ROW_GROUP_SIZE",
    "fine_index",
    "partition_column",
    "prepare_piece",
]

FINE_COLUMN = "healpix_fine"
FINE_ORDER = 13  # nside 8192: 26" pixels, well below a row group's patch, int64-safe
# A partition holds ~30k (galactic poles) to ~500k (plane) rows of the real catalogue;
# 8192-row groups cut it into patches of ~0.3-2 deg^2, fine enough to skip most of a
# partition a footprint only grazes, coarse enough that the per-group overhead (pages,
# statistics, one read per column chunk) stays small against the data.
ROW_GROUP_SIZE = 8192
LAYOUT_KEY = b"sphx.refcat_layout"
# Read by sphx.io.tables.write_table when no row_group_size is given.
ROW_GROUP_KEY = b"sphx.row_group_size"
_MAX_ORDER = 29


def _order(nside: int, what: str) -> int:
    if isinstance(nside, bool) or not isinstance(nside, int | np.integer) or nside < 1 or nside & (nside - 1):
        raise StepError(f"{what}: must be a power of two, got {nside!r}")
    order = int(nside).bit_length() - 1
    if order > _MAX_ORDER:
        raise StepError(f"{what}: at most 2**{_MAX_ORDER}, got {nside}")
    return order


def partition_column(nside: int) -> str:
    """Name of the Hive partition column of a catalogue partitioned at ``nside``, e.g. ``healpix16``."""
    _order(nside, "nside")
    return f"healpix{int(nside)}"


def fine_index(ra, dec, *, order: int = FINE_ORDER) -> np.ndarray:
    """Nested HEALPix pixel at ``order`` of positions ``ra, dec`` [deg], int64."""
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    return np.asarray(hp.ang2pix(2**order, ra, dec, nest=True, lonlat=True), dtype=np.int64)


def prepare_piece(
    table: pa.Table,
    *,
    nside: int,
    pixel: int | None = None,
    fine_order: int = FINE_ORDER,
    row_group_size: int = ROW_GROUP_SIZE,
) -> pa.Table:
    """Prepare one partition's rows for storage: add the fine index and sort by it.

    Parameters
    ----------
    table
        Catalogue rows with ``ra`` and ``dec`` [deg] (at ``ref_epoch``), all in one
        partition pixel; a stored :data:`FINE_COLUMN` is recomputed.
    nside
        HEALPix nside of the partitioning (nested).
    pixel
        The partition pixel the rows belong to; checked when given.
    fine_order
        HEALPix order of the fine index, at least that of ``nside``.
    row_group_size
        Rows per Parquet row group; recorded in the schema metadata, where
        :func:`sphx.io.tables.write_table` finds it.

    Returns
    -------
    pyarrow.Table
        The rows sorted (stably) by the fine index, with :data:`FINE_COLUMN` (int64,
        field metadata ``order``) appended and the layout recorded in the schema
        metadata under :data:`LAYOUT_KEY`.

    Raises
    ------
    StepError
        No ``ra``/``dec`` columns, a bad nside or order, or rows outside ``pixel``.
    """
    order = _order(nside, "nside")
    if (isinstance(fine_order, bool) or not isinstance(fine_order, int | np.integer)
            or not order <= fine_order <= _MAX_ORDER):
        raise StepError(
            f"fine_order: must be an integer in [{order}, {_MAX_ORDER}] for nside={nside}, got {fine_order!r}"
        )
    if isinstance(row_group_size, bool) or not isinstance(row_group_size, int | np.integer) or row_group_size < 1:
        raise StepError(f"row_group_size: must be a positive integer, got {row_group_size!r}")
    missing = [c for c in ("ra", "dec") if c not in table.column_names]
    if missing:
        raise StepError(f"catalogue piece: lacks the column(s) {missing}; has {table.column_names}")
    if FINE_COLUMN in table.column_names:
        table = table.drop_columns([FINE_COLUMN])
    fine = fine_index(table.column("ra").to_numpy(), table.column("dec").to_numpy(), order=int(fine_order))
    if pixel is not None:
        coarse = fine >> np.int64(2 * (int(fine_order) - order))
        wrong = coarse != int(pixel)
        if wrong.any():
            raise StepError(
                f"catalogue piece: {int(wrong.sum())} of {fine.size} rows lie outside partition pixel {pixel} "
                f"(nside {nside}, nested), e.g. in pixel {int(coarse[wrong][0])}"
            )
    # Stable: rows sharing a fine pixel keep their order, so equal input gives equal bytes.
    order_rows = np.argsort(fine, kind="stable")
    table = table.take(pa.array(order_rows))
    field = pa.field(FINE_COLUMN, pa.int64(), nullable=False, metadata={
        "unit": "", "order": str(int(fine_order)),
        "description": f"nested HEALPix pixel of (ra, dec) at order {int(fine_order)}; rows are sorted by it",
    })
    table = table.append_column(field, pa.array(fine[order_rows], type=pa.int64()))
    meta = dict(table.schema.metadata or {})
    meta[LAYOUT_KEY] = json.dumps(
        {"partition_nside": int(nside), "fine_column": FINE_COLUMN, "fine_order": int(fine_order)}
    ).encode()
    meta[ROW_GROUP_KEY] = str(int(row_group_size)).encode()
    return table.replace_schema_metadata(meta)
