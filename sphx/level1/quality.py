"""Data Quality Assessment for Level 1, and the re-observation list.

Per image: the statistics and flag counts of :func:`sphx.quality.image_statistics`
(recorded with the level, as the real files record header keywords), the data-integrity
outcome ``l1dqa_pass`` (the header's L1DQAFLG: enough finite, non-missing active pixels)
and ``reobserve``: the transient count exceeds the re-observation trigger, 435,000 of the
2040 x 2040 pixels in the paper (about 1 % of images), scaled by area for other
geometries. The ``reobservation`` table lists those images for the survey planners (the
paper's Observation Data Integrity Report).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pydantic
import xarray as xr

from ..instrument import Instrument
from ..pipeline.step import register_step
from ..quality import STATISTICS, ImageStatisticsConfig, add_statistics

__all__ = ["Level1QualityConfig", "assess_level1_quality", "reobservation_table", "transient_limit"]

REAL_TRANSIENT_LIMIT = 435_000
REAL_PIXELS = 2040 * 2040


def transient_limit(instrument: Instrument, limit: int | None = None) -> int:
    """The re-observation trigger in TRANSIENT pixels for ``instrument`` (scaled by area)."""
    return int(limit) if limit is not None else round(REAL_TRANSIENT_LIMIT * instrument.n_active**2 / REAL_PIXELS)


class Level1QualityConfig(ImageStatisticsConfig):
    transient_limit: int | None = pydantic.Field(
        None, ge=0, description="re-observation trigger [pixels]; default 435,000 scaled by detector area")
    min_good_fraction: float = pydantic.Field(0.9, ge=0, le=1, description="L1DQAFLG pass above this good fraction")


def reobservation_table(level: xr.Dataset, tables: Any = None) -> pa.Table:
    """Images of a level whose transient count triggers a re-observation request."""
    need = level["reobserve"].values
    band, obs = np.nonzero(need)
    return pa.table({
        "obsid": pa.array([str(level["obsid"].values[j]) for j in obs], pa.string()),
        "band": pa.array(level["band"].values[band].astype(np.int8)),
        "mjd_avg": pa.array(level["mjd_avg"].values[obs]),
        "n_transient": pa.array(level["n_transient"].values[band, obs].astype(np.int64)),
        "limit": pa.array(np.full(band.size, int(level.attrs.get("transient_limit", -1)), np.int64)),
    })


@register_step(
    "assess_level1_quality",
    module="Data Quality Assessment for Level 1",
    config=Level1QualityConfig,
    reads={"IMAGE": None, "FLAGS": None},
    writes={**{k: None for k in STATISTICS}, "flag_count": None, "n_transient": None, "l1dqa_pass": None,
            "reobserve": None},
    reports={"reobservation": reobservation_table},
)
def assess_level1_quality(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: Level1QualityConfig, instrument: Instrument
) -> xr.Dataset:
    """Image statistics, L1DQAFLG and the re-observation trigger of every image (lazy)."""
    out = add_statistics(ds, bad=config.bad, instrument=instrument)[0]
    limit = transient_limit(instrument, config.transient_limit)
    out["n_transient"] = out["flag_count"].sel(flag="TRANSIENT", drop=True).assign_attrs(
        long_name="number of pixels flagged TRANSIENT (L2 N_TRANSIENT)")
    out["reobserve"] = (out["n_transient"] > limit).assign_attrs(
        long_name=f"transient count above the re-observation trigger ({limit} pixels)")
    missing = out["flag_count"].sel(flag="MISSING_DATA", drop=True)
    out["l1dqa_pass"] = ((out["stat_npix"] >= config.min_good_fraction * instrument.n_active**2)
                         & (missing == 0)).assign_attrs(long_name="Level 1 data-quality outcome (L1DQAFLG)")
    out.attrs["transient_limit"] = limit
    return out
