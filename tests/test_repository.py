import json
import os
import subprocess
import sys
import textwrap
import warnings

import dask
import dask.array as da
import numpy as np
import pyarrow.compute as pc
import pytest
import xarray as xr

from sphx import Repository, open_repository
from sphx.errors import (
    CalibrationError,
    CalibrationNotFoundError,
    CubeValidationError,
    DuplicateExposureError,
    IncompleteWriteWarning,
    OrderError,
    RepositoryLockedError,
    RepositoryNotFoundError,
    SelectionError,
    WriteError,
)
from sphx.testing import gain_product, raise_if_dask_computes, synthetic_raw_cube

from .conftest import assert_cubes_equal, tree_digest


def test_round_trip_is_exact(repo, raw):
    report = repo.write_level("raw", raw)
    assert (report.written, report.new_obs, report.skipped) == (9, 3, 0)
    back = repo.open_level("raw")
    assert_cubes_equal(back, raw)
    assert back.attrs == raw.attrs  # instrument, history
    assert back["FLAGS"].attrs == raw["FLAGS"].attrs and back["IMAGE"].attrs == raw["IMAGE"].attrs


def test_round_trip_of_an_eager_cube(repo, raw):
    eager = raw.compute()
    repo.write_level("raw", eager)
    assert_cubes_equal(repo.open_level("raw"), eager)


def test_plain_xarray_reads_a_level_without_sphx(repo, raw):
    repo.write_level("raw", raw)
    code = textwrap.dedent(f"""
        import json, sys, xarray as xr
        ds = xr.open_zarr({repo.level_url("raw")!r})
        assert "sphx" not in sys.modules
        print(json.dumps({{
            "units": ds["IMAGE"].attrs["units"],
            "meanings": ds["FLAGS"].attrs["flag_meanings"],
            "masks": ds["FLAGS"].attrs["flag_masks"],
            "bands": ds["band"].values.tolist(),
            "complete": int((ds["write_id"] > 0).sum()),
            "sum": float(ds["IMAGE"].sel(band=2).isel(obs=1).sum()),
        }}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert out["units"] == "adu / s"
    assert out["meanings"].split()[:3] == ["TRANSIENT", "OVERFLOW", "SUR_ERROR"] and out["masks"][2] == 4
    assert out["bands"] == [1, 2, 3, 4, 5, 6] and out["complete"] == 9
    assert out["sum"] == pytest.approx(float(raw["IMAGE"].sel(band=2).isel(obs=1).sum()), rel=1e-6)


def test_absent_detectors_read_as_missing(repo, raw):
    repo.write_level("raw", raw)
    plain = xr.open_zarr(repo.level_url("raw"))
    assert bool(plain["IMAGE"].sel(band=3).isnull().all())
    assert bool((plain["FLAGS"].sel(band=3) == 512).all())  # MISSING_DATA
    assert repo.open_level("raw")["band"].values.tolist() == [1, 2, 4]


def test_appending_the_same_exposures_twice_changes_nothing(repo, raw):
    repo.write_level("raw", raw)
    before = tree_digest(repo.location)
    again = repo.write_level("raw", raw)
    assert (again.written, again.skipped, again.write_id) == (0, 9, None)
    assert tree_digest(repo.location) == before


def test_appends_grow_along_obs_in_time_order(repo, inst):
    cube, _ = synthetic_raw_cube(inst, n_obs=5, bands=[1, 2, 4], seed=3)
    repo.write_level("raw", cube.isel(obs=slice(0, 2)))
    repo.write_level("raw", cube.isel(obs=slice(1, 5)))  # overlaps: the stored one is skipped
    assert_cubes_equal(repo.open_level("raw"), cube)
    assert repo.level_summary("raw")["bands"][2] == {"complete": 5, "pending": 0}


def test_out_of_order_append_is_refused_and_changes_nothing(repo, inst):
    cube, _ = synthetic_raw_cube(inst, n_obs=4, bands=[1], seed=3)
    repo.write_level("raw", cube.isel(obs=[0, 2]))
    before = tree_digest(repo.location)
    with pytest.raises(OrderError, match=r"2025W51_1A_0684_2 at MJD .* is not later than the last stored "
                                         r"observation 2025W51_1A_0684_3"):
        repo.write_level("raw", cube.isel(obs=[1, 3]))
    assert tree_digest(repo.location) == before


def test_clashing_observation_is_refused(repo, raw):
    repo.write_level("raw", raw)
    moved = raw.assign_coords(mjd_avg=raw["mjd_avg"] + 0.001)
    with pytest.raises(DuplicateExposureError, match="clashes with the stored 2025W51_1A_0684_1"):
        repo.write_level("raw", moved)


def test_new_bands_of_stored_exposures_are_added(repo, inst):
    cube, _ = synthetic_raw_cube(inst, n_obs=2, bands=[1, 2, 4], seed=3)
    repo.write_level("raw", cube.sel(band=[1]))
    repo.write_level("raw", cube.sel(band=[2, 4]))
    assert_cubes_equal(repo.open_level("raw"), cube)


def test_overwrite_reprocesses_in_place(repo, raw):
    repo.write_level("raw", raw)
    doubled = raw.copy()
    doubled["IMAGE"] = raw["IMAGE"] * 2
    assert repo.write_level("raw", doubled).written == 0
    report = repo.write_level("raw", doubled, overwrite=True)
    assert report.written == 9 and report.write_id == 2
    assert_cubes_equal(repo.open_level("raw"), doubled)
    record = repo.image_provenance("raw", band=2, obs="2025W51_1A_0684_3")
    assert record["id"] == 2 and record["overwrite"] is True


def _failing_after(cube, n_good: int):
    """The cube, with every image computation after the first ``n_good`` raising."""
    calls = []

    def maybe_fail(block):
        calls.append(1)
        if len(calls) > n_good:
            raise RuntimeError("detector readout lost")
        return block

    out = cube.copy()
    out["IMAGE"] = (cube["IMAGE"].dims, da.map_blocks(maybe_fail, cube["IMAGE"].data, dtype=np.float32),
                    cube["IMAGE"].attrs)
    return out


def _complete_images_are_exact(partial, cube):
    """Every image that reads back is the written one; the others read as missing."""
    n_complete = 0
    for b in partial["band"].values:
        for o in partial["obs"].values:
            got = partial["IMAGE"].sel(band=b, obs=o).values
            if np.isnan(got).all():
                assert (partial["FLAGS"].sel(band=b, obs=o).values == 512).all()
            else:
                np.testing.assert_array_equal(got, cube["IMAGE"].sel(band=b, obs=o).values)
                n_complete += 1
    return n_complete


def test_failed_write_keeps_completed_images_and_a_rerun_completes_it(tmp_path, repo, raw):
    with dask.config.set(scheduler="synchronous"), pytest.raises(WriteError, match="rerun the same write"):
        repo.write_level("raw", _failing_after(raw, n_good=4))
    with pytest.warns(IncompleteWriteWarning, match="interrupted write read as missing"):
        partial = repo.open_level("raw")
    assert 1 <= _complete_images_are_exact(partial, raw) <= 4  # what completed before the failure is kept
    report = repo.write_level("raw", raw)
    assert report.written + report.skipped == 9 and report.skipped >= 1
    reference = Repository.create(tmp_path / "reference", instrument=repo.instrument)
    reference.write_level("raw", raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteWriteWarning)
        assert_cubes_equal(repo.open_level("raw"), reference.open_level("raw"))


_KILL = textwrap.dedent("""
    import os, sys, zarr, dask
    from sphx import Repository, SPHEREX_SMALL
    from sphx.testing import synthetic_raw_cube
    where, after = sys.argv[2], int(sys.argv[3])
    cube, _ = synthetic_raw_cube(SPHEREX_SMALL, n_obs=5, bands=[1, 2, 4], seed=11)
    repo = Repository.create(sys.argv[1], instrument=SPHEREX_SMALL)
    repo.write_level("raw", cube.isel(obs=slice(0, 2)))  # an earlier, complete write
    calls = 0
    name = "__setitem__" if where == "data" else "resize"
    original = getattr(zarr.Array, name)
    def dying(self, *args, **kwargs):
        global calls
        if where == "resize" or (self.ndim == 4 and self.basename == "IMAGE"):
            calls += 1
            if calls > after:
                os._exit(9)  # a crash: no exception handling, no cleanup
        return original(self, *args, **kwargs)
    setattr(zarr.Array, name, dying)
    with dask.config.set(scheduler="synchronous"):
        repo.write_level("raw", cube.isel(obs=slice(2, 5)))
""")


@pytest.mark.parametrize("where, after", [("data", 5), ("resize", 3)])
def test_killed_write_then_rerun_gives_a_complete_correct_store(tmp_path, inst, where, after):
    path = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL, str(path), where, str(after)], capture_output=True, text=True, check=False)
    assert proc.returncode == 9, proc.stderr
    cube, _ = synthetic_raw_cube(inst, n_obs=5, bands=[1, 2, 4], seed=11)
    repo = Repository.open(path)
    if where == "resize":
        assert (path / ".sphx" / "journal" / "raw.json").exists()  # died while growing the arrays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteWriteWarning)
        survived = repo.open_level("raw")  # rolls a half-done append back
    # the earlier write is intact, and nothing half-written reads as data
    assert_cubes_equal(survived.isel(obs=slice(0, 2)), cube.isel(obs=slice(0, 2)))
    _complete_images_are_exact(survived, cube)
    repo.write_level("raw", cube)  # the rerun; the dead writer's lock is recognised as stale
    reference = Repository.create(tmp_path / "reference", instrument=inst)
    reference.write_level("raw", cube)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteWriteWarning)
        assert_cubes_equal(repo.open_level("raw"), reference.open_level("raw"))
    assert not (path / ".sphx" / "journal" / "raw.json").exists()


def test_live_lock_refuses_a_second_writer(repo, raw):
    lock = os.path.join(repo.location, ".sphx", "locks", "raw.lock")
    os.makedirs(os.path.dirname(lock))
    with open(lock, "w") as f:
        json.dump({"pid": os.getppid(), "host": os.uname().nodename, "time": "now"}, f)
    with pytest.raises(RepositoryLockedError, match=f"being written by pid {os.getppid()}"):
        repo.write_level("raw", raw)


def test_building_a_graph_from_the_repository_computes_nothing(repo_with_raw):
    from sphx.level1 import convert_to_engineering_units
    from sphx.level2 import remove_reference_pixels
    from sphx.quality import image_statistics

    with raise_if_dask_computes():
        raw = repo_with_raw.open_level("raw", bands=[2, 4], start=0.0)
        gains = repo_with_raw.open_calibration("gain_factors")
        l1 = convert_to_engineering_units(raw, calib={"gain_factors": gains})
        stats = image_statistics(remove_reference_pixels(l1))
    assert dask.is_dask_collection(stats["IMAGE"].data) and dask.is_dask_collection(stats["stat_median"].data)


def test_selection_on_open(repo, raw):
    repo.write_level("raw", raw)
    sel = repo.open_level("raw", bands=[4], obs=["2025W51_1A_0684_2", int(raw["obs"][2])])
    assert sel["band"].values.tolist() == [4] and sel.sizes["obs"] == 2
    t = raw["mjd_avg"].values
    assert repo.open_level("raw", start=t[1], end=t[1])["obsid"].values.tolist() == ["2025W51_1A_0684_2"]
    with pytest.raises(SelectionError, match=r"band\(s\) \[7\] not in level 'raw'"):
        repo.open_level("raw", bands=[7])

    # a selection that matches nothing is an empty cube, not an error from dask's chunking
    assert repo.open_level("raw", obs=[10**9]).sizes["obs"] == 0


def test_read_images_now_matches_the_lazy_cube(repo, raw):
    repo.write_level("raw", raw)
    keys = raw["obs"].values.tolist()
    lazy = repo.open_level("raw")
    for obs in ([keys[0], keys[1]], [keys[2], keys[0]]):  # a slice of the store, and out of order
        got = repo.read_images("raw", ["IMAGE", "FLAGS"], band=2, obs=obs)
        for name in ("IMAGE", "FLAGS"):
            np.testing.assert_array_equal(got[name], lazy[name].sel(band=2, obs=obs).values)
    with pytest.raises(SelectionError, match=r"band 7 not in level 'raw'"):
        repo.read_images("raw", ["IMAGE"], band=7, obs=keys[:1])
    with pytest.raises(SelectionError, match=r"observation\(s\) \[1\] not in level 'raw'"):
        repo.read_images("raw", ["IMAGE"], band=2, obs=[keys[0], 1])
    # band 3 was never written: its images are absent
    with pytest.raises(SelectionError, match=r"no complete image of band 3 for observation\(s\)"):
        repo.read_images("raw", ["IMAGE"], band=3, obs=keys[:1])

def test_calibration_products_are_versioned(repo, truth):
    g1 = gain_product(truth.gains, [1, 2, 4])
    g2 = gain_product(truth.gains * 2, [1, 2, 4])
    assert repo.write_calibration("gain_factors", g1) == 1
    assert repo.write_calibration("gain_factors", g2) == 2
    assert repo.calibrations() == {"gain_factors": [1, 2]}
    np.testing.assert_array_equal(repo.open_calibration("gain_factors", 1)["GAIN"], g1["GAIN"])
    latest = repo.open_calibration("gain_factors")
    np.testing.assert_array_equal(latest["GAIN"], g2["GAIN"])
    assert latest.attrs["sphx_version"] == 2
    assert repo.provenance("calibration", "gain_factors")[-1]["id"] == 2
    with pytest.raises(CalibrationNotFoundError, match="has no version 3"):
        repo.open_calibration("gain_factors", 3)
    with pytest.raises(CalibrationNotFoundError, match="no calib product 'dark'"):
        repo.open_calibration("dark")


def test_interrupted_calibration_version_is_invisible(repo, truth):
    g = gain_product(truth.gains, [1, 2, 4])
    repo.write_calibration("gain_factors", g)
    g.to_zarr(os.path.join(repo.location, "calib", "gain_factors", "v0002.zarr"), zarr_format=3, consolidated=False)
    assert repo.calibration_versions("gain_factors") == [1]  # no provenance record: not complete
    assert repo.write_calibration("gain_factors", g) == 2


@pytest.mark.parametrize("change, message", [
    (lambda g: g.rename({"GAIN": "GAINS"}), "missing variable GAIN"),
    (lambda g: g.assign_coords(band=[1, 2, 9]), r"band\(s\) \[9\] not in instrument"),
    (lambda g: g.isel(readout_channel=slice(0, 16)), "readout_channel has 16 entries, expected 32"),
    (lambda g: g.assign(GAIN=g["GAIN"].assign_attrs(units="adu / electron")), "expected 'electron / adu'"),
])
def test_bad_calibration_products_are_refused(repo, truth, change, message):
    with pytest.raises(CalibrationError, match=message):
        repo.write_calibration("gain_factors", change(gain_product(truth.gains, [1, 2, 4])))
    with pytest.raises(CalibrationError, match="unknown calibration product 'gain'"):
        repo.write_calibration("gain", gain_product(truth.gains, [1, 2, 4]))


def test_tables_as_parquet(repo):
    repo.write_table("srccat", {"ra": [1.0, 2.0], "dec": [3.0, 4.0]}, key="a", partition={"healpix64": 7},
                     provenance={"step": "query"})
    repo.write_table("srccat", {"ra": [5.0], "dec": [6.0]}, key="b", partition={"healpix64": 9})
    repo.write_table("srccat", {"ra": [2.5], "dec": [3.5]}, key="a", partition={"healpix64": 7})  # replaces a
    table = repo.read_table("srccat")
    assert sorted(table["ra"].to_pylist()) == [2.5, 5.0]
    assert repo.read_table("srccat", filter=pc.field("healpix64") == 9)["dec"].to_pylist() == [6.0]
    import pyarrow.parquet as pq

    meta = pq.read_schema(os.path.join(repo.table_path("srccat"), "healpix64=7", "a.parquet")).metadata
    assert b"sphx" in meta


def test_state_is_versioned(repo, inst):
    state = xr.Dataset({"Q": (("band", "y", "x"), np.ones((1, 4, 4), np.float32))},
                       coords={"band": [1], "y": np.arange(4), "x": np.arange(4)})
    assert repo.write_state("persistence", state) == 1
    np.testing.assert_array_equal(repo.open_state("persistence")["Q"], state["Q"])


def test_fsspec_url_repository(raw, inst):
    url = f"memory://sphx-test-{os.getpid()}/repo"
    repo = Repository.create(url, instrument=inst)
    with dask.config.set(scheduler="threads"):
        repo.write_level("raw", raw)
    assert_cubes_equal(open_repository(url).open_level("raw"), raw)
    assert xr.open_zarr(repo.level_url("raw"))["IMAGE"].attrs["units"] == "adu / s"


def test_open_or_create(tmp_path, inst):
    with pytest.raises(RepositoryNotFoundError, match="no sphx repository"):
        open_repository(tmp_path / "nope")
    repo = open_repository(tmp_path / "new", create=True, instrument=inst)
    assert open_repository(tmp_path / "new").instrument == inst
    assert repo.levels() == []


def test_later_writes_may_add_variables(repo, inst):
    cube, _ = synthetic_raw_cube(inst, n_obs=3, bands=[1, 2], seed=5)
    bare = cube.drop_vars([v for v in cube.variables if str(v).startswith("wcs_")] + ["CWAVE", "CBAND", "target"])
    repo.write_level("raw", bare.isel(obs=[0]))
    repo.write_level("raw", cube.isel(obs=[1, 2]))
    back = repo.open_level("raw")
    assert "CWAVE" in back.coords and "target" in back.coords and "wcs_crval" in back.data_vars
    assert np.isnan(back["wcs_crval"].isel(obs=0)).all() and np.isfinite(back["wcs_crval"].isel(obs=[1, 2])).all()
    assert back["target"].values.tolist() == [0, 684, 684]  # absent metadata reads as the fill value
    assert_cubes_equal(back.isel(obs=[1, 2]), cube.isel(obs=[1, 2]))
    assert "CWAVE" in xr.open_zarr(repo.level_url("raw")).coords


def test_refused_writes_leave_no_trace(repo, raw):
    repo.write_level("raw", raw.isel(obs=[1]))
    before = tree_digest(repo.location)
    extra = raw.isel(obs=[0]).assign(stat_extra=(("band", "obs"), np.ones((3, 1))))
    with pytest.raises(OrderError):
        repo.write_level("raw", extra)  # a new variable, but the observation is out of order
    with pytest.raises(CubeValidationError, match="CWAVE of band 1 differs from the map stored"):
        repo.write_level("raw", raw.isel(obs=[2]).assign_coords(CWAVE=raw["CWAVE"] * 1.01))
    wrong_units = raw.isel(obs=[2]).copy()
    wrong_units["IMAGE"].attrs["units"] = "electron / s"
    with pytest.raises(CubeValidationError, match="expected 'adu / s'"):
        repo.write_level("raw", wrong_units)
    assert tree_digest(repo.location) == before
