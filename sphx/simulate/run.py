"""Write a simulated survey into a repository, exposure by exposure.

What lands in the repository:

=========================  ===============================================================
``raw`` level              on-board slopes [adu/s] with reference border, phantom reads,
                           on-board flags and the observation records
``truth`` level            true sky [MJy/sr] (zodi included), ZODI, injected PERSIST
                           current [electron/s], true flags and the true WCS per image;
                           the true current into a pixel is
                           ``IMAGE / ABS_GAIN + DARK + PERSIST`` with the exact
                           ``ABS_GAIN`` and ``DARK`` of ``simulation_truth``
calibration products       ``gain_factors``, ``dark``, ``abs_gain_matrix``,
                           ``spectral_wcs``, ``solid_angle_pixel_map``, ``nonfunc``,
                           ``dichroic``, ``readnoise_pars``, ``nonlinear_pars``,
                           ``average_psf``, ``initial_distortion_table``,
                           ``persistence_pars`` (version 1, lab-measured)
``simulation_truth`` state the exact detector properties and the configuration
tables                     ``refcat`` (HEALPix-partitioned reference catalogue),
                           ``survey_plan``, ``truth_sources`` (per-exposure source
                           positions and band-averaged fluxes [uJy]),
                           ``truth_transients``, ``fullsample`` (every read of the
                           full-sample pixels)
=========================  ===============================================================

Exposures are written in batches of bounded size, so a survey of any length runs in the
memory of a few exposures; every batch is a complete repository write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..catalog.layout import prepare_piece
from ..errors import SimulationError
from ..io import Repository, open_repository
from .config import SimulationConfig
from .products import calibration_products, detector_truth
from .simulator import TRUTH_LEVEL, ImageResult, Simulator, raw_cube, truth_cube
from .sky import CATALOG_NSIDE
from .sso import sso_elements

__all__ = ["SimulationReport", "simulate_survey"]

_BATCH_BYTES = 512 * 2**20


@dataclass
class SimulationReport:
    """What :func:`simulate_survey` did."""

    repository: Repository
    obsids: list[str]
    bands: tuple[int, ...]
    elapsed: float
    seconds_per_exposure: list[float] = field(default_factory=list)
    seconds_writing: list[float] = field(default_factory=list)  # per exposure, batches shared out
    setup_seconds: float = 0.0
    calibrations: list[str] = field(default_factory=list)
    catalog_sources: int = 0

    def __str__(self) -> str:
        per = np.mean(self.seconds_per_exposure) if self.seconds_per_exposure else float("nan")
        return (f"simulated {len(self.obsids)} exposure(s) x {len(self.bands)} band(s) in {self.elapsed:.1f} s "
                f"({per:.2f} s per exposure to simulate); {self.catalog_sources} catalogue sources")


def _table(obsid: str, band: int, rows: Mapping[str, np.ndarray]) -> pa.Table:
    n = len(next(iter(rows.values()))) if rows else 0
    cols = {"obsid": pa.array([obsid] * n, pa.string()), "band": pa.array(np.full(n, band, np.int8))}
    cols.update({k: pa.array(np.asarray(v)) for k, v in rows.items()})
    return pa.table(cols)


def _open(repository: Repository | str | os.PathLike[str], sim: Simulator) -> Repository:
    repo = (repository if isinstance(repository, Repository)
            else open_repository(repository, create=True, instrument=sim.instrument))
    if repo.instrument.name != sim.instrument.name:
        raise SimulationError(f"repository {repo.location} is for instrument {repo.instrument.name!r}; "
                              f"the simulation uses {sim.instrument.name!r}")
    if repo.has_level("raw") or repo.has_level(TRUTH_LEVEL):
        raise SimulationError(f"repository {repo.location} already holds exposures; simulate into a new one")
    return repo


def simulate_survey(
    config: SimulationConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
    repository: Repository | str | os.PathLike[str],
    *,
    log: Callable[[str], None] | None = None,
) -> SimulationReport:
    """Simulate a survey into a new repository (created if ``repository`` is a new path).

    Parameters
    ----------
    config
        Simulation configuration (see :class:`~sphx.simulate.config.SimulationConfig`).
    repository
        A repository without exposures, or a path for a new one.
    log
        Called with one line per written batch.
    """
    t0 = time.perf_counter()
    say = log or (lambda _s: None)
    sim = Simulator(config)
    repo = _open(repository, sim)
    source = {"source": "sphx.simulate", "seed": sim.config.seed}
    products = calibration_products(sim)
    for name, ds in products.items():
        repo.write_calibration(name, ds, provenance={**source, "note": "lab-measured simulated product"})
    del products  # hundreds of MB on the real geometry
    repo.write_state("simulation_truth", detector_truth(sim), provenance=source)
    repo.write_table("survey_plan", sim.plan.to_table(), key="plan", provenance=source)
    repo.write_table("sso_elements", sso_elements(sim), key="elements", provenance=source)

    inst = sim.instrument
    per_exposure_bytes = len(sim.bands) * (inst.n_raw**2 * 8 + inst.n_active**2 * 16)
    batch = max(1, _BATCH_BYTES // per_exposure_bytes)
    report = SimulationReport(repo, [], sim.bands, 0.0, calibrations=sorted(repo.calibrations()))
    report.setup_seconds = time.perf_counter() - t0

    def write(batch_: list[tuple[int, dict[int, ImageResult]]], catalog: list[tuple[int, pa.Table]]) -> None:
        t1 = time.perf_counter()
        idx = [j for j, _ in batch_]
        images = [im for _, im in batch_]
        repo.write_level("raw", raw_cube(sim, idx, images), provenance=source)
        repo.write_level(TRUTH_LEVEL, truth_cube(sim, idx, images), provenance=source)
        for j, im in batch_:
            obsid = str(sim.plan.obsid[j])
            for name, attr in (("truth_sources", "sources"), ("truth_transients", "transients"),
                               ("fullsample", "fullsample")):
                table = pa.concat_tables([_table(obsid, b, getattr(im[b], attr)) for b in sim.bands])
                repo.write_table(name, table, key=obsid, provenance=source)
        for pixel, table in catalog:
            # Sorted by a fine HEALPix index in bounded row groups, for statistics pruning.
            piece = prepare_piece(table, nside=CATALOG_NSIDE, pixel=pixel)
            repo.write_table("refcat", piece, key=f"hpx{pixel}", partition={f"healpix{CATALOG_NSIDE}": pixel},
                             provenance=source)
        say(f"  exposures {sim.plan.obsid[idx[0]]} .. {sim.plan.obsid[idx[-1]]} written")
        report.seconds_writing.extend([(time.perf_counter() - t1) / len(batch_)] * len(batch_))

    # One writer thread stores a batch while the next is simulated; at most two batches
    # are in memory, and a failure in either stops the run after the batch in flight.
    pending: list[tuple[int, dict[int, ImageResult]]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sphx-simulate-writer") as writer:
        in_flight: Future | None = None

        def submit() -> Future:
            if in_flight is not None:
                in_flight.result()
            catalog = list(sim.catalog.new)
            sim.catalog.new.clear()
            report.catalog_sources += sum(t.num_rows for _, t in catalog)
            job = writer.submit(write, list(pending), catalog)
            pending.clear()
            return job

        for j in range(len(sim.plan)):
            t1 = time.perf_counter()
            pending.append((j, sim.step()))
            report.seconds_per_exposure.append(time.perf_counter() - t1)
            report.obsids.append(str(sim.plan.obsid[j]))
            if len(pending) >= batch:
                in_flight = submit()
        if pending:
            in_flight = submit()
        in_flight.result()
    report.elapsed = time.perf_counter() - t0
    return report
