"""A repository root on the local disk or behind an fsspec URL.

Local paths use the filesystem directly (atomic renames, ``O_EXCL`` lock files) and
zarr's ``LocalStore``, which writes every chunk atomically. Other URLs (``s3://``,
``gs://``, ``memory://``...) go through fsspec; object stores make single-object writes
atomic, which is all the repository relies on there.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

__all__ = ["Location"]


class Location:
    """A directory, local or remote, addressed by paths relative to its root.

    Parameters
    ----------
    location
        Local path, ``file://`` URL or any fsspec URL.
    storage_options
        Passed to fsspec for remote URLs (credentials, endpoint...).
    """

    def __init__(self, location: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
        text = os.fspath(location)
        text = text.removeprefix("file://")
        self.storage_options = dict(storage_options or {})
        self.local = "://" not in text
        if self.local:
            self.root = str(Path(text).expanduser().resolve())
            self.fs = fsspec.filesystem("file")
        else:
            self.fs, self.root = fsspec.core.url_to_fs(text, **self.storage_options)
            self.root = self.root.rstrip("/")
            self._protocol = text.split("://", 1)[0]

    def __repr__(self) -> str:
        return f"Location({self.url()!r})"

    def path(self, *parts: str) -> str:
        """Filesystem path (local) or fs path (remote) of a relative location."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def url(self, *parts: str) -> str:
        """What to give xarray or zarr to open a relative location."""
        p = self.path(*parts)
        return p if self.local else f"{self._protocol}://{p.lstrip('/')}"

    # --- files ---------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under a relative directory (empty if it does not exist)."""
        p = self.path(*parts)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))

    def makedirs(self, *parts: str) -> None:
        if self.local:
            os.makedirs(self.path(*parts), exist_ok=True)
        else:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    def remove(self, *parts: str) -> None:
        """Remove a file or directory tree if it exists."""
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file atomically (temp file and rename locally)."""
        p = self.path(*parts)
        if not self.local:
            self.fs.pipe_file(p, data)
            return
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), *parts)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create a file only if it does not exist; False if it does (lock files)."""
        p = self.path(*parts)
        if self.local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.fs.exists(p):
            return False
        self.fs.pipe_file(p, data)
        return True

    # --- stores --------------------------------------------------------------------
    def zarr_store(self, *parts: str, read_only: bool = False) -> zarr.abc.store.Store:
        """A zarr store rooted at a relative location."""
        if self.local:
            return LocalStore(self.path(*parts), read_only=read_only)
        return FsspecStore.from_url(self.url(*parts), storage_options=self.storage_options, read_only=read_only)

    def arrow_filesystem(self):
        """A pyarrow filesystem for this location's paths."""
        import pyarrow.fs as pafs

        if self.local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))
