"""Run a recipe against a repository: the library function behind ``sphx run``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._progress import ProgressSpec
from ..io.levelstore import WriteReport
from ..io.repository import Repository, open_repository
from .compute import ComputeSpec, compute_context, resolve_compute
from .recipe import Recipe, check_recipe, load_recipe

__all__ = ["RunReport", "format_plan", "run_recipe"]


@dataclass
class RunReport:
    """What a run did (or, for a dry run, would do)."""

    recipe: str
    repository: str
    compute: str
    plan: list[dict[str, Any]]
    writes: list[WriteReport] = field(default_factory=list)
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
            say(f"stage {stage.name}: {stage.input} -> {stage.output}")
            ds = repo.open_level(stage.input, **recipe.select.as_kwargs())
            if not ds.sizes["obs"]:
                say(f"  no complete observations of {stage.input!r} match the selection; nothing to do")
                continue
            calibrations: dict[str, int] = {}
            for use, used in zip(stage.steps, stage_plan["steps"], strict=True):
                calib = {name: repo.open_calibration(name, version) for name, version in used["calibrations"].items()}
                calibrations.update(used["calibrations"])
                ds = use.step(ds, calib=calib, config=use.config, instrument=repo.instrument)
            provenance = {
                "recipe": recipe.identity(),
                "stage": stage.name,
                "steps": stage_plan["steps"],
                "input": {"level": stage.input, "observations": int(ds.sizes["obs"]),
                          "bands": [int(b) for b in ds["band"].values]},
                "calibrations": calibrations,
                "compute": spec.describe(),
            }
            report.writes.append(repo.write_level(stage.output, ds, provenance=provenance, progress=progress))
            say(f"  {report.writes[-1]}")
    report.elapsed = time.monotonic() - t0
    return report
