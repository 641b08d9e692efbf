"""Validate Sample-up-the-ramp: read noise, slope pulls and drift against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import xarray as xr

from sphx import flags
from sphx.errors import CalibrationError, ConfigError, StepError
from sphx.io import Repository
from sphx.level1.engineering_units import convert_to_engineering_units
from sphx.level1.preamp import correct_preamplifier
from sphx.level1.sur import SUR_VARIABLES, sur_statistics, validate_sur
from sphx.level2.reference_pixels import remove_reference_pixels
from sphx.pipeline.step import instrument_of
from sphx.testing import gain_product, raise_if_dask_computes

SUR = list(SUR_VARIABLES)


def _sur(ds: xr.Dataset) -> xr.Dataset:
    return ds[SUR].compute()


# -- the simulated survey (4 full-sample pixels per image, 3 bands x 8 exposures) ---------


@pytest.fixture(scope="module")
def survey_l1(survey_path):
    repo = Repository.open(survey_path)
    gains = repo.open_calibration("gain_factors")
    raw = repo.open_level("raw")
    l1 = correct_preamplifier(convert_to_engineering_units(raw, calib={"gain_factors": gains}))
    table = repo.read_table("fullsample")
    truth = repo.open_state("simulation_truth").compute()
    return l1, gains, table, truth, raw


@pytest.fixture(scope="module")
def survey_sur(survey_l1):
    l1, gains, table, _, _ = survey_l1
    return _sur(validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": table}))


def _pixel_gain(table: pa.Table, gains: xr.Dataset, instrument) -> np.ndarray:
    band = table.column("band").to_numpy().astype(int)
    x = table.column("x").to_numpy()
    out = np.empty(len(band))
    for b in np.unique(band):
        sel = band == b
        out[sel] = gains["GAIN"].sel(band=b).values[instrument.readout_channel(int(b), x[sel])]
    return out


def test_counts_units_and_laziness(survey_l1, survey_sur):
    l1, gains, table, _, _ = survey_l1
    with raise_if_dask_computes():
        out = validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": table})
    assert out["sur_read_noise"].data.numblocks == (3, 8)  # one task per image
    fullsample = (l1["FLAGS"] & np.uint32(flags.Flag.FULLSAMPLE)) != 0
    expected = fullsample.sum(("y", "x")).compute()
    assert int(expected.min()) == 4
    np.testing.assert_array_equal(survey_sur["sur_npix"], expected)
    np.testing.assert_array_equal(survey_sur["sur_nused"], expected)
    assert int(survey_sur["sur_njump"].sum()) == 0
    assert survey_sur["sur_read_noise"].attrs["units"] == "electron"
    assert survey_sur["sur_drift"].attrs["units"] == "electron / s"
    assert survey_sur["sur_pass"].dtype == bool and "units" not in survey_sur["sur_pass"].attrs
    assert any(h.startswith("Validate Sample-up-the-ramp, sphx validate_sur") for h in out.attrs["history"])


def test_read_noise_matches_truth(survey_l1, survey_sur):
    _, _, table, truth, _ = survey_l1
    rows = table.to_pandas()
    for band in (1, 3, 6):
        pix = rows[rows.band == band][["y", "x"]].drop_duplicates()
        rn = truth["READNOISE"].sel(band=band).values[pix.y.values, pix.x.values]
        true_rms = np.sqrt(np.mean(rn**2))
        measured = survey_sur["sur_read_noise"].sel(band=band).values
        # 4 pixels x 72 second differences: ~6 % per image, ~2 % over 8 exposures
        assert np.all(np.abs(measured / true_rms - 1) < 0.2), (band, measured, true_rms)
        assert abs(np.sqrt(np.mean(measured**2)) / true_rms - 1) < 0.04, (band, measured, true_rms)


def test_slope_pulls_after_preamp_and_drift_consistent_with_zero(survey_sur):
    pull = survey_sur["sur_slope_pull"].values
    assert np.all(np.abs(pull) < 0.05), pull  # residual offsets after the preamplifier correction
    assert abs(np.mean(pull)) < 0.01
    z = (survey_sur["sur_drift"] / survey_sur["sur_drift_error"]).values
    assert np.all(np.abs(z) < 4), z
    assert 0.3 < np.mean(z**2) < 2.0, np.mean(z**2)
    assert bool(survey_sur["sur_pass"].all())


def test_uncorrected_offsets_show_in_the_pulls(survey_l1, survey_sur):
    _, gains, table, _, raw = survey_l1
    l1 = convert_to_engineering_units(raw, calib={"gain_factors": gains})
    out = _sur(validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": table}))
    # the same reads, the same fits: the slope difference is the offset the preamp step removes
    removed = (l1["IMAGE"] - survey_l1[0]["IMAGE"]).compute()
    rows = table.filter(pc.equal(table.column("frame"), 0)).to_pandas()
    for (band, obsid), grp in rows.groupby(["band", "obsid"]):
        obs = int(np.flatnonzero(raw["obsid"].values == obsid)[0])
        offset = removed.sel(band=band).isel(obs=obs).values[grp.y.values + 4, grp.x.values + 4]
        got = float(out["sur_slope_diff"].sel(band=band).isel(obs=obs))
        assert abs(np.median(offset)) > 0.01
        assert got == pytest.approx(np.median(offset), abs=5e-3)  # up to the preamp fit's residual
    off = np.abs(out["sur_slope_pull"].values) > 1.0  # the default max_slope_pull
    assert off.sum() >= 16, out["sur_slope_pull"].values
    assert not out["sur_pass"].values[off].any()
    np.testing.assert_allclose(out["sur_read_noise"], survey_sur["sur_read_noise"])


def test_injected_drift_is_detected(survey_l1, survey_sur):
    l1, gains, table, _, _ = survey_l1
    instrument = instrument_of(l1)
    a = 0.05  # [electron / s^2]: a ramp bending up by a t^2
    t = table.column("time").to_numpy()
    adu = table.column("adu").to_numpy() + a * t**2 / _pixel_gain(table, gains, instrument)
    bent = table.set_column(table.schema.get_field_index("adu"), "adu", pa.array(adu.astype(np.float32)))
    out = _sur(validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": bent}))
    # the OLS slope of a t^2 is 2 a mean(t): the halves' means are 37 frames apart
    expected = 2 * a * 37 * instrument.frame_time
    np.testing.assert_allclose(out["sur_drift"] - survey_sur["sur_drift"], expected, rtol=1e-3)
    assert np.all(out["sur_drift"] / out["sur_drift_error"] > 8)
    assert int(out["sur_njump"].sum()) == 0
    assert not bool(out["sur_pass"].any())
    # second differences of a parabola are constant and do not raise the read noise; only the
    # Poisson term subtracted, 2 i dt / 6 per pixel, follows the steeper refitted slope i
    frames = np.arange(instrument.n_discarded_frames, instrument.n_frames)
    steeper = 2 * a * frames.mean() * instrument.frame_time
    np.testing.assert_allclose(out["sur_read_noise"] ** 2,
                               survey_sur["sur_read_noise"] ** 2 - 2 * steeper * instrument.frame_time / 6,
                               rtol=1e-5)


def test_injected_jump_rejects_the_ramp(survey_l1, survey_sur):
    l1, gains, table, _, raw = survey_l1
    obsid = str(raw["obsid"].values[2])
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("obsid", "band", "y", "x", "frame")}
    first = (cols["obsid"] == obsid) & (cols["band"] == 3)
    y0, x0 = cols["y"][first][0], cols["x"][first][0]
    hit = first & (cols["y"] == y0) & (cols["x"] == x0) & (cols["frame"] >= 40)
    adu = table.column("adu").to_numpy() + np.where(hit, 400.0, 0.0)  # a 400 adu particle hit
    jumped = table.set_column(table.schema.get_field_index("adu"), "adu", pa.array(adu.astype(np.float32)))
    out = _sur(validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": jumped}))
    assert int(out["sur_njump"].sel(band=3).isel(obs=2)) == 1
    assert int(out["sur_nused"].sel(band=3).isel(obs=2)) == 3
    assert int(out["sur_njump"].sum()) == 1
    others = np.ones((3, 8), bool)
    others[1, 2] = False
    np.testing.assert_array_equal(out["sur_read_noise"].values[others], survey_sur["sur_read_noise"].values[others])
    assert abs(float(out["sur_read_noise"][1, 2]) / float(survey_sur["sur_read_noise"][1, 2]) - 1) < 0.3


def test_image_without_rows_gets_nan_and_fails(survey_l1, survey_sur):
    l1, gains, table, _, raw = survey_l1
    obsid = str(raw["obsid"].values[5])
    keep = pc.invert(pc.and_(pc.equal(table.column("obsid"), obsid), pc.equal(table.column("band"), 6)))
    out = _sur(validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": table.filter(keep)}))
    empty = out.sel(band=6).isel(obs=5)
    assert int(empty["sur_npix"]) == 0 and int(empty["sur_nused"]) == 0
    assert np.isnan(float(empty["sur_read_noise"])) and np.isnan(float(empty["sur_drift"]))
    assert not bool(empty["sur_pass"])
    assert int(out["sur_npix"].sum()) == 4 * 23
    np.testing.assert_array_equal(out["sur_read_noise"].sel(band=1), survey_sur["sur_read_noise"].sel(band=1))


def test_active_frame_and_other_tables_give_the_same_result(survey_l1, survey_sur):
    l1, gains, table, _, _ = survey_l1
    active = remove_reference_pixels(l1)
    sub = active.isel(obs=[1, 4], band=[0, 2])
    out = _sur(validate_sur(sub, calib={"gain_factors": gains}, tables={"fullsample": table}))
    xr.testing.assert_allclose(out.reset_coords(drop=True),
                               survey_sur.isel(obs=[1, 4], band=[0, 2]).reset_coords(drop=True))


def test_pass_limits_follow_the_config(survey_l1, survey_sur):
    l1, gains, table, _, _ = survey_l1
    run = {"calib": {"gain_factors": gains}, "tables": {"fullsample": table}}
    loud = _sur(validate_sur(l1, expected_read_noise=20.0, **run))  # 10 e is outside 20 / 1.5 .. 20 x 1.5
    assert not bool(loud["sur_pass"].any())
    tight = _sur(validate_sur(l1, max_drift_sigma=0.5, **run))
    z = np.abs(survey_sur["sur_drift"] / survey_sur["sur_drift_error"]).values
    np.testing.assert_array_equal(tight["sur_pass"].values, z <= 0.5)
    assert 0 < int(tight["sur_pass"].sum()) < 24
    with pytest.raises(ConfigError, match="NOT_A_FLAG"):
        validate_sur(l1, exclude=("NOT_A_FLAG",), **run)


def test_errors_name_what_is_wrong(survey_l1):
    l1, gains, table, _, raw = survey_l1
    with pytest.raises(StepError, match="fullsample"):
        validate_sur(l1, calib={"gain_factors": gains})
    with pytest.raises(StepError, match="'adu'"):
        validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": table.drop_columns(["adu"])})
    late = table.set_column(table.schema.get_field_index("frame"), "frame", pc.add(table.column("frame"), 5))
    with pytest.raises(StepError, match="frame"):
        validate_sur(l1, calib={"gain_factors": gains}, tables={"fullsample": late})
    with pytest.raises(CalibrationError, match=r"\[6\]"):
        validate_sur(l1, calib={"gain_factors": gains.sel(band=[1, 3])}, tables={"fullsample": table})
    with pytest.raises(StepError, match="electron / s"):
        validate_sur(raw, calib={"gain_factors": gains}, tables={"fullsample": table})


# -- in memory: many full-sample pixels and the exact reference offsets ---------------------


@pytest.fixture(scope="module")
def dense():
    """Two exposures of bands 1 and 6 with ~300 full-sample pixels, offsets removed exactly."""
    from sphx.simulate import Simulator
    from sphx.simulate.simulator import raw_cube

    bands = [1, 6]
    sim = Simulator({"instrument": "SPHEREx-small", "seed": 5, "bands": bands,
                     "detector": {"fullsample_pixels": 20000}})
    images = [sim.step(), sim.step()]
    raw = raw_cube(sim, [0, 1], images)
    inst = sim.instrument
    parts = []
    for j, im in enumerate(images):
        for b in bands:
            fs = im[b].fullsample
            n = len(fs["y"])
            parts.append(pa.table({"obsid": pa.array([str(sim.plan.obsid[j])] * n), "band": np.full(n, b, np.int8),
                                   **{k: pa.array(v) for k, v in fs.items()}}))
    table = pa.concat_tables(parts)
    gains = gain_product(np.stack([sim.detectors[b].gain for b in bands]), bands)
    l1 = convert_to_engineering_units(raw, calib={"gain_factors": gains})
    offset = np.zeros(raw["IMAGE"].shape, np.float32)
    for i, b in enumerate(bands):
        ch = inst.readout_channel(b, raw["x"].values)
        for j, im in enumerate(images):
            offset[i, j] = im[b].offset[:, ch] * sim.detectors[b].gain[ch]
    corrected = l1.copy()
    corrected["IMAGE"] = (l1["IMAGE"] - offset).assign_attrs(l1["IMAGE"].attrs)
    out = _sur(validate_sur(corrected, calib={"gain_factors": gains}, tables={"fullsample": table}))
    return sim, images, out


def test_dense_read_noise_and_pulls_against_truth(dense):
    sim, images, out = dense
    ref = sim.instrument.n_reference
    assert np.all(out["sur_npix"].values > 250)
    for i, b in enumerate(out["band"].values):
        fs = images[0][b].fullsample
        rn = sim.detectors[b].read_noise[fs["y"][::77] + ref, fs["x"][::77] + ref]
        true_rms = np.sqrt(np.mean(rn.astype(np.float64) ** 2))
        np.testing.assert_allclose(out["sur_read_noise"][i], true_rms, rtol=0.02)
    # the exact offsets removed, on-board and ground fits of the same reads agree to float32
    assert np.all(np.abs(out["sur_slope_diff"].values) < 1e-5)
    assert np.all(np.abs(out["sur_slope_pull"].values) < 1e-4)
    assert np.all(np.abs(out["sur_drift"] / out["sur_drift_error"]).values < 4)
    assert np.all(out["sur_drift_error"].values < 0.05)  # ~300 pixels: 10x tighter than the survey's 4
    assert bool(out["sur_pass"].all())


def test_dense_jumps_are_the_particle_hits(dense):
    sim, images, out = dense
    inst = sim.instrument
    first, last = inst.n_discarded_frames, inst.n_frames - 1
    for i, b in enumerate(out["band"].values):
        for j, im in enumerate(images):
            fs, tr = im[b].fullsample, im[b].transients
            pixels = set(zip(fs["y"][::77].tolist(), fs["x"][::77].tolist(), strict=True))
            # a hit after the first fitted read steps the ramp inside the fit
            hits = {(y, x) for y, x, f in zip(tr["y"].tolist(), tr["x"].tolist(), tr["frame"].tolist(), strict=True)
                    if (y, x) in pixels and first < f <= last}
            assert int(out["sur_njump"][i, j]) == len(hits)
            assert int(out["sur_nused"][i, j]) <= int(out["sur_npix"][i, j]) - len(hits)
    assert int(out["sur_njump"].sum()) >= 1


def test_kernel_on_a_noiseless_ramp():
    """A straight ramp: zero read noise, zero drift, pull = offset / noise."""
    n_frames, first, frame_time = 20, 2, 1.5
    t = np.arange(n_frames) * frame_time
    reads = np.stack([3.0 * t, 5.0 * t])  # [adu], gain 2 -> 6 and 10 electron / s
    image = np.array([[6.5, 10.5]])
    flags_ = np.zeros((1, 2), np.uint32)
    npix, nused, njump, rn, diff, pull, drift, err = sur_statistics(
        image, flags_, reads, np.array([0, 0]), np.array([0, 1]), np.array([2.0, 2.0]), first=first,
        last=n_frames - 1, frame_time=frame_time, exclude=int(flags.Flag.TRANSIENT), jump_threshold=5.0)
    assert (npix, nused, njump) == (2, 2, 0)
    assert rn == pytest.approx(0.0, abs=1e-6)
    assert diff == pytest.approx(0.5)
    assert drift == pytest.approx(0.0, abs=1e-9)
    from sphx.kernels.ramp import slope_variance

    sigma = np.sqrt(slope_variance(np.array([6.0, 10.0]), np.zeros(2), n_frames=18, frame_time=frame_time))
    assert pull == pytest.approx(np.median(0.5 / sigma))
    assert err > 0
