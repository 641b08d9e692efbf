"""The exposure cube: one ``xarray.Dataset`` on ``(band, obs, y, x)``.

Pixel variables are named after the FITS extensions (IMAGE, FLAGS, VARIANCE, ZODI; raw
frames add PHANTOM, the phantom reads per row and readout channel). Per-exposure
metadata are coordinates on ``obs`` (identity, times, pointing); per-image results (the
celestial WCS, data-quality statistics) are small data variables on ``(band, obs, ...)``;
static per-band maps (CWAVE, CBAND) are coordinates on ``(band, y, x)``.

``obs`` is labelled with the int64 key of the observation id (:func:`sphx.obsid.obs_key`)
and sorted by time; the string id is the ``obsid`` coordinate. Pixel coordinates are
labelled so that active pixel (0, 0) is ``x = 0, y = 0`` at every level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from astropy.wcs import WCS

from . import flags as _flags
from .errors import CubeValidationError
from .instrument import SPHEREX, Instrument
from .levels import WAVELENGTH, Level, get_level
from .obsid import obs_key
from .wcs import wcs_variables

__all__ = [
    "CUBE_DIMS",
    "OBS_COORDS",
    "PIXEL_VARIABLES",
    "STRING_DTYPE",
    "make_cube",
    "nominal_spectral_maps",
]

STRING_DTYPE = np.dtypes.StringDType()
"""dtype of string coordinates (what Zarr v3 variable-length strings read back as)."""

CUBE_DIMS = ("band", "obs", "y", "x")


@dataclass(frozen=True)
class VariableSpec:
    """Dimensions, dtype and description of a known variable."""

    dims: tuple[str, ...]
    dtype: np.dtype
    long_name: str
    units: str | None = None


PIXEL_VARIABLES: dict[str, VariableSpec] = {
    "IMAGE": VariableSpec(CUBE_DIMS, np.dtype("float32"), "surface brightness, zodiacal light not subtracted"),
    "FLAGS": VariableSpec(CUBE_DIMS, _flags.FLAG_DTYPE, "SPHEREx pixel flags"),
    "VARIANCE": VariableSpec(CUBE_DIMS, np.dtype("float32"), "variance of IMAGE"),
    "ZODI": VariableSpec(CUBE_DIMS, np.dtype("float32"), "zodiacal light model"),
    "PHANTOM": VariableSpec(
        ("band", "obs", "y", "readout_channel", "phantom_read"),
        np.dtype("float32"),
        "phantom (reference-voltage) reads per row and readout channel",
    ),
}

OBS_COORDS: dict[str, VariableSpec] = {
    "obsid": VariableSpec(("obs",), STRING_DTYPE, "observation id (OBSID)"),
    "mjd_beg": VariableSpec(("obs",), np.dtype("float64"), "MJD at start of observation (MJD-BEG, UTC)", "d"),
    "mjd_avg": VariableSpec(("obs",), np.dtype("float64"), "MJD at midpoint of observation (MJD-AVG, UTC)", "d"),
    "mjd_end": VariableSpec(("obs",), np.dtype("float64"), "MJD at end of observation (MJD-END, UTC)", "d"),
    "xposure": VariableSpec(("obs",), np.dtype("float64"), "integration time (XPOSURE)", "s"),
    "telapse": VariableSpec(("obs",), np.dtype("float64"), "elapsed time, discarded frames included (TELAPSE)", "s"),
    "target": VariableSpec(("obs",), np.dtype("int64"), "survey-planning target id (SPS_TARGET)"),
    "survey": VariableSpec(("obs",), np.dtype("int64"), "all-sky survey number"),
    "planned_elon": VariableSpec(("obs",), np.dtype("float64"), "ecliptic longitude of planned boresight (SPS_ELON)", "deg"),
    "planned_elat": VariableSpec(("obs",), np.dtype("float64"), "ecliptic latitude of planned boresight (SPS_ELAT)", "deg"),
    "planned_pa": VariableSpec(("obs",), np.dtype("float64"), "PA of focal-plane y axis at planned boresight, E of ecliptic N (SPS_EPA)", "deg"),
    "planned_ra": VariableSpec(("obs",), np.dtype("float64"), "right ascension of planned boresight", "deg"),
    "planned_dec": VariableSpec(("obs",), np.dtype("float64"), "declination of planned boresight", "deg"),
    "planned_pa_eq": VariableSpec(("obs",), np.dtype("float64"), "PA of focal-plane y axis at planned boresight, E of equatorial N", "deg"),
    "sps_flags": VariableSpec(("obs",), STRING_DTYPE, "flags defined by survey planning (SPS_FLAGS)"),
    "sgt_lat": VariableSpec(("obs",), np.dtype("float64"), "ground track latitude at midpoint (SGT_LAT_MIDPT)", "deg"),
    "sgt_lon": VariableSpec(("obs",), np.dtype("float64"), "ground track longitude at midpoint (SGT_LON_MIDPT)", "deg"),
    "saa_distance": VariableSpec(("obs",), np.dtype("float64"), "closest ground track distance to the SAA (SGT_MIN_GCD2SAA)", "deg"),
}

SPACECRAFT_VARIABLES: dict[str, VariableSpec] = {
    "sc_position": VariableSpec(("obs", "sc_epoch", "xyz"), np.dtype("float64"), "geocentric spacecraft position", "km"),
    "sc_velocity": VariableSpec(("obs", "sc_epoch", "xyz"), np.dtype("float64"), "geocentric spacecraft velocity", "km / s"),
}
SC_EPOCHS = ("beg", "avg", "end")

STATIC_MAPS: dict[str, VariableSpec] = {
    "CWAVE": VariableSpec(("band", "y", "x"), np.dtype("float32"), "central wavelength of each pixel", WAVELENGTH),
    "CBAND": VariableSpec(("band", "y", "x"), np.dtype("float32"), "bandwidth of each pixel", WAVELENGTH),
}


def _attrs(spec: VariableSpec, units: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"long_name": spec.long_name}
    if units is not None or spec.units is not None:
        out["units"] = units if units is not None else spec.units
    return out


def _zeros_like(template: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    if isinstance(template, da.Array):
        return da.zeros(shape, dtype=dtype, chunks=template.chunks[:2] + (-1,) * (len(shape) - 2))
    return np.zeros(shape, dtype=dtype)


def nominal_spectral_maps(
    instrument: Instrument = SPHEREX, *, bands: Sequence[int] | None = None, reference_pixels: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nominal CWAVE and CBAND maps (band, y, x) [um] from the instrument's band layout.

    Wavelength follows :meth:`Instrument.nominal_wavelength` (uncurved, constant along x);
    bandwidth is wavelength / R. NaN on reference pixels.
    """
    bands = list(bands or instrument.band_numbers)
    coords = instrument.pixel_coords(reference_pixels=reference_pixels)
    cwave = np.empty((len(bands), coords.size, coords.size), dtype=np.float32)
    for i, b in enumerate(bands):
        lam = instrument.nominal_wavelength(b, coords)[:, None]
        inside = (coords >= 0) & (coords < instrument.n_active)
        cwave[i] = np.where(inside[None, :], lam, np.nan)
    cband = np.stack([cwave[i] / instrument.band(b).resolving_power for i, b in enumerate(bands)])
    return cwave, cband.astype(np.float32)


def make_cube(
    image: Any,
    *,
    level: str | Level,
    obsid: Sequence[str],
    mjd_avg: Sequence[float],
    instrument: Instrument = SPHEREX,
    bands: Sequence[int] | None = None,
    flags: Any = None,
    variance: Any = None,
    zodi: Any = None,
    phantom: Any = None,
    observations: Mapping[str, Any] | None = None,
    wcs: Mapping[tuple[int, int], WCS | None] | None = None,
    cwave: Any = None,
    cband: Any = None,
    units: Mapping[str, str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Assemble an exposure cube from arrays.

    Parameters
    ----------
    image
        (band, obs, y, x) array, numpy or dask, in the level's IMAGE units.
    level
        Processing level (sets the units and whether the reference border is present).
    obsid
        Observation ids in the SPHEREx form, in time order.
    mjd_avg
        Mid-exposure MJD (UTC) of each observation [d], strictly increasing.
    instrument
        Geometry the images follow.
    bands
        Detector numbers of the band axis; default all the instrument's bands.
    flags
        (band, obs, y, x) uint32 bitmask; default zeros, with REFERENCE on the border of
        raw-frame levels.
    variance, zodi
        (band, obs, y, x) arrays in the level's units, where the level has them.
    phantom
        (band, obs, y, readout_channel, phantom_read) phantom reads, raw-frame levels only.
    observations
        Further per-observation metadata by name (see :data:`OBS_COORDS`, plus
        ``sc_position`` and ``sc_velocity`` of shape (obs, 3 epochs, 3) [km, km/s]).
        ``xposure``/``telapse`` default to the instrument's; ``mjd_beg``/``mjd_end`` to
        ``mjd_avg`` -/+ half the exposure time.
    wcs
        Celestial WCS per image, ``{(band, obs_key): astropy.wcs.WCS}``.
    cwave, cband
        (band, y, x) central-wavelength and bandwidth maps [um].
    units
        Units of the pixel variables; required for custom levels, checked for others.
    attrs
        Dataset attributes; ``instrument`` (the geometry as a dict) and ``history`` (the
        modules applied, as in the FITS HISTORY cards) are added if absent.

    Returns
    -------
    xarray.Dataset
        The cube; lazy if the inputs are dask arrays. Call
        :func:`sphx.validate.validate_cube` to check it.
    """
    lvl = get_level(level) if isinstance(level, str) else level
    units = dict(units or {})
    bands = list(instrument.band_numbers if bands is None else bands)
    coords_1d = instrument.pixel_coords(reference_pixels=lvl.reference_pixels)
    n_obs = len(obsid)
    shape = (len(bands), n_obs, coords_1d.size, coords_1d.size)

    def _check(name: str, arr: Any, expected: tuple[int, ...]) -> Any:
        if tuple(arr.shape) != expected:
            raise CubeValidationError(
                [(f"{name} has shape {tuple(arr.shape)}, expected {expected} for {len(bands)} band(s), "
                 f"{n_obs} observation(s) and the {'raw' if lvl.reference_pixels else 'active'} frame of "
                 f"instrument {instrument.name!r}")],
                level=lvl.name,
            )
        return arr

    def _units(name: str) -> str:
        u = units.get(name, lvl.units(name))
        if u is None:
            raise CubeValidationError([f"no units for {name}: custom level {lvl.name!r} needs units={{...}}"])
        return u

    image = _check("IMAGE", image, shape).astype(np.float32, copy=False)
    if flags is None:
        flags = _zeros_like(image, shape, _flags.FLAG_DTYPE)
        if lvl.reference_pixels:
            border = ~((coords_1d >= 0) & (coords_1d < instrument.n_active))
            on_border = border[:, None] | border[None, :]
            flags = flags | np.where(on_border, np.uint32(_flags.Flag.REFERENCE), np.uint32(0))
    flags = _check("FLAGS", flags, shape).astype(_flags.FLAG_DTYPE, copy=False)

    data_vars: dict[str, Any] = {
        "IMAGE": (CUBE_DIMS, image, _attrs(PIXEL_VARIABLES["IMAGE"], _units("IMAGE"))),
        "FLAGS": (CUBE_DIMS, flags, _flags.cf_attrs()),
    }
    for name, arr in (("VARIANCE", variance), ("ZODI", zodi)):
        if arr is not None:
            arr = _check(name, arr, shape).astype(np.float32, copy=False)
            data_vars[name] = (CUBE_DIMS, arr, _attrs(PIXEL_VARIABLES[name], _units(name)))
    if phantom is not None:
        pshape = (len(bands), n_obs, coords_1d.size, instrument.n_readout_channels, instrument.n_phantom)
        phantom = _check("PHANTOM", phantom, pshape).astype(np.float32, copy=False)
        data_vars["PHANTOM"] = (PIXEL_VARIABLES["PHANTOM"].dims, phantom, _attrs(PIXEL_VARIABLES["PHANTOM"], _units("PHANTOM")))

    obs_meta = _observation_coords(obsid, mjd_avg, observations or {}, instrument)
    coords: dict[str, Any] = {
        "band": ("band", np.asarray(bands, dtype=np.int64), {"long_name": "detector number (DETECTOR)"}),
        "obs": ("obs", np.array([obs_key(o) for o in obsid], dtype=np.int64),
                {"long_name": "observation key: EXPIDN without the detector digit"}),
        "y": ("y", coords_1d.copy(), {"long_name": "pixel row, 0 = first active row"}),
        "x": ("x", coords_1d.copy(), {"long_name": "pixel column, 0 = first active column (sky orientation)"}),
        **{k: v for k, v in obs_meta.items() if k in OBS_COORDS},
    }
    data_vars.update({k: v for k, v in obs_meta.items() if k in SPACECRAFT_VARIABLES})
    if any(k in SPACECRAFT_VARIABLES for k in obs_meta):
        coords["sc_epoch"] = ("sc_epoch", np.array(SC_EPOCHS, dtype=STRING_DTYPE))
        coords["xyz"] = ("xyz", np.array(["x", "y", "z"], dtype=STRING_DTYPE))
    for name, arr in (("CWAVE", cwave), ("CBAND", cband)):
        if arr is not None:
            arr = _check(name, arr, (len(bands), coords_1d.size, coords_1d.size)).astype(np.float32, copy=False)
            coords[name] = (STATIC_MAPS[name].dims, arr, _attrs(STATIC_MAPS[name]))
    if wcs is not None:
        data_vars.update(wcs_variables(wcs, coords["band"][1], coords["obs"][1]))

    ds = xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))
    ds.attrs.setdefault("instrument", instrument.to_dict())
    ds.attrs.setdefault("history", [])
    return ds


def _observation_coords(
    obsid: Sequence[str], mjd_avg: Sequence[float], extra: Mapping[str, Any], instrument: Instrument
) -> dict[str, Any]:
    n = len(obsid)
    known = {**OBS_COORDS, **SPACECRAFT_VARIABLES}
    unknown = sorted(set(extra) - set(known) - {"obsid", "mjd_avg"})
    if unknown:
        raise CubeValidationError([f"unknown observation metadata {unknown}; known: {sorted(known)}"])
    values: dict[str, Any] = {
        "obsid": np.array([str(o) for o in obsid], dtype=STRING_DTYPE),
        "mjd_avg": np.asarray(mjd_avg, dtype=np.float64),
        "xposure": np.full(n, instrument.exposure_time),
        "telapse": np.full(n, instrument.elapsed_time),
    }
    values.update({k: np.asarray(v) for k, v in extra.items()})
    half = np.asarray(values["xposure"], dtype=np.float64) / 2 / 86400.0
    values.setdefault("mjd_beg", values["mjd_avg"] - half)
    values.setdefault("mjd_end", values["mjd_avg"] + half)
    out = {}
    for name, v in values.items():
        spec = known[name]
        expected = (n,) if spec.dims == ("obs",) else (n, len(SC_EPOCHS), 3)
        if v.shape != expected:
            raise CubeValidationError([f"observation metadata {name!r} has shape {v.shape}, expected {expected}"])
        out[name] = (spec.dims, v.astype(spec.dtype), _attrs(spec))
    return out
