"""Detect Outlier Pixels: transients the on-board detection missed.

Particle hits late or early in the ramp, or below the on-board jump threshold, leave
single bright pixels (plus a little charge shared with the four neighbours). Each image
is compared with its own ``size`` x ``size`` median (:func:`sphx.kernels.median.median_filter`,
with pixels already known to be bad left out): a pixel whose excess over the median is
more than ``nsigma`` times its noise is flagged OUTLIER. The noise is the pixel's
VARIANCE plus that of the median of ``size**2`` samples (``pi / 2 / size**2`` of a pixel's
variance for Gaussian noise). Pixels already flagged keep their flags and may be flagged
OUTLIER too.

Also recorded per image: ``outlier_pull_std``, the robust width (1.4826 MAD) of the
normalised residual over unflagged pixels, which should be close to 1 when VARIANCE
describes the noise (a Level 2 data-quality test).
"""

from __future__ import annotations

import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..instrument import Instrument
from ..kernels.median import median_filter
from ..pipeline.step import StepConfig, register_step
from ._frame import per_image

__all__ = ["OutlierConfig", "detect_outliers", "outlier_kernel"]

_ROBUST = 1.482602218505602
_EXCLUDED = ("TRANSIENT", "OVERFLOW", "SUR_ERROR", "NONFUNC", "HOT", "MISSING_DATA")


class OutlierConfig(StepConfig):
    size: int = pydantic.Field(5, ge=3, description="median box side [pixel], odd")
    nsigma: float = pydantic.Field(5.0, gt=0, description="flag above this many sigma")
    two_sided: bool = pydantic.Field(False, description="also flag pixels far below the median")
    exclude: _flags.FlagNames = pydantic.Field(_EXCLUDED, description="flags left out of the median")

    @pydantic.field_validator("size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"size must be odd, got {v}")
        return v


@per_image
def outlier_kernel(image: np.ndarray, variance: np.ndarray, flags: np.ndarray, *, size: int, nsigma: float,
                   two_sided: bool, exclude: int) -> tuple[np.ndarray, np.ndarray]:
    """(flags with OUTLIER set, robust width of the normalised residual) of one image."""
    work = np.where((flags & np.uint32(exclude)) == 0, image, np.float32(np.nan)).astype(np.float32)
    med = median_filter(work, size=size)
    pull = (image - med) / np.sqrt(variance * np.float32(1.0 + np.pi / 2.0 / size**2))
    hit = np.abs(pull) > nsigma if two_sided else pull > nsigma
    out = flags | np.where(hit, np.uint32(_flags.Flag.OUTLIER), np.uint32(0))
    clean = pull[::2, ::2][(flags[::2, ::2] & ~np.uint32(_flags.Flag.SOURCE)) == 0]
    clean = clean[np.isfinite(clean)]
    width = _ROBUST * np.median(np.abs(clean - np.median(clean))) if clean.size else np.nan
    return out, np.float64(width)


@register_step(
    "detect_outliers",
    module="Detect Outlier Pixels",
    config=OutlierConfig,
    reads={"IMAGE": None, "VARIANCE": None, "FLAGS": None},
    writes={"outlier_pull_std": ""},
    frame="active",
)
def detect_outliers(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: OutlierConfig, instrument: Instrument
) -> xr.Dataset:
    """Flag OUTLIER pixels by sigma clipping against a median-filtered image (lazy)."""
    flags, width = xr.apply_ufunc(
        outlier_kernel, ds["IMAGE"], ds["VARIANCE"], ds["FLAGS"],
        input_core_dims=[["y", "x"]] * 3, output_core_dims=[["y", "x"], []],
        kwargs={"size": config.size, "nsigma": config.nsigma, "two_sided": config.two_sided,
                "exclude": int(_flags.mask(*config.exclude))},
        dask="parallelized", output_dtypes=[_flags.FLAG_DTYPE, np.float64],
    )
    out = ds.copy()
    out["FLAGS"] = flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    out["outlier_pull_std"] = width.transpose("band", "obs").assign_attrs(
        long_name="robust width of (IMAGE - median) / sigma over unflagged pixels")
    return out
