import numpy as np
import pytest
from astropy.stats import mad_std

from sphx import flags, get_step
from sphx.errors import CalibrationError, ConfigError, StepError, UnknownStepError
from sphx.level1 import convert_to_engineering_units
from sphx.level2 import remove_reference_pixels
from sphx.quality import image_statistics
from sphx.testing import gain_product


@pytest.fixture
def l1(raw, truth):
    return convert_to_engineering_units(raw, calib={"gain_factors": gain_product(truth.gains, [1, 2, 4])})


def test_engineering_units_recover_the_photocurrent(raw, truth, l1, inst):
    assert l1["IMAGE"].attrs["units"] == "electron / s" and l1["PHANTOM"].attrs["units"] == "electron / s"
    assert l1["IMAGE"].dtype == np.float32
    active = l1["IMAGE"].sel(x=slice(0, inst.n_active - 1), y=slice(0, inst.n_active - 1))
    good = ~flags.test_flag(l1["FLAGS"], flags.DEFAULT_BAD).sel(x=active["x"], y=active["y"])
    for i, b in enumerate([1, 2, 4]):
        pix = active.sel(band=b).where(good.sel(band=b)).values
        # flat sky: every channel sits at the true level (no channel-to-channel steps remain)
        per_channel = [np.nanmean(pix[..., inst.readout_channel(b, active["x"].values) == c]) for c in range(32)]
        np.testing.assert_allclose(per_channel, truth.sky[i], atol=5 * truth.noise[i] / np.sqrt(3 * 248 * 8 / 2))


def test_engineering_units_match_an_independent_computation(raw, truth, l1, inst):
    for i, b in enumerate([1, 2, 4]):
        ch = np.arange(inst.n_raw) // inst.readout_channel_width  # detector columns
        if inst.band(b).flipped_x:
            ch = ch[::-1]
        expected = raw["IMAGE"].sel(band=b).values * truth.gains[i][ch]
        np.testing.assert_array_equal(l1["IMAGE"].sel(band=b).values, expected.astype(np.float32))
        np.testing.assert_allclose(l1["PHANTOM"].sel(band=b).values,
                                   raw["PHANTOM"].sel(band=b).values * truth.gains[i][None, None, :, None], rtol=1e-6)


def test_history_names_module_and_calibration(raw, truth, repo_with_raw):
    gains = repo_with_raw.open_calibration("gain_factors")
    out = convert_to_engineering_units(raw, calib={"gain_factors": gains})
    assert out.attrs["history"][-2:] == ["Convert to Engineering Units, sphx convert_to_engineering_units 0.1.0",
                                         "[CALIB] gain_factors v1"]
    assert raw.attrs["history"] == []  # input untouched


def test_missing_or_mismatched_calibration(raw, truth):
    with pytest.raises(CalibrationError, match="needs calibration product"):
        convert_to_engineering_units(raw)
    with pytest.raises(CalibrationError, match=r"no gains for band\(s\) \[4\]"):
        convert_to_engineering_units(raw, calib={"gain_factors": gain_product(truth.gains[:2], [1, 2])})


def test_wrong_units_are_refused(l1, truth):
    with pytest.raises(StepError, match="needs IMAGE in 'adu / s', but the cube has 'electron / s'"):
        convert_to_engineering_units(l1, calib={"gain_factors": gain_product(truth.gains, [1, 2, 4])})


def test_reference_pixels_are_removed_by_label(l1, inst):
    out = remove_reference_pixels(l1)
    assert out["x"].values.tolist() == list(range(inst.n_active)) and "PHANTOM" not in out
    np.testing.assert_array_equal(out["IMAGE"].sel(x=0, y=0).values, l1["IMAGE"].sel(x=0, y=0).values)
    assert not flags.test_flag(out["FLAGS"], "REFERENCE").any()
    with pytest.raises(StepError, match="no reference border"):
        remove_reference_pixels(out)


def test_image_statistics_match_numpy_and_astropy(l1, truth, inst):
    stats = image_statistics(remove_reference_pixels(l1)).compute()
    active = remove_reference_pixels(l1).compute()
    for b in [1, 2, 4]:
        for o in active["obs"].values:
            img = active["IMAGE"].sel(band=b, obs=o).values
            f = active["FLAGS"].sel(band=b, obs=o).values
            good = img[((f & int(flags.DEFAULT_BAD)) == 0) & np.isfinite(img)]
            s = stats.sel(band=b, obs=o)
            assert int(s["stat_npix"]) == good.size
            assert float(s["stat_median"]) == pytest.approx(float(np.median(good.astype(np.float64))), rel=1e-6)
            assert float(s["stat_mean"]) == pytest.approx(float(good.astype(np.float64).mean()), rel=1e-9)
            assert float(s["stat_std"]) == pytest.approx(float(mad_std(good.astype(np.float64))), rel=1e-5)
            assert (float(s["stat_min"]), float(s["stat_max"])) == (float(good.min()), float(good.max()))
            expected = flags.counts(f)
            assert dict(zip(stats["flag"].values.tolist(), s["flag_count"].values.tolist(), strict=True)) == expected
    i = [1, 2, 4].index(2)
    assert float(stats["stat_median"].sel(band=2).mean()) == pytest.approx(truth.sky[i], rel=2e-3)
    injected = {name: truth.flagged[name].sum() for name in truth.flagged}
    found = {name: int(stats["flag_count"].sel(flag=name).sum()) for name in injected}
    assert found == injected


def test_configs_are_validated():
    step = get_step("image_statistics")
    assert step.make_config(bad=["hot"]).bad == ("HOT",)
    with pytest.raises(ConfigError, match="unknown config key for step 'image_statistics' \\(did you mean 'bad'"):
        step.make_config(bads=["HOT"])
    with pytest.raises(ConfigError, match="unknown FLAGS bit 'WARM'"):
        step.make_config(bad=["WARM"])
    with pytest.raises(UnknownStepError, match="did you mean 'image_statistics'"):
        get_step("image_statistic")
