"""Remove the reference and phantom pixels after Level 2a.

The reference border and the phantom reads serve the preamplifier correction and do
not see the sky; Level 2a ends by dropping them (section 4.2 of the pipeline paper).
Labelled coordinates make this a selection: active pixels keep their ``x``/``y``.
"""

from __future__ import annotations

import xarray as xr

from ..errors import StepError
from ..instrument import Instrument
from ..pipeline.step import StepConfig, register_step

__all__ = ["remove_reference_pixels"]


@register_step(
    "remove_reference_pixels",
    module="Remove reference and phantom pixels",
    removes=("PHANTOM",),
    frame="raw",
    output_frame="active",
)
def remove_reference_pixels(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument
) -> xr.Dataset:
    """Keep the active pixels only and drop the phantom reads."""
    if int(ds["y"].min()) >= 0 and int(ds["x"].min()) >= 0:
        raise StepError("the cube has no reference border to remove (already at the active frame)")
    last = instrument.n_active - 1
    out = ds.sel(y=slice(0, last), x=slice(0, last))
    return out.drop_vars(["PHANTOM", "readout_channel", "phantom_read"], errors="ignore")
