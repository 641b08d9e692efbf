"""The SPHEREx Reference Catalog: storage layout, motion to an epoch, and region queries.

* :mod:`.motion` — :func:`propagate`: proper motion and parallax to an epoch and observer.
* :mod:`.layout` — :func:`prepare_piece`: rows sorted by a fine HEALPix index inside each
  ``healpix<nside>=`` partition, in bounded row groups, for statistics pruning.
* :mod:`.query` — :func:`query_catalog`: the sources of a target group's footprints.
"""

from .layout import FINE_COLUMN, FINE_ORDER, ROW_GROUP_SIZE, fine_index, partition_column, prepare_piece
from .motion import propagate
from .query import DEFAULT_MARGIN, QueryStats, query_catalog

__all__ = [
    "DEFAULT_MARGIN",
    "FINE_COLUMN",
    "FINE_ORDER",
    "ROW_GROUP_SIZE",
    "QueryStats",
    "fine_index",
    "partition_column",
    "prepare_piece",
    "propagate",
    "query_catalog",
]
