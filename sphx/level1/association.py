"""GDS Image Association: per-exposure records attached to each image.

On the ground, detector data (Ka band) are merged with the header values of the S-band
downlinks and the survey plan. Here the observation records are the repository's
``survey_plan`` table (one row per exposure, see :meth:`SurveyPlan.to_table
<sphx.simulate.survey.SurveyPlan.to_table>` for the columns). Every observation of the
cube must have a record; times in the cube and the record must agree.

What is attached, per observation (coordinates on ``obs``):

- exposure times, target id, survey-plan flags (SPS_FLAGS), planned boresight in ecliptic
  (SPS_ELON, SPS_ELAT, SPS_EPA) and equatorial coordinates, spacecraft position and
  velocity at start, middle and end;
- the ground track at mid-exposure and its closest distance to the South Atlantic
  Anomaly over the exposure (SGT_LAT_MIDPT, SGT_LON_MIDPT, SGT_MIN_GCD2SAA), used by
  Level 2 data quality. The SAA is modelled as a spherical cap (centre and radius are
  options); the ground track uses the Earth rotation angle (UT1 taken as UTC, an error
  of under 0.01 deg).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pydantic
import xarray as xr

from ..cube import OBS_COORDS, SC_EPOCHS, SPACECRAFT_VARIABLES, STRING_DTYPE
from ..errors import StepError
from ..instrument import Instrument
from ..pipeline.step import StepConfig, register_step

__all__ = ["AssociationConfig", "associate_images", "ground_track", "saa_distance"]

_TABLE_EPOCHS = ("start", "mid", "end")  # survey_plan column suffixes for SC_EPOCHS
_PLAN_COLUMNS = {  # cube coordinate <- survey_plan column
    "mjd_beg": "mjd_beg", "mjd_end": "mjd_end", "target": "target",
    "planned_elon": "planned_elon", "planned_elat": "planned_elat", "planned_pa": "planned_epa",
    "planned_ra": "planned_ra", "planned_dec": "planned_dec", "planned_pa_eq": "planned_pa",
}


class AssociationConfig(StepConfig):
    """Where the South Atlantic Anomaly is, and how strictly times must agree."""

    saa_lat: float = pydantic.Field(-27.0, description="SAA centre latitude [deg]")
    saa_lon: float = pydantic.Field(-45.0, description="SAA centre longitude, east positive [deg]")
    saa_radius: float = pydantic.Field(25.0, gt=0, description="SAA cap radius [deg]")
    time_tolerance: float = pydantic.Field(1.0, gt=0, description="largest mid-time disagreement [s]")


def ground_track(position_km: np.ndarray, mjd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Geodetic-sphere latitude and east longitude below geocentric equatorial positions [deg].

    Parameters
    ----------
    position_km
        (..., 3) geocentric positions, equatorial (ICRS-aligned) axes [km].
    mjd
        Times (UTC, broadcast against ``position_km[..., 0]``) [d].
    """
    x, y, z = np.moveaxis(np.asarray(position_km, dtype=np.float64), -1, 0)
    lat = np.rad2deg(np.arctan2(z, np.hypot(x, y)))
    # Earth rotation angle (IERS 2003), the sidereal angle without the small precession terms
    era = 360.0 * (0.7790572732640 + 1.00273781191135448 * (np.asarray(mjd) - 51544.5))
    lon = np.mod(np.rad2deg(np.arctan2(y, x)) - era + 180.0, 360.0) - 180.0
    return lat, lon


def saa_distance(lat: np.ndarray, lon: np.ndarray, *, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Great-circle distance from ground points to the edge of the SAA cap (0 inside) [deg]."""
    la, lo = np.deg2rad(lat), np.deg2rad(lon)
    cla, clo = np.deg2rad(centre[0]), np.deg2rad(centre[1])
    cosd = np.sin(la) * np.sin(cla) + np.cos(la) * np.cos(cla) * np.cos(lo - clo)
    return np.maximum(np.rad2deg(np.arccos(np.clip(cosd, -1.0, 1.0))) - radius, 0.0)


def _records(table: pa.Table, obsids: list[str]) -> dict[str, np.ndarray]:
    """Columns of ``table`` in the order of ``obsids``; StepError names missing ones."""
    if "obsid" not in table.column_names:
        raise StepError("survey_plan table has no 'obsid' column")
    ids = [str(o) for o in table.column("obsid").to_pylist()]
    row = {o: i for i, o in enumerate(ids)}
    missing = [o for o in obsids if o not in row]
    if missing:
        raise StepError(f"no survey_plan record for observation(s) {missing[:5]}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    take = np.array([row[o] for o in obsids], dtype=np.int64)
    needed = [*_PLAN_COLUMNS.values(), "mjd_avg"] + [f"sc_{p}{a}_{e}" for p in ("", "v") for a in "xyz"
                                                    for e in _TABLE_EPOCHS]
    absent = [c for c in needed if c not in table.column_names]
    if absent:
        raise StepError(f"survey_plan table lacks column(s) {absent}")
    return {c: table.column(c).to_numpy()[take] for c in needed}


@register_step(
    "associate_images",
    module="GDS Image Association",
    config=AssociationConfig,
    tables={"survey_plan": True},
    writes={},
)
def associate_images(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: AssociationConfig, instrument: Instrument,
    tables: dict[str, Any],
) -> xr.Dataset:
    """Attach the observation records of ``tables["survey_plan"]`` to each observation.

    Returns
    -------
    xarray.Dataset
        The cube with the records as ``obs`` coordinates (see the module docstring) and
        ``sc_position`` / ``sc_velocity``; pixel data untouched and lazy.

    Raises
    ------
    StepError
        An observation without a record, or whose mid time disagrees with its record.
    """
    obsids = [str(o) for o in ds["obsid"].values]
    rec = _records(tables["survey_plan"], obsids)
    off = np.abs(rec["mjd_avg"] - ds["mjd_avg"].values) * 86400.0
    if np.any(off > config.time_tolerance):
        j = int(np.argmax(off))
        raise StepError(f"observation {obsids[j]}: MJD-AVG {ds['mjd_avg'].values[j]:.8f} differs from its "
                        f"survey_plan record {rec['mjd_avg'][j]:.8f} by {off[j]:.1f} s")
    position = np.stack([np.stack([rec[f"sc_{a}_{e}"] for a in "xyz"], -1) for e in _TABLE_EPOCHS], 1)
    velocity = np.stack([np.stack([rec[f"sc_v{a}_{e}"] for a in "xyz"], -1) for e in _TABLE_EPOCHS], 1)
    mjd = np.stack([rec["mjd_beg"], ds["mjd_avg"].values, rec["mjd_end"]], 1)
    lat, lon = ground_track(position, mjd)
    saa = saa_distance(lat, lon, centre=(config.saa_lat, config.saa_lon), radius=config.saa_radius)
    mode = (tables["survey_plan"].schema.metadata or {}).get(b"mode", b"").decode()

    values = {name: rec[col] for name, col in _PLAN_COLUMNS.items()}
    values.update(sgt_lat=lat[:, 1], sgt_lon=lon[:, 1], saa_distance=saa.min(axis=1),
                  sps_flags=np.array([mode] * len(obsids), dtype=STRING_DTYPE))
    coords = {}
    for name, v in values.items():
        spec = OBS_COORDS[name]
        attrs = {"long_name": spec.long_name, **({"units": spec.units} if spec.units else {})}
        coords[name] = ("obs", np.asarray(v).astype(spec.dtype), attrs)
    out = ds.assign_coords(coords)
    out = out.assign_coords(sc_epoch=("sc_epoch", np.array(SC_EPOCHS, dtype=STRING_DTYPE)),
                            xyz=("xyz", np.array(["x", "y", "z"], dtype=STRING_DTYPE)))
    for name, arr in (("sc_position", position), ("sc_velocity", velocity)):
        spec = SPACECRAFT_VARIABLES[name]
        out[name] = (spec.dims, arr.astype(spec.dtype), {"long_name": spec.long_name, "units": spec.units})
    return out
