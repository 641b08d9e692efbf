"""Level 3b (paper section 4.3): the catalogs of one sky tile from all its measurements.

- **Create Primary All-sky Catalog**: every measurement of every source in the tile.
- **Create Secondary All-sky Catalog and Estimate Variability**: per source, the
  inverse-variance weighted spectrum on the fixed grid of 102 channels (17 per band,
  :meth:`sphx.instrument.Instrument.channel_edges`), and a survey-to-survey comparison:
  in the native channels for sources with S/N > 100, otherwise in about ten reference
  bands (contiguous groups of channels), turned into one significance.
- **Create High Reliability Source Catalog**: S/N > 10 in at least five channels and a
  passed consistency test.

All functions take and return pyarrow Tables and hold one tile in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from ..instrument import Instrument

__all__ = [
    "PRIMARY_COLUMNS",
    "SURVEY_DAYS",
    "SURVEY_START_MJD",
    "channel_grid",
    "high_reliability_catalog",
    "primary_catalog",
    "secondary_catalog",
]

# Columns of the primary catalog (the measurements as Perform Forced Photometry wrote them).
PRIMARY_COLUMNS = ("source_id", "ra", "dec", "flux", "flux_error", "wavelength", "bandwidth", "mjd", "band",
                   "obsid", "flags", "phot_status", "chi2", "n_blend", "neighbour_id", "neighbour_cov", "healpix64")
SURVEY_START_MJD = 60796.0  # 2025-05-01, start of the first all-sky survey
SURVEY_DAYS = 365.25 / 2  # one all-sky survey every six months
_FATAL = 1 | 4 | 8 | 32  # phot_status bits that leave no flux (OUTSIDE, NO_DATA, SINGULAR, NO_PSF)


def channel_grid(instrument: Instrument) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed channel grid: band and centre wavelength [um] of each channel, and its
    (lower, upper) edges [um], band by band (102 channels for SPHEREx)."""
    bands, centres, edges = [], [], []
    for b in instrument.band_numbers:
        e = instrument.channel_edges(b)
        bands.append(np.full(e.size - 1, b))
        centres.append(instrument.channel_centers(b))
        edges.append(np.stack([e[:-1], e[1:]], axis=1))
    return np.concatenate(bands), np.concatenate(centres), np.concatenate(edges)


def primary_catalog(pieces: Sequence[pa.Table]) -> pa.Table:
    """Every measurement of the tile, sorted by source and time (columns :data:`PRIMARY_COLUMNS`)."""
    pieces = [p.select(list(PRIMARY_COLUMNS)) for p in pieces if p.num_rows]
    if not pieces:
        raise ValueError("no measurements in this tile")
    table = pa.concat_tables(pieces, promote_options="permissive")
    order = pc.sort_indices(table, sort_keys=[("source_id", "ascending"), ("mjd", "ascending"),
                                              ("band", "ascending")])
    return table.take(order)


def _channel_of(band: np.ndarray, wavelength: np.ndarray, grid_band: np.ndarray,
                grid_edges: np.ndarray) -> np.ndarray:
    """Index into the grid of each measurement: the channel of its band holding its wavelength."""
    out = np.full(band.size, -1, np.int64)
    for b in np.unique(grid_band):
        idx = np.flatnonzero(grid_band == b)
        sel = band == b
        k = np.searchsorted(grid_edges[idx, 1], wavelength[sel])  # first channel whose upper edge is above
        out[sel] = idx[np.clip(k, 0, idx.size - 1)]
    return out


def _weighted(group: np.ndarray, n_groups: int, value: np.ndarray, error: np.ndarray):
    """Inverse-variance weighted mean, its error, count and chi-square per group."""
    w = 1.0 / error**2
    sw = np.bincount(group, w, n_groups)
    mean = np.bincount(group, w * value, n_groups) / np.where(sw > 0, sw, np.nan)
    count = np.bincount(group, minlength=n_groups)
    chi2 = np.bincount(group, w * (value - mean[group]) ** 2, n_groups)
    return mean, 1.0 / np.sqrt(np.where(sw > 0, sw, np.nan)), count, chi2


def _epoch(mjd: np.ndarray, source: np.ndarray, n_sources: int, *, start: float,
           days: float) -> tuple[np.ndarray, np.ndarray]:
    """Comparison epoch of each measurement and the number of epochs per source: the survey;
    for a source seen in one survey only, the earlier and the later half of its visits."""
    survey = np.floor((mjd - start) / days).astype(np.int64)
    lo = np.full(n_sources, np.iinfo(np.int64).max)
    hi = np.full(n_sources, np.iinfo(np.int64).min)
    np.minimum.at(lo, source, survey)
    np.maximum.at(hi, source, survey)
    order = np.lexsort((mjd, source))
    first = np.searchsorted(source[order], np.arange(n_sources))
    rank = np.empty(source.size, np.int64)
    rank[order] = np.arange(source.size) - first[source[order]]
    count = np.bincount(source, minlength=n_sources)
    half = (2 * rank >= count[source]).astype(np.int64)
    epoch = np.where(lo[source] == hi[source], half, survey - lo[source])
    pairs = np.unique(source * (int(epoch.max(initial=0)) + 1) + epoch)
    n_epochs = np.bincount(pairs // (int(epoch.max(initial=0)) + 1), minlength=n_sources)
    return epoch, n_epochs


def secondary_catalog(
    primary: pa.Table,
    instrument: Instrument,
    *,
    bright_snr: float = 100.0,
    n_reference_bands: int = 10,
    threshold: float = 5.0,
    bad_flags: int = 0,
    survey_start: float = SURVEY_START_MJD,
    survey_days: float = SURVEY_DAYS,
) -> pa.Table:
    """Per source: the spectrum on the fixed channel grid and the variability estimate.

    Parameters
    ----------
    primary
        Measurements of one tile (:func:`primary_catalog`).
    instrument
        Defines the channel grid.
    bright_snr
        Sources whose median channel S/N exceeds this are compared channel by channel;
        the others in ``n_reference_bands`` collapsed bands.
    threshold
        Variability significance [sigma] above which a source is variable.
    bad_flags
        Measurements with any of these FLAGS bits are left out (besides those without a
        flux).
    survey_start, survey_days
        Survey number of a measurement: ``floor((mjd - survey_start) / survey_days)``.

    Returns
    -------
    pyarrow.Table
        ``source_id``, ``ra``, ``dec`` (mean position), ``n_obs``, ``flux``,
        ``flux_error`` [uJy] and ``n_channel_obs`` (fixed-size lists over the channel
        grid; NaN and 0 where unobserved), ``snr_max``, ``n_snr10`` (channels with
        S/N > 10), ``n_epochs``, ``variability_sigma``, ``variability_mode``
        ('channels' or 'bands'), ``variable``. The grid's wavelengths are in the schema
        metadata (``sphx.channel_wavelength``, ``sphx.channel_band``).
    """
    grid_band, grid_centre, grid_edges = channel_grid(instrument)
    n_ch = grid_band.size
    flux = primary.column("flux").to_numpy(zero_copy_only=False).astype(np.float64)
    error = primary.column("flux_error").to_numpy(zero_copy_only=False).astype(np.float64)
    status = primary.column("phot_status").to_numpy(zero_copy_only=False)
    flags = primary.column("flags").to_numpy(zero_copy_only=False).astype(np.int64)
    good = (np.isfinite(flux) & np.isfinite(error) & (error > 0) & ((status & _FATAL) == 0)
            & ((flags & int(bad_flags)) == 0))
    ids_all = primary.column("source_id").to_numpy(zero_copy_only=False)
    ids, source = np.unique(ids_all, return_inverse=True)
    n_src = ids.size
    channel = _channel_of(primary.column("band").to_numpy(zero_copy_only=False).astype(np.int64),
                          primary.column("wavelength").to_numpy(zero_copy_only=False), grid_band, grid_edges)
    good &= channel >= 0
    s, c, f, e = source[good], channel[good], flux[good], error[good]
    mjd = primary.column("mjd").to_numpy(zero_copy_only=False)[good]

    cell = s * n_ch + c
    mean, err, count, _ = _weighted(cell, n_src * n_ch, f, e)
    mean, err, count = mean.reshape(n_src, n_ch), err.reshape(n_src, n_ch), count.reshape(n_src, n_ch)
    snr = mean / err
    with np.errstate(invalid="ignore"):
        snr_max = np.nanmax(np.where(count > 0, snr, np.nan), axis=1, initial=-np.inf)
        n_snr10 = np.sum(np.nan_to_num(snr, nan=0.0) > 10, axis=1)
        median_snr = np.nanmedian(np.where(count > 0, snr, np.nan), axis=1)

    # survey-to-survey comparison: per epoch, weighted means in channels (bright sources)
    # or in reference bands of the residuals from the source's mean spectrum (so that
    # epochs sampling different channels of a band compare like with like); constancy of
    # each unit's epoch means is a chi-square with (epochs - 1) degrees of freedom,
    # summed over the source's units
    residual = f - mean.reshape(-1)[cell]
    epoch, n_epochs = _epoch(mjd, s, n_src, start=survey_start, days=survey_days)
    bright = np.nan_to_num(median_snr, nan=0.0) > bright_snr
    band_of_channel = np.minimum((np.arange(n_ch) * n_reference_bands) // n_ch, n_reference_bands - 1)
    unit = np.where(bright[s], c, band_of_channel[c])
    n_unit = max(n_ch, n_reference_bands)
    n_ep = int(epoch.max(initial=0)) + 1
    m_ep, e_ep, k_ep, _ = _weighted((s * n_unit + unit) * n_ep + epoch, n_src * n_unit * n_ep, residual, e)
    has = np.flatnonzero(k_ep > 0)
    su = has // n_ep
    _, _, k_su, chi2_su = _weighted(su, n_src * n_unit, m_ep[has], e_ep[has])
    chi2 = np.bincount(np.arange(n_src * n_unit) // n_unit, chi2_su, n_src)
    dof = np.bincount(np.arange(n_src * n_unit) // n_unit, np.maximum(k_su - 1, 0).astype(np.float64), n_src)
    with np.errstate(invalid="ignore"):
        p = stats.chi2.sf(chi2, np.maximum(dof, 1))
    sigma = np.where(dof > 0, stats.norm.isf(np.clip(p / 2, 1e-300, 0.5)), np.nan)

    ra = primary.column("ra").to_numpy(zero_copy_only=False)
    dec = primary.column("dec").to_numpy(zero_copy_only=False)
    n_obs = np.bincount(source, minlength=n_src)
    vec = np.stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)), np.cos(np.radians(dec)) * np.sin(np.radians(ra)),
                    np.sin(np.radians(dec))], axis=1)
    mean_vec = np.stack([np.bincount(source, vec[:, k], n_src) for k in range(3)], axis=1)
    mean_ra = np.degrees(np.arctan2(mean_vec[:, 1], mean_vec[:, 0])) % 360.0
    mean_dec = np.degrees(np.arctan2(mean_vec[:, 2], np.hypot(mean_vec[:, 0], mean_vec[:, 1])))

    def fixed(values: np.ndarray, type_: pa.DataType) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type_), n_ch)

    meta = {"sphx.channel_wavelength": " ".join(f"{v:.6f}" for v in grid_centre),
            "sphx.channel_band": " ".join(str(int(b)) for b in grid_band),
            "sphx.variability_threshold": str(threshold)}
    return pa.table({
        "source_id": pa.array(ids),
        "ra": pa.array(mean_ra), "dec": pa.array(mean_dec),
        "n_obs": pa.array(n_obs.astype(np.int32)),
        "flux": fixed(np.where(count > 0, mean, np.nan), pa.float64()),
        "flux_error": fixed(np.where(count > 0, err, np.nan), pa.float64()),
        "n_channel_obs": fixed(count.astype(np.int32), pa.int32()),
        "snr_max": pa.array(np.where(np.isfinite(snr_max), snr_max, np.nan)),
        "n_snr10": pa.array(n_snr10.astype(np.int32)),
        "n_epochs": pa.array(n_epochs.astype(np.int32)),
        "variability_sigma": pa.array(sigma),
        "variability_mode": pa.array(np.where(bright, "channels", "bands")),
        "variable": pa.array(np.nan_to_num(sigma, nan=0.0) > threshold),
    }, metadata=meta)


def high_reliability_catalog(secondary: pa.Table, *, min_snr: float = 10.0, min_channels: int = 5) -> pa.Table:
    """Sources with S/N above ``min_snr`` in at least ``min_channels`` channels that were
    compared between epochs and found consistent (not variable)."""
    flux = np.asarray(secondary.column("flux").combine_chunks().flatten(), dtype=np.float64)
    err = np.asarray(secondary.column("flux_error").combine_chunks().flatten(), dtype=np.float64)
    n_ch = secondary.schema.field("flux").type.list_size
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = (flux / err).reshape(-1, n_ch)
    n_good = np.sum(np.nan_to_num(snr, nan=0.0) > min_snr, axis=1)
    sigma = secondary.column("variability_sigma").to_numpy(zero_copy_only=False)
    variable = secondary.column("variable").to_numpy(zero_copy_only=False)
    keep = (n_good >= min_channels) & np.isfinite(sigma) & ~variable
    return secondary.filter(pa.array(keep))
