"""Immutable numbered versions of small datasets: calibration products and scan state.

Version ``n`` of product ``name`` lives in ``<repo>/<kind>/<name>/v{n:04d}.zarr``; its
provenance record ``provenance/<kind>/<name>/{n:06d}.json`` is written last and marks
the version complete, so a version whose write was interrupted is invisible and is
replaced by the next write.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dask
import xarray as xr

from ..errors import CalibrationNotFoundError
from .codecs import compressors_for
from .location import Location
from .provenance import make_record, write_record

__all__ = ["PendingVersion", "ProductStore"]

_VERSION = re.compile(r"^v(\d{4,})\.zarr$")


@dataclass(frozen=True)
class PendingVersion:
    """A version being written: compute ``delayed``, then ``commit()`` to make it visible."""

    name: str
    version: int
    delayed: Any
    commit: Callable[[], int]


class ProductStore:
    """Versioned datasets of one kind (``calib`` or ``state``) in a repository."""

    def __init__(self, loc: Location, kind: str) -> None:
        self.loc, self.kind = loc, kind

    def _record_kind(self) -> str:
        return "calibration" if self.kind == "calib" else self.kind

    def names(self) -> list[str]:
        return [n for n in self.loc.listdir(self.kind) if self.versions(n)]

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, oldest first."""
        done = {f for f in self.loc.listdir("provenance", self._record_kind(), name)}
        out = []
        for entry in self.loc.listdir(self.kind, name):
            m = _VERSION.match(entry)
            if m and f"{int(m.group(1)):06d}.json" in done:
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, name: str, version: int) -> tuple[str, str, str]:
        return (self.kind, name, f"v{version:04d}.zarr")

    def write(self, name: str, ds: xr.Dataset, *, provenance: Mapping[str, Any] | None = None) -> int:
        """Store ``ds`` as the next version of ``name`` and return the version number."""
        pending = self.prepare(name, ds, provenance=provenance)
        dask.compute(pending.delayed)
        return pending.commit()

    def prepare(self, name: str, ds: xr.Dataset, *, provenance: Mapping[str, Any] | None = None) -> PendingVersion:
        """Lay out the next version of ``name``; its data are written when ``delayed`` runs.

        A lazy ``ds`` (state computed by the same graph as a level write) is stored by
        computing ``delayed`` together with that write; :meth:`PendingVersion.commit`
        then writes the provenance record that makes the version visible.
        """
        complete = self.versions(name)
        # An interrupted earlier write may have left a version directory without a record.
        for entry in self.loc.listdir(self.kind, name):
            m = _VERSION.match(entry)
            if m and int(m.group(1)) not in complete:
                self.loc.remove(self.kind, name, entry)
        version = max(complete, default=0) + 1
        out = ds.copy()
        out.attrs = {**ds.attrs, "sphx_product": name, "sphx_version": version}
        for key, var in list(out.variables.items()):
            var.encoding = {}
            if var.ndim >= 2 and var.dtype.kind in "iufb":
                # one chunk per band: readers take a band's whole map at once
                chunks = tuple(1 if d == "band" else s for d, s in zip(var.dims, var.shape, strict=True))
                if var.chunks is not None:
                    out[key] = var.chunk(dict(zip(var.dims, chunks, strict=True)))
                out.variables[key].encoding = {"chunks": chunks, "compressors": compressors_for(var.dtype)}
        self.loc.makedirs(self.kind, name)
        delayed = out.to_zarr(self.loc.zarr_store(*self.path(name, version)), mode="w-", consolidated=False,
                              zarr_format=3, compute=False)

        def commit() -> int:
            write_record(self.loc, make_record(kind=self._record_kind(), target=name, record_id=version,
                                               provenance=provenance, status="complete"))
            return version

        return PendingVersion(name, version, delayed, commit)

    def open(self, name: str, version: int | str | None = None) -> xr.Dataset:
        """Open a version (default the latest); pixel maps are lazy, one dask chunk per band."""
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise CalibrationNotFoundError(
                f"no {self.kind} product {name!r} in {self.loc.url()} (stored: {known})"
            )
        if version is None or version == "latest":
            version = versions[-1]
        if int(version) not in versions:
            raise CalibrationNotFoundError(f"{self.kind} product {name!r} has no version {version}; versions: {versions}")
        ds = xr.open_dataset(self.loc.zarr_store(*self.path(name, int(version)), read_only=True), engine="zarr",
                             chunks=None, consolidated=False)
        # Pixel maps stay lazy, one chunk per band; small tables (gains, PSF grids) are loaded.
        chunked = {}
        for n, var in ds.variables.items():
            if "y" in var.dims:
                chunked[n] = var.chunk({d: 1 if d == "band" else -1 for d in var.dims})
            elif n not in ds.indexes:
                var.load()
        return ds.assign(chunked)  # coordinates stay coordinates
