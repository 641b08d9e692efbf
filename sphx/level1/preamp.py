"""Correct Preamplifier: remove each readout channel's amplifier offset, row by row.

Every detector is read through 32 readout channels, each behind its own preamplifier
whose offset drifts from exposure to exposure and varies slowly along the rows of one
exposure. Three kinds of reference information see that offset and no light:

* the PHANTOM reads: per raw row and channel, ``n_phantom`` (4) reads of the reference
  voltage, interleaved with the pixel reads;
* the reference rows: the four rows above and below the active area, in every channel;
* the reference columns: the four columns on either side, in the first and last channel
  only.

Per image and per channel the step fits the offset as a polynomial in the normalised
raw row

.. math::

    u = \\frac{y - (n_\\mathrm{active} - 1) / 2}{(n_\\mathrm{raw} - 1) / 2},

which runs from -1 at the first reference row (``y = -n_reference``) to +1 at the last
(``y = n_active + n_reference - 1``), to all the reference information of the channel:
per row, the mean of the finite phantom reads (weight: their number) and the mean of
the channel's usable reference pixels in that row (weight: their number; a phantom read
and a reference pixel are taken to carry the same read noise, as they do on the
detector to within the pixel-to-pixel read-noise scatter). A weighted
least-squares fit is repeated ``clip_rounds`` times, each time dropping the samples
whose weighted residual exceeds ``clip`` robust standard deviations (1.4826 x the
median absolute weighted residual). The fitted polynomial is subtracted from every
pixel of the channel, reference pixels included, and from its phantom reads, so the
corrected reference information is centred on zero and can be inspected. The
coefficients, ``offset(y) = sum_k preamp_offset[..., k] * u**k`` [electron / s], are
kept per image as ``preamp_offset``.

Rows of a channel whose phantom reads are all missing (NaN) are fitted from the other
rows and the reference pixels, and their pixels are flagged PHANMISS; an image without
a PHANTOM variable is fitted from its reference pixels alone and flagged PHANMISS
everywhere. A channel with no usable reference information at all is left
uncorrected (its coefficients are NaN), and flagged PHANMISS.
"""

from __future__ import annotations

import numba
import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..blocks import apply_blocks, stack_images
from ..errors import StepError
from ..instrument import Instrument
from ..levels import ELECTRON_RATE, same_unit
from ..pipeline.step import StepConfig, register_step
from .engineering_units import channel_map

__all__ = [
    "PreampConfig",
    "correct_preamp_image",
    "correct_preamplifier",
    "evaluate_offsets",
    "fit_preamp_offsets",
    "normalised_row",
]

_ROBUST = 1.482602218505602  # MAD to standard deviation for a normal distribution
_PHANTOM_DIMS = ("band", "obs", "y", "readout_channel", "phantom_read")


class PreampConfig(StepConfig):
    """How the per-channel offsets are fitted."""

    degree: int = pydantic.Field(1, ge=0, le=5, description="degree of the offset polynomial in the row")
    clip: float = pydantic.Field(5.0, gt=0, description="clipping threshold [robust standard deviations]")
    clip_rounds: int = pydantic.Field(2, ge=0, le=10, description="rounds of clipping and refitting")
    bad: _flags.FlagNames = pydantic.Field(
        default=("TRANSIENT", "OVERFLOW", "SUR_ERROR", "NONFUNC", "MISSING_DATA", "HOT"),
        description="FLAGS bits that exclude a reference pixel from the fit",
    )


def normalised_row(y: np.ndarray, instrument: Instrument) -> np.ndarray:
    """The row coordinate ``u`` of the offset polynomial: -1 .. 1 over the raw frame.

    Parameters
    ----------
    y
        Labelled rows (active row 0 is ``y = 0``).
    instrument
        Geometry that fixes the centre and half-height of the raw frame.
    """
    centre = (instrument.n_active - 1) / 2.0
    half = (instrument.n_raw - 1) / 2.0
    return (np.asarray(y, dtype=np.float64) - centre) / half


def evaluate_offsets(coef: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Offset of every row and channel from polynomial coefficients.

    Parameters
    ----------
    coef
        ``(..., channels, degree + 1)`` coefficients of ``u**k`` [electron / s].
    u
        ``(rows,)`` normalised rows (:func:`normalised_row`).

    Returns
    -------
    numpy.ndarray
        ``(..., rows, channels)`` [electron / s]; NaN for channels with NaN coefficients.
    """
    powers = np.asarray(u, np.float64)[:, None] ** np.arange(coef.shape[-1])  # (rows, k)
    return np.einsum("rk,...ck->...rc", powers, coef)


def _reference_samples(
    image: np.ndarray, flags: np.ndarray, phantom: np.ndarray | None, column_channel: np.ndarray,
    reference_rows: np.ndarray, reference_columns: np.ndarray, n_channels: int, bad: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row and channel: sum and count of the usable reference pixels and phantom reads."""
    onehot = (column_channel[:, None] == np.arange(n_channels)[None, :]).astype(np.float64)  # (x, channel)
    pix_sum = np.zeros((image.shape[0], n_channels))
    pix_n = np.zeros((image.shape[0], n_channels))
    # reference rows: every column is a reference pixel; active rows: only the side
    # reference columns (first and last channel). Index first, so that only the border
    # is converted and tested, never the whole image.
    ref_rows, act_rows = np.flatnonzero(reference_rows), np.flatnonzero(~reference_rows)
    ref_cols = np.flatnonzero(reference_columns)
    for rows, cols in ((ref_rows, np.arange(image.shape[1])), (act_rows, ref_cols)):
        block = image[np.ix_(rows, cols)].astype(np.float64)
        good = np.isfinite(block) & ((flags[np.ix_(rows, cols)] & np.uint32(bad)) == 0)
        pix_sum[rows] = np.where(good, block, 0.0) @ onehot[cols]
        pix_n[rows] = good @ onehot[cols]
    if phantom is None:
        ph_n = np.zeros_like(pix_n)
        ph_sum = np.zeros_like(pix_n)
    else:
        ph = phantom.astype(np.float64)
        finite = np.isfinite(ph)
        ph_n = finite.sum(axis=-1).astype(np.float64)
        ph_sum = np.where(finite, ph, 0.0).sum(axis=-1)
    return pix_sum, pix_n, ph_sum, ph_n


def _weighted_fit(u: np.ndarray, v: np.ndarray, w: np.ndarray, degree: int) -> np.ndarray:
    design = u[:, None] ** np.arange(degree + 1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(design * sw[:, None], v * sw, rcond=None)
    return coef


def _robust_polyfit(u: np.ndarray, v: np.ndarray, w: np.ndarray, *, degree: int, clip: float,
                    clip_rounds: int) -> np.ndarray | None:
    """Weighted polynomial fit with sigma clipping; ``None`` when no sample is usable."""
    usable = w > 0
    keep = usable.copy()
    coef = None
    for round_ in range(clip_rounds + 1):
        distinct = np.unique(u[keep]).size
        if distinct == 0:
            return coef
        # fewer distinct rows than coefficients: fit the highest degree they determine
        coef = np.zeros(degree + 1)
        deg = min(degree, distinct - 1)
        coef[:deg + 1] = _weighted_fit(u[keep], v[keep], w[keep], deg)
        if round_ == clip_rounds:
            break
        z = (v - np.polynomial.polynomial.polyval(u, coef)) * np.sqrt(w)
        sigma = _ROBUST * np.median(np.abs(z[usable]))
        if not sigma > 0:
            break
        new_keep = usable & (np.abs(z) <= clip * sigma)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return coef


def fit_preamp_offsets(
    image: np.ndarray,
    flags: np.ndarray,
    phantom: np.ndarray | None,
    column_channel: np.ndarray,
    reference_rows: np.ndarray,
    reference_columns: np.ndarray,
    u: np.ndarray,
    *,
    n_channels: int,
    degree: int = 1,
    clip: float = 5.0,
    clip_rounds: int = 2,
    bad: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit the offset polynomial of every readout channel of one raw-frame image.

    Parameters
    ----------
    image
        ``(rows, columns)`` raw-frame slopes, reference border included [electron / s].
    flags
        ``(rows, columns)`` FLAGS; reference pixels carrying any ``bad`` bit are not used.
    phantom
        ``(rows, channels, reads)`` phantom reads [electron / s], or None.
    column_channel
        ``(columns,)`` readout channel of every column.
    reference_rows, reference_columns
        ``(rows,)`` and ``(columns,)`` masks of the reference border.
    u
        ``(rows,)`` normalised rows (:func:`normalised_row`).
    n_channels
        Number of readout channels.
    degree, clip, clip_rounds
        Polynomial degree, clipping threshold [robust sigma] and rounds of clipping.
    bad
        FLAGS bit mask of unusable reference pixels.

    Returns
    -------
    coef, missing
        ``(channels, degree + 1)`` coefficients of ``u**k`` [electron / s], NaN for a
        channel without usable reference information; ``(rows, channels)`` True where a
        row has no finite phantom read.
    """
    pix_sum, pix_n, ph_sum, ph_n = _reference_samples(
        image, flags, phantom, column_channel, reference_rows, reference_columns, n_channels, bad)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.concatenate([ph_sum / ph_n, pix_sum / pix_n], axis=0)  # (2 rows, channels)
    w = np.concatenate([ph_n, pix_n], axis=0)
    uu = np.concatenate([u, u])
    coef = np.full((n_channels, degree + 1), np.nan)
    for ch in range(n_channels):
        c = _robust_polyfit(uu, v[:, ch], w[:, ch], degree=degree, clip=clip, clip_rounds=clip_rounds)
        if c is not None:
            coef[ch] = c
    return coef, ph_n == 0


@numba.njit(nogil=True, cache=True)
def _subtract_offsets(image, flags, offset, column_channel, missing, phanmiss, out_image, out_flags):
    """One pass over the image: subtract its channel's row offset, flag rows without phantoms.

    Not ``parallel``: dask already runs one image per thread, and nesting numba's thread
    pool inside dask's threads gains nothing on this memory-bound loop.
    """
    ny, nx = image.shape
    for r in range(ny):
        for c in range(nx):
            ch = column_channel[c]
            o = offset[r, ch]
            v = image[r, c]
            out_image[r, c] = v - o if np.isfinite(o) else v
            f = flags[r, c]
            if missing[r, ch]:
                f |= phanmiss
            out_flags[r, c] = f


def correct_preamp_image(
    image: np.ndarray,
    flags: np.ndarray,
    phantom: np.ndarray | None,
    column_channel: np.ndarray,
    reference_rows: np.ndarray,
    reference_columns: np.ndarray,
    u: np.ndarray,
    *,
    n_channels: int,
    degree: int = 1,
    clip: float = 5.0,
    clip_rounds: int = 2,
    bad: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Fit and subtract the per-channel offsets of one raw-frame image.

    Parameters are those of :func:`fit_preamp_offsets`.

    Returns
    -------
    image, flags, phantom, coef
        Corrected image [electron / s] (dtype of the input), flags with PHANMISS set on
        rows and channels without phantom reads, corrected phantom reads (None without
        input phantoms) and the ``(channels, degree + 1)`` coefficients [electron / s].
    """
    coef, missing = fit_preamp_offsets(
        image, flags, phantom, column_channel, reference_rows, reference_columns, u, n_channels=n_channels,
        degree=degree, clip=clip, clip_rounds=clip_rounds, bad=bad)
    offset = evaluate_offsets(coef, u)  # (rows, channels)
    out_image = np.empty_like(image)
    out_flags = np.empty_like(flags)
    _subtract_offsets(image, flags, offset.astype(image.dtype), column_channel.astype(np.int64), missing,
                      flags.dtype.type(int(_flags.Flag.PHANMISS)), out_image, out_flags)
    out_phantom = None
    if phantom is not None:
        out_phantom = (phantom - np.nan_to_num(offset, nan=0.0)[:, :, None]).astype(phantom.dtype)
    return out_image, out_flags, out_phantom, coef


def _correct_stack(image: np.ndarray, flags: np.ndarray, column_channel: np.ndarray, *phantom: np.ndarray,
                   n_channels: int, degree: int, clip: float, clip_rounds: int, bad: int,
                   reference_rows: np.ndarray, reference_columns: np.ndarray,
                   u: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`correct_preamp_image` over the leading (band, obs) dimensions of a block."""
    lead = image.shape[:-2]
    column_channel = np.broadcast_to(column_channel, (*lead, column_channel.shape[-1]))
    ph = np.broadcast_to(phantom[0], (*lead, *phantom[0].shape[-3:])) if phantom else None
    results = [correct_preamp_image(
        image[idx], flags[idx], None if ph is None else ph[idx], column_channel[idx], reference_rows,
        reference_columns, u, n_channels=n_channels, degree=degree, clip=clip, clip_rounds=clip_rounds, bad=bad)
        for idx in np.ndindex(*lead)]
    out = tuple(stack_images([r[k] for r in results], lead) for k in (0, 1, 3))
    return out if ph is None else (*out, stack_images([r[2] for r in results], lead))


def _check_frame(ds: xr.Dataset, instrument: Instrument) -> None:
    y, x = ds["y"].values, ds["x"].values
    if y.size and x.size and y.min() >= 0 and x.min() >= 0:
        raise StepError(
            "correct_preamplifier needs the raw frame with its reference border, but the cube is at the active "
            "frame (no reference pixels); run it on the raw level after convert_to_engineering_units, before "
            "remove_reference_pixels"
        )
    raw = instrument.pixel_coords(reference_pixels=True)
    for name, labels in (("y", y), ("x", x)):
        if not np.array_equal(labels, raw):
            raise StepError(
                f"correct_preamplifier needs the whole raw frame: {name} must run {raw[0]}..{raw[-1]} "
                f"({raw.size} pixels) for instrument {instrument.name!r}, but the cube has {labels.size} "
                f"{name} labels from {labels.min() if labels.size else None} to {labels.max() if labels.size else None}; "
                "select bands and observations, not pixels, before this step"
            )


@register_step(
    "correct_preamplifier",
    module="Correct Preamplifier",
    config=PreampConfig,
    reads={"IMAGE": ELECTRON_RATE, "FLAGS": None},
    writes={"preamp_offset": ELECTRON_RATE},
    frame="raw",
)
def correct_preamplifier(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: PreampConfig, instrument: Instrument
) -> xr.Dataset:
    """Subtract each readout channel's offset, fitted along the rows from the reference information.

    Parameters
    ----------
    ds
        Raw-frame cube with IMAGE in electron / s (after
        :func:`~sphx.level1.convert_to_engineering_units`), FLAGS and, normally,
        PHANTOM (band, obs, y, readout_channel, phantom_read) in electron / s.
    calib
        Not used.
    config
        :class:`PreampConfig`.
    instrument
        Geometry: reference border, readout channels and their x flip.

    Returns
    -------
    xarray.Dataset
        The cube with IMAGE (reference pixels included) and PHANTOM corrected, PHANMISS
        set on rows and channels without phantom reads, and ``preamp_offset``
        (band, obs, readout_channel, preamp_coef): the subtracted polynomial's
        coefficients of ``u**k`` [electron / s], ``u`` as in :func:`normalised_row`.
        Lazy, one task per image.

    Raises
    ------
    StepError
        If the cube is not the whole raw frame, or PHANTOM has the wrong shape or units.
    """
    _check_frame(ds, instrument)
    nch = instrument.n_readout_channels
    has_phantom = "PHANTOM" in ds
    if has_phantom:
        ph = ds["PHANTOM"]
        if set(ph.dims) != set(_PHANTOM_DIMS) or ph.sizes["readout_channel"] != nch:
            raise StepError(
                f"PHANTOM must have dims {_PHANTOM_DIMS} with readout_channel of size {nch}, but it has "
                f"{dict(ph.sizes)}"
            )
        if not same_unit(ph.attrs.get("units"), ELECTRON_RATE):
            raise StepError(
                f"correct_preamplifier needs PHANTOM in {ELECTRON_RATE!r} like IMAGE, but the cube has "
                f"{ph.attrs.get('units')!r}; convert it with convert_to_engineering_units"
            )
    per_image = {"band": 1, "obs": 1}
    image = ds["IMAGE"].chunk({**per_image, "y": -1, "x": -1})
    flags = ds["FLAGS"].chunk({**per_image, "y": -1, "x": -1})
    columns = channel_map(ds, instrument).chunk({"band": 1})
    y = ds["y"].values
    x = ds["x"].values
    args = [image, flags, columns]
    core_in = [["y", "x"], ["y", "x"], ["x"]]
    core_out = [["y", "x"], ["y", "x"], ["readout_channel", "preamp_coef"]]
    dtypes = [image.dtype, flags.dtype, np.float64]
    if has_phantom:
        args.append(ds["PHANTOM"].transpose(*_PHANTOM_DIMS).chunk(
            {**per_image, "y": -1, "readout_channel": -1, "phantom_read": -1}))
        core_in.append(["y", "readout_channel", "phantom_read"])
        core_out.append(["y", "readout_channel", "phantom_read"])
        dtypes.append(ds["PHANTOM"].dtype)
    sizes = {"preamp_coef": config.degree + 1}
    if not has_phantom:
        sizes["readout_channel"] = nch
    results = apply_blocks(
        _correct_stack,
        *args,
        kwargs={
            "n_channels": nch, "degree": config.degree, "clip": config.clip, "clip_rounds": config.clip_rounds,
            "bad": int(_flags.mask(*config.bad)),
            "reference_rows": (y < 0) | (y >= instrument.n_active),
            "reference_columns": (x < 0) | (x >= instrument.n_active),
            "u": normalised_row(y, instrument),
        },
        input_core_dims=core_in,
        output_core_dims=core_out,
        output_dtypes=dtypes,
        output_sizes=sizes,
    )
    out = ds.drop_vars(["preamp_offset", "preamp_coef"], errors="ignore")
    out["IMAGE"] = results[0].transpose(*ds["IMAGE"].dims).assign_attrs(ds["IMAGE"].attrs)
    out["FLAGS"] = results[1].transpose(*ds["FLAGS"].dims).assign_attrs(ds["FLAGS"].attrs)
    if has_phantom:
        out["PHANTOM"] = results[3].transpose(*ds["PHANTOM"].dims).assign_attrs(ds["PHANTOM"].attrs)
    coef = results[2].transpose("band", "obs", "readout_channel", "preamp_coef")
    if "readout_channel" not in coef.coords:
        coef = coef.assign_coords(readout_channel=np.arange(nch, dtype=np.int64))
    out["preamp_offset"] = coef.assign_coords(
        preamp_coef=np.arange(config.degree + 1, dtype=np.int64)
    ).assign_attrs(
        units=ELECTRON_RATE,
        long_name="subtracted preamplifier offset: coefficients of u**k per readout channel",
        description=(
            "offset(y) = sum_k preamp_offset[k] * u**k with u = (y - (n_active - 1) / 2) / ((n_raw - 1) / 2), "
            "-1 at the first and +1 at the last raw row; NaN where a channel had no reference information"
        ),
        row_center=(instrument.n_active - 1) / 2.0,
        row_scale=(instrument.n_raw - 1) / 2.0,
    )
    return out
