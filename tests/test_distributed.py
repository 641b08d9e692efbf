"""Recipes on real Dask processes started the way users start them."""

import subprocess
import sys
from pathlib import Path

import pytest

from sphx import Repository, run_recipe
from sphx.errors import ComputeError
from sphx.pipeline.compute import load_profiles, make_cluster, resolve_compute
from sphx.testing import gain_product, synthetic_raw_cube

from .conftest import assert_cubes_equal

QUICKLOOK = Path(__file__).resolve().parents[1] / "recipes" / "quicklook.yaml"


def _repo(path, inst):
    cube, truth = synthetic_raw_cube(inst, n_obs=4, bands=[1, 3, 5], seed=21)
    repo = Repository.create(path, instrument=inst)
    repo.write_level("raw", cube)
    repo.write_calibration("gain_factors", gain_product(truth.gains, [1, 3, 5]))
    return repo


def test_recipe_on_a_real_scheduler_equals_the_embedded_cluster_run(tmp_path, inst, loopback_cluster):
    address, sched_file = loopback_cluster
    remote = _repo(tmp_path / "remote", inst)
    cli = subprocess.run(
        [sys.executable, "-m", "sphx", "run", str(QUICKLOOK), "--repo", remote.location, "--scheduler", address,
         "--progress"],
        capture_output=True, text=True, check=False, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert f"scheduler at {address} (2 workers)" in cli.stderr and "dashboard:" in cli.stderr
    assert "quicklook: 12 image(s) written" in cli.stderr and "quicklook: images [" in cli.stderr

    by_file = _repo(tmp_path / "by_file", inst)
    run_recipe(QUICKLOOK, by_file, scheduler_file=sched_file, log=lambda s: None)

    embedded = _repo(tmp_path / "embedded", inst)
    spec = resolve_compute(profile={"cluster": {"kwargs": {"n_workers": 2, "threads_per_worker": 1,
                                                           "dashboard_address": ":0"}}})
    lines = []
    run_recipe(QUICKLOOK, embedded, compute=spec, log=lines.append)
    assert any(line.startswith("dashboard: http://") for line in lines)

    reference = embedded.open_level("quicklook")
    assert_cubes_equal(remote.open_level("quicklook"), reference)
    assert_cubes_equal(by_file.open_level("quicklook"), reference)
    assert remote.image_provenance("quicklook", band=5, obs=reference["obsid"].values[-1])["compute"] \
        == f"scheduler at {address}"


def test_slurm_profile_builds_a_jobqueue_cluster():
    pytest.importorskip("dask_jobqueue")
    spec = resolve_compute(profile={"cluster": {
        "type": "dask_jobqueue.SLURMCluster",
        "kwargs": {"cores": 8, "memory": "32GiB", "processes": 2, "walltime": "01:30:00", "queue": "debug",
                   "scheduler_options": {"dashboard_address": ":0"}},
        "scale": {"jobs": 4}}})
    assert spec.cluster.scale == {"jobs": 4}
    with make_cluster(spec) as cluster:  # not scaled: no sbatch is needed to build it
        script = cluster.job_script()
    assert "#SBATCH -p debug" in script and "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH -t 01:30:00" in script and "--nworkers 2" in script
    assert "slurm" in load_profiles()


def test_profiles_from_a_user_file(tmp_path, monkeypatch):
    f = tmp_path / "compute.yaml"
    f.write_text("profiles:\n  big: {cluster: {kwargs: {n_workers: 8}}}\n  head: {address: 'tcp://h:8786'}\n")
    monkeypatch.setenv("SPHX_COMPUTE_CONFIG", str(f))
    assert resolve_compute(profile="big").cluster.kwargs == {"n_workers": 8}
    assert resolve_compute(profile="head").address == "tcp://h:8786"
    assert resolve_compute().cluster.type == "distributed.LocalCluster"


@pytest.mark.parametrize("kwargs, message", [
    ({"profile": "warp"}, "unknown compute profile 'warp'"),
    ({"profile": {"address": "tcp://a:1", "cluster": {}}}, "give only one of address, scheduler_file and cluster"),
    ({"profile": {"scheduler": "threads", "address": "tcp://a:1"}}, "runs locally and takes no address"),
    ({"profile": {"workers": 3}}, "Extra inputs are not permitted"),
    ({"scheduler": "tcp://a:1", "profile": "local"}, "choose one of --profile, --scheduler"),
])
def test_bad_compute_settings(kwargs, message):
    with pytest.raises(ComputeError, match=message):
        resolve_compute(**kwargs)


def test_cluster_that_cannot_start_is_a_clear_error():
    pytest.importorskip("dask_jobqueue")
    spec = resolve_compute(profile={"cluster": {"type": "dask_jobqueue.SLURMCluster", "kwargs": {"cores": 4}}})
    with pytest.raises(ComputeError, match=r"cannot start dask_jobqueue\.SLURMCluster"):
        make_cluster(spec)
