"""Query Reference Catalog: the catalogue sources of a target group's footprints, at its epoch.

A target group's images (every exposure of the group, both detectors of a dichroic
pair) cover a few overlapping ~3.5 deg squares; :func:`query_catalog` returns the
catalogue rows inside their union, grown by a margin, moved to the group's epoch.

It reads as little as the layout of :mod:`sphx.catalog.layout` allows:

1. **Coverage.** Each footprint, a convex spherical polygon, is grown by ``margin``.
   The partition pixels it may touch, and the nested pixels at a finer cover order that
   it may touch, are found by descending the nested HEALPix tree from the partition
   level, keeping every pixel whose centre lies within its own largest
   centre-to-corner distance (+1 %) of the grown polygon. The farthest point of a
   HEALPix pixel from its centre is a corner (checked on densely sampled boundaries at
   nside 1 to 8192), so the test can only keep too much, never too little, anywhere on
   the sky (the inclusive modes of healpy's queries are close but not guaranteed, e.g.
   near the poles, healpy issue #968).
2. **Partitions.** Only the fragments of the covered partitions are opened (a filter
   on the Hive partition column, resolved from the directory names).
3. **Row groups.** The covered fine pixels become index ranges of the
   :data:`~sphx.catalog.layout.FINE_COLUMN`; every row group whose min/max statistics
   of that column (from the Parquet footer) lie outside all ranges is skipped.
4. **Exact test.** Rows whose catalogue position (at ``ref_epoch``) lies inside any
   grown footprint are kept (point in convex spherical polygon: on the inner side of
   every edge's great circle), then moved to ``epoch`` with proper motion and parallax
   (:func:`sphx.catalog.motion.propagate`). The margin is to cover the motion between
   the catalogue epoch and ``epoch`` (the fastest stars move a few arcsec per year) as
   well as any reach the caller needs beyond the images.

Growing a footprint offsets each edge outward in the gnomonic projection about the
footprint's centre (where great circles are straight lines) by ``margin`` times the
largest scale of that projection over the grown region, and joins the offset edges at
their intersections. The grown footprint is therefore again a convex spherical polygon
that contains every point within ``margin`` of the footprint.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import healpy as hp
import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..errors import StepError
from .layout import FINE_COLUMN, LAYOUT_KEY
from .motion import propagate

__all__ = ["DEFAULT_MARGIN", "QueryStats", "query_catalog"]

DEFAULT_MARGIN = 1.0 / 60.0  # [deg] 1': 25 yr of 2"/yr motion plus any parallax
REQUIRED_COLUMNS = ("ra", "dec", "ref_epoch", "pmra", "pmdec")
_OPTIONAL_MOTION = ("parallax",)
_PARTITION = re.compile(r"^healpix(\d+)$")
_MAX_EXTENT = 60.0  # [deg] largest footprint radius (+ margin) about its centre
_PIXRAD_SAFETY = 1.01  # beyond the farthest corner: rounding, never a missed pixel
_COVER_STEPS = 4  # cover order = partition order + 4 (nside 256 for nside 16 partitions)
_EPS = 1e-12  # [-] tolerance of the convexity check (collinear vertices allowed)


@dataclass(frozen=True)
class QueryStats:
    """What a query read, to show that it did not read the whole catalogue.

    Attributes
    ----------
    partitions
        Partition files (or, for an in-memory table, partition values) read.
    partitions_total
        Partition files in the dataset (distinct values for a table).
    row_groups
        Parquet row groups read (after statistics pruning); 0 for a table.
    rows_read
        Rows decoded: all rows of the row groups read (for a table, those of the
        partitions selected).
    rows_returned
        Rows in the result.
    seconds
        Wall-clock time of the query, propagation included [s].
    """

    partitions: int
    partitions_total: int
    row_groups: int
    rows_read: int
    rows_returned: int
    seconds: float


# --- footprints ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Polygon:
    vertices: np.ndarray  # (n, 3) unit vectors, counter-clockwise seen from outside
    normals: np.ndarray   # (n, 3) unit inward normals of the edges v[i] -> v[i + 1]


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _polygon(vertices: np.ndarray, k: int) -> _Polygon:
    """A convex spherical polygon from unit vertices, oriented; StepError if it is not one."""
    centre = vertices.sum(axis=0)
    norm = np.linalg.norm(centre)
    if norm < 1e-9:
        raise StepError(f"footprints[{k}]: its corners surround no centre (a polygon of a hemisphere or more)")
    centre = centre / norm
    cross = np.cross(vertices, np.roll(vertices, -1, axis=0))
    if float(np.sum(cross @ centre)) < 0:  # clockwise: reverse so that inner normals are +cross
        vertices = vertices[::-1].copy()
        cross = np.cross(vertices, np.roll(vertices, -1, axis=0))
    length = np.linalg.norm(cross, axis=1)
    if (length < 1e-12).any():
        raise StepError(f"footprints[{k}]: has repeated or antipodal consecutive corners")
    normals = cross / length[:, None]
    # Corners on the great circle of the edge before them add nothing, and would make
    # parallel offset edges when growing: drop them.
    straight = np.abs(np.einsum("ij,ij->i", np.roll(normals, 1, axis=0), np.roll(vertices, -1, axis=0))) < _EPS
    if straight.any() and (~straight).sum() >= 3:
        return _polygon(vertices[~straight], k)
    # Convex: every corner on the inner side of every edge's great circle.
    if (vertices @ normals.T < -_EPS).any():
        raise StepError(f"footprints[{k}]: is not a convex polygon (corners must go round its edge in order)")
    return _Polygon(vertices, normals)


def _tangent_basis(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the tangent plane at ``centre``."""
    axis = np.array([0.0, 0.0, 1.0]) if abs(centre[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(axis, centre)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(centre, e1)


def _grow(poly: _Polygon, margin: float, k: int) -> _Polygon:
    """The footprint grown to contain every point within ``margin`` [deg] (see the module notes)."""
    v = poly.vertices
    centre = v.sum(axis=0)
    centre /= np.linalg.norm(centre)
    rho = math.degrees(math.acos(min(1.0, float((v @ centre).min()))))  # farthest corner [deg]
    if rho + margin > _MAX_EXTENT:
        raise StepError(
            f"footprints[{k}]: reaches {rho + margin:.1f} deg from its centre with the margin; "
            f"at most {_MAX_EXTENT:g} deg"
        )
    if margin == 0:
        return poly
    e1, e2 = _tangent_basis(centre)
    w = v @ centre
    p = np.stack([(v @ e1) / w, (v @ e2) / w], axis=1)  # gnomonic plane coordinates
    # The gnomonic scale is at most sec^2(angle from the centre), so an arc of length
    # `margin` near the footprint is at most this long in the plane.
    shift = math.radians(margin) / math.cos(math.radians(rho + margin)) ** 2
    edge = np.roll(p, -1, axis=0) - p
    # The polygon is counter-clockwise seen from outside, i.e. in the (e1, e2) plane;
    # the outward normal of an edge is the edge direction turned clockwise.
    out = np.stack([edge[:, 1], -edge[:, 0]], axis=1) / np.linalg.norm(edge, axis=1)[:, None]
    offset = np.einsum("ij,ij->i", out, p) + shift  # offset line i: out_i . x = offset_i
    prev = np.roll(np.arange(len(p)), 1)
    # Corner i is where the offset lines of edges i - 1 and i meet.
    a = np.stack([out[prev], out], axis=1)  # (n, 2, 2)
    b = np.stack([offset[prev], offset], axis=1)
    corners = np.linalg.solve(a, b[..., None])[..., 0]
    grown = centre + corners[:, :1] * e1 + corners[:, 1:] * e2
    grown /= np.linalg.norm(grown, axis=1, keepdims=True)
    return _polygon(grown, k)


def _footprints(footprints, margin: float) -> list[_Polygon]:
    if isinstance(footprints, np.ndarray) and footprints.ndim == 2:
        raise StepError("footprints: must be a sequence of (n, 2) corner arrays; wrap a single footprint in a list")
    out = []
    for k, f in enumerate(footprints):
        arr = np.asarray(f, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
            raise StepError(f"footprints[{k}]: must be an (n >= 3, 2) array of RA, Dec corners [deg], got {arr.shape}")
        if not np.isfinite(arr).all() or (np.abs(arr[:, 1]) > 90).any():
            raise StepError(f"footprints[{k}]: corners must be finite with |Dec| <= 90 deg")
        out.append(_grow(_polygon(_unit(arr[:, 0], arr[:, 1]), k), margin, k))
    return out


def _near(points: np.ndarray, poly: _Polygon, reach: np.ndarray) -> np.ndarray:
    """Points (n, 3) inside ``poly`` or within ``reach`` (n,) [rad] of its edges."""
    side = points @ poly.normals.T  # (n, edges): >= 0 on the inner side
    near = (side >= 0).all(axis=1)
    sin_r, cos_r = np.sin(reach)[:, None], np.cos(reach)[:, None]
    v, nxt = poly.vertices, np.roll(poly.vertices, -1, axis=0)
    near |= (points @ v.T >= cos_r).any(axis=1)  # near a corner
    # Near an edge's great circle with the foot of the perpendicular on the edge.
    begin = points @ np.cross(poly.normals, v).T  # (v x p) . n = p . (n x v)
    end = points @ np.cross(nxt, poly.normals).T  # (p x w) . n = p . (w x n)
    near |= ((np.abs(side) <= sin_r) & (begin >= 0) & (end >= 0)).any(axis=1)
    return near


def _coverage(polys: list[_Polygon], order: int, cover_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Partition pixels at ``order`` and pixels at ``cover_order`` that may touch any polygon."""
    pix = np.arange(12 * 4**order, dtype=np.int64)
    partitions = pix
    for level in range(order, cover_order + 1):
        if pix.size == 0:
            break
        nside = 2**level
        centres = np.stack(hp.pix2vec(nside, pix, nest=True), axis=-1).reshape(-1, 3)
        corners = np.asarray(hp.boundaries(nside, pix, step=1, nest=True)).reshape(-1, 3, 4)
        cos_far = np.einsum("nk,nkc->nc", centres, corners).min(axis=1)  # farthest corner
        reach = _PIXRAD_SAFETY * np.arccos(np.clip(cos_far, -1.0, 1.0))
        keep = np.zeros(pix.size, bool)
        for poly in polys:
            keep |= _near(centres, poly, reach)
        pix = pix[keep]
        if level == order:
            partitions = pix
        if level < cover_order:
            pix = (pix[:, None] * 4 + np.arange(4, dtype=np.int64)).ravel()
    return partitions, pix


def _ranges(pixels: np.ndarray, cover_order: int, fine_order: int) -> np.ndarray:
    """Sorted, merged [lo, hi) ranges of fine indices covering the given pixels, shape (m, 2)."""
    if pixels.size == 0:
        return np.zeros((0, 2), np.int64)
    shift = np.int64(2 * (fine_order - cover_order))
    p = np.unique(pixels)
    starts = np.flatnonzero(np.diff(p, prepend=p[0] - 2) != 1)  # new run where not consecutive
    ends = np.append(starts[1:], p.size) - 1
    return np.stack([p[starts] << shift, (p[ends] + 1) << shift], axis=1)


# --- exact test ---------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _inside_any(ra, dec, normals, first):  # pragma: no cover - compiled
    """Rows whose (ra, dec) [deg] is on the inner side of every edge of some polygon.

    ``normals`` (edges, 3) holds the inner normals of all polygons, polygon k's edges
    being rows ``first[k]:first[k + 1]``.
    """
    n = ra.size
    out = np.zeros(n, np.bool_)
    d2r = math.pi / 180.0
    for i in range(n):
        r, d = ra[i] * d2r, dec[i] * d2r
        cd = math.cos(d)
        x, y, z = cd * math.cos(r), cd * math.sin(r), math.sin(d)
        for k in range(first.size - 1):
            inside = True
            for e in range(first[k], first[k + 1]):
                if x * normals[e, 0] + y * normals[e, 1] + z * normals[e, 2] < 0.0:
                    inside = False
                    break
            if inside:
                out[i] = True
                break
    return out


def _exact(table: pa.Table, polys: list[_Polygon]) -> np.ndarray:
    if table.num_rows == 0 or not polys:
        return np.zeros(table.num_rows, bool)
    normals = np.ascontiguousarray(np.concatenate([p.normals for p in polys]))
    first = np.cumsum([0, *(len(p.normals) for p in polys)]).astype(np.int64)
    ra = np.ascontiguousarray(table.column("ra").to_numpy(), dtype=np.float64)
    dec = np.ascontiguousarray(table.column("dec").to_numpy(), dtype=np.float64)
    return _inside_any(ra, dec, normals, first)


# --- the dataset ----------------------------------------------------------------------------
def _partition_field(refcat) -> tuple[str | None, int | None]:
    """(name, nside) of the Hive partition column ``healpix<nside>``; (None, None) if absent."""
    if isinstance(refcat, pa.Table):
        names = refcat.column_names
    else:
        partitioning = getattr(refcat, "partitioning", None)
        names = list(partitioning.schema.names) if partitioning is not None else []
    found = [(n, int(m.group(1))) for n in names if (m := _PARTITION.match(n))]
    if len(found) > 1:
        raise StepError(f"refcat: several HEALPix partition columns {[n for n, _ in found]}; expected one")
    if not found:
        return None, None
    name, nside = found[0]
    if nside < 1 or nside & (nside - 1):
        raise StepError(f"refcat: partition column {name!r} names nside {nside}, not a power of two")
    return name, nside


def _fine_order(schema: pa.Schema) -> int | None:
    """Order of the fine index column, from its field or the schema metadata; None if unknown."""
    if FINE_COLUMN not in schema.names:
        return None
    meta = schema.field(FINE_COLUMN).metadata or {}
    if b"order" in meta:
        return int(meta[b"order"])
    layout = (schema.metadata or {}).get(LAYOUT_KEY)
    if layout is not None:
        return int(json.loads(layout)["fine_order"])
    return None  # an index of unknown order prunes nothing safely


def _check_columns(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise StepError(f"refcat: lacks the column(s) {missing} needed to place sources at an epoch; has {names}")
    if columns is None:
        return list(names)
    columns = list(columns)
    unknown = [c for c in columns if c not in names]
    if unknown:
        raise StepError(f"columns: {unknown} are not in the catalogue (it has {names})")
    return columns


def _propagated(table: pa.Table, *, epoch: float, observer: np.ndarray | None) -> pa.Table:
    """ra, dec moved to ``epoch`` and seen from ``observer``; ref_epoch set to ``epoch``."""
    col = {c: table.column(c).to_numpy() for c in (*REQUIRED_COLUMNS, *_OPTIONAL_MOTION) if c in table.column_names}
    ra, dec = propagate(col["ra"], col["dec"], col["pmra"], col["pmdec"], col.get("parallax"),
                        ref_epoch=col["ref_epoch"], epoch=epoch, observer=observer)
    new = {"ra": ra, "dec": dec, "ref_epoch": np.full(table.num_rows, epoch)}
    for name, values in new.items():
        i = table.schema.get_field_index(name)
        field = table.schema.field(i)
        table = table.set_column(i, field, pa.array(values, type=field.type))
    return table


def query_catalog(
    refcat: pads.Dataset | pa.Table,
    *,
    footprints: Sequence,
    epoch: float,
    observer=None,
    margin: float = DEFAULT_MARGIN,
    columns: Sequence[str] | None = None,
) -> tuple[pa.Table, QueryStats]:
    """Catalogue sources inside the union of footprints, moved to an epoch.

    Parameters
    ----------
    refcat
        The reference catalogue: a ``pyarrow.dataset.Dataset`` in the layout of
        :mod:`sphx.catalog.layout` (Hive partition column ``healpix<nside>``, rows sorted
        by :data:`~sphx.catalog.layout.FINE_COLUMN` in bounded row groups), or a
        ``pyarrow.Table`` for small in-memory use (a partition column is used when
        present, else every row is tested). Needs ``ra``, ``dec`` [deg], ``ref_epoch``
        [Julian year], ``pmra``, ``pmdec`` [mas/yr]; ``parallax`` [mas] when present.
    footprints
        Sky polygons, each an ``(n, 2)`` array of RA, Dec corners [deg] in order round
        its edge (either direction), convex, edges along great circles: e.g. the four
        corners of each image of a target group and dichroic pair. An empty sequence
        gives an empty result.
    epoch
        Julian year the positions are wanted at (e.g. the group's mid-time,
        :func:`sphx.ephemeris.julian_year`).
    observer
        Barycentric observer position [AU], shape ``(3,)``
        (:func:`sphx.ephemeris.observer_barycentric`); None applies no parallax.
    margin
        Growth of each footprint [deg], at least the motion between the catalogue epoch
        and ``epoch`` (default 1').
    columns
        Columns to return (default all stored ones, partition and fine index included).

    Returns
    -------
    table : pyarrow.Table
        The sources whose catalogue position lies inside any grown footprint, ordered by
        ``source_id`` when present, with ``ra``, ``dec`` at ``epoch`` as seen from
        ``observer`` (proper motion and parallax applied), ``ref_epoch`` set to
        ``epoch``, and every other column as stored (proper motions kept, so that
        later steps can move sources by the minutes within a group). Same schema when
        empty.
    stats : QueryStats
        Partitions, row groups and rows read, rows returned, seconds.

    Raises
    ------
    StepError
        A catalogue without the partition column (dataset) or a required column,
        unknown ``columns``, footprints that are not convex polygons of (RA, Dec)
        corners or reach more than 60 deg from their centre, a negative or
        non-finite margin or epoch, or an observer not of shape (3,).
    """
    t0 = time.perf_counter()
    try:
        margin = float(margin)
        epoch = float(epoch)
    except (TypeError, ValueError):
        raise StepError(f"margin, epoch: must be numbers [deg], [Julian year], got {margin!r}, {epoch!r}") from None
    if not math.isfinite(margin) or margin < 0:
        raise StepError(f"margin: must be finite and non-negative [deg], got {margin!r}")
    if not math.isfinite(epoch):
        raise StepError(f"epoch: must be a finite Julian year, got {epoch!r}")
    if observer is not None:
        observer = np.asarray(observer, dtype=np.float64)
        if observer.shape != (3,) or not np.isfinite(observer).all():
            raise StepError(f"observer: must be a finite barycentric position of shape (3,) [AU], got {observer!r}")
    if not isinstance(refcat, pa.Table | pads.Dataset):
        raise StepError(f"refcat: must be a pyarrow Dataset or Table, got {type(refcat).__name__}")
    schema = refcat.schema
    wanted = _check_columns(schema, columns)
    part, nside = _partition_field(refcat)
    if part is None and not isinstance(refcat, pa.Table):
        raise StepError(
            "refcat: the dataset has no Hive partition column 'healpix<nside>' (directories like healpix16=1234/; "
            "open it with partitioning='hive')"
        )
    polys = _footprints(footprints, margin)
    motion = [c for c in (*REQUIRED_COLUMNS, *_OPTIONAL_MOTION) if c in schema.names]
    read = [*wanted, *(c for c in motion if c not in wanted)]
    if "source_id" in schema.names and "source_id" not in read:
        read.append("source_id")

    if isinstance(refcat, pa.Table):
        table, stats = _from_table(refcat, polys, part, nside, read)
    else:
        table, stats = _from_dataset(refcat, polys, part, nside, read)
    table = table.filter(pa.array(_exact(table, polys), type=pa.bool_()))
    if "source_id" in table.column_names and table.num_rows:
        table = table.take(pc.sort_indices(table.column("source_id")))
    table = _propagated(table, epoch=epoch, observer=observer).select(wanted)
    return table, QueryStats(**stats, rows_returned=table.num_rows, seconds=time.perf_counter() - t0)


def _from_table(table: pa.Table, polys, part, nside, read) -> tuple[pa.Table, dict]:
    values = table.column(part).to_numpy() if part is not None else None
    total = int(np.unique(values).size) if values is not None else 0
    if values is not None and polys:
        order = nside.bit_length() - 1
        pixels, _ = _coverage(polys, order, order)
        mask = np.isin(values, pixels)
        table = table.filter(pa.array(mask))
        partitions = int(np.unique(values[mask]).size)
    else:
        partitions = total
        if not polys:
            table = table.slice(0, 0)
    table = table.select(read)
    stats = {"partitions": partitions, "partitions_total": total, "row_groups": 0, "rows_read": table.num_rows}
    return table, stats


def _from_dataset(dataset: pads.Dataset, polys, part, nside, read) -> tuple[pa.Table, dict]:
    files = getattr(dataset, "files", None)  # a FileSystemDataset lists them without making fragments
    n_total = len(files) if files is not None else sum(1 for _ in dataset.get_fragments())
    stats = {"partitions": 0, "partitions_total": n_total, "row_groups": 0, "rows_read": 0}
    empty = dataset.schema.empty_table().select(read)
    if not polys:
        return empty, stats
    order = nside.bit_length() - 1
    fine_order = _fine_order(dataset.schema)
    cover = order if fine_order is None else min(fine_order, order + _COVER_STEPS)
    pixels, cells = _coverage(polys, order, cover)
    if pixels.size == 0:
        return empty, stats
    # Partition pruning: the partition expressions of the fragments (their directory
    # names) decide, no file is opened for the others.
    fragments = list(dataset.get_fragments(filter=pc.field(part).isin(pa.array(pixels, type=pa.int64()))))
    ranges = _ranges(cells, cover, fine_order) if fine_order is not None else None
    kept = []
    for fragment in fragments:
        if not isinstance(fragment, pads.ParquetFileFragment):
            kept.append(fragment)  # no statistics to prune with: read it whole
            continue
        groups = _row_groups(fragment.metadata, ranges)
        if groups:
            kept.append(fragment.subset(row_group_ids=groups))
            stats["row_groups"] += len(groups)
            stats["rows_read"] += sum(fragment.metadata.row_group(i).num_rows for i in groups)
    stats["partitions"] = len(kept)
    if not kept:
        return empty, stats
    subset = pads.FileSystemDataset(kept, schema=dataset.schema, format=dataset.format,
                                    filesystem=dataset.filesystem)
    table = subset.to_table(columns=read, use_threads=True)
    if any(not isinstance(f, pads.ParquetFileFragment) for f in kept):
        stats["rows_read"] = table.num_rows
    return table, stats


def _row_groups(meta: pq.FileMetaData, ranges: np.ndarray | None) -> list[int]:
    """Row groups of a Parquet file whose fine-index min/max statistics meet any [lo, hi) range.

    The statistics are read from the footer (cached in the fragment after the first
    query). This is what pyarrow's filter-expression pruning does, but one
    ``searchsorted`` per group instead of simplifying an expression of dozens of
    ranges against every group (~1 ms each).
    """
    n = meta.num_row_groups
    if ranges is None or FINE_COLUMN not in meta.schema.names:
        return list(range(n))
    column = meta.schema.names.index(FINE_COLUMN)
    out = []
    for i in range(n):
        st = meta.row_group(i).column(column).statistics
        if st is None or not st.has_min_max:
            out.append(i)  # unknown extent: keep
            continue
        k = np.searchsorted(ranges[:, 1], st.min, side="right")  # first range ending after min
        if k < len(ranges) and ranges[k, 0] <= st.max:
            out.append(i)
    return out
