"""Run a recipe against a repository: the library function behind ``sphx run``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import xarray as xr

from .._progress import ProgressSpec
from ..io.repository import Repository, open_repository
from .compute import ComputeSpec, compute_context, resolve_compute
from .recipe import Recipe, Stage, check_recipe, load_recipe

__all__ = ["RunReport", "format_plan", "run_recipe"]


@dataclass
class RunReport:
    """What a run did (or, for a dry run, would do)."""

    recipe: str
    repository: str
    compute: str
    plan: list[dict[str, Any]]
    writes: list[Any] = field(default_factory=list)  # WriteReport, Level3Report or SolverReport per stage
    elapsed: float = 0.0
    dry_run: bool = False

    def __str__(self) -> str:
        head = f"recipe {self.recipe!r} on {self.repository} ({self.compute})"
        if self.dry_run:
            return head + "\n" + format_plan(self.plan)
        return "\n".join([head, *(f"  {w}" for w in self.writes), f"  done in {self.elapsed:.1f} s"])


def format_plan(plan: list[dict[str, Any]]) -> str:
    lines = []
    for i, stage in enumerate(plan):
        lines.append(f"stage {i} ({stage['stage']}): {stage['input']} [{stage['source']}] -> {stage['output']}")
        for s in stage["steps"]:
            cfg = ", ".join(f"{k}={v!r}" for k, v in s["config"].items())
            cal = ", ".join(f"{k} v{v}" for k, v in s["calibrations"].items())
            lines.append(f"  - {s['step']}" + (f" ({cfg})" if cfg else "") + (f" [calibrations: {cal}]" if cal else ""))
    return "\n".join(lines)


def _open_tables(repo: Repository, stage: Stage) -> dict[str, pads.Dataset]:
    """The repository tables the stage's steps read (optional ones when present), unread."""
    wanted = {name for use in stage.steps for name in (*use.step.tables, *use.step.reports)}
    held = set(repo.tables())
    return {name: repo.open_table(name) for name in sorted(wanted & held)}


def _previous_state(repo: Repository, name: str, ds: xr.Dataset) -> tuple[xr.Dataset | None, int | None]:
    """The newest stored version of state ``name`` that ends before the cube's first exposure.

    Re-running a batch thus continues from the state before it, and a later batch from
    the state after the earlier one; with none, the scan starts empty.
    """
    start = float(ds["mjd_beg"].values.min())
    for version in reversed(repo.state_versions(name)):
        state = repo.open_state(name, version)
        ends = state["state_mjd_end"].values if "state_mjd_end" in state else np.array([np.inf])
        if np.all(~(ends >= start)):  # NaN (a band without exposures) does not block
            return state, version
    return None, None


def _drop_unused_coords(ds: xr.Dataset) -> xr.Dataset:
    used = {d for v in ds.data_vars.values() for d in v.dims}
    return ds.drop_vars([n for n, c in ds.coords.items() if n not in ds.indexes and not set(c.dims) <= used]
                        + [n for n in ds.indexes if n not in used])


def _write_pieces(repo: Repository, name: str, pieces: Mapping[str, pa.Table], provenance: Mapping[str, Any],
                  say: Callable[[str], None]) -> None:
    for key, table in pieces.items():
        repo.write_table(name, table, key=key, provenance=provenance)
    say(f"  table {name}: {sum(t.num_rows for t in pieces.values())} row(s) in {len(pieces)} piece(s)")


def _write_reports(repo: Repository, stage: Stage, ds: xr.Dataset, tables: Mapping[str, Any],
                   say: Callable[[str], None]) -> None:
    """Tables the stage's steps derive from the written level (keyed by the batch's first and last obs,
    or by the reporter's own keys)."""
    reporters = {name: fn for use in stage.steps for name, fn in use.step.reports.items()}
    if not reporters:
        return
    ids = [str(o) for o in ds["obsid"].values]
    level = repo.open_level(stage.output, obs=ids)
    for name, fn in reporters.items():
        table = fn(level, tables)
        pieces = table if isinstance(table, Mapping) else {f"{stage.output}_{ids[0]}_{ids[-1]}": table}
        _write_pieces(repo, name, pieces, {"stage": stage.name, "level": stage.output}, say)


def run_recipe(
    recipe: Recipe | str | os.PathLike[str] | Mapping[str, Any],
    repository: Repository | str | os.PathLike[str],
    *,
    compute: ComputeSpec | None = None,
    profile: str | Mapping[str, Any] | None = None,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    progress: ProgressSpec = None,
    log: Callable[[str], None] | None = None,
) -> RunReport:
    """Check a recipe's wiring, then run its stages on a Dask target.

    Parameters
    ----------
    recipe
        A :class:`Recipe`, a YAML path or a mapping.
    repository
        The repository (or its location); it must exist.
    compute, profile, scheduler, scheduler_file
        Where to run (at most one); default the ``local`` profile, an embedded
        ``LocalCluster`` sized to the machine.
    overrides
        ``dotted.key=value`` changes to the recipe.
    dry_run
        Only check and return the plan.
    progress
        Progress display of each write (see :class:`sphx.io.levelstore.LevelStore.write`).
    log
        Receives one-line messages (dashboard link, stage starts); default stderr.

    Returns
    -------
    RunReport
    """
    t0 = time.monotonic()
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides=overrides)
    repo = repository if isinstance(repository, Repository) else open_repository(repository)
    spec = compute or resolve_compute(profile=profile, scheduler=scheduler, scheduler_file=scheduler_file)
    plan = check_recipe(recipe, repo)
    report = RunReport(recipe.name, repo.location, spec.describe(), plan, dry_run=dry_run)
    if dry_run:
        return report
    with compute_context(spec, log=say):
        for stage, stage_plan in zip(recipe.stages, plan, strict=True):
            if stage.kind == "calibration":
                from ..calibrate.run import run_solver

                say(f"stage {stage.name}: calibration solver {stage.solver}")
                report.writes.append(run_solver(
                    repo, stage.solver, stage.calibration, select=recipe.select.as_kwargs(),
                    calibrations=recipe.calibrations, provenance={"recipe": recipe.identity(), "stage": stage.name},
                    log=say))
                continue
            if stage.kind == "level3":
                from ..level3.run import run_level3

                say(f"stage {stage.name}: level 3 on {stage.input}")
                done = run_level3(repo, stage.level3, level=stage.input, select=recipe.select.as_kwargs(), log=say)
                report.writes.append(done)
                continue
            say(f"stage {stage.name}: {stage.input} -> {stage.output}")
            ds = repo.open_level(stage.input, **recipe.select.as_kwargs())
            if not ds.sizes["obs"]:
                say(f"  no complete observations of {stage.input!r} match the selection; nothing to do")
                continue
            calibrations: dict[str, int] = {}
            tables = _open_tables(repo, stage)
            states: list[tuple[str, xr.Dataset, int | None]] = []
            for use, used in zip(stage.steps, stage_plan["steps"], strict=True):
                calib = {name: repo.open_calibration(name, version) for name, version in used["calibrations"].items()}
                calibrations.update(used["calibrations"])
                step = use.step
                previous, version = _previous_state(repo, step.state, ds) if step.state else (None, None)
                ds = step(ds, calib=calib, config=use.config, instrument=repo.instrument, tables=tables,
                          state=previous)
                if step.state:
                    states.append((step.state, ds[list(step.state_variables)], version))
                    ds = _drop_unused_coords(ds.drop_vars(list(step.state_variables)))
            made: list[tuple[str, Mapping[str, pa.Table]]] = []
            for use in stage.steps:
                for name, split in use.step.makes_tables.items():
                    ds, pieces = split(ds)
                    made.append((name, pieces))
            provenance = {
                "recipe": recipe.identity(),
                "stage": stage.name,
                "steps": stage_plan["steps"],
                "input": {"level": stage.input, "observations": int(ds.sizes["obs"]),
                          "bands": [int(b) for b in ds["band"].values]},
                "calibrations": calibrations,
                "tables": sorted(tables),
                "compute": spec.describe(),
            }
            pending = [repo.prepare_state(name, st, provenance={**provenance, "continues": version})
                       for name, st, version in states]
            report.writes.append(repo.write_level(stage.output, ds, provenance=provenance, progress=progress,
                                                  also=[p.delayed for p in pending]))
            for p in pending:
                say(f"  state {p.name} v{p.commit()}")
            say(f"  {report.writes[-1]}")
            for name, pieces in made:
                _write_pieces(repo, name, pieces, {"stage": stage.name, "level": stage.output}, say)
            _write_reports(repo, stage, ds, tables, say)
    report.elapsed = time.monotonic() - t0
    return report
