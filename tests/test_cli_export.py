"""``sphx export-calibration``: any version of a calibration product in its archive format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from sphx.cli import export_calibration, main
from sphx.errors import CalibrationError, CalibrationNotFoundError
from sphx.io.fits.calibration import read_calibration_product, read_gain_factors
from sphx.testing import gain_product

BANDS = [1, 4]


def dark(inst, seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    shape = (len(BANDS), inst.n_active, inst.n_active)
    pix = inst.pixel_coords(reference_pixels=False)
    return xr.Dataset(
        {"DARK": (("band", "y", "x"), rng.normal(0.01, 0.003, shape).astype(np.float32), {"units": "electron / s"}),
         "DARK_ERR": (("band", "y", "x"), rng.uniform(1e-4, 1e-3, shape).astype(np.float32),
                      {"units": "electron / s"})},
        coords={"band": np.asarray(BANDS, np.int64), "y": pix, "x": pix},
    )


@pytest.fixture
def calib_repo(repo, inst):
    """dark v1 (lab) and v2 (a solver's), flat_field v1, gain_factors v1."""
    repo.write_calibration("dark", dark(inst, 1), provenance={"source": "lab"})
    repo.write_calibration("dark", dark(inst, 2), provenance={"solver": "dark_flat"})
    flat = xr.Dataset({"FLAT": (("band", "y", "x"), np.ones((2, inst.n_active, inst.n_active), np.float32),
                                {"units": ""})}, coords=dark(inst, 0).coords)
    repo.write_calibration("flat_field", flat, provenance={"solver": "dark_flat"})
    gains = np.linspace(1.0, 2.0, len(BANDS) * inst.n_readout_channels).reshape(len(BANDS), -1)
    repo.write_calibration("gain_factors", gain_product(gains, BANDS), provenance={"source": "lab"})
    return repo


def export(repo, *args):
    return CliRunner().invoke(main, ["export-calibration", repo.location, *args])


def test_each_version_exports_its_own_values(calib_repo, inst, tmp_path):
    written = {}
    for version in (1, 2):
        out = tmp_path / f"v{version}"
        result = export(calib_repo, "dark", "--version", str(version), "-o", str(out))
        assert result.exit_code == 0, result.output
        paths = [Path(line) for line in result.output.split()]
        assert sorted(paths) == sorted(out.iterdir())
        assert [p.name.split("_spx_")[0] for p in paths] == ["dark_D1", "dark_D4"]
        assert all(f"_spx_cal-drk-v{version}-" in p.name for p in paths)
        expected = dark(inst, version)
        for path, band in zip(paths, BANDS, strict=True):
            back = read_calibration_product(path)
            assert back["band"].values.tolist() == [band]
            for var in ("DARK", "DARK_ERR"):
                np.testing.assert_array_equal(back[var].values, expected[var].sel(band=[band]).values)
            xr.testing.assert_equal(back["DARK"], calib_repo.open_calibration("dark", version)["DARK"]
                                    .sel(band=[band]).compute().assign_attrs(back["DARK"].attrs))
        written[version] = paths
    # default: the latest version, named by the date the version was written
    result = export(calib_repo, "dark", "-o", str(tmp_path / "latest"))
    assert result.exit_code == 0, result.output
    assert [Path(p).name for p in result.output.split()] == [p.name for p in written[2]]


def test_band_selection_and_date(calib_repo, tmp_path):
    result = export(calib_repo, "dark", "--band", "4", "--date", "2025-06-13", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(tmp_path / "dark_D4_spx_cal-drk-v2-2025-164.fits")]
    result = export(calib_repo, "dark", "-b", "2", "-o", str(tmp_path))
    assert result.exit_code == 2 and "error: calibration product 'dark' v2 has no band(s) [2]; its bands: [1, 4]" \
        in result.output


def test_existing_files_need_overwrite(calib_repo, tmp_path):
    args = ("dark", "--version", "1", "-o", str(tmp_path))
    assert export(calib_repo, *args).exit_code == 0
    result = export(calib_repo, *args)
    assert result.exit_code == 2 and "exists (overwrite it with --overwrite" in result.output
    assert export(calib_repo, *args, "--overwrite").exit_code == 0


def test_gain_factors_export_as_yaml(calib_repo, tmp_path):
    result = export(calib_repo, "gain_factors", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    (path,) = result.output.split()
    assert path.endswith(".yaml")
    xr.testing.assert_equal(read_gain_factors(path)["GAIN"],
                            calib_repo.open_calibration("gain_factors")["GAIN"].assign_attrs(
                                read_gain_factors(path)["GAIN"].attrs))


def test_product_without_archive_format(calib_repo, tmp_path):
    out = tmp_path / "out"
    result = export(calib_repo, "flat_field", "-o", str(out))
    assert result.exit_code == 2
    assert "calibration product 'flat_field' has no archive format" in result.output
    assert "the archive folds the flat field into abs_gain_matrix" in result.output
    assert "Products that can be exported: abs_gain_matrix, average_psf, dark," in result.output
    assert not out.exists()
    with pytest.raises(CalibrationError, match=r"Products that can be exported: .*gain_factors"):
        export_calibration(calib_repo, "flat_field", out)


def test_unknown_product_or_version(calib_repo, tmp_path):
    result = export(calib_repo, "drak", "-o", str(tmp_path))
    assert result.exit_code == 2 and "error: unknown calibration product 'drak'. Products that can be exported:" \
        in result.output
    result = export(calib_repo, "abs_gain_matrix", "-o", str(tmp_path))  # exportable, not stored
    assert result.exit_code == 2 and "no calib product 'abs_gain_matrix'" in result.output
    result = export(calib_repo, "dark", "--version", "3", "-o", str(tmp_path))
    assert result.exit_code == 2 and "error: calib product 'dark' has no version 3; versions: [1, 2]" in result.output
    result = export(calib_repo, "dark", "--version", "two", "-o", str(tmp_path))
    assert result.exit_code == 2 and "'two' is not a version number" in result.output
    result = CliRunner().invoke(main, ["export-calibration", str(tmp_path / "nowhere"), "dark", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "error: no sphx repository at" in result.output
    with pytest.raises(CalibrationNotFoundError):
        export_calibration(calib_repo, "dark", tmp_path, version=3)


def test_info_shows_what_wrote_each_version(calib_repo):
    result = CliRunner().invoke(main, ["info", calib_repo.location])
    assert result.exit_code == 0, result.output
    assert "calibration dark: versions [1, 2] (v1 lab, v2 dark_flat)" in result.output
    assert "calibration flat_field: versions [1] (v1 dark_flat)" in result.output
