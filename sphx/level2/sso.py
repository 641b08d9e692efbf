"""Compute Known Solar System Object Positions: the ancillary ``sso`` table of every image.

The paper's module lists the known solar-system objects that fall on each image, with
their astrometric positions during the integration and the UTC time, in an ancillary
Parquet file. It needs the image's final WCS, so the step adds nothing to the cube:
its report runs after the Level 2 write, on the written WCS and the spacecraft state,
propagating the orbital elements of the repository table ``sso_elements``
(:func:`sphx.sso.sso_table`, offline two-body propagation) and writing one ``sso``
piece per image keyed ``<obsid>_D<band>``. Without an ``sso_elements`` table there is
nothing to list and nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import xarray as xr

from ..instrument import Instrument
from ..pipeline.step import StepConfig, register_step
from ..sso import sso_table

__all__ = ["compute_sso_positions", "sso_report"]


def sso_report(level: xr.Dataset, tables: Mapping[str, Any]) -> dict[str, pa.Table]:
    """``{"<obsid>_D<band>": table}`` of the known objects on each image of a written level."""
    elements = tables.get("sso_elements")
    if elements is None:
        return {}
    return sso_table(level, elements)


@register_step(
    "compute_sso_positions",
    module="Compute Known Solar System Object Positions",
    tables={"sso_elements": False},
    lazy_tables=("sso_elements",),
    reports={"sso": sso_report},
)
def compute_sso_positions(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument,
    tables: Mapping[str, Any],
) -> xr.Dataset:
    """Return the cube unchanged; the ``sso`` table is written from the level (see the module)."""
    return ds
