"""Shared fixtures: the small instrument, synthetic raw cubes with truth, repositories."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sphx import SPHEREX_SMALL, Repository
from sphx.testing import gain_product, synthetic_raw_cube

DATA = Path(__file__).parent / "data"


@pytest.fixture
def inst():
    return SPHEREX_SMALL


@pytest.fixture
def raw_and_truth(inst):
    return synthetic_raw_cube(inst, n_obs=3, bands=[1, 2, 4], seed=7)


@pytest.fixture
def raw(raw_and_truth):
    return raw_and_truth[0]


@pytest.fixture
def truth(raw_and_truth):
    return raw_and_truth[1]


@pytest.fixture
def repo(tmp_path, inst):
    return Repository.create(tmp_path / "repo", instrument=inst)


@pytest.fixture
def repo_with_raw(repo, raw, truth):
    repo.write_level("raw", raw)
    repo.write_calibration("gain_factors", gain_product(truth.gains, [1, 2, 4]))
    return repo


def tree_digest(path: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (relative names), to prove a store unchanged."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_cubes_equal(a, b):
    """Exact equality of two cubes, computing both."""
    import xarray as xr

    xr.testing.assert_identical(a.compute(), b.compute())
    for name in a.data_vars:
        assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a["obs"].values, b["obs"].values)


SURVEY_CONFIG = {"instrument": "SPHEREx-small", "seed": 11, "bands": [1, 3, 6], "survey": {"n_exposures": 8}}


@pytest.fixture(scope="session")
def survey_path(tmp_path_factory):
    """A simulated survey (small geometry, 8 exposures, bands 1, 3, 6): read-only, shared."""
    from sphx.simulate import simulate_survey

    path = tmp_path_factory.mktemp("survey") / "repo"
    simulate_survey(SURVEY_CONFIG, path)
    return path


@pytest.fixture
def survey(survey_path, tmp_path):
    """A writable copy of the simulated survey's repository."""
    import shutil

    from sphx import open_repository

    dest = tmp_path / "survey"
    shutil.copytree(survey_path, dest)
    return open_repository(dest)


def _dask_cli(*args):
    exe = shutil.which("dask")
    return [exe, *args] if exe else [sys.executable, "-m", "dask", *args]


@pytest.fixture
def loopback_cluster(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen(
        _dask_cli("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                  "--scheduler-file", str(sched_file)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen(
                _dask_cli("worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                          "--no-dashboard", "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}")),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, sched_file
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
