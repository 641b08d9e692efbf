"""The ``sphx`` command line: ``demo``, ``simulate``, ``run``, ``info``, ``steps``, ``profiles``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import SphxError


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sphx")
def main() -> None:
    """sphx: the SPHEREx pipeline on xarray, Dask and Zarr."""


@main.command()
@click.option("-o", "--output", default="sphx-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder (under the current directory) that receives everything the demo makes.")
@click.option("--full", is_flag=True, help="Real 2040x2040 detectors instead of the small test geometry.")
@click.option("--exposures", default=4, show_default=True, type=int, help="Number of exposures.")
@click.option("--profile", default=None, help="Compute profile (default: embedded LocalCluster).")
@click.option("--progress/--no-progress", default=None, help="Show progress bars (default: on a terminal).")
def demo(output: str, full: bool, exposures: int, profile: str | None, progress: bool | None) -> None:
    """Run the whole pipeline that exists on a small default survey."""
    from .demo import run_demo

    try:
        run_demo(output, full=full, n_exposures=exposures, profile=profile, progress=progress)
    except SphxError as e:
        _fail(e)


@main.command()
@click.argument("repository")
@click.option("-c", "--config", "config", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Simulation configuration (YAML); defaults for everything not given.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration entry, e.g. survey.n_exposures=4 or instrument=SPHEREx-small.")
def simulate(repository: str, config: str | None, overrides: tuple[str, ...]) -> None:
    """Simulate a survey into a new REPOSITORY: raw exposures, calibration products and truth."""
    import yaml

    from .simulate import load_config, simulate_survey

    try:
        extra = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise SphxError(f"--set {item!r}: expected KEY=VALUE")
            extra[key.strip()] = yaml.safe_load(value)
        cfg = load_config(config, **extra)
        click.echo(f"simulating {cfg.survey.n_exposures} exposure(s) of {cfg.instrument} into {repository}")
        report = simulate_survey(cfg, repository, log=click.echo)
    except SphxError as e:
        _fail(e)
    click.echo(str(report))


@main.command()
@click.argument("recipe")
@click.option("--repo", "repository", required=True, help="Repository path or URL.")
@click.option("--scheduler", default=None, help="Address of a running dask scheduler (tcp://host:8786).")
@click.option("--scheduler-file", default=None, type=click.Path(dir_okay=False),
              help="Scheduler file of a running dask scheduler (e.g. inside a SLURM allocation).")
@click.option("--profile", default=None, help="Compute profile: local (default), threads, synchronous, slurm, "
              "or one from ~/.config/sphx/compute.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe entry, e.g. stages.0.steps.1.config.bad=[HOT].")
@click.option("--dry-run", is_flag=True, help="Check the wiring and print the plan; run nothing.")
@click.option("--progress/--no-progress", default=None, help="Show progress bars (default: on a terminal).")
def run(recipe: str, repository: str, scheduler: str | None, scheduler_file: str | None, profile: str | None,
        overrides: tuple[str, ...], dry_run: bool, progress: bool | None) -> None:
    """Run RECIPE (a YAML file, or the name of a shipped recipe) on a repository."""
    from .demo import recipe_path
    from .pipeline import run_recipe

    try:
        path = Path(recipe) if Path(recipe).suffix in (".yaml", ".yml") or Path(recipe).exists() else recipe_path(recipe)
        report = run_recipe(path, repository, scheduler=scheduler, scheduler_file=scheduler_file, profile=profile,
                            overrides=overrides, dry_run=dry_run, progress=progress)
    except SphxError as e:
        _fail(e)
    click.echo(str(report))


@main.command()
@click.argument("repository")
def info(repository: str) -> None:
    """Describe a repository: levels, calibration products, tables."""
    from .io import open_repository

    try:
        repo = open_repository(repository)
        click.echo(f"repository {repo.location} (instrument {repo.instrument.name})")
        for level in repo.levels():
            s = repo.level_summary(level)
            bands = ", ".join(f"D{b}:{v['complete']}" + (f"(+{v['pending']} pending)" if v["pending"] else "")
                              for b, v in s["bands"].items() if v["complete"] or v["pending"])
            click.echo(f"  level {level}: {s['observations']} observation(s) {s['first']}..{s['last']}; images {bands}")
        for name, versions in repo.calibrations().items():
            click.echo(f"  calibration {name}: versions {versions}")
        for name in repo.tables():
            click.echo(f"  table {name}")
    except SphxError as e:
        _fail(e)


@main.command(name="steps")
def list_steps() -> None:
    """List the registered pipeline steps and their configuration."""
    from .pipeline import steps

    for name, step in steps().items():
        click.echo(f"{name}: {step.module}")
        for key, f in step.config.model_fields.items():
            click.echo(f"    {key} = {f.default!r}" + (f"  # {f.description}" if f.description else ""))
        if step.calibrations:
            click.echo(f"    calibrations: {', '.join(step.calibrations)}")


@main.command()
def profiles() -> None:
    """List the compute profiles (built-in and from the user's file)."""
    from .pipeline import load_profiles

    try:
        for name, body in load_profiles().items():
            click.echo(f"{name}: {json.dumps(body)}")
    except SphxError as e:
        _fail(e)
