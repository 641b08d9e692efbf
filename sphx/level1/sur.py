"""Validate Sample-up-the-ramp (SUR): noise and stability from the full-sample pixels.

On board, every pixel's ramp (``n_frames`` reads ``frame_time`` apart, the first
``n_discarded_frames`` discarded) is reduced to a slope by an equal-weight least-squares
fit; only a small block of *full-sample* pixels (FLAGS bit FULLSAMPLE; 8 x 34 on the real
detectors) has every read downlinked, in the ``fullsample`` table (``obsid``, ``band``,
``y``, ``x`` as active-frame labels, ``frame``, ``adu``: the read with the channel gain
divided out and no reference offset). The pipeline paper's module "extracts the
subsection where the full sample up the ramp is recorded to monitor noise performance
and temporal stability". For every image this step measures, from the reads of frames
``first = n_discarded_frames`` .. ``last = n_frames - 1`` (the frames of the on-board fit)
converted to electrons with the ``gain_factors`` gain of each pixel's readout channel:

``sur_read_noise`` [electron]
    Read noise of one frame. The second differences of a ramp,
    ``d_k = q_{k+2} - 2 q_{k+1} + q_k``, cancel any straight line (and leave a constant
    for a curved one); their variance is ``6 sigma_r^2 + 2 i dt`` (read noise of three
    reads plus the Poisson charge of two frame intervals, current ``i``). Per pixel
    ``sigma_r^2 = (var(d) - 2 i dt) / 6`` with ``i`` the refitted slope; the image value
    is the root of the mean over the pixels used (an rms read noise).
``sur_slope_diff``, ``sur_slope_pull``
    Median over pixels of the on-board slope in IMAGE minus the slope refitted on the
    ground by the same fit (:func:`sphx.kernels.ramp.ols_weights`), in electron / s and
    in units of the slope's noise (:func:`sphx.kernels.ramp.slope_variance` with the
    measured read noise). Both fits see the same reads, so after the preamplifier
    correction the difference is the residual reference offset plus whatever the
    on-board processing got wrong; before it, the reference offset itself.
``sur_drift``, ``sur_drift_error`` [electron / s]
    Median over pixels of the slope of the second half of the ramp minus that of the
    first half, and its expected scatter from the noise model (the two halves share no
    read and no Poisson increment, so their slope variances add). A stable detector
    gives ``sur_drift`` within a few ``sur_drift_error`` of zero. The reads are not yet
    corrected for non-linearity, which lowers the second half of a bright ramp: full-sample
    pixels far from saturation (tens of thousands of electrons) show no measurable effect.

Pixels used: a full-sample pixel inside the cube whose reads of frames ``first..last``
are all present and finite (counted in ``sur_npix``), with a finite IMAGE value,
carrying none of the ``exclude`` FLAGS bits (TRANSIENT, OVERFLOW, SUR_ERROR by default:
their on-board fit is not the straight line over all frames) and showing no jump, i.e.
no second difference further
than ``jump_threshold`` robust standard deviations (1.4826 x MAD of that ramp's second
differences) from their median; ``sur_nused`` counts them, ``sur_njump`` the complete
ramps rejected for a jump. Screening whole ramps rather than clipping reads lets the
statistics of the clean ramps use plain variances (full Gaussian efficiency) while a
particle hit below the on-board threshold cannot leak into them.

``sur_pass`` is true when at least ``min_pixels`` pixels were used, the read noise lies
within a factor ``read_noise_factor`` of ``expected_read_noise``, ``|sur_slope_pull|``
is at most ``max_slope_pull`` and ``|sur_drift|`` is at most ``max_drift_sigma`` times
``sur_drift_error``. An image without usable full-sample pixels (none in the table, none
inside the cube, all excluded) gets NaN statistics and ``sur_pass`` False: nothing was
validated.

The table is small (the real block is 272 pixels x 77 reads per image): it is split into
per-image numpy arrays on the client and handed to one task per image together with that
image's IMAGE and FLAGS blocks, so the step builds a graph and computes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydantic
import xarray as xr

from .. import flags as _flags
from ..blocks import apply_blocks
from ..errors import CalibrationError, StepError
from ..instrument import Instrument
from ..kernels.ramp import ols_weights, slope_variance
from ..levels import ELECTRON_RATE
from ..pipeline.step import StepConfig, register_step

__all__ = ["SUR_VARIABLES", "SurConfig", "sur_statistics", "sur_statistics_stack", "validate_sur"]

_ROBUST = 1.482602218505602  # MAD to standard deviation for a normal distribution
_COLUMNS = ("obsid", "band", "y", "x", "frame", "adu")

SUR_VARIABLES: dict[str, tuple[str, str | None]] = {
    "sur_npix": ("full-sample pixels with a complete ramp", None),
    "sur_nused": ("full-sample pixels used (complete, not excluded, no jump)", None),
    "sur_njump": ("complete full-sample ramps rejected for a jump", None),
    "sur_read_noise": ("rms read noise of one frame from the full-sample ramps", "electron"),
    "sur_slope_diff": ("median on-board minus ground-refitted slope of the full-sample pixels", ELECTRON_RATE),
    "sur_slope_pull": ("median (on-board - refitted slope) / slope noise of the full-sample pixels", ""),
    "sur_drift": ("median second-half minus first-half ramp slope of the full-sample pixels", ELECTRON_RATE),
    "sur_drift_error": ("expected standard deviation of sur_drift from the noise model", ELECTRON_RATE),
    "sur_pass": ("full-sample noise, slope and drift checks passed", None),
}
"""Per-image variables the step writes: name -> (long_name, units)."""


class SurConfig(StepConfig):
    """Which full-sample pixels count, and the limits of the checks."""

    exclude: _flags.FlagNames = pydantic.Field(
        default=("TRANSIENT", "OVERFLOW", "SUR_ERROR"),
        description="FLAGS bits that exclude a full-sample pixel from the statistics",
    )
    jump_threshold: float = pydantic.Field(
        5.0, gt=0, description="a ramp with a second difference this many robust sigmas from its median has a jump")
    min_pixels: int = pydantic.Field(1, ge=1, description="pixels needed for sur_pass")
    expected_read_noise: float = pydantic.Field(10.0, gt=0, description="expected read noise of one frame [electron]")
    read_noise_factor: float = pydantic.Field(
        1.5, gt=1, description="sur_read_noise must lie within expected_read_noise divided or multiplied by this")
    max_slope_pull: float = pydantic.Field(1.0, gt=0, description="largest |sur_slope_pull| that passes")
    max_drift_sigma: float = pydantic.Field(5.0, gt=0, description="largest |sur_drift| / sur_drift_error that passes")


def _median_variance_factor(m: int) -> float:
    """Variance of the median of ``m`` normal deviates over that of their mean.

    Exactly 1 for ``m <= 2`` (the median is the mean) and pi / 2 for large ``m``; in
    between, ``pi / 2 * m / (m + c)`` with ``c`` = 0.5 (odd ``m``) or 1.4 (even ``m``,
    the median averages two order statistics) matches Monte-Carlo values to 3 %.
    """
    if m <= 2:
        return 1.0
    return math.pi / 2.0 * m / (m + (0.5 if m % 2 else 1.4))


def sur_statistics(
    image: np.ndarray,
    flags: np.ndarray,
    reads: np.ndarray,
    iy: np.ndarray,
    ix: np.ndarray,
    gain: np.ndarray,
    *,
    first: int,
    last: int,
    frame_time: float,
    exclude: int,
    jump_threshold: float,
) -> tuple[int, int, int, float, float, float, float, float]:
    """SUR statistics of one image.

    Parameters
    ----------
    image : (ny, nx) array
        On-board slopes [electron / s].
    flags : (ny, nx) uint32 array
    reads : (npix, n_frames) array
        Every read of the full-sample pixels [adu], NaN where missing; rows of padding
        carry ``iy = -1``.
    iy, ix : (npix,) int arrays
        Array indices of each pixel in ``image``; -1 for a pixel outside it.
    gain : (npix,) array
        Gain of each pixel's readout channel [electron / adu].
    first, last
        Frames of the on-board fit (inclusive).
    frame_time
        Interval between reads [s].
    exclude
        FLAGS bits that exclude a pixel.
    jump_threshold
        A ramp with a second difference this many robust standard deviations from their
        median has a jump and is not used.

    Returns
    -------
    npix, nused, njump, read_noise, slope_diff, slope_pull, drift, drift_error
        As described in :mod:`sphx.level1.sur`; NaN statistics when no pixel is used.
    """
    inside = (iy >= 0) & (ix >= 0)
    q = reads[:, first:last + 1].astype(np.float64) * np.asarray(gain, np.float64)[:, None]
    complete = inside & np.isfinite(q).all(axis=1)
    npix = int(complete.sum())
    nan = math.nan
    if npix == 0:
        return 0, 0, 0, nan, nan, nan, nan, nan
    q = q[complete]
    yy, xx = iy[complete], ix[complete]
    on_board = image[yy, xx].astype(np.float64)
    bad = (flags[yy, xx].astype(np.int64) & int(exclude)) != 0

    d2 = np.diff(q, 2, axis=1)
    dev = np.abs(d2 - np.median(d2, axis=1, keepdims=True))
    scale = _ROBUST * np.median(dev, axis=1, keepdims=True)
    # a noise-free ramp has MAD 0: its rounding errors must not read as a jump
    floor = 1e-9 * np.max(np.abs(q), axis=1, keepdims=True)
    jump = (dev > jump_threshold * scale + floor).any(axis=1)
    use = ~jump & ~bad & np.isfinite(on_board)
    njump = int(jump.sum())
    nused = int(use.sum())
    if nused == 0:
        return npix, 0, njump, nan, nan, nan, nan, nan
    q, d2, on_board = q[use], d2[use], on_board[use]

    n = last - first + 1
    slope = q @ ols_weights(first, last, frame_time=frame_time)
    # ddof=0: d2 telescopes, so its mean has variance ~4 sigma_r^2 / N^2, not 6 sigma_r^2 / N,
    # and dividing by N (not N - 1) leaves the variance unbiased to O(1 / N^2).
    var_d2 = np.mean((d2 - d2.mean(axis=1, keepdims=True)) ** 2, axis=1)
    rate = np.maximum(slope, 0.0)
    rn2 = (var_d2 - 2.0 * rate * frame_time) / 6.0
    read_noise = math.sqrt(max(float(rn2.mean()), 0.0))

    diff = on_board - slope
    sigma = np.sqrt(slope_variance(rate, np.full_like(rate, read_noise), n_frames=n, frame_time=frame_time))
    pull = np.divide(diff, sigma, out=np.full_like(diff, np.nan), where=sigma > 0)

    half = first + n // 2
    s1 = q[:, :half - first] @ ols_weights(first, half - 1, frame_time=frame_time)
    s2 = q[:, half - first:] @ ols_weights(half, last, frame_time=frame_time)
    rn = np.full_like(rate, read_noise)
    var_drift = (slope_variance(rate, rn, n_frames=half - first, frame_time=frame_time)
                 + slope_variance(rate, rn, n_frames=last - half + 1, frame_time=frame_time))
    drift_error = math.sqrt(_median_variance_factor(nused) * float(var_drift.mean()) / nused)
    return (npix, nused, njump, read_noise, float(np.median(diff)), float(np.median(pull)),
            float(np.median(s2 - s1)), drift_error)


def sur_statistics_stack(
    image: np.ndarray,
    flags: np.ndarray,
    reads: np.ndarray,
    iy: np.ndarray,
    ix: np.ndarray,
    gain: np.ndarray,
    **kwargs: Any,
) -> tuple[np.ndarray, ...]:
    """:func:`sur_statistics` over leading dimensions (``image`` is ``(..., ny, nx)``).

    Returns eight arrays of the leading shape: three int64 counts, five float64 values.
    """
    lead = image.shape[:-2]
    out = [np.empty(lead, np.int64) for _ in range(3)] + [np.empty(lead, np.float64) for _ in range(5)]
    for idx in np.ndindex(*lead):
        values = sur_statistics(image[idx], flags[idx], reads[idx], iy[idx], ix[idx], gain[idx], **kwargs)
        for arr, v in zip(out, values, strict=True):
            arr[idx] = v
    return tuple(out)


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if name == "obsid":
        return np.asarray(col.to_pylist(), dtype=object)
    if col.null_count:
        raise StepError(f"table 'fullsample' has {col.null_count} null value(s) in column {name!r}")
    return col.to_numpy()


def _fullsample_arrays(ds: xr.Dataset, table: Any, instrument: Instrument) -> dict[str, np.ndarray]:
    """Split the table into per-image arrays on the cube's (band, obs) grid.

    Returns ``reads`` (band, obs, pix, frame) [adu] with NaN where missing, the array
    indices ``iy``/``ix`` (band, obs, pix) of each pixel in the cube (-1 outside it or for
    padding) and the readout ``channel`` (band, obs, pix) of each pixel.
    """
    if not isinstance(table, pa.Table):
        try:
            table = pa.table(table)
        except (TypeError, ValueError, pa.ArrowInvalid) as e:
            raise StepError(f"table 'fullsample' must be a pyarrow.Table, got {type(table).__name__}") from e
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise StepError(f"table 'fullsample' lacks column(s) {missing}; it has {table.column_names}")
    if "obsid" not in ds.coords:
        raise StepError("step 'validate_sur' needs the cube's obsid coordinate to select the fullsample rows")
    obsids = [str(o) for o in ds["obsid"].values]
    bands = [int(b) for b in ds["band"].values]
    keep = pc.and_(pc.is_in(pc.cast(table.column("obsid"), pa.string()), pa.array(obsids, pa.string())),
                   pc.is_in(pc.cast(table.column("band"), pa.int64()), pa.array(bands, pa.int64())))
    table = table.filter(keep)

    nb, no, nf = len(bands), len(obsids), instrument.n_frames
    ib = np.searchsorted(np.array(bands), _column(table, "band").astype(np.int64))
    position = {o: k for k, o in enumerate(obsids)}
    io = np.array([position[o] for o in _column(table, "obsid")], dtype=np.int64)
    y = _column(table, "y").astype(np.int64)
    x = _column(table, "x").astype(np.int64)
    frame = _column(table, "frame").astype(np.int64)
    adu = _column(table, "adu").astype(np.float64)
    out_of_range = (frame < 0) | (frame >= nf)
    if out_of_range.any():
        raise StepError(f"table 'fullsample' has frame(s) {sorted(set(frame[out_of_range].tolist()))[:5]} "
                        f"outside 0..{nf - 1} of instrument {instrument.name!r}")

    # one row per (image, pixel), image-major, then the pixel's rank within its image
    pixels, inverse = np.unique(np.stack([ib, io, y, x], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    image_of = pixels[:, 0] * no + pixels[:, 1]
    rank = np.arange(len(pixels)) - np.searchsorted(image_of, image_of, side="left")
    npix = max(int(rank.max()) + 1 if rank.size else 0, 1)  # one padding pixel keeps the core dim non-empty

    reads = np.full((nb, no, npix, nf), np.nan)
    reads[ib, io, rank[inverse], frame] = adu
    iy = np.full((nb, no, npix), -1, np.int64)
    ix = np.full((nb, no, npix), -1, np.int64)
    channel = np.zeros((nb, no, npix), np.int64)
    ylab, xlab = ds["y"].values, ds["x"].values
    pb, po, py, px = pixels.T
    ry = np.clip(np.searchsorted(ylab, py), 0, len(ylab) - 1)
    rx = np.clip(np.searchsorted(xlab, px), 0, len(xlab) - 1)
    inside = (ylab[ry] == py) & (xlab[rx] == px)
    iy[pb[inside], po[inside], rank[inside]] = ry[inside]
    ix[pb[inside], po[inside], rank[inside]] = rx[inside]
    for k, band in enumerate(bands):
        sel = inside & (pb == k)
        channel[k, po[sel], rank[sel]] = instrument.readout_channel(band, px[sel])
    return {"reads": reads, "iy": iy, "ix": ix, "channel": channel}


@register_step(
    "validate_sur",
    module="Validate Sample-up-the-ramp",
    config=SurConfig,
    reads={"IMAGE": ELECTRON_RATE, "FLAGS": None},
    writes={name: units for name, (_, units) in SUR_VARIABLES.items()},
    calibrations=("gain_factors",),
    tables={"fullsample": True},
)
def validate_sur(
    ds: xr.Dataset,
    *,
    calib: Mapping[str, xr.Dataset],
    config: SurConfig,
    instrument: Instrument,
    tables: Mapping[str, Any],
) -> xr.Dataset:
    """Per-image read noise, slope validation and drift from the full-sample ramps.

    Parameters
    ----------
    ds
        Cube with IMAGE in electron / s (after engineering units and, for meaningful slope
        pulls, the preamplifier correction) and FLAGS; raw or active frame.
    calib
        ``{"gain_factors": Dataset}`` with ``GAIN`` (band, readout_channel) [electron / adu].
    config
        Pixel selection and check limits (:class:`SurConfig`).
    instrument
        Frame count, discarded frames, frame time and channel layout.
    tables
        ``{"fullsample": pyarrow.Table}`` with columns obsid, band, y, x, frame, adu; rows of
        other observations or bands are ignored.

    Returns
    -------
    xarray.Dataset
        The cube with the :data:`SUR_VARIABLES` added on (band, obs); lazy.
    """
    gain = calib["gain_factors"]["GAIN"]
    missing = sorted(set(ds["band"].values.tolist()) - set(gain["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"gain_factors has no gains for band(s) {missing}")
    arrays = _fullsample_arrays(ds, tables["fullsample"], instrument)

    coords = {"band": ds["band"].values, "obs": ds["obs"].values}
    image, flags = ds["IMAGE"], ds["FLAGS"]
    dims3 = ("band", "obs", "pix")
    small = {
        "reads": xr.DataArray(arrays["reads"], dims=(*dims3, "frame"), coords=coords),
        "iy": xr.DataArray(arrays["iy"], dims=dims3, coords=coords),
        "ix": xr.DataArray(arrays["ix"], dims=dims3, coords=coords),
    }
    channel = xr.DataArray(arrays["channel"], dims=dims3, coords=coords)
    pixel_gain = (gain.sel(band=ds["band"].values).isel(readout_channel=channel)
                  .drop_vars("readout_channel", errors="ignore").astype(np.float64))
    if image.chunks:
        image = image.chunk({"y": -1, "x": -1})
        flags = flags.chunk({"y": -1, "x": -1})
        # the per-image arrays follow IMAGE's (band, obs) blocks: one task per image block
        blocks = {d: c for d, c in zip(image.dims, image.chunks, strict=True) if d in ("band", "obs")}
        small = {k: v.chunk(blocks) for k, v in small.items()}
        pixel_gain = pixel_gain.chunk(blocks)

    results = apply_blocks(
        sur_statistics_stack,
        image, flags, small["reads"], small["iy"], small["ix"], pixel_gain,
        kwargs={
            "first": instrument.n_discarded_frames,
            "last": instrument.n_frames - 1,
            "frame_time": instrument.frame_time,
            "exclude": int(_flags.mask(*config.exclude)),
            "jump_threshold": config.jump_threshold,
        },
        input_core_dims=[["y", "x"], ["y", "x"], ["pix", "frame"], ["pix"], ["pix"], ["pix"]],
        output_core_dims=[[]] * 8,
        output_dtypes=[np.int64] * 3 + [np.float64] * 5,
    )
    values = dict(zip(list(SUR_VARIABLES)[:8], results, strict=True))
    rn, pull, drift = values["sur_read_noise"], values["sur_slope_pull"], values["sur_drift"]
    # NaN statistics compare False, so an image with nothing to validate does not pass
    values["sur_pass"] = (
        (values["sur_nused"] >= config.min_pixels)
        & (rn >= config.expected_read_noise / config.read_noise_factor)
        & (rn <= config.expected_read_noise * config.read_noise_factor)
        & (abs(pull) <= config.max_slope_pull)
        & (abs(drift) <= config.max_drift_sigma * values["sur_drift_error"])
    )
    out = ds.copy()
    for name, (long_name, units) in SUR_VARIABLES.items():
        attrs = {"long_name": long_name, **({"units": units} if units is not None else {})}
        var = values[name].transpose("band", "obs")
        var.attrs = attrs  # replace what the comparisons kept from their operands
        out[name] = var
    return out
