import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from sphx.demo import run_demo
from sphx.errors import SphxError


def test_demo_runs_the_pipeline_and_checks_truth(tmp_path):
    lines = []
    result = run_demo(tmp_path / "out", profile="threads", n_exposures=2, log=lines.append)
    # the on-board TRANSIENT flags the quicklook counts are exactly the detectable hits injected
    assert result.transients_found == result.transients_detectable > 0
    # calibrated Level 2 images against the true sky, unflagged pixels, every band
    assert set(result.pulls) == {1, 2, 3, 4, 5, 6}
    for mean, std in result.pulls.values():
        assert abs(mean) < 0.1 and abs(std - 1) < 0.15
    # arcminute pointing errors solved from the stars; failures are flagged, never wrong
    assert result.astrometry_solved >= 9 and result.astrometry_worst < 0.1
    assert any(line.startswith("  fine astrometry: FINAST = 0") for line in lines)
    assert result.output == (tmp_path / "out").resolve()
    assert {p.name for p in result.output.iterdir()} == {".sphx-demo", "repository", "fits"}
    # the Level 2 spectral images as the archive has them, one file per detector and exposure
    assert len(result.fits_files) == 12 and all(p.parent == result.output / "fits" for p in result.fits_files)
    with fits.open(result.fits_files[0]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "PSF", "WCS-WAVE"]
    assert set(result.repository.levels()) == {"raw", "truth", "l1", "l2a", "l2"}
    # Level 3: catalogs as tables and HATS, a few recovered spectra against the truth
    assert {"l3a_photometry", "l3_primary", "l3_secondary", "l3_high_reliability"} <= set(result.repository.tables())
    assert set(result.catalogs) >= {"l3_primary", "l3_secondary"}
    assert all(str(result.output) in path for path in result.catalogs.values())
    chi2, dof = (np.array(v, float) for v in zip(*result.spectra_chi2, strict=True))
    assert dof.sum() >= 6 and np.sum(chi2 * dof) / dof.sum() < 3  # p ~ 0.005 for 6 dof
    assert any(line.startswith("level 3: ") for line in lines)
    l2 = xr.open_zarr(result.repository.level_url("l2"))
    assert l2.sizes["obs"] == 2 and int((l2["write_id"] > 0).sum()) == 12
    assert result.repository.state_versions("persistence") == [1]
    assert lines[0] == f"sphx demo: writing into {result.output}"
    assert any("simulated 2 exposure(s) x 6 band(s)" in line for line in lines)
    assert sum("zodi" in line and "MJy/sr" in line for line in lines) == 6
    # running it again replaces its own output; it never deletes anything else
    run_demo(tmp_path / "out", profile="synchronous", n_exposures=1, log=lambda s: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SphxError, match="was not made by 'sphx demo'"):
        run_demo(tmp_path / "mine", log=lambda s: None)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_demo_command_on_the_embedded_cluster(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sphx", "demo", "--exposures", "2"], cwd=tmp_path,
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"writing into {tmp_path / 'sphx-demo'}" in proc.stdout
    assert "compute: distributed.LocalCluster()" in proc.stdout and "dashboard: http" in proc.stdout
    assert (tmp_path / "sphx-demo" / "repository" / "l2.zarr" / "zarr.json").exists()


def test_demo_calibrate_needs_enough_exposures(tmp_path):
    with pytest.raises(SphxError, match="at least 24 exposures, got 4: add --exposures 24"):
        run_demo(tmp_path / "out", n_exposures=4, calibrate=True, log=lambda s: None)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow
def test_demo_solves_dark_and_flat_from_its_survey(tmp_path):
    # ~3 minutes: 24 exposures of every band
    result = run_demo(tmp_path / "out", n_exposures=24, calibrate=True, profile="threads", log=lambda s: None)
    assert result.repository.calibration_versions("dark") == [1, 2]
    for band, numbers in result.calibration.items():
        assert 0.8 < numbers["dark_rms_over_error"] < 1.1, (band, numbers)
        assert numbers["flat_rms"] < 1.2 * numbers["flat_error"], (band, numbers)
