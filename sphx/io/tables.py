"""Tables as Parquet datasets, one file per write.

Table ``name`` lives in ``<repo>/tables/<name>/`` with optional Hive-style partition
directories (``healpix64=1234/``). Each write stores one file named by its key,
atomically, so re-writing a key replaces exactly that piece (idempotent reruns) and
concurrent writers of different keys never collide. The provenance record travels in
the Parquet schema metadata under ``sphx``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..errors import RepositoryError
from .location import Location

__all__ = ["open_table", "read_table", "table_names", "table_pieces", "write_table"]

_ROW_GROUP_KEY = b"sphx.row_group_size"  # a table's preferred rows per row group
_SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _check(what: str, value: str) -> str:
    if not _SAFE.match(str(value)):
        raise RepositoryError(f"table {what} {value!r} may hold only letters, digits, '_', '.', '-'")
    return str(value)


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, Mapping):
        return pa.table(dict(data))
    if hasattr(data, "__dataframe__") or type(data).__name__ == "DataFrame":
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"cannot store {type(data).__name__} as a table; give a pyarrow Table, DataFrame or dict")


def write_table(
    loc: Location,
    name: str,
    data: Any,
    *,
    key: str,
    partition: Mapping[str, int | str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    row_group_size: int | None = None,
) -> str:
    """Write one piece of a table; returns the path written.

    Parameters
    ----------
    name
        Table name.
    data
        pyarrow Table, pandas DataFrame or dict of columns.
    key
        Name of this piece (e.g. an observation id); writing the same key again
        replaces the piece.
    partition
        Hive partition values, e.g. ``{"healpix64": 1234}``.
    provenance
        Stored in the schema metadata.
    row_group_size
        Most rows per Parquet row group, so that readers can skip row groups by their
        statistics. None: the table's own preference (schema metadata
        ``sphx.row_group_size``, set e.g. by :func:`sphx.catalog.layout.prepare_piece`),
        else pyarrow's default (up to 1Mi rows).
    """
    table = _as_table(data)
    parts = ["tables", _check("name", name)]
    for k, v in (partition or {}).items():
        parts.append(f"{_check('partition column', k)}={_check('partition value', str(v))}")
    parts.append(f"{_check('key', key)}.parquet")
    meta = dict(table.schema.metadata or {})
    if row_group_size is None and _ROW_GROUP_KEY in meta:
        row_group_size = int(meta[_ROW_GROUP_KEY])
    if row_group_size is not None and (isinstance(row_group_size, bool) or int(row_group_size) < 1):
        raise RepositoryError(f"table {name!r}: row_group_size must be a positive integer, got {row_group_size!r}")
    meta[b"sphx"] = json.dumps(dict(provenance or {}), default=str).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    loc.write_bytes(sink.getvalue().to_pybytes(), *parts)
    return loc.path(*parts)


def table_names(loc: Location) -> list[str]:
    return loc.listdir("tables")


def table_pieces(loc: Location, name: str) -> list[tuple[dict[str, str], str]]:
    """The pieces of a table: ``(partition values, key)`` of every file (none when the
    table does not exist)."""
    out: list[tuple[dict[str, str], str]] = []

    def walk(parts: tuple[str, ...], partition: dict[str, str]) -> None:
        for entry in loc.listdir(*parts):
            if entry.endswith(".parquet"):
                out.append((partition, entry[: -len(".parquet")]))
            elif "=" in entry:
                k, v = entry.split("=", 1)
                walk((*parts, entry), {**partition, k: v})

    if loc.exists("tables", _check("name", name)):
        walk(("tables", name), {})
    return out


def open_table(loc: Location, name: str) -> pads.Dataset:
    """A table as a lazy ``pyarrow.dataset.Dataset`` (nothing read until it is scanned).

    Readers pass filters to its ``to_table``/``scanner`` so that only the partitions and
    row groups they need are read (the reference catalogue, :mod:`sphx.catalog.query`).
    """
    if not loc.exists("tables", name):
        raise RepositoryError(f"no table {name!r} in {loc.url()} (tables: {', '.join(table_names(loc)) or 'none'})")
    return pads.dataset(
        loc.path("tables", name), format="parquet", partitioning="hive",
        filesystem=loc.arrow_filesystem(), exclude_invalid_files=True,
    )


def read_table(
    loc: Location,
    name: str,
    *,
    columns: Sequence[str] | None = None,
    filter: Any = None,
) -> pa.Table:
    """Read a whole table or a filtered part of it (partition pruning applies).

    Parameters
    ----------
    columns
        Columns to read (default all, partition columns included).
    filter
        A ``pyarrow.compute`` expression, e.g. ``pc.field("healpix64") == 12``.
    """
    return open_table(loc, name).to_table(columns=list(columns) if columns else None, filter=filter)
