"""The simulator's survey plan and orbit: ids, timing, pointing geometry, errors, orbit."""

from __future__ import annotations

import datetime as dt
import io
import math

import astropy.units as u
import numpy as np
import pyarrow as pa
import pytest
from astropy.coordinates import BarycentricMeanEcliptic, GeocentricMeanEcliptic, SkyCoord, get_sun
from astropy.io.fits import Header
from astropy.time import Time

from sphx import SPHEREX, SPHEREX_SMALL
from sphx.errors import SimulationError
from sphx.obsid import obs_key, parse_obsid
from sphx.simulate.survey import (
    MU_EARTH,
    R_EARTH,
    SMALL_SLEW_TIME,
    SurveyPlan,
    ecliptic_to_equatorial,
    equatorial_to_ecliptic,
    large_slew_time,
    orbital_period,
    plan_survey,
    planning_period,
    spacecraft_state,
    sun_longitude_j2000,
    sun_synchronous_inclination,
)
from sphx.wcs import tan_wcs

from .conftest import DATA

A_KM = R_EARTH + 650.0
NO_ERRORS = {"pointing_error": 0.0, "roll_error": 0.0}


# --- independent helpers (no sphx code) -------------------------------------------------
def sep_deg(ra1, dec1, ra2, dec2):
    """Great-circle separation (Vincenty form) [deg]."""
    ra1, dec1, ra2, dec2 = (np.deg2rad(np.asarray(a, dtype=float)) for a in (ra1, dec1, ra2, dec2))
    d = ra2 - ra1
    num = np.hypot(np.cos(dec2) * np.sin(d), np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * np.cos(d))
    den = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(d)
    return np.rad2deg(np.arctan2(num, den))


def iso_period(mjd: float) -> str:
    """Planning-period label from the calendar, written independently of the module."""
    t = dt.datetime(1858, 11, 17) + dt.timedelta(days=float(mjd))
    year, week, weekday = t.isocalendar()
    since_monday = weekday - 1 + (t - t.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds() / 86400
    return f"{year:04d}W{week:02d}_{1 if since_monday < 3.5 else 2}A"


def wcs_of(plan, j, inst, *, true=True):
    pre = "true" if true else "planned"
    return tan_wcs(ra=float(getattr(plan, f"{pre}_ra")[j]), dec=float(getattr(plan, f"{pre}_dec")[j]),
                   pa=float(getattr(plan, f"{pre}_pa")[j]), pixel_scale=inst.pixel_scale, n_pixels=inst.n_active)


def sun_radec(mjd):
    s = get_sun(Time(np.asarray(mjd), format="mjd", scale="utc"))
    return s.ra.deg, s.dec.deg


# --- ids, times, planning periods -------------------------------------------------------
def test_obsids_parse_unique_and_time_ordered():
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=203, exposures_per_group=4)
    assert len(p) == 203 and p.obsid.dtype.kind == "U"
    parsed = [parse_obsid(o) for o in p.obsid]
    assert [str(o) for o in parsed] == list(p.obsid)
    assert len(set(p.obsid)) == len(p)
    assert np.all(np.diff(p.mjd_beg) > 0) and np.all(p.mjd_beg[1:] > p.mjd_end[:-1])
    assert np.all(np.diff([obs_key(o) for o in p.obsid]) > 0)  # the integer keys sort in time order too
    assert [o.step for o in parsed] == list(p.step) == [i % 4 + 1 for i in range(203)]  # last group is short
    assert [o.target for o in parsed] == list(p.target) == [i // 4 + 1 for i in range(203)]
    assert list(p.group) == [i // 4 for i in range(203)]
    assert p.obsid[0] == "2025W51_1A_0001_1" and p.mjd_beg[0] == 61024.0  # Monday 2025-12-15 00:00 UTC


def test_exposure_timing_and_large_slews():
    inst = SPHEREX
    p = plan_survey(instrument=inst, n_exposures=40, **NO_ERRORS)
    assert np.allclose((p.mjd_end - p.mjd_beg) * 86400, inst.exposure_time, rtol=0, atol=1e-5)  # 113.58 s
    assert np.allclose(p.mjd_avg, (p.mjd_beg + p.mjd_end) / 2, rtol=0, atol=1e-10)
    spacing = np.diff(p.mjd_beg) * 86400
    same = np.diff(p.group) == 0
    # Within a group: the 118.19 s ramp plus an 8 s small slew.
    assert np.allclose(spacing[same], inst.elapsed_time + SMALL_SLEW_TIME, atol=1e-4)
    # Between groups: the large slew (a function of its angle) plus the discarded frames.
    k = np.flatnonzero(~same)
    angle = sep_deg(p.planned_ra[k], p.planned_dec[k], p.planned_ra[k + 1], p.planned_dec[k + 1])
    gap = (p.mjd_beg[k + 1] - p.mjd_end[k]) * 86400
    lead = inst.elapsed_time - inst.exposure_time
    assert np.allclose(gap, large_slew_time(angle) + lead, atol=1e-3)
    assert np.allclose(angle, 10.455 - 3 * 17 / 60, atol=0.02)  # 3 fields minus the group's span
    assert np.all((large_slew_time(angle) > 60) & (large_slew_time(angle) < 90))  # 79.2 s
    assert large_slew_time(0.5) < large_slew_time(10.0) < large_slew_time(180.0)


@pytest.mark.parametrize(
    ("start", "before", "after", "boundary"),
    [
        (61027.45, "2025W51_1A", "2025W51_2A", 61027.5),  # Thursday noon
        (61030.95, "2025W51_2A", "2025W52_1A", 61031.0),  # Monday 00:00
        (61037.95, "2025W52_2A", "2026W01_1A", 61038.0),  # ISO year 2026 starts on 2025-12-29
    ],
)
def test_planning_periods_restart_the_target_counter(start, before, after, boundary):
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=120, start_mjd=start)
    labels = np.array([parse_obsid(o).planning_period for o in p.obsid])
    assert list(labels) == [iso_period(t) for t in p.mjd_beg]  # each id follows its own start time
    assert set(labels) == {before, after}
    first_new = int(np.argmax(labels == after))
    assert np.all(labels[:first_new] == before) and np.all(labels[first_new:] == after)
    assert p.mjd_beg[first_new] >= boundary and p.mjd_beg[first_new - 1] < boundary
    assert (p.target[first_new], p.step[first_new]) == (1, 1)
    assert p.target[first_new - 1] > 1
    for g in np.unique(p.group):  # no group straddles the boundary
        assert len(set(labels[p.group == g])) == 1


def test_planning_period_of_the_real_header():
    h = Header.fromtextfile(DATA / "qr2_l2_image_header.txt")
    label, start, end = planning_period(h["MJD-BEG"])
    assert label == parse_obsid(h["OBSID"]).planning_period == "2025W51_1A"
    assert (start, end) == (61024.0, 61027.5)


# --- pointing geometry ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inst", "kwargs", "group"),
    [
        (SPHEREX, {}, 2),
        (SPHEREX_SMALL, {}, 2),
        (SPHEREX, {"group_step": 30.0}, 3),  # the south ecliptic pole is crossed inside this group
        (SPHEREX, {"mode": "deep"}, 5),
        (SPHEREX_SMALL, {"mode": "deep", "small_slew": 3.0}, 5),
    ],
)
def test_a_sky_point_steps_through_the_filter(inst, kwargs, group):
    p = plan_survey(instrument=inst, n_exposures=24, **NO_ERRORS, **kwargs)
    idx = np.flatnonzero(p.group == group)
    assert len(idx) == 4
    small = kwargs.get("small_slew", 17.0 * inst.n_active / 2040)  # [arcmin]
    step_px = small * 60 / inst.pixel_scale  # 165.85 px (SPHEREx), 20.16 px (small)
    n = inst.n_active
    starts = np.array([[0.1, 0.9], [0.5, 0.5], [0.95, 0.7], [0.05, 0.6]]) * n
    world = wcs_of(p, idx[0], inst).pixel_to_world_values(starts[:, 0], starts[:, 1])
    xy = np.array([wcs_of(p, j, inst).world_to_pixel_values(*world) for j in idx])  # (step, x|y, point)
    dy = np.diff(xy[:, 1], axis=0)
    assert np.all(dy < 0)  # monotonic: the boresight moves along +y, so the sky moves to -y
    assert np.all(np.abs(dy + step_px) < 0.5), (dy + step_px)
    assert np.all(np.abs(xy[:, 0] - xy[0, 0]) < 1.0)
    if "group_step" in kwargs:  # the pole crossing flips SPS_EPA inside the group
        assert set(p.planned_epa[idx]) == {0.0, 180.0}


def test_all_sky_geometry():
    inst = SPHEREX
    p = plan_survey(instrument=inst, n_exposures=160, **NO_ERRORS)
    first = np.flatnonzero(p.step == 1)
    field = inst.n_active * inst.pixel_scale / 3600
    step = sep_deg(p.planned_ra[first[:-1]], p.planned_dec[first[:-1]], p.planned_ra[first[1:]], p.planned_dec[first[1:]])
    assert np.allclose(step, 3 * field, atol=0.02)  # 10.455 deg
    # Perpendicular to the (astropy) Sun.
    elong = sep_deg(p.planned_ra, p.planned_dec, *sun_radec(p.mjd_avg))
    assert np.all(np.abs(elong - 90) < 5) and np.max(np.abs(elong - 90)) < 0.05
    # Pole to pole and over: +y south on the Sun + 90 deg leg, north on the Sun - 90 deg leg.
    assert p.planned_elat.min() < -85 and p.planned_elat.max() > 85
    dlon = (p.planned_elon - sun_longitude_j2000(p.mjd_avg) + 180) % 360 - 180
    near_pole = np.abs(p.planned_elat) > 89
    assert np.all(np.abs(np.abs(dlon[~near_pole]) - 90) < 0.05)
    assert set(p.planned_epa) == {0.0, 180.0}
    assert np.all(p.planned_epa[(dlon > 0) & ~near_pole] == 180.0)
    assert np.all(p.planned_epa[(dlon < 0) & ~near_pole] == 0.0)
    assert np.count_nonzero(np.diff(p.planned_epa)) == 2  # 40 groups = 418 deg: two pole crossings
    # Ecliptic and equatorial columns describe the same boresight.
    ra, dec = ecliptic_to_equatorial(p.planned_elon, p.planned_elat)
    assert np.max(sep_deg(ra, dec, p.planned_ra, p.planned_dec)) < 1e-9
    # The Sun is on the -x side: the +x edge is half a field further from the Sun.
    sun = sun_radec(p.mjd_avg)
    for j in range(0, len(p), 7):
        w = wcs_of(p, j, inst)
        plus_x = w.pixel_to_world_values(inst.n_active - 1, (inst.n_active - 1) / 2)
        gain = sep_deg(*plus_x, sun[0][j], sun[1][j]) - elong[j]
        assert abs(gain - field / 2) < 0.02


def test_custom_group_step_and_the_real_header_parity():
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=40, group_step=5.0, **NO_ERRORS)
    first = np.flatnonzero(p.step == 1)
    step = sep_deg(p.planned_ra[first[:-1]], p.planned_dec[first[:-1]], p.planned_ra[first[1:]], p.planned_dec[first[1:]])
    assert np.allclose(step, 5.0, atol=0.01)
    # QR2 header: boresight at the Sun's longitude + 116 deg, ecliptic latitude +33 deg, SPS_EPA = 180;
    # the plan's leg on that side has the same orientation.
    h = Header.fromtextfile(DATA / "qr2_l2_image_header.txt")
    dlon = (h["SPS_ELON"] - float(sun_longitude_j2000(h["MJD-AVG"])) + 180) % 360 - 180
    assert 90 < dlon < 135 and h["SPS_EPA"] == 180.0
    assert p.planned_epa[0] == 180.0


def test_deep_field_mode():
    inst = SPHEREX
    n = inst.n_active
    p = plan_survey(instrument=inst, n_exposures=9 * 146, mode="deep", exposures_per_group=9)  # 2.0 days
    assert p.mode == "deep" and p.mjd_end[-1] - p.mjd_beg[0] > 2.0
    sep = sep_deg(270.0, 66.56, p.planned_ra, p.planned_dec)
    assert sep.max() < 2.0  # 1.83 deg: 0.25 field across, 0.48 field along the filters
    ys, pas = [], []
    for j in range(len(p)):
        w = wcs_of(p, j, inst)
        x0, y0 = w.world_to_pixel_values(270.0, 66.56)
        x1, y1 = w.world_to_pixel_values(270.0, 66.57)
        assert 0 <= x0 < n and 0 <= y0 < n  # the field centre is in every exposure
        ys.append(float(y0))
        pas.append(math.degrees(math.atan2(x1 - x0, y1 - y0)))  # PA of +y at the field centre
    channels = np.bincount((np.array(ys) / (n / 17)).astype(int), minlength=17)
    assert len(channels) == 17 and channels.min() >= 10  # every channel, repeatedly (19..111)
    # The roll follows the Sun: PA of +y at the field centre = -(Sun's longitude) + const.
    pa_unwrapped = np.unwrap(np.array(pas), period=360)
    lam = np.unwrap(get_sun(Time(p.mjd_avg, format="mjd")).transform_to(
        GeocentricMeanEcliptic(equinox="J2000", obstime=Time(p.mjd_avg, format="mjd"))).lon.deg, period=360)
    rate = np.polyfit(p.mjd_avg - p.mjd_avg[0], pa_unwrapped, 1)[0]
    assert abs(abs(rate) - 1.0) < 0.05  # -1.015 deg / day in December
    assert np.std(pa_unwrapped + lam) < 0.3  # roll error 0.1 deg rms plus dither geometry


def test_deep_mode_other_fields_and_the_sun():
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=40, mode="deep", deep_field=(90.0, -66.56))  # SEP
    assert sep_deg(90.0, -66.56, p.planned_ra, p.planned_dec).max() < 0.3
    with pytest.raises(SimulationError, match="deep_field"):  # the Sun is at RA ~265 deg in December
        plan_survey(instrument=SPHEREX_SMALL, n_exposures=4, mode="deep", deep_field=(266.0, -23.0))


# --- pointing errors and determinism --------------------------------------------------------
def test_pointing_error_statistics():
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=2000, pointing_error=2.0, roll_error=0.0)
    off = sep_deg(p.planned_ra, p.planned_dec, p.true_ra, p.true_dec) * 60  # [arcmin]
    rms = math.sqrt(np.mean(off**2))
    assert abs(rms - 2.0) < 0.2  # measured 2.02
    assert abs(np.median(off) / rms - math.sqrt(math.log(2))) < 0.05  # Rayleigh: median = 0.833 rms
    # Uniform directions: the mean offset vector is ~0 (2000 draws: sigma of the mean ~ 0.03').
    east = (p.true_ra - p.planned_ra + 180) % 360 - 180
    de = east * np.cos(np.deg2rad(p.planned_dec)) * 60
    dn = (p.true_dec - p.planned_dec) * 60
    assert abs(de.mean()) < 0.15 and abs(dn.mean()) < 0.15
    assert abs(np.std(de) - np.std(dn)) < 0.15

    q = plan_survey(instrument=SPHEREX_SMALL, n_exposures=2000, pointing_error=0.0, roll_error=0.1)
    assert np.array_equal(q.true_ra, q.planned_ra) and np.array_equal(q.true_dec, q.planned_dec)
    droll = (q.true_pa - q.planned_pa + 180) % 360 - 180
    assert abs(np.std(droll) - 0.1) < 0.01 and abs(droll.mean()) < 0.01


@pytest.mark.parametrize("mode", ["all_sky", "deep"])
def test_zero_errors_leave_the_planned_pointing(mode):
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=50, mode=mode, **NO_ERRORS)
    for a in ("ra", "dec", "pa"):
        assert np.array_equal(getattr(p, f"true_{a}"), getattr(p, f"planned_{a}"))


def _ipc_bytes(plan: SurveyPlan) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, plan.to_table().schema) as writer:
        writer.write_table(plan.to_table())
    return sink.getvalue()


@pytest.mark.parametrize("mode", ["all_sky", "deep"])
def test_same_seed_same_plan_bytes(mode):
    a = plan_survey(instrument=SPHEREX_SMALL, n_exposures=30, mode=mode, seed=5)
    b = plan_survey(instrument=SPHEREX_SMALL, n_exposures=30, mode=mode, seed=5)
    c = plan_survey(instrument=SPHEREX_SMALL, n_exposures=30, mode=mode, seed=6)
    assert _ipc_bytes(a) == _ipc_bytes(b) != _ipc_bytes(c)
    assert not np.array_equal(a.true_ra, c.true_ra)
    if mode == "all_sky":  # the seed draws only errors there
        assert np.array_equal(a.planned_ra, c.planned_ra)


def test_table_and_immutability():
    p = plan_survey(instrument=SPHEREX_SMALL, n_exposures=6)
    t = p.to_table()
    assert t.num_rows == 6 and t.num_columns == 16 + 18
    assert t.schema.field("planned_ra").metadata == {b"unit": b"deg"}
    assert t.schema.field("sc_vz_end").metadata == {b"unit": b"km / s"}
    assert t.schema.field("mjd_beg").metadata == {b"unit": b"d"}
    assert t.schema.metadata[b"mode"] == b"all_sky"
    assert t.column("obsid").to_pylist() == list(p.obsid)
    assert np.array_equal(t.column("sc_y_mid").to_numpy(), p.sc_position[:, 1, 1])
    assert np.array_equal(t.column("sc_vx_start").to_numpy(), p.sc_velocity[:, 0, 0])
    with pytest.raises(ValueError, match="read-only"):
        p.true_ra[0] = 0.0
    # The state at the three epochs is the orbit at mjd_beg / mjd_avg / mjd_end.
    r, v = spacecraft_state(p.mjd_end)
    assert np.array_equal(r, p.sc_position[:, 2]) and np.array_equal(v, p.sc_velocity[:, 2])


# --- frames and the Sun ------------------------------------------------------------------------
def test_ecliptic_frame_matches_astropy():
    rng = np.random.default_rng(1)
    lon, lat = rng.uniform(0, 360, 50), np.rad2deg(np.arcsin(rng.uniform(-1, 1, 50)))
    ra, dec = ecliptic_to_equatorial(lon, lat)
    ref = SkyCoord(lon * u.deg, lat * u.deg, frame=BarycentricMeanEcliptic()).icrs
    assert np.max(sep_deg(ra, dec, ref.ra.deg, ref.dec.deg)) * 3600 < 0.1  # arcsec
    lon2, lat2 = equatorial_to_ecliptic(ra, dec)
    assert np.max(sep_deg(lon, lat, lon2, lat2)) < 1e-10


def test_sun_longitude_matches_astropy():
    mjd = np.linspace(60800.0, 61600.0, 41)
    t = Time(mjd, format="mjd")
    ref = get_sun(t).transform_to(GeocentricMeanEcliptic(equinox="J2000", obstime=t)).lon.deg
    diff = (sun_longitude_j2000(mjd) - ref + 180) % 360 - 180
    assert np.max(np.abs(diff)) < 0.02  # measured < 0.01 deg


# --- orbit --------------------------------------------------------------------------------------
def test_orbit_is_circular_at_650_km():
    t = np.linspace(61000.0, 61365.0, 2001)
    r, v = spacecraft_state(t)
    assert r.shape == v.shape == (2001, 3)
    assert np.allclose(np.linalg.norm(r, axis=-1), A_KM, rtol=1e-12)
    assert np.allclose(np.linalg.norm(v, axis=-1), math.sqrt(MU_EARTH / A_KM), rtol=1e-4)  # 7.531 km/s
    cos_rv = np.sum(r * v, -1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(v, axis=-1))
    assert np.max(np.abs(cos_rv)) < 1e-12
    assert spacecraft_state(np.zeros((2, 5)) + 61000.0)[0].shape == (2, 5, 3)


def test_orbit_period_and_inclination():
    t = 61010.0 + np.arange(0, 2 * 5900) / 86400.0  # two orbits at 1 s
    r, v = spacecraft_state(t)
    z = r[:, 2]
    up = np.flatnonzero((z[:-1] < 0) & (z[1:] >= 0))
    crossing = t[up] + (-z[up] / (z[up + 1] - z[up])) / 86400.0
    period = np.diff(crossing) * 86400
    assert len(period) >= 1 and abs(period[0] - orbital_period()) < 0.05
    assert abs(period[0] / 60 - 97.73) < 0.05  # 97.73 min
    h = np.cross(r, v)
    inc = np.rad2deg(np.arccos(h[:, 2] / np.linalg.norm(h, axis=-1)))
    assert abs(sun_synchronous_inclination() - 97.99) < 0.01
    assert np.allclose(inc, sun_synchronous_inclination(), atol=0.02)


def test_velocity_is_the_derivative_of_position():
    t = np.array([61000.3, 61100.7, 61290.1])
    dt_s = 0.5
    r_minus, _ = spacecraft_state(t - dt_s / 86400)
    r_plus, _ = spacecraft_state(t + dt_s / 86400)
    _, v = spacecraft_state(t)
    # The node-motion term (1.4 m/s) is included: the residual is far below it.
    assert np.max(np.abs((r_plus - r_minus) / (2 * dt_s) - v)) < 1e-4


@pytest.mark.parametrize("ltan", [18.0, 6.0, 10.5])
def test_node_tracks_the_sun_for_180_days(ltan):
    t = 61024.0 + np.arange(181.0)
    r, v = spacecraft_state(t, ltan_hours=ltan)
    h = np.cross(r, v)
    node = np.rad2deg(np.arctan2(h[:, 0], -h[:, 1]))  # ascending node = z x h
    sun_ra, _ = sun_radec(t)
    diff = (node - sun_ra - (ltan - 12) * 15 + 180) % 360 - 180
    assert np.max(np.abs(diff)) < 1.0  # measured < 0.02 deg against astropy's Sun
    assert 170 < np.ptp(np.unwrap(node, period=360)) < 190  # ~0.99 deg / day


def test_orbit_normal_from_first_principles():
    # Astropy-free: the orbit normal is (sin i sin W, -sin i cos W, cos i), with the node W
    # at the Sun's RA - 90 deg (LTAN 6 h, the default) from the low-precision Sun and the J2 inclination.
    t = np.linspace(61024.0, 61100.0, 9)
    a = A_KM
    n = math.sqrt(MU_EARTH / a**3)
    cos_i = -math.radians(0.9856474) / 86400 / (1.5 * n * 1.08263e-3 * (R_EARTH / a) ** 2)
    inc = math.acos(cos_i)
    lam = np.deg2rad(sun_longitude_j2000(t))
    eps = math.radians(23.4392911)
    node = np.arctan2(math.cos(eps) * np.sin(lam), np.cos(lam)) - math.pi / 2
    expected = np.stack([math.sin(inc) * np.sin(node), -math.sin(inc) * np.cos(node), np.full_like(node, cos_i)], -1)
    r, v = spacecraft_state(t)
    h = np.cross(r, v)
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    assert np.max(np.rad2deg(np.arccos(np.clip(np.sum(h * expected, -1), -1, 1)))) < 0.02
    # u = phase + n (t - epoch): the phase is the argument of latitude at the epoch.
    r0, _ = spacecraft_state(61000.0, phase=90.0)
    assert abs(r0[2] - a * math.sin(inc)) < 1e-6


def test_orbit_plane_of_the_real_header():
    # The QR2 header's GEOCENTER state has its node 90.7 deg west of the Sun (LTAN ~ 6 h).
    h = Header.fromtextfile(DATA / "qr2_l2_image_header.txt")
    r = np.array([h["X_SC"], h["Y_SC"], h["Z_SC"]])
    v = np.array([h["VX_SC"], h["VY_SC"], h["VZ_SC"]])
    assert abs(np.linalg.norm(r) - A_KM) < 10 and abs(np.linalg.norm(v) - math.sqrt(MU_EARTH / A_KM)) < 0.01
    n_real = np.cross(r, v) / np.linalg.norm(np.cross(r, v))
    rs, vs = spacecraft_state(h["MJD-AVG"], ltan_hours=6.0)
    n_sim = np.cross(rs, vs) / np.linalg.norm(np.cross(rs, vs))
    assert math.degrees(math.acos(float(n_real @ n_sim))) < 1.0  # 0.68 deg


# --- bad configurations ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_exposures": 0}, "n_exposures"),
        ({"n_exposures": 2.5}, "n_exposures"),
        ({"exposures_per_group": 0}, "exposures_per_group"),
        ({"exposures_per_group": 10}, "exposures_per_group"),
        ({"mode": "wide"}, "mode"),
        ({"pointing_error": -1.0}, "pointing_error"),
        ({"roll_error": -0.1}, "roll_error"),
        ({"roll_error": float("nan")}, "roll_error"),
        ({"small_slew": 25.5}, "small_slew"),  # the small detector is 25.42 arcmin across
        ({"small_slew": 0.0}, "small_slew"),
        ({"group_step": 0.0}, "group_step"),
        ({"group_step": 200.0}, "group_step"),
        ({"deep_field": (270.0, 91.0)}, "deep_field"),
        ({"deep_field": (float("nan"), 0.0)}, "deep_field"),
        ({"start_mjd": float("inf")}, "start_mjd"),
        ({"instrument": "SPHEREx"}, "instrument"),
    ],
)
def test_bad_plans_are_named(kwargs, name):
    args = {"instrument": SPHEREX_SMALL, "n_exposures": 8, **kwargs}
    with pytest.raises(SimulationError, match=name):
        plan_survey(**args)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"altitude": -5.0}, "altitude"),
        ({"altitude": 8000.0}, "altitude"),  # too high for a sun-synchronous orbit
        ({"ltan_hours": float("nan")}, "ltan_hours"),
        ({"phase": float("inf")}, "phase"),
    ],
)
def test_bad_orbits_are_named(kwargs, name):
    with pytest.raises(SimulationError, match=name):
        spacecraft_state(61000.0, **kwargs)
