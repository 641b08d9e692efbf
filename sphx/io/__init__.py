"""Input and output: the data repository (Zarr levels, versioned products, Parquet tables)."""

from .levelstore import WriteReport
from .repository import Repository, open_repository

__all__ = ["Repository", "WriteReport", "open_repository"]
