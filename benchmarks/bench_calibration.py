"""Calibration solvers: throughput against plain reading of the same images, and peak memory.

Requirement (issue): each solver processes images at least half as fast as plain reading
of the same images from the repository in the same run, and its peak memory does not
depend on the number of images (100 against 1000 images). Every solver registered in
:mod:`sphx.calibrate.run` is measured; one whose inputs the survey cannot satisfy (too
few isolated stars for the PSF, say) is skipped with a note.

**Inputs.** Two simulated surveys (:mod:`sphx.simulate`, then ``recipes/l1-l2.yaml``),
built once and kept under ``--work``:

- *throughput*: the real geometry, 2040 x 2040 pixels, ``--exposures`` exposures of bands
  1 and 4 with ``--calibrator-density`` calibrator stars per square degree. Full-size
  images because on the 248-pixel test detector reading an image takes ~5 ms, mostly the
  fixed cost of a dask task and a Zarr chunk per variable: the ratio would compare task
  overheads, not the solvers' work on the pixels. At 2040 pixels an image is 66 MB over
  the four variables that the absolute gain reads, and both sides are dominated by work
  per pixel. Simulating and reducing the default 64 exposures (128 full-size images,
  18 GB with the raw, Level 1 and truth levels) takes ~4 minutes on 2 cores, once (the
  1024-pixel variant suggested in the issue is not one the simulator offers). The
  solvers' per-band set-up (channel maps, PSF templates, the final solve or
  deconvolution) is part of the time, so more images per band show more throughput;
  64 per band give every chain of the dark/flat and PSF solvers several batches, as a
  calibration run of hundreds of images does. The solvers' configs are relaxed only in
  their minimum image, measurement and star counts (``SOLVER_CONFIG``): the survey is
  sized for timing, not accuracy.
- *memory*: the test geometry (248 x 248), 500 exposures of bands 1 and 4 (1000 images),
  300 calibrators per square degree: the accuracy survey of ``docs/calibration.md``.

**Throughput.** For each solver, in one run and on the same repository: (a) plain reading:
the variables the solver reads (``Solver.reads``: variable and level), opened as the
solver opens them (:func:`sphx.calibrate.inputs.open_inputs`: one image per block, or
the solver's batch of images, ``Solver.batch_field``), and reduced to one sum per image
so that nothing is kept; (b) the solver: its graph built and computed (``Solver.solve``
and ``dask.compute``, as :func:`~sphx.calibrate.run.run_solver` does, without storing the
small products). Both on dask's threaded scheduler with ``--workers`` threads,
interleaved, best of ``--repeat``, on all images and on the first half of the exposures.
The table gives the whole run's ratio (the requirement) and, from the difference
between the two sizes, the time of each further image for reading and for the solver
and the solver's set-up that remains (channel maps, PSF templates, the final solve or
deconvolution per band): the ratio a survey of many more images would approach.
Missing products that another solver makes (the flat field the absolute gain starts
from) are made first, untimed.

**Memory.** Each solver runs in a fresh process on the first 100 and on all 1000 images
of the memory survey, after a warm-up on 8 images (numba compilation is not counted),
and so does plain reading of the same images. Peak resident memory during the compute
above the resident memory before it: the kernel's high-water mark is reset
(``/proc/self/clear_refs``) just before. Dask's bookkeeping of the graph grows with the
number of image tasks for reading as for the solvers; the solver's own memory is its
growth above plain reading.

    python benchmarks/bench_calibration.py [--work /tmp/sphx-bench-calibration] [--exposures 64] [--calibrator-density 10]
        [--workers 2] [--repeat 2] [--only SOLVER ...] [--skip-memory] [--skip-throughput]
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread, as dask's worker processes run (distributed.nanny.pre-spawn-environ):
# the scheduler's threads are the parallelism. Spinning BLAS threads on top of them made
# a 0.05 s matrix product take 0.5-3 s on 2 busy cores. Set before numpy loads its BLAS.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

THROUGHPUT_SURVEY = {"seed": 11, "instrument": "SPHEREx", "bands": [1, 4]}
MEMORY_SURVEY = {"seed": 21, "instrument": "SPHEREx-small", "bands": [1, 4], "survey": {"n_exposures": 500},
                 "sky": {"calibrator_density": 300.0}}
# minimum counts lowered for a survey sized for timing; nothing else differs from the defaults
SOLVER_CONFIG: dict[str, dict[str, Any]] = {"dark_flat": {"min_images": 3}, "abs_gain": {"min_measurements": 5},
                                          "psf": {"min_stars": 1}}
MEMORY_IMAGES = (100, 1000)
WARM_UP_OBS = 4


# --- inputs ---------------------------------------------------------------------------
def survey(work: Path, name: str, config: dict[str, Any]) -> Path:
    """A simulated survey reduced to Level 2 under ``work/name`` (reused when complete)."""
    from sphx.demo import recipe_path
    from sphx.pipeline import run_recipe
    from sphx.simulate import simulate_survey

    path, marker = work / name, work / f"{name}.json"
    if marker.exists() and json.loads(marker.read_text()) == config and path.exists():
        return path
    if path.exists():  # an earlier build that did not finish
        import shutil

        shutil.rmtree(path)
    print(f"building the {name} survey in {path} (once) ...", flush=True)
    t0 = time.perf_counter()
    repo = simulate_survey(config, path).repository
    t1 = time.perf_counter()
    run_recipe(recipe_path("l1-l2"), repo, profile="threads", progress=False, log=lambda s: None)
    print(f"  simulated in {t1 - t0:.0f} s, Level 1-2 in {time.perf_counter() - t1:.0f} s", flush=True)
    marker.write_text(json.dumps(config))
    return path


def solvers() -> dict[str, Any]:
    from sphx.calibrate.run import SOLVERS, get_solver

    get_solver("dark_flat")  # loads every registered solver
    return dict(SOLVERS)


def make_prerequisites(path: Path, registered: dict[str, Any]) -> None:
    """Make the products a solver starts from that the repository lacks but another
    solver writes (the flat field of the absolute gain), untimed."""
    from sphx import open_repository
    from sphx.calibrate.run import run_solver

    repo = open_repository(path)
    writers = {product: name for name, spec in registered.items() for product in spec.writes}
    for name, spec in registered.items():
        for entry in spec.calibrations:
            options = entry.split("|")
            if any(repo.calibration_versions(o) for o in options):
                continue
            writer = next((writers[o] for o in options if writers.get(o, name) != name), None)
            if writer is not None:
                print(f"  making {entry} for {name} with {writer} (untimed)", flush=True)
                run_solver(repo, writer, SOLVER_CONFIG.get(writer), log=lambda s: None)


def open_for(repo, spec, config: dict[str, Any] | None, *, select: dict[str, Any] | None = None, extra: bool = True):
    """The solver's calibrations and inputs, opened as run_solver opens them (in the
    solver's batches of images, if it reads in batches)."""
    from sphx.calibrate.inputs import open_inputs
    from sphx.calibrate.run import resolve_calibrations

    used = resolve_calibrations(repo, ("spectral_wcs", *spec.calibrations), {})
    calib = {name: repo.open_calibration(name, version) for name, version in used.items()}
    inputs = open_inputs(repo, spec.reads, spectral_wcs=calib["spectral_wcs"], select=select,
                         extra=spec.extra if extra else (), batch=spec.read_batch(spec.make_config(config)))
    return calib, inputs


def run_once(repo, spec, config: dict[str, Any] | None, select: dict[str, Any] | None = None) -> int:
    """Build and compute the solver's products; returns the number of images."""
    calib, inputs = open_for(repo, spec, config, select=select)
    products = spec.solve(repo, inputs, spec.make_config(config), calibrations=calib)
    dask.compute(*products.values())
    return sum(inputs.n_images().values())


def read_once(repo, spec, config: dict[str, Any] | None, select: dict[str, Any] | None = None) -> int:
    """Plain reading of what the solver reads: one sum per image and variable."""
    _, inputs = open_for(repo, spec, config, select=select, extra=False)
    sums = [da.sum(inputs.pixels[name].data, axis=(2, 3), dtype=np.float64) for name in spec.reads]
    dask.compute(*sums)
    return sum(inputs.n_images().values())


# --- throughput -----------------------------------------------------------------------
def throughput(path: Path, registered: dict[str, Any], args: argparse.Namespace) -> list[tuple]:
    """Best times of reading and of solving, on all images and on the first half of the
    exposures: ``(name, {"all": (images, t_read, t_solve), "half": ...})`` per solver,
    or ``(name, reason)`` if skipped."""
    from sphx import open_repository
    from sphx.errors import CalibrationError

    repo = open_repository(path)
    obs = [int(o) for o in repo.open_level("l2")["obs"].values]
    selections = {"all": None, "half": {"obs": obs[:len(obs) // 2]}}
    rows: dict[str, dict[str, tuple[int, float, float]]] = {}
    skipped: dict[str, str] = {}
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        for repeat in range(args.repeat):
            for name, spec in registered.items():
                for size, select in selections.items():
                    if name in skipped:
                        continue
                    t0 = time.perf_counter()
                    n_read = read_once(repo, spec, SOLVER_CONFIG.get(name), select=select)
                    t_read = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    try:
                        n_solved = run_once(repo, spec, SOLVER_CONFIG.get(name), select=select)
                    except CalibrationError as e:
                        skipped[name] = str(e)
                        print(f"  {name}: skipped, the survey cannot satisfy its inputs: {e}", flush=True)
                        continue
                    t_solve = time.perf_counter() - t0
                    print(f"  pass {repeat + 1}: {name}: read {n_read} images in {t_read:.2f} s, "
                          f"solved {n_solved} in {t_solve:.2f} s", flush=True)
                    best = rows.setdefault(name, {}).get(size, (n_read, np.inf, np.inf))
                    rows[name][size] = (n_read, min(best[1], t_read), min(best[2], t_solve))
    return [(name, rows[name]) if name not in skipped else (name, skipped[name]) for name in registered]


def throughput_report(rows: list[tuple], args: argparse.Namespace) -> list[str]:
    """The table: the whole run's rates, and the cost of each further image (the
    difference between all images and half of them: the solver's per-band set-up, final
    solve or deconvolution cancel) with the set-up cost that remains."""
    out = [(f"throughput, 2040 x 2040 images, {args.calibrator_density:g} calibrators per square degree, "
           f"{args.workers} threads, best of {args.repeat}"),
           (f"  {'solver':10s} {'images':>6s} {'read [img/s]':>13s} {'solver [img/s]':>15s} {'solver/read':>12s}"
           f"  (required >= 0.5) | per further image: {'read':>7s} {'solver':>7s} {'ratio':>6s} | set-up"),
           ]
    for name, result in rows:
        if isinstance(result, str):
            out.append(f"  {name:10s} skipped: {result[:150]}")
            continue
        n, t_read, t_solve = result["all"]
        n_half, h_read, h_solve = result["half"]
        ratio = t_read / t_solve
        dn = n - n_half
        step_read, step_solve = (t_read - h_read) / dn, (t_solve - h_solve) / dn
        setup = t_solve - n * step_solve
        out.append(f"  {name:10s} {n:6d} {n / t_read:13.2f} {n / t_solve:15.2f} {ratio:12.2f}  "
                   f"{'OK' if ratio >= 0.5 else 'BELOW':17s} |   {1e3 * step_read:7.0f} ms {1e3 * step_solve:4.0f} ms "
                   f"{step_read / step_solve:6.2f} | {setup:5.1f} s")
    return out


# --- memory ---------------------------------------------------------------------------
def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_child(args: argparse.Namespace) -> None:
    """(In a fresh process.) Peak memory of one solver on the first images of a survey."""
    from sphx import open_repository
    from sphx.calibrate.run import get_solver

    repo = open_repository(args.repo)
    spec = get_solver(args.solver)
    config = SOLVER_CONFIG.get(args.solver)
    bands = len(repo.open_level(next(iter(spec.reads.values())))["band"])
    obs = [int(o) for o in repo.open_level("l2")["obs"].values]
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        try:  # compile the kernels and warm the caches outside the measurement
            run_once(repo, spec, {**(config or {}), **_relaxed(spec)}, select={"obs": obs[:WARM_UP_OBS]})
        except Exception as e:  # noqa: BLE001 - a warm-up on a few images may fall short of minimum counts
            print(f"warm-up: {type(e).__name__}: {e}", file=sys.stderr)
        select = {"obs": obs[:args.images // bands]}
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            reset = True
        except OSError:
            reset = False
        base = _status("VmRSS")
        t0 = time.perf_counter()
        n = read_once(repo, spec, config, select=select) if args.read_only else run_once(repo, spec, config, select=select)
        seconds = time.perf_counter() - t0
        peak = _status("VmHWM")
    print(json.dumps({"images": n, "base": base, "peak": peak, "growth": peak - base, "reset": reset,
                      "seconds": seconds}))


def _relaxed(spec) -> dict[str, Any]:
    """Minimum counts at their floor, for the warm-up on a few images."""
    fields = spec.config.model_fields
    return {k: v for k, v in (("min_images", 3), ("min_measurements", 1), ("min_stars", 1)) if k in fields}


def memory(path: Path, registered: dict[str, Any], args: argparse.Namespace) -> list[tuple]:
    """Peak memory growth of each solver and of plain reading of its inputs, at each of
    MEMORY_IMAGES images, each in a fresh process."""
    rows = []
    for name in registered:
        result: list[dict[str, Any]] | str = []
        for n in MEMORY_IMAGES:
            for read_only in (False, True):
                cmd = [sys.executable, __file__, "--memory-child", "--repo", str(path), "--solver", name,
                       "--images", str(n), "--workers", str(args.workers), *(["--read-only"] if read_only else [])]
                done = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if done.returncode != 0:
                    result = (done.stderr.strip().splitlines() or ["?"])[-1]
                    break
                result.append({**json.loads(done.stdout.strip().splitlines()[-1]), "read_only": read_only})
            if isinstance(result, str):
                break
        rows.append((name, result))
        if isinstance(result, str):
            print(f"  {name}: skipped: {result}", flush=True)
        else:
            print(f"  {name}: " + ", ".join(f"{'reading' if r['read_only'] else 'solver'} {r['images']} images: "
                                             f"+{r['growth'] / 2**20:.0f} MiB in {r['seconds']:.1f} s"
                                             for r in result), flush=True)
    return rows


# --- main -----------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sphx-bench-calibration",
                   help="where the simulated surveys are kept between runs")
    p.add_argument("--exposures", type=int, default=64, help="exposures of the full-size throughput survey")
    p.add_argument("--calibrator-density", type=float, default=10.0,
                   help="calibrator stars per square degree in the throughput survey")
    p.add_argument("--workers", type=int, default=2, help="threads of dask's scheduler")
    p.add_argument("--repeat", type=int, default=2, help="timed passes (the best is kept)")
    p.add_argument("--only", nargs="+", metavar="SOLVER", help="measure these solvers only (default: all registered)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repo", help=argparse.SUPPRESS)
    p.add_argument("--solver", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)
    p.add_argument("--read-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    registered = everything = solvers()
    if args.only:
        unknown = sorted(set(args.only) - set(registered))
        if unknown:
            p.error(f"unknown solver(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
        registered = {name: spec for name, spec in registered.items() if name in args.only}
    print(f"solvers registered: {', '.join(registered)}; dask threaded scheduler, {args.workers} threads, "
          f"{os.cpu_count()} CPUs", flush=True)
    report = []
    if not args.skip_throughput:
        config = {**THROUGHPUT_SURVEY, "survey": {"n_exposures": args.exposures},
                  "sky": {"calibrator_density": args.calibrator_density}}
        path = survey(args.work, f"full-{args.exposures}x2-cal{args.calibrator_density:g}", config)
        make_prerequisites(path, everything)
        print(f"throughput on {path} (2040 x 2040 images), best of {args.repeat}:", flush=True)
        rows = throughput(path, registered, args)
        report += ["", *throughput_report(rows, args)]
    if not args.skip_memory:
        path = survey(args.work, "small-500x2-cal300", MEMORY_SURVEY)
        make_prerequisites(path, everything)
        print(f"peak memory on {path} (248 x 248 images), {MEMORY_IMAGES[0]} vs {MEMORY_IMAGES[1]} images:",
              flush=True)
        rows = memory(path, registered, args)
        report.append("")
        report.append(f"peak memory above the process before the compute, 248 x 248 images, {args.workers} threads; "
                      "the solver's own: above plain reading of the same images")
        report.append(f"  {'solver':10s} {'images':>6s} {'solver':>8s} {'reading':>8s} {'own':>8s}")
        for name, result in rows:
            if isinstance(result, str):
                report.append(f"  {name:10s} skipped: {result[:150]}")
                continue
            for solver, reading in zip(result[::2], result[1::2], strict=True):
                a, b = solver["growth"] / 2**20, reading["growth"] / 2**20
                report.append(f"  {name:10s} {solver['images']:6d} {a:4.0f} MiB {b:4.0f} MiB {a - b:4.0f} MiB")
    print("\n".join(report))


if __name__ == "__main__":
    main()
