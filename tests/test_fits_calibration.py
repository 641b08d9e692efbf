"""Calibration products and Level 1 image files in their archive formats."""

from __future__ import annotations

import re
import shutil

import astropy.units as u
import numpy as np
import pytest
import xarray as xr
import yaml
from astropy.io import fits
from astropy.wcs import WCS

from sphx.errors import FitsFormatError
from sphx.io.fits.calibration import (
    CALIBRATION_FILES,
    read_calibration_product,
    read_gain_factors,
    read_wave_table,
    write_calibration_product,
    write_gain_factors,
)
from sphx.io.fits.level1 import read_level1_images, write_level1_image
from sphx.testing import raise_if_dask_computes
from sphx.wcs import cube_wcs

DATE = "2025-06-13"  # day 164

EXPECTED_HDUS = {
    "abs_gain_matrix": [("IMAGE", "float32")],
    "dark": [("IMAGE", "float32"), ("DARK_ERR", "float32")],
    "spectral_wcs": [("CWAVE", "float32"), ("CBAND", "float32"), ("WCS-WAVE", None)],
    "dichroic": [("IMAGE", "uint8")],
    "nonfunc": [("IMAGE", "uint8")],
    "nonlinear_pars": [("Q_NL", "float32"), ("B1", "float32"), ("B2", "float32"), ("B3", "float32"),
                       ("QMAX", "float32")],
    "readnoise_pars": [("READNOISE-1", "float32"), ("READNOISE-2", "float32")],
    "solid_angle_pixel_map": [("IMAGE", "float32")],
    "average_psf": [("PSF-DATA-CUBE", "float32")],
}
PATTERNS = {
    "abs_gain_matrix": r"abs_gain_matrix_D4_spx_cal-agm-v3-2025-164\.fits",
    "dark": r"dark_D4_spx_cal-drk-v3-2025-164\.fits",
    "average_psf": r"average_psf_D4_spx_cal-psf-v3-2025-164\.fits",
    "spectral_wcs": r"spectral_wcs_D4_spx_cal-wcs-v3-2025-164\.fits",
    "dichroic": r"dichroic_D4_spx_base-2025-164\.fits",
    "nonfunc": r"nonfunc_D4_spx_base-2025-164\.fits",
    "nonlinear_pars": r"nonlinear_pars_D4_spx_base-2025-164\.fits",
    "readnoise_pars": r"readnoise_pars_D4_spx_base-2025-164\.fits",
    "solid_angle_pixel_map": r"solid_angle_pixel_map_D4_spx_cal-sapm-v3-2025-164\.fits",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from sphx.demo import recipe_path
    from sphx.pipeline.runner import run_recipe
    from sphx.simulate import simulate_survey

    root = tmp_path_factory.mktemp("fitscal")
    repo = simulate_survey({"instrument": "SPHEREx-small", "seed": 6, "bands": [1, 4],
                            "survey": {"n_exposures": 2}}, root / "repo").repository
    run_recipe(recipe_path("l1-l2"), repo, profile="synchronous", progress=False, log=lambda s: None)
    return repo


@pytest.fixture(scope="module")
def exported(repo, tmp_path_factory):
    """Every FITS product of band 4 exported once: {name: path}."""
    folder = tmp_path_factory.mktemp("cal")
    return {name: write_calibration_product(repo.open_calibration(name), name, folder, band=4, version=3, date=DATE)
            for name in CALIBRATION_FILES}


def test_every_named_product_has_a_format():
    assert set(CALIBRATION_FILES) == set(PATTERNS)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_product_round_trip_exact(repo, exported, name):
    path = exported[name]
    assert re.fullmatch(PATTERNS[name], path.name)
    ref = repo.open_calibration(name).sel(band=[4]).compute()
    back = read_calibration_product(path)
    # Pixel data, dims, coordinates (zone_x/zone_y, psf offsets) exactly.
    xr.testing.assert_identical(back.drop_attrs(), ref.drop_attrs())
    for var in ref.data_vars:
        assert back[var].dtype == ref[var].dtype
        assert u.Unit(back[var].attrs["units"]) == u.Unit(ref[var].attrs["units"])
    assert back.attrs["sphx_product"] == name
    if "oversampling" in ref.attrs:
        assert back.attrs["oversampling"] == ref.attrs["oversampling"]
    # Re-import into the repository: accepted, and reads back the same.
    version = repo.write_calibration(name, back)
    xr.testing.assert_equal(repo.open_calibration(name, version), back)


@pytest.mark.parametrize("name", sorted(EXPECTED_HDUS))
def test_product_hdus(exported, name):
    with fits.open(exported[name]) as hdul:
        primary = hdul[0].header
        assert hdul[0].data is None
        assert primary["TELESCOP"] == "SPHEREx" and primary["INSTRUME"] == "SPHEREx"
        assert primary["DETECTOR"] == 4 and "DATE" in primary
        from packaging.version import Version

        Version(primary["VERSION"])  # PEP 440
        got = [(h.name, None if isinstance(h, fits.BinTableHDU) else h.data.dtype.newbyteorder("=").name)
               for h in hdul[1:]]
        assert got == [(n, d if d is None else np.dtype(d).name) for n, d in EXPECTED_HDUS[name]]
        for h in hdul[1:]:
            if isinstance(h, fits.ImageHDU):
                u.Unit(h.header["BUNIT"])  # parses
                assert h.data.shape == ((121, 101, 101) if name == "average_psf" else (248, 248))


def test_sapm_and_gain_units(exported):
    assert u.Unit(fits.getheader(exported["solid_angle_pixel_map"], "IMAGE")["BUNIT"]) == u.arcsec**2
    agm = u.Unit(fits.getheader(exported["abs_gain_matrix"], "IMAGE")["BUNIT"])
    assert agm == (u.MJy / u.sr) / (u.electron / u.s)
    assert u.Unit(fits.getheader(exported["dark"], "DARK_ERR")["BUNIT"]) == u.electron / u.s


def test_readnoise_second_component_adds_in_quadrature(repo, exported, tmp_path):
    path = tmp_path / exported["readnoise_pars"].name
    with fits.open(exported["readnoise_pars"]) as hdul:
        hdul["READNOISE-2"].data = np.full_like(hdul["READNOISE-1"].data, 3.0)
        hdul.writeto(path)
    ref = repo.open_calibration("readnoise_pars").sel(band=[4])["READNOISE"].values
    np.testing.assert_allclose(read_calibration_product(path)["READNOISE"].values, np.hypot(ref, 3.0), rtol=1e-6)


def test_psf_zone_keywords(repo, exported):
    ref = repo.open_calibration("average_psf")
    h = fits.getheader(exported["average_psf"], "PSF-DATA-CUBE")
    assert h["OVERSAMP"] == 10 and h["CTYPE1"] == "XANG" and h["CTYPE2"] == "YANG"
    assert h["CRPIX1"] == 51 and h["CDELT1"] == pytest.approx(0.615)
    xctr = np.array([h[f"XCTR_{i + 1}"] for i in range(121)])
    yctr = np.array([h[f"YCTR_{i + 1}"] for i in range(121)])
    np.testing.assert_array_equal(xctr, ref["zone_x"].values)
    np.testing.assert_array_equal(yctr, ref["zone_y"].values)
    # x-first: plane = iy * 11 + ix + 1, the "(ix, iy)" in the comments says so
    for plane in (1, 2, 11, 12, 121):
        ix, iy = (plane - 1) % 11, (plane - 1) // 11
        for key in ("XCTR", "YCTR", "XWID", "YWID"):
            m = re.search(r"\((\d+)\s*,\s*(\d+)\)", h.comments[f"{key}_{plane}"])
            assert m and (int(m.group(1)), int(m.group(2))) == (ix, iy)
    assert xctr[1] > xctr[0] and yctr[1] == yctr[0] and yctr[11] > yctr[0]
    extra = [k for k in h if k.startswith("XCT") and not re.fullmatch(r"XCTR_\d+", k)]
    assert extra == []


def test_spectral_wcs_table_reproduces_cwave(repo, exported):
    ref = repo.open_calibration("spectral_wcs").sel(band=4)
    x, y, values = read_wave_table(exported["spectral_wcs"])
    assert values.dtype.newbyteorder("=") == np.float32 and values.shape == (len(y), len(x), 2)
    assert len(x) >= 11 and len(y) >= 11 and x[0] == 1 and x[-1] == 248  # 1-based detector pixels
    assert fits.getheader(exported["spectral_wcs"], "WCS-WAVE")["TDIM3"] == f"(2,{len(x)},{len(y)})"
    # Bilinear interpolation at every pixel (1-based coordinates p + 1).
    p = np.arange(248) + 1.0
    for c, var in enumerate(("CWAVE", "CBAND")):
        truth = ref[var].values.astype(np.float64)
        # interpolate along x first, then y: rows are per table y
        grid = np.array([[np.interp(px, x, values[j, :, c]) for px in p] for j in range(len(y))])
        full = np.array([np.interp(p, y, grid[:, i]) for i in range(248)]).T
        assert np.nanmax(np.abs(full - truth)) < 1e-3  # um: 1 nm


def test_gain_factors_yaml_round_trip(repo, tmp_path):
    ref = repo.open_calibration("gain_factors")
    path = write_gain_factors(ref, tmp_path, date=DATE)
    assert path.name == "gain_factors_spx_base-2025-164.yaml"
    doc = yaml.safe_load(path.read_text())
    assert sorted(doc["DETECTORS"]) == [1, 4] and all(len(v) == 32 for v in doc["DETECTORS"].values())
    back = read_gain_factors(path)
    xr.testing.assert_identical(back.drop_attrs(), ref.compute().drop_attrs())
    assert back["GAIN"].dtype == np.float32
    assert read_calibration_product(path).identical(back)
    repo.write_calibration("gain_factors", back)
    doc["DETECTORS"][4] = doc["DETECTORS"][4][:31]
    bad = tmp_path / "gain_factors_spx_base-2025-165.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(FitsFormatError, match="32 gain factors"):
        read_gain_factors(bad)


def test_writes_are_atomic_and_refuse_overwrite(repo, exported):
    folder = exported["dark"].parent
    with pytest.raises(FileExistsError):
        write_calibration_product(repo.open_calibration("dark"), "dark", folder, band=4, version=3, date=DATE)
    write_calibration_product(repo.open_calibration("dark"), "dark", folder, band=4, version=3, date=DATE,
                              overwrite=True)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------


def _copy(src, dst, edit):
    with fits.open(src) as hdul:
        edit(hdul)
        hdul.writeto(dst)
    return dst


def test_bad_calibration_files(exported, tmp_path):
    dark = exported["dark"]
    missing = _copy(dark, tmp_path / dark.name, lambda h: h.pop(2))
    with pytest.raises(FitsFormatError, match="missing HDU 'DARK_ERR'") as e:
        read_calibration_product(missing)
    assert e.value.file == str(missing) and e.value.hdu == "DARK_ERR"

    d2 = tmp_path / "shape"
    d2.mkdir()
    def shrink(h):
        h["DARK_ERR"].data = h["DARK_ERR"].data[:10]
    with pytest.raises(FitsFormatError, match="square 2-D"):
        read_calibration_product(_copy(dark, d2 / dark.name, shrink))

    d3 = tmp_path / "trunc"
    d3.mkdir()
    raw = dark.read_bytes()
    (d3 / dark.name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FitsFormatError, match=re.escape(dark.name)):
        read_calibration_product(d3 / dark.name)

    unknown = tmp_path / "flat_D4_spx_base-2025-164.fits"
    shutil.copy(exported["nonfunc"], unknown)
    with fits.open(unknown, mode="update") as h:
        del h[0].header["SPHX PRODUCT"]
    with pytest.raises(FitsFormatError, match="pattern"):
        read_calibration_product(unknown)

    wrong = tmp_path / exported["nonfunc"].name.replace("nonfunc", "dichroic")
    shutil.copy(exported["nonfunc"], wrong)
    with pytest.raises(FitsFormatError, match="holds product 'nonfunc'"):
        read_calibration_product(wrong)

    other = tmp_path / "dark_D4_spx_cal-drk-v1-2025-164.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4), np.float32))]).writeto(other)
    with pytest.raises(FitsFormatError, match="not 'SPHEREx'"):
        read_calibration_product(other)

    notfits = tmp_path / "nonfunc_D4_spx_base-2025-164.fits"
    notfits.write_text("hello")
    with pytest.raises(FitsFormatError, match="nonfunc_D4"):
        read_calibration_product(notfits)


# ---------------------------------------------------------------------------------------
# Level 1 image files
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def l1_files(repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("l1")
    l1 = repo.open_level("l1")
    return [write_level1_image(l1, folder / f"level1_{o}D{b}.fits", band=int(b), obs=int(o))
            for b in l1["band"].values for o in l1["obs"].values]


def test_level1_round_trip_exact_and_lazy(repo, l1_files):
    l1 = repo.open_level("l1")
    with raise_if_dask_computes():
        back = read_level1_images(l1_files)
    assert back["IMAGE"].chunks is not None
    back = back.compute()
    ref = l1.compute()
    xr.testing.assert_identical(back.drop_attrs(), ref.drop_attrs())
    assert back.attrs == ref.attrs
    assert back["FLAGS"].dtype == np.uint32 and back["IMAGE"].dtype == np.float32
    assert back["IMAGE"].attrs["units"] == "electron / s" and "units" not in back["FLAGS"].attrs
    assert back["FLAGS"].attrs["flag_meanings"] == ref["FLAGS"].attrs["flag_meanings"]
    # a subset of files gives the subset of the cube
    with raise_if_dask_computes():
        part = read_level1_images(l1_files[:2])
    xr.testing.assert_equal(part.compute().drop_attrs(), ref.isel(band=[0], obs=[0, 1]).drop_attrs())


def test_level1_header_and_sky_wcs(repo, l1_files):
    l1 = repo.open_level("l1")
    band, obs = int(l1["band"].values[1]), int(l1["obs"].values[-1])
    path = next(p for p in l1_files if p.name == f"level1_{obs}D{band}.fits")
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "FLAGS", "PHANTOM", "SPHX-META"]
        h = hdul["IMAGE"].header
        assert hdul["FLAGS"].data.dtype.name.endswith("int32") and hdul["FLAGS"].header["EXTTYPE"] == "MASK"
        assert hdul["FLAGS"].header["MP_SOURCE"] == 21
        u.Unit(h["BUNIT"])
        assert h["DETECTOR"] == band and h["OBSID"] == str(l1["obsid"].sel(obs=obs).values)
        assert h["EXPIDN"] == obs * 10 + band
        for key in ("DATE-OBS", "MJD-BEG", "MJD-AVG", "MJD-END", "XPOSURE", "TELAPSE", "TSAMP", "SURLIM",
                    "NCHANNEL", "X_SC", "VZ_SC_END", "L1DQAFLG", "CRPIX1A"):
            assert key in h, key
        assert h["MJD-AVG"] == float(l1["mjd_avg"].sel(obs=obs).values)
        assert any("Convert to Engineering Units" in line for line in h["HISTORY"])
        wcs = WCS(h)
    ref = cube_wcs(l1, band=band, obs=obs)
    # array pixel i is cube pixel x[0] + i (the written frame starts with the reference border)
    x0, y0 = int(l1["x"].values[0]), int(l1["y"].values[0])
    xs, ys = np.meshgrid(np.linspace(0, 247, 7), np.linspace(0, 247, 7))
    a = wcs.pixel_to_world(xs - x0, ys - y0)
    b = ref.pixel_to_world(xs, ys)
    assert np.max(a.separation(b).arcsec) < 0.01


def test_bad_level1_files(l1_files, tmp_path):
    src = l1_files[0]
    with pytest.raises(FitsFormatError, match="missing HDU 'FLAGS'") as e:
        read_level1_images([_copy(src, tmp_path / "a.fits", lambda h: h.pop(2))])
    assert e.value.file.endswith("a.fits")

    def shrink(h):
        h["FLAGS"].data = h["FLAGS"].data[:5]
    with pytest.raises(FitsFormatError, match="differs from IMAGE"):
        read_level1_images([_copy(src, tmp_path / "b.fits", shrink)])
    raw = src.read_bytes()
    (tmp_path / "c.fits").write_bytes(raw[: len(raw) - 5000])
    with pytest.raises(FitsFormatError, match=re.escape("c.fits")):
        read_level1_images([tmp_path / "c.fits"])
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4)), name="IMAGE")]).writeto(tmp_path / "d.fits")
    with pytest.raises(FitsFormatError, match="not 'SPHEREx'"):
        read_level1_images([tmp_path / "d.fits"])
