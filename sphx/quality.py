"""Data Quality Assessment: per-image statistics and flag counts.

Levels 1 and 2 record image statistics as metadata (the real files carry them as header
keywords such as the ``L2 N_<FLAG>`` counts). This step computes, for every image of a
cube and over its active pixels, the number of good pixels and their mean, median,
robust standard deviation (1.4826 x MAD), minimum and maximum, and the number of pixels
carrying each FLAGS bit. Good pixels are finite and carry none of the ``bad`` bits.
"""

from __future__ import annotations

import numpy as np
import pydantic
import xarray as xr

from . import flags as _flags
from .blocks import apply_blocks
from .cube import STRING_DTYPE
from .instrument import Instrument
from .kernels.statistics import image_statistics_stack
from .pipeline.step import StepConfig, register_step

__all__ = ["STATISTICS", "ImageStatisticsConfig", "add_statistics", "image_statistics"]

STATISTICS = {
    "stat_npix": "number of good pixels",
    "stat_mean": "mean of good pixels",
    "stat_median": "median of good pixels",
    "stat_std": "robust standard deviation of good pixels (1.4826 MAD)",
    "stat_min": "minimum of good pixels",
    "stat_max": "maximum of good pixels",
}


class ImageStatisticsConfig(StepConfig):
    """Which pixels count as good."""

    bad: _flags.FlagNames = pydantic.Field(
        default=tuple(_flags.describe(_flags.DEFAULT_BAD)),
        description="FLAGS bits that exclude a pixel from the statistics",
    )


@register_step(
    "image_statistics",
    module="Perform Data Quality Assessment: image statistics",
    config=ImageStatisticsConfig,
    reads={"IMAGE": None, "FLAGS": None},
    writes={**{k: None for k in STATISTICS}, "flag_count": None},
)
def image_statistics(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: ImageStatisticsConfig, instrument: Instrument
) -> xr.Dataset:
    """Per-image statistics of good active pixels and per-bit flag counts."""
    return add_statistics(ds, bad=config.bad, instrument=instrument)[0]


def add_statistics(
    ds: xr.Dataset, *, bad: tuple[str, ...], instrument: Instrument, without: tuple[str, ...] = ()
) -> tuple[xr.Dataset, xr.DataArray]:
    """``ds`` with the statistics and ``flag_count`` (lazy), and the per-bit counts of the
    pixels carrying none of the ``without`` bits (band, obs, flag), in one pass per image."""
    last = instrument.n_active - 1
    active = ds[["IMAGE", "FLAGS"]].sel(y=slice(0, last), x=slice(0, last))
    if active["IMAGE"].chunks:
        active = active.chunk({"y": -1, "x": -1})
    bits = np.array([f.bit for f in _flags.REGISTRY], dtype=np.int64)
    results = apply_blocks(
        image_statistics_stack,
        active["IMAGE"],
        active["FLAGS"],
        kwargs={"bad": int(_flags.mask(*bad)), "bits": bits, "without": int(_flags.mask(*without))},
        input_core_dims=[["y", "x"], ["y", "x"]],
        output_core_dims=[[]] * 6 + [["flag"]] * 2,
        output_dtypes=[np.int64] + [np.float64] * 5 + [np.int64] * 2,
        output_sizes={"flag": bits.size},
    )
    units = ds["IMAGE"].attrs.get("units")
    out = ds.copy()
    for (name, long_name), value in zip(STATISTICS.items(), results[:6], strict=True):
        attrs = {"long_name": long_name, **({"units": units} if units and name != "stat_npix" else {})}
        out[name] = value.transpose("band", "obs").assign_attrs(attrs)
    flag = ("flag", np.array([f.name for f in _flags.REGISTRY], dtype=STRING_DTYPE))
    out["flag_count"] = results[6].transpose("band", "obs", "flag").assign_attrs(
        long_name="number of active pixels carrying each FLAGS bit"
    )
    out = out.assign_coords(flag=flag)
    return out, results[7].transpose("band", "obs", "flag").assign_coords(flag=flag)
