import dask.array as da
import numpy as np
import pytest
import xarray as xr
from astropy.io.fits import Header
from astropy.wcs import WCS

from sphx import SPHEREX, flags, make_cube, nominal_spectral_maps, validate_cube
from sphx.cube import STRING_DTYPE
from sphx.errors import CubeValidationError
from sphx.obsid import obs_key
from sphx.testing import raise_if_dask_computes
from sphx.wcs import arrays_to_wcs, cube_wcs, tan_wcs, wcs_to_arrays

from .conftest import DATA

OBSIDS = ["2025W51_1A_0684_1", "2025W51_1A_0684_2"]


def small_cube(inst, level="l2", **kw):
    n = inst.n_active if level in ("l2", "l2a") else inst.n_raw
    shape = (2, 2, n, n)
    extra = {"variance": np.ones(shape), "zodi": np.ones(shape)} if level == "l2" else {}
    if level == "l2a":
        extra = {"variance": np.ones(shape)}
    return make_cube(np.zeros(shape), level=level, obsid=OBSIDS, mjd_avg=[61027.2, 61027.21], instrument=inst,
                     bands=[1, 4], **{**extra, **kw})


def test_data_model(inst):
    ds = small_cube(inst, "l2")
    assert ds["IMAGE"].dims == ("band", "obs", "y", "x")
    assert {v: str(ds[v].dtype) for v in ("IMAGE", "FLAGS", "VARIANCE", "ZODI")} == {
        "IMAGE": "float32", "FLAGS": "uint32", "VARIANCE": "float32", "ZODI": "float32"}
    assert ds["IMAGE"].attrs["units"] == "MJy / sr" and ds["VARIANCE"].attrs["units"] == "MJy2 / sr2"
    assert ds["obs"].values.tolist() == [obs_key(o) for o in OBSIDS] and ds["obs"].dtype == np.int64
    assert ds["obsid"].dtype == STRING_DTYPE
    assert ds["xposure"].values[0] == pytest.approx(113.5826)
    assert ds["mjd_end"].values[0] - ds["mjd_beg"].values[0] == pytest.approx(113.5826 / 86400)
    assert ds["FLAGS"].attrs["flag_meanings"].startswith("TRANSIENT")
    assert ds.attrs["instrument"]["name"] == inst.name
    validate_cube(ds, level="l2", instrument=inst)


def test_raw_frames_keep_labelled_reference_border(inst):
    ds = small_cube(inst, "raw")
    assert ds["x"].values[0] == -4 and ds["x"].values[-1] == inst.n_active + 3
    assert int(ds["x"].values.tolist().index(0)) == 4  # active pixel 0 is x=0
    border = flags.test_flag(ds["FLAGS"], "REFERENCE")
    assert bool(border.sel(x=-1).all()) and bool(border.sel(y=inst.n_active).all())
    assert not bool(border.sel(x=slice(0, inst.n_active - 1), y=slice(0, inst.n_active - 1)).any())
    trimmed = ds.sel(x=slice(0, inst.n_active - 1), y=slice(0, inst.n_active - 1))
    assert trimmed.sizes["x"] == inst.n_active


def test_lazy_inputs_stay_lazy(inst):
    n = inst.n_raw
    img = da.zeros((2, 2, n, n), chunks=(1, 1, n, n))
    with raise_if_dask_computes():
        ds = make_cube(img, level="raw", obsid=OBSIDS, mjd_avg=[1.0, 2.0], instrument=inst, bands=[1, 4])
        validate_cube(ds, level="raw", instrument=inst)
    assert isinstance(ds["IMAGE"].data, da.Array) and isinstance(ds["FLAGS"].data, da.Array)


def test_static_spectral_maps(inst):
    cw, cb = nominal_spectral_maps(inst, bands=[1, 4])
    ds = small_cube(inst, cwave=cw, cband=cb)
    assert ds["CWAVE"].dims == ("band", "y", "x") and ds["CWAVE"].attrs["units"] == "um"
    r = ds["CWAVE"] / ds["CBAND"]
    np.testing.assert_allclose(r.sel(band=4).values, 35.0, rtol=1e-6)
    assert float(ds["CWAVE"].sel(band=1).min()) > 0.75 and float(ds["CWAVE"].sel(band=1).max()) < 1.09


def test_wcs_round_trip_with_real_sip():
    header = Header.fromtextfile(DATA / "qr2_l2_image_header.txt")
    real = WCS(header)
    assert real.sip is not None
    back = arrays_to_wcs(**{k.removeprefix("wcs_"): v for k, v in wcs_to_arrays(real).items()})
    x, y = np.meshgrid(np.linspace(-300, 300, 7), np.linspace(-300, 300, 7))
    a = real.pixel_to_world(x, y)
    b = back.pixel_to_world(x, y)
    assert np.max(a.separation(b).arcsec) < 1e-6
    np.testing.assert_allclose(back.world_to_pixel(a), (x, y), atol=1e-6)


def test_cube_wcs_is_an_astropy_wcs(inst):
    w = {(4, obs_key(OBSIDS[1])): tan_wcs(ra=123.0, dec=-20.0, pa=30.0, pixel_scale=6.15, n_pixels=inst.n_active)}
    ds = small_cube(inst, wcs=w)
    got = ds.sphx.wcs(band=4, obs=OBSIDS[1])
    c = got.pixel_to_world((inst.n_active - 1) / 2, (inst.n_active - 1) / 2)
    assert c.ra.deg == pytest.approx(123.0) and c.dec.deg == pytest.approx(-20.0)
    assert got.proj_plane_pixel_scales()[0].to_value("arcsec") == pytest.approx(6.15)
    # +y points to PA 30 deg east of north
    c2 = got.pixel_to_world((inst.n_active - 1) / 2, (inst.n_active - 1) / 2 + 100)
    assert c.position_angle(c2).deg == pytest.approx(30.0, abs=0.05)
    with pytest.raises(ValueError, match="no celestial WCS"):
        cube_wcs(ds, band=1, obs=obs_key(OBSIDS[0]))


# --- the validator names exactly what is wrong -------------------------------------
def _problems(ds, **kw):
    with pytest.raises(CubeValidationError) as e:
        validate_cube(ds, **kw)
    return "\n".join(e.value.problems)


def test_missing_variable(inst):
    msg = _problems(small_cube(inst).drop_vars("ZODI"), level="l2", instrument=inst)
    assert "missing variable ZODI" in msg


def test_wrong_dtype(inst):
    ds = small_cube(inst)
    ds["FLAGS"] = ds["FLAGS"].astype(np.float64)
    assert "FLAGS has dtype float64, expected uint32" in _problems(ds, level="l2")


def test_unsorted_obs(inst):
    msg = _problems(small_cube(inst).isel(obs=[1, 0]), level="l2")
    assert "obs not sorted by time: 2025W51_1A_0684_1" in msg and "follows 2025W51_1A_0684_2" in msg


def test_duplicate_observation(inst):
    ds = small_cube(inst)
    dup = xr.concat([ds, ds.isel(obs=[1])], dim="obs")
    msg = _problems(dup, level="l2")
    assert "duplicate observation 2025W51_1A_0684_2" in msg


def test_wrong_units(inst):
    ds = small_cube(inst)
    ds["IMAGE"].attrs["units"] = "electron / s"
    assert "IMAGE has units 'electron / s', expected 'MJy / sr' at level 'l2'" in _problems(ds, level="l2")
    ds["IMAGE"].attrs["units"] = "furlongs per fortnight"
    assert "IMAGE has units" in _problems(ds, level="l2")


def test_wrong_band_and_geometry(inst):
    ds = small_cube(inst).assign_coords(band=[1, 9])
    assert "band(s) [9] not in instrument" in _problems(ds, level="l2", instrument=inst)
    msg = _problems(small_cube(inst), level="l2", instrument=SPHEREX)
    assert "y runs 0..247, expected the active frame 0..2039" in msg
    raw = small_cube(inst, "raw")
    assert "expected the active frame" in _problems(raw, level="l2a", instrument=inst)


def test_obsid_must_match_key(inst):
    ds = small_cube(inst).assign_coords(obs=[20255110106841, 20255110106899])
    assert "does not match observation id '2025W51_1A_0684_2'" in _problems(ds)


def test_constructor_checks_shapes(inst):
    with pytest.raises(CubeValidationError, match="IMAGE has shape"):
        make_cube(np.zeros((1, 2, 5, 5)), level="l2", obsid=OBSIDS, mjd_avg=[1, 2], instrument=inst, bands=[1])
    with pytest.raises(CubeValidationError, match="unknown observation metadata"):
        small_cube(inst, observations={"airmass": [1, 1]})
