"""Query Reference Catalog: the source list of every target group and dichroic pair.

The paper runs this module between Level 2a and 2b, "over the sky area covered by the
overlapping images in the target groups ... rather than separately for each image",
moving sources with known motions to the epoch of the observation. Here one query runs
per (target group, dichroic pair): the union of the group's image footprints (from the
coarse WCS, grown by ``margin`` to cover the pointing error) is looked up in the
HEALPix-partitioned ``refcat`` (:func:`sphx.catalog.query.query_catalog`: only the
partitions and row groups under the footprints are read), and positions are moved to
the group's mid-time as seen from the spacecraft (proper motion and parallax).

The lists enter the cube as ``srccat_<column>`` variables along ``srccat_source`` (each
group's rows contiguous, sorted by ``source_id``) with ``srccat_rows`` giving every
image its group's rows; Estimate Fine Astrometry and Create Source Mask read them there.
A runner writes them as the ``srccat`` table, one Parquet piece per group keyed
``<first obsid of the group>_D<a>D<b>``, and leaves them out of the level.

The catalogue is read while the graph is built (it is a few numbers per source of the
group); no pixel is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pydantic
import xarray as xr

from ..astrometry.catalog import SRCCAT_DIM, SRCCAT_ROWS
from ..catalog.query import query_catalog
from ..ephemeris import julian_year, observer_barycentric
from ..errors import StepError
from ..instrument import Instrument
from ..pipeline.step import StepConfig, register_step
from ..wcs import WCS_VARIABLES, cube_wcs

__all__ = ["QueryCatalogConfig", "query_reference_catalog", "srccat_tables"]

# the columns kept in the source lists when the catalogue has them
_COLUMNS = ("source_id", "ra", "dec", "ref_epoch", "pmra", "pmdec", "parallax", "pos_error", "kind", "calibrator",
            "mag_ab", "flux_1um", "flux_2um", "flux_3um", "flux_4p5um")


class QueryCatalogConfig(StepConfig):
    """How far around the images the catalogue is read."""

    margin: float = pydantic.Field(
        20.0, ge=0, description="[arcmin] growth of every image footprint: the coarse pointing error plus "
                                "the blind search of fine astrometry")


def _groups(ds: xr.Dataset, instrument: Instrument) -> dict[tuple[Any, tuple[int, ...]], tuple[list[int], list[int]]]:
    """{(target, pair): (band indices, obs indices)} of the cube's images."""
    bands = [int(b) for b in ds["band"].values]
    targets = ds["target"].values if "target" in ds.coords else ds["obsid"].values
    out: dict[tuple[Any, tuple[int, ...]], tuple[list[int], list[int]]] = {}
    for i, b in enumerate(bands):
        pair = tuple(sorted({b, instrument.band(b).dichroic_partner}))
        for j, t in enumerate(targets.tolist()):
            bi, oj = out.setdefault((t, pair), ([], []))
            if i not in bi:
                bi.append(i)
            if j not in oj:
                oj.append(j)
    return out


def _corners(ds: xr.Dataset, band: int, obs: Any, n: int) -> np.ndarray | None:
    """RA, Dec of the image's outer corners [deg], or None without a WCS."""
    if not np.all(np.isfinite(ds["wcs_crval"].sel(band=band, obs=obs).values)):
        return None
    edge = np.array([-0.5, n - 0.5])
    x, y = edge[[0, 1, 1, 0]], edge[[0, 0, 1, 1]]
    return np.column_stack(cube_wcs(ds, band=band, obs=obs).all_pix2world(x, y, 0))


def srccat_tables(ds: xr.Dataset) -> tuple[xr.Dataset, dict[str, pa.Table]]:
    """Split the source lists off a cube: the cube without them and ``{group key: table}``."""
    names = [v for v in ds.data_vars if SRCCAT_DIM in ds[v].dims]
    if not names:
        return ds, {}
    groups = ds["srccat_group"].values
    columns = {v[len("srccat_"):]: ds[v].values for v in names if v != "srccat_group"}
    pieces = {}
    for key in dict.fromkeys(groups.tolist()):
        take = groups == key
        pieces[str(key)] = pa.table({c: v[take] for c, v in columns.items()})
    return ds.drop_vars([*names, SRCCAT_ROWS]), pieces


@register_step(
    "query_reference_catalog",
    module="Query Reference Catalog",
    config=QueryCatalogConfig,
    tables={"refcat": True},
    lazy_tables=("refcat",),
    makes_tables={"srccat": srccat_tables},
    frame="active",
)
def query_reference_catalog(
    ds: xr.Dataset,
    *,
    calib: dict[str, xr.Dataset],
    config: QueryCatalogConfig,
    instrument: Instrument,
    tables: Mapping[str, Any],
) -> xr.Dataset:
    """Attach each target group's catalogue sources to the cube.

    Parameters
    ----------
    ds
        Cube with the coarse ``wcs_*`` variables (in memory), ``mjd_avg`` and, when
        known, ``target`` and ``sc_position`` (for parallax; without it the geocentre).
    tables
        ``refcat``: a ``pyarrow.dataset.Dataset`` in the layout of
        :mod:`sphx.catalog.layout` (or a pyarrow Table).

    Returns
    -------
    xarray.Dataset
        The cube with ``srccat_<column>`` (srccat_source), ``srccat_group`` (the piece
        key of each row) and ``srccat_rows`` (band, obs, srccat_bound).

    Raises
    ------
    StepError
        No WCS in the cube, WCS variables held as dask arrays, or a catalogue without
        the needed columns (an empty sky region is not an error: its list is empty).
    """
    missing = [v for v in WCS_VARIABLES[:3] if v not in ds]
    if missing:
        raise StepError(f"query_reference_catalog needs the images' coarse WCS, but the cube lacks {missing}")
    lazy = [v for v in WCS_VARIABLES if v in ds and hasattr(ds[v].data, "dask")]
    if lazy:
        raise StepError(f"query_reference_catalog reads the footprints while the graph is built, but {lazy} are "
                        "dask arrays; load them first (ds[name].load())")
    refcat = tables["refcat"]
    names = refcat.schema.names
    columns = [c for c in _COLUMNS if c in names]
    pieces, keys, rows = [], [], np.zeros((ds.sizes["band"], ds.sizes["obs"], 2), np.int64)
    start = 0
    for (_, pair), (bi, oj) in _groups(ds, instrument).items():
        obs = ds["obs"].values[oj]
        feet = [c for i in bi for o in obs
                if (c := _corners(ds, int(ds["band"].values[i]), o, instrument.n_active)) is not None]
        mjd = float(np.mean(ds["mjd_avg"].values[oj]))
        observer = None
        if "sc_position" in ds:
            sc = ds["sc_position"].isel(obs=oj).sel(sc_epoch="avg").values.mean(axis=0)
            observer = observer_barycentric(mjd, sc)
        table, _ = query_catalog(refcat, footprints=feet, epoch=float(julian_year(mjd)), observer=observer,
                                 margin=config.margin / 60.0, columns=columns)
        key = f"{ds['obsid'].values[oj[0]]}_" + "".join(f"D{b}" for b in pair)
        pieces.append(table)
        keys.append(np.full(table.num_rows, key, dtype=object))
        rows[np.ix_(bi, oj)] = (start, start + table.num_rows)
        start += table.num_rows
    table = pa.concat_tables(pieces) if pieces else pa.table({c: pa.array([], pa.float64()) for c in columns})
    out = ds.assign({f"srccat_{c}": (SRCCAT_DIM, table.column(c).to_numpy(zero_copy_only=False)) for c in columns})
    out["srccat_group"] = (SRCCAT_DIM, np.concatenate(keys).astype(str) if keys else np.array([], str))
    out[SRCCAT_ROWS] = (("band", "obs", "srccat_bound"), rows)
    return out
