"""Provenance records: who wrote what, from what, with which code and calibrations.

Every write to a repository leaves one JSON record under
``provenance/<kind>/<name>/<id>.json`` (one file per record, so concurrent writers of
different targets never contend). A record holds the sphx version and those of its core
dependencies, the time, the host, the step chain with resolved configs, the recipe (path
and SHA-256), the inputs and the calibration versions used. Images point at their record
through the ``write_id`` variable of their level.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import importlib.metadata
import platform
import socket
from collections.abc import Mapping
from typing import Any

from .location import Location

__all__ = ["make_record", "read_records", "write_record"]

_PACKAGES = ("numpy", "dask", "distributed", "xarray", "zarr", "astropy", "numba", "pyarrow")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("sphx", *_PACKAGES):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "sphx" not in out:
        from .. import __version__

        out["sphx"] = __version__
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def make_record(*, kind: str, target: str, record_id: int, provenance: Mapping[str, Any] | None = None,
                **fields: Any) -> dict[str, Any]:
    """A provenance record.

    Parameters
    ----------
    kind
        ``"level"``, ``"calibration"``, ``"state"`` or ``"table"``.
    target
        Level, product or table name.
    record_id
        Identifier, unique per (kind, target).
    provenance
        What the caller knows: ``steps``, ``recipe``, ``inputs``, ``calibrations``...
    fields
        Facts the writer adds (images written, version number...).
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    return {
        "id": record_id,
        "kind": kind,
        "target": target,
        "time": utc_now(),
        "versions": _versions(),
        "host": socket.gethostname(),
        "user": user,
        "python": platform.python_version(),
        **dict(provenance or {}),
        **fields,
    }


def write_record(loc: Location, record: Mapping[str, Any]) -> None:
    loc.write_json(dict(record), "provenance", record["kind"], record["target"], f"{record['id']:06d}.json")


def read_records(loc: Location, kind: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
    """All records, optionally of one kind and target, oldest first."""
    out = []
    for k in [kind] if kind else loc.listdir("provenance"):
        for t in [target] if target else loc.listdir("provenance", k):
            for f in loc.listdir("provenance", k, t):
                if f.endswith(".json"):
                    out.append(loc.read_json("provenance", k, t, f))
    return sorted(out, key=lambda r: (r["time"], r["kind"], r["target"], r["id"]))
