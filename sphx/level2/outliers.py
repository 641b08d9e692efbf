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

import numba
import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..blocks import apply_blocks, per_image
from ..instrument import Instrument
from ..kernels.median import median_filter
from ..kernels.select import median
from ..pipeline.step import StepConfig, register_step

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


@numba.njit(nogil=True, cache=True)
def _without_excluded(image, flags, exclude):  # pragma: no cover - compiled
    out = np.empty(image.shape, np.float32)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            out[i, j] = np.float32(np.nan) if flags[i, j] & exclude else image[i, j]
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 is inf, as in numpy
def _clip(image, med, variance, flags, factor, nsigma, two_sided, outlier, source):  # pragma: no cover - compiled
    """Flags with ``outlier`` set, and the robust width of the pull of unflagged pixels
    (every other row and column: a quarter of the image pins it down to 0.1 %)."""
    out = np.empty(flags.shape, flags.dtype)
    clean = np.empty(((image.shape[0] + 1) // 2) * ((image.shape[1] + 1) // 2), np.float32)
    n = 0
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            pull = np.float32(image[i, j] - med[i, j]) / np.sqrt(np.float32(variance[i, j] * factor))
            hit = abs(pull) > nsigma if two_sided else pull > nsigma
            f = flags[i, j]
            out[i, j] = f | outlier if hit else f
            if i % 2 == 0 and j % 2 == 0 and (f & ~source) == 0 and np.isfinite(pull):
                clean[n] = pull
                n += 1
    if n == 0:
        return out, np.nan
    clean = clean[:n]
    centre = np.float32(median(clean))
    for k in range(n):
        clean[k] = abs(clean[k] - centre)
    return out, _ROBUST * median(clean)


@per_image
def outlier_kernel(image: np.ndarray, variance: np.ndarray, flags: np.ndarray, *, size: int, nsigma: float,
                   two_sided: bool, exclude: int) -> tuple[np.ndarray, np.ndarray]:
    """(flags with OUTLIER set, robust width of the normalised residual) of one image."""
    med = median_filter(_without_excluded(image, flags, flags.dtype.type(exclude)), size=size)
    out, width = _clip(image, med, variance, flags, np.float32(1.0 + np.pi / 2.0 / size**2), np.float32(nsigma),
                       two_sided, flags.dtype.type(_flags.Flag.OUTLIER), flags.dtype.type(_flags.Flag.SOURCE))
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
    flags, width = apply_blocks(
        outlier_kernel, ds["IMAGE"], ds["VARIANCE"], ds["FLAGS"],
        input_core_dims=[["y", "x"]] * 3, output_core_dims=[["y", "x"], []],
        kwargs={"size": config.size, "nsigma": config.nsigma, "two_sided": config.two_sided,
                "exclude": int(_flags.mask(*config.exclude))},
        output_dtypes=[_flags.FLAG_DTYPE, np.float64],
    )
    out = ds.copy()
    out["FLAGS"] = flags.transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    out["outlier_pull_std"] = width.transpose("band", "obs").assign_attrs(
        long_name="robust width of (IMAGE - median) / sigma over unflagged pixels")
    return out
