"""Simulation speed on the real geometry: seconds per full exposure (6 detectors).

Budget (issue 3): at most 10 s per exposure of six 2048x2048 detectors on 2 cores,
writing included, with memory bounded whatever the survey length. This simulates
``--exposures`` exposures into a fresh repository and prints, per exposure, the time to
simulate and the time to write the raw and truth levels and tables, then the peak
resident memory.

    python benchmarks/bench_simulate.py [--exposures 4]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from sphx.simulate import Simulator, simulate_survey
from sphx.simulate.run import SimulationReport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=4)
    args = parser.parse_args()
    config = {"seed": 1, "survey": {"n_exposures": args.exposures}}

    # compile the kernels once, outside the timing (numba caches them on disk afterwards)
    warm = Simulator({"instrument": "SPHEREx-small", "survey": {"n_exposures": 1}})
    warm.step()

    root = Path(tempfile.mkdtemp(prefix="sphx-bench-sim-"))
    try:
        t0 = time.perf_counter()
        report: SimulationReport = simulate_survey(config, root / "repo")
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(report.obsids)
    set_up = report.setup_seconds
    print(f"full geometry, {n} exposure(s) x 6 detectors of 2048x2048, {report.catalog_sources} catalogue sources")
    print(f"  set-up (detectors, optics, calibration products, plan): {set_up:.1f} s")
    for obsid, sim_s, write_s in zip(report.obsids, report.seconds_per_exposure, report.seconds_writing, strict=True):
        print(f"  {obsid}: simulate {sim_s:.2f} s, write {write_s:.2f} s (in a writer thread)")
    per = (total - set_up) / n
    print(f"wall time per exposure, simulation and writing overlapped: {per:.2f} s (budget 10 s) -> "
          f"{'OK' if per <= 10 else 'OVER BUDGET'}")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
