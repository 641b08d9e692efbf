"""The simulator end to end: statistics against its own truth, the survey plan, the repository."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sphx import flags
from sphx.errors import SimulationError
from sphx.io import Repository
from sphx.kernels.nonlinearity import measured_rate
from sphx.kernels.ramp import slope_variance
from sphx.simulate import TRUTH_LEVEL, Simulator, load_config, simulate_survey
from sphx.simulate.sky import sed_flux
from sphx.validate import validate_cube
from sphx.zodi import earth_position, zodi_brightness

SMALL = {"instrument": "SPHEREx-small", "seed": 11}


@pytest.fixture(scope="module")
def run():
    """Eight exposures (two target groups) of the small geometry, kept in memory."""
    sim = Simulator({**SMALL, "survey": {"n_exposures": 8}})
    return sim, [sim.step() for _ in range(8)]


def _electrons(sim, band, im):
    """The active-pixel slopes back in electron/s with the true gains and offsets."""
    inst, det = sim.instrument, sim.detectors[band]
    ref, n = inst.n_reference, inst.n_active
    ch = inst.readout_channel(band, np.arange(n))
    raw = im.raw[ref:ref + n, ref:ref + n].astype(np.float64)
    return (raw - im.offset[ref:ref + n][:, ch]) * det.gain[ch][None, :]


def _near(points_y, points_x, n, grow):
    mask = np.zeros((n, n), bool)
    for dy in range(-grow, grow + 1):
        for dx in range(-grow, grow + 1):
            yy, xx = points_y + dy, points_x + dx
            ok = (yy >= 0) & (yy < n) & (xx >= 0) & (xx < n)
            mask[yy[ok], xx[ok]] = True
    return mask


def test_same_seed_same_bytes():
    a, b, c = (Simulator({**SMALL, "seed": s, "survey": {"n_exposures": 2}}) for s in (3, 3, 4))
    for _ in range(2):
        ia, ib, ic = a.step(), b.step(), c.step()
        for band in ia:
            for attr in ("raw", "raw_flags", "phantom", "sky", "persistence"):
                assert getattr(ia[band], attr).tobytes() == getattr(ib[band], attr).tobytes()
            assert ia[band].raw.tobytes() != ic[band].raw.tobytes()


def test_same_seed_same_repository_bytes(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for level in ("raw.zarr", f"{TRUTH_LEVEL}.zarr"):
            for f in sorted((root / level).rglob("c/**/*")):
                if f.is_file():
                    h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
        return h.hexdigest()

    cfg = {**SMALL, "bands": [2, 5], "survey": {"n_exposures": 2}}
    simulate_survey(cfg, tmp_path / "a")
    simulate_survey(cfg, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_noise_in_flat_regions_follows_the_ramp_fit_variance(run):
    sim, images = run
    inst = sim.instrument
    n, ref = inst.n_active, inst.n_reference
    pulls = []
    for band in sim.bands:
        det = sim.detectors[band]
        for im in images[1:]:
            im = im[band]
            value = _electrons(sim, band, im)
            t = im.transients
            ok = (im.truth_flags == 0) & ~_near(t["y"], t["x"], n, 1)
            ok[det.fullsample[:, 0], det.fullsample[:, 1]] = False
            ok &= im.current * inst.exposure_time < 0.5 * det.q_nl  # linear regime
            var = slope_variance(im.current.astype(float), det.read_noise[ref:ref + n, ref:ref + n],
                                 n_frames=inst.n_frames - inst.n_discarded_frames, frame_time=inst.frame_time)
            pulls.append(((value - im.current) / np.sqrt(var))[ok])
    pulls = np.concatenate(pulls)
    assert pulls.size > 1e6
    assert abs(pulls.mean()) < 0.01
    assert pulls.std() == pytest.approx(1.0, abs=0.02)


def test_zodi_levels_and_interpolation(run):
    sim, images = run
    med = {b: np.median([im[b].zodi for im in images]) for b in sim.bands}
    # exposures near the ecliptic at 90 deg from the Sun: 0.1-1.5 MJy/sr in every band
    assert np.all(np.abs(sim.plan.planned_elat) < 30)
    assert all(0.1 < v < 1.5 for v in med.values()), med
    assert med[4] == min(med.values())  # the scattered/thermal minimum near 3.5 um
    assert med[6] > med[5] > med[4]  # thermal emission rising
    # the node-grid interpolation reproduces the model at arbitrary pixels to 0.1 %
    j, band = 3, 2
    im, opt = images[j][band], sim.optics[band]
    rng = np.random.default_rng(0)
    y, x = rng.integers(0, sim.instrument.n_active, (2, 25))
    ra, dec = im.wcs.all_pix2world(x, y, 0)
    from sphx.simulate.survey import equatorial_to_ecliptic

    lon, lat = equatorial_to_ecliptic(ra, dec)
    sc = sim.plan.sc_position[j, 1]
    from sphx.simulate.simulator import AU_KM, _ecliptic_vector

    observer = earth_position(sim.plan.mjd_avg[j]) + _ecliptic_vector(sc) / AU_KM
    direct = zodi_brightness(lon, lat, opt.cwave[y, x], observer=observer)
    assert np.allclose(im.zodi[y, x], direct, rtol=1e-3)


def test_persistence_decays_as_injected(run):
    sim, images = run
    cfg, inst = sim.config.detector, sim.instrument
    band = 1
    det = sim.detectors[band]
    first = images[0][band]
    y, x = np.unravel_index(np.argmax(first.current), first.current.shape)
    gain = det.gain[inst.readout_channel(band, np.array([x]))[0]]
    fluence = min(first.current[y, x] * inst.exposure_time, 1.2 * cfg.overflow_adu * gain)
    taus, fr = np.array(cfg.trap_taus), np.array(cfg.trap_fractions)
    texp = inst.exposure_time
    end0 = sim.plan.mjd_end[0]
    previous = np.inf
    for j in (1, 2, 3):
        since = (sim.plan.mjd_beg[j] - end0) * 86400.0
        # trapped charge decays through the gaps and through the earlier integrations' release
        expected = np.sum(fr * det.trap_density[y, x] * fluence * np.exp(-since / taus) * (1 - np.exp(-texp / taus))) / texp
        got = images[j][band].persistence[y, x]
        if j == 1:
            assert got == pytest.approx(expected, rel=1e-4)
        else:  # later exposures' sky refills the fastest traps a little: never less than the decay alone
            assert expected * (1 - 1e-5) <= got < 1.05 * expected
        assert got < previous
        previous = got
    assert images[1][band].persistence[y, x] > cfg.persistence_threshold
    assert images[1][band].truth_flags[y, x] & np.uint32(flags.Flag.PERSIST)


def test_aperture_flux_of_isolated_stars_equals_truth(run):
    sim, images = run
    inst = sim.instrument
    n = inst.n_active
    pulls = []
    for band in sim.bands:
        det, opt = sim.detectors[band], sim.optics[band]
        for im in images:
            im = im[band]
            s = im.sources
            value = _electrons(sim, band, im)
            cal = (value - det.dark - im.persistence) / opt.response - im.zodi * opt.omega  # uJy per pixel
            var = slope_variance(im.current.astype(float), det.read_noise[4:4 + n, 4:4 + n],
                                 n_frames=74, frame_time=inst.frame_time) / opt.response.astype(float) ** 2
            yy, xx = np.mgrid[0:n, 0:n]
            for i in np.argsort(s["flux"])[::-1][:60]:
                x0, y0, f = s["x"][i], s["y"][i], s["flux"][i]
                if not (12 < x0 < n - 13 and 12 < y0 < n - 13):
                    continue
                ap = (xx - x0) ** 2 + (yy - y0) ** 2 < 8**2
                sigma = np.sqrt(var[ap].sum())
                # isolated: the other sources that can reach the aperture hold < 0.3 sigma
                d2 = (s["x"] - x0) ** 2 + (s["y"] - y0) ** 2
                if s["flux"][(d2 > 0) & (d2 < 14**2)].sum() > 0.3 * sigma:
                    continue
                bad = im.truth_flags[ap] | im.raw_flags[4:4 + n, 4:4 + n][ap]
                if np.any(bad) or np.max(im.current[ap]) * inst.exposure_time > np.min(det.q_nl[ap]):
                    continue
                pulls.append((cal[ap].sum() - f) / sigma)
    pulls = np.array(pulls)
    assert pulls.size >= 20
    assert np.all(np.abs(pulls) < 5)
    assert abs(pulls.mean()) < 3 / np.sqrt(pulls.size) + 0.1 and 0.6 < pulls.std() < 1.4


def test_survey_steps_a_sky_point_through_the_channels():
    sim = Simulator({**SMALL, "survey": {"n_exposures": 4, "pointing_error": 0, "roll_error": 0}})
    inst = sim.instrument
    band = 2
    c = inst.n_active / 2
    start = sim.true_wcs(0, band).pixel_to_world(c, c)  # three slews move it 60 of 248 rows
    edges = inst.channel_edges(band)
    slew = 17 * 60 * inst.n_active / 2040 / inst.pixel_scale  # [pixel]
    ys, channels, lams = [], [], []
    for j in range(4):
        x, y = sim.true_wcs(j, band).world_to_pixel(start)
        lam = sim.optics[band].cwave[round(float(y)), round(float(x))]
        ys.append(float(y))
        lams.append(lam)
        channels.append(int(np.searchsorted(edges, lam)) - 1)
        assert abs(float(x) - c) < 1
    assert np.allclose(np.abs(np.diff(ys)), slew, atol=0.5)
    steps = np.diff(channels)
    assert np.all(np.sign(steps) == np.sign(steps[0])) and np.all(np.abs(steps) >= 1) and np.all(np.abs(steps) <= 2)
    assert np.all(np.sign(np.diff(lams)) == np.sign(steps[0]))


def test_fullsample_ramps_give_the_reported_slopes(run):
    sim, images = run
    inst = sim.instrument
    band = 3
    im = images[2][band]
    fs = im.fullsample
    t = np.arange(inst.n_frames) * inst.frame_time
    det = sim.detectors[band]
    ref = inst.n_reference
    for py, px in det.fullsample:
        sel = (fs["y"] == py) & (fs["x"] == px)
        adu = fs["adu"][sel]
        slope = np.polyfit(t[3:], adu[3:], 1)[0]
        ch = inst.readout_channel(band, np.array([px]))[0]
        assert im.raw_flags[py + ref, px + ref] & np.uint32(flags.Flag.FULLSAMPLE)
        if im.raw_flags[py + ref, px + ref] & np.uint32(flags.Flag.OVERFLOW):
            continue
        assert slope == pytest.approx(im.raw[py + ref, px + ref] - im.offset[py + ref, ch], rel=1e-4, abs=1e-4)


def test_onboard_flags_and_nonlinearity(run):
    sim, images = run
    inst = sim.instrument
    counts = {"flagged": 0, "hits": 0}
    for band in sim.bands:
        det = sim.detectors[band]
        for im in images:
            im = im[band]
            t = im.transients
            counts["hits"] += t["y"].size
            counts["flagged"] += int(t["flagged"].sum())
            on_board = im.raw_flags[4:-4, 4:-4]
            hit = (on_board & np.uint32(flags.Flag.TRANSIENT)) != 0
            assert np.all(hit[t["y"][t["flagged"]], t["x"][t["flagged"]]])
            assert np.count_nonzero(hit) <= t["flagged"].sum()
            # OVERFLOW exactly where the ramp's reported charge reaches the limit
            ch = inst.readout_channel(band, np.arange(inst.n_active))
            limit = sim.config.detector.overflow_adu * det.gain[ch][None, :]
            _, used = measured_rate(im.current, det.q_nl, det.b1, det.b2, det.b3, limit=limit)
            assert np.array_equal(used < 74, (on_board & np.uint32(flags.Flag.OVERFLOW)) != 0)
    # most hits are caught on board, some are left for outlier detection
    assert 0.6 < counts["flagged"] / counts["hits"] < 0.98
    assert np.all(images[0][1].raw_flags[:4] == np.uint32(flags.Flag.REFERENCE))


def test_calibrator_spectra_are_known(run):
    sim, _ = run
    cat = next(iter(sim.catalog.pixels.values()))
    calib = np.flatnonzero(cat["calibrator"])
    assert calib.size
    lam = np.array([1.0, 2.0, 4.0])
    got = sed_flux(cat, np.tile(lam, (calib.size, 1)), rows=calib)
    import astropy.units as u
    from astropy.modeling.models import BlackBody

    for k, i in enumerate(calib):
        bb = BlackBody(cat["teff"][i] * u.K)(lam * u.um).value
        assert np.allclose(got[k] / got[k][0], bb / bb[0], rtol=1e-6)


@pytest.mark.parametrize(("config", "message"), [
    ({"survey": {"n_exposures": -1}}, "survey.n_exposures"),
    ({"survey": {"n_exposures": 0}}, "survey.n_exposures"),
    ({"bands": [7]}, "bands"),
    ({"instrument": "HST"}, "instrument"),
    ({"survey": {"exposures": 4}}, "survey.exposures: unknown key"),
    ({"detector": {"trap_taus": [1.0, -2.0, 3.0]}}, "trap_taus"),
    ({"sky": {"mag_limit": 5.0}}, "mag_limit"),
])
def test_bad_configurations_name_the_key(config, message):
    with pytest.raises(SimulationError, match=message):
        load_config({**SMALL, **config})


def test_impossible_geometry_is_refused():
    with pytest.raises(SimulationError, match="small_slew"):
        Simulator({**SMALL, "survey": {"small_slew": 60.0}})  # larger than the 25' detector
    with pytest.raises(SimulationError, match="does not exist"):
        load_config("/no/such/config.yaml")


def test_simulate_survey_writes_raw_products_and_truth(tmp_path):
    report = simulate_survey({**SMALL, "survey": {"n_exposures": 3}}, tmp_path / "repo")
    repo = Repository.open(tmp_path / "repo")
    assert set(repo.levels()) == {"raw", TRUTH_LEVEL}
    raw = repo.open_level("raw")
    validate_cube(raw, level="raw", instrument=repo.instrument)
    assert list(raw["obsid"].values) == report.obsids and raw.sizes["obs"] == 3
    assert np.all(np.diff(raw["mjd_avg"].values) > 0)
    assert np.allclose(np.linalg.norm(raw["sc_position"].values, axis=-1), 6378.137 + 650, rtol=1e-6)
    truth = repo.open_level(TRUTH_LEVEL)
    assert truth["IMAGE"].attrs["units"] == "MJy / sr" and "PERSIST" in truth and "ZODI" in truth
    assert set(repo.calibrations()) >= {"gain_factors", "dark", "abs_gain_matrix", "spectral_wcs", "average_psf",
                                        "nonlinear_pars", "readnoise_pars", "nonfunc", "dichroic",
                                        "solid_angle_pixel_map", "initial_distortion_table", "persistence_pars"}
    exact = repo.open_state("simulation_truth")
    gains = repo.open_calibration("gain_factors")["GAIN"].values
    rel = gains / exact["GAIN"].values - 1
    assert 0 < np.std(rel) < 0.005  # lab-measured: 0.2 % errors
    psf = repo.open_calibration("average_psf")["PSF"].values
    assert np.allclose(psf.sum(axis=(-1, -2)), 1, atol=1e-4)
    assert set(repo.tables()) == {"refcat", "survey_plan", "truth_sources", "truth_transients", "fullsample",
                                 "sso_elements"}
    src = repo.read_table("truth_sources").to_pandas()
    assert set(src["obsid"]) == set(report.obsids) and (src["flux"] > 0).all()
    assert repo.read_table("refcat").num_rows == report.catalog_sources
    # the true WCS differs from the planned one by the pointing error (arcminutes)
    from sphx.wcs import cube_wcs

    w = cube_wcs(truth, band=1, obs=int(truth["obs"][0]))
    sim = Simulator({**SMALL, "survey": {"n_exposures": 3}})
    planned = sim.planned_wcs(0, 1).pixel_to_world(124, 124)
    assert 0.01 < w.pixel_to_world(124, 124).separation(planned).arcmin < 10
    # the stored truth gives back the true current into every pixel, and the raw level the exact slopes
    im = sim.step()[1]
    first = truth.isel(obs=0).sel(band=1)
    current = (first["IMAGE"] / exact["ABS_GAIN"].sel(band=1) + exact["DARK"].sel(band=1) + first["PERSIST"]).values
    live = np.isfinite(current)
    assert np.allclose(current[live], im.current[live], rtol=1e-5, atol=1e-6)
    assert np.array_equal(raw["IMAGE"].isel(obs=0).sel(band=1).values, im.raw)
    with pytest.raises(SimulationError, match="already holds exposures"):
        simulate_survey({**SMALL, "survey": {"n_exposures": 1}}, tmp_path / "repo")


def test_simulate_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sphx", "simulate", str(tmp_path / "r"), "--set",
                           "instrument=SPHEREx-small", "--set", "survey.n_exposures=1", "--set", "bands=[3]"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "simulated 1 exposure(s) x 1 band(s)" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "sphx", "simulate", str(tmp_path / "s"), "--set", "survey.n_exposures=-2"],
                         capture_output=True, text=True, check=False, timeout=300)
    assert bad.returncode == 2 and "survey.n_exposures" in bad.stderr


def test_reference_pixels_and_phantom_reads_carry_the_channel_offsets(run):
    sim, images = run
    inst = sim.instrument
    ref, nr = inst.n_reference, inst.n_raw
    band = 4  # MWIR: channels run right to left in the stored frame
    det = sim.detectors[band]
    ch = inst.readout_channel(band, inst.pixel_coords(reference_pixels=True))
    rows = np.r_[0:ref, nr - ref:nr]
    sigma_e = np.sqrt(slope_variance(0.0, det.read_noise[rows], n_frames=74, frame_time=inst.frame_time))
    for im in (images[0][band], images[7][band]):
        for c in range(inst.n_readout_channels):
            cols = np.flatnonzero(ch == c)
            border = im.raw[np.ix_(rows, cols)] - im.offset[rows][:, [c]]
            sigma = sigma_e[:, cols] / det.gain[c]
            assert abs(border.mean()) < 5 * np.sqrt((sigma**2).sum()) / border.size
            phantom = im.phantom[:, c, :] - im.offset[:, [c]]
            assert abs(phantom.mean()) < 5 * phantom.std() / np.sqrt(phantom.size)
    # offsets drift from exposure to exposure around the static value of simulation_truth
    drift = images[7][band].offset.mean(axis=0) - images[0][band].offset.mean(axis=0)
    assert np.all(drift != 0) and np.std(drift) < 10 * sim.config.detector.reference_drift
    static = images[0][band].offset.mean(axis=0) - det.offset
    assert np.std(static) < 5 * sim.config.detector.reference_drift
