"""The ``sphx`` command line: ``demo``, ``simulate``, ``run``, ``info``, ``export-calibration``, ``steps``,
``profiles``."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import CalibrationError, SphxError

if TYPE_CHECKING:
    from .io.repository import Repository

# Products sphx keeps that the archive has no file for, and where their content goes there.
NOT_ARCHIVED = {
    "flat_field": "the archive folds the flat field into abs_gain_matrix (ABS_GAIN = g(CWAVE) / FLAT)",
}


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
@click.option("--calibrate", is_flag=True,
              help="Also solve the dark current and flat field from the survey (needs --exposures 24 or more).")
def demo(output: str, full: bool, exposures: int, profile: str | None, progress: bool | None,
         calibrate: bool) -> None:
    """Run the whole pipeline that exists on a small default survey."""
    from .demo import run_demo

    try:
        run_demo(output, full=full, n_exposures=exposures, profile=profile, progress=progress, calibrate=calibrate)
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
        records = {(r["target"], r["id"]): r for r in repo.provenance("calibration")}
        for name, versions in repo.calibrations().items():
            origin = ", ".join(f"v{v} {_origin(records.get((name, v), {}))}" for v in versions)
            click.echo(f"  calibration {name}: versions {versions} ({origin})")
        for name in repo.tables():
            click.echo(f"  table {name}")
    except SphxError as e:
        _fail(e)


def _origin(record: dict[str, Any]) -> str:
    """What wrote a calibration version, from its provenance record: the solver, else the source."""
    return str(record.get("solver") or record.get("source") or "unknown")


def exportable_calibrations() -> list[str]:
    """Calibration products that have an archive format (FITS per detector; gain_factors YAML)."""
    from .io.fits.calibration import CALIBRATION_FILES

    return sorted([*CALIBRATION_FILES, "gain_factors"])


def export_calibration(
    repo: Repository,
    name: str,
    folder: str | Path,
    *,
    version: int | None = None,
    bands: Sequence[int] | None = None,
    date: _dt.date | _dt.datetime | str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one version of a calibration product in its archive format, one file per band.

    The repository version is the file name's ``v<version>`` (``cal-`` products); the
    ``VERSION`` keyword stays what the archive defines, the software (sphx) version.

    Parameters
    ----------
    repo
        The repository holding the product.
    name
        Product name; one of :func:`exportable_calibrations`.
    folder
        Output folder (created if needed).
    version
        Repository version (default the latest).
    bands
        Detectors to write (default every band of that version).
    date
        Processing date of the file names and ``DATE`` keyword; default the time the
        version was written (its provenance record), so a re-export gives the same names.
    overwrite
        Replace existing files; otherwise an existing file is an error and nothing is written.

    Returns
    -------
    The paths written (``gain_factors``: one YAML for all the bands).

    Raises
    ------
    CalibrationError
        A product without an archive format (names those that have one) or a band the
        version does not have.
    CalibrationNotFoundError
        A product or version the repository does not hold.
    FileExistsError
        A file to write exists and ``overwrite`` is false.
    """
    from .calibration import PRODUCTS
    from .io.fits.calibration import calibration_filename, write_calibration_product, write_gain_factors

    exportable = exportable_calibrations()
    if name not in exportable:
        if name not in PRODUCTS:
            what = f"unknown calibration product {name!r}"
        else:
            what = f"calibration product {name!r} has no archive format" + (
                f": {NOT_ARCHIVED[name]}" if name in NOT_ARCHIVED else "")
        raise CalibrationError(f"{what}. Products that can be exported: {', '.join(exportable)}")
    versions = repo.calibration_versions(name)
    v = versions[-1] if version is None and versions else version
    ds = repo.open_calibration(name, v)  # CalibrationNotFoundError names the stored products / versions
    v = int(v)
    have = [int(b) for b in ds["band"].values.tolist()]
    chosen = have if not bands else list(dict.fromkeys(int(b) for b in bands))
    missing = [b for b in chosen if b not in have]
    if missing:
        raise CalibrationError(f"calibration product {name!r} v{v} has no band(s) {missing}; its bands: {have}")
    if date is None:
        written = [r["time"] for r in repo.provenance("calibration", name) if r["id"] == v]
        date = _dt.datetime.fromisoformat(written[-1]) if written else None  # None: now
    out = Path(folder)
    targets = [out / calibration_filename(name, b, version=v, date=date) for b in chosen]
    if not overwrite:
        for path in dict.fromkeys(targets):
            if path.exists():
                raise FileExistsError(f"{path} exists (overwrite it with --overwrite, or choose another folder)")
    if name == "gain_factors":
        return [write_gain_factors(ds.sel(band=chosen), out, date=date, overwrite=overwrite)]
    return [write_calibration_product(ds, name, out, band=b, version=v, date=date, overwrite=overwrite,
                                      n_active=repo.instrument.n_active) for b in chosen]


def _version_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None or value == "latest":
        return None
    try:
        v = int(value)
    except ValueError:
        v = 0
    if v < 1:
        raise click.BadParameter(f"{value!r} is not a version number (1, 2, ...) or 'latest'")
    return v


@main.command(name="export-calibration")
@click.argument("repository")
@click.argument("name")
@click.option("--version", "version", default=None, callback=_version_option, metavar="N",
              help="Repository version of the product (default: the latest; see `sphx info`).")
@click.option("-b", "--band", "bands", multiple=True, type=int, metavar="B",
              help="Detector to export; repeat for several (default: every band of the version).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder that receives the files (created if needed).")
@click.option("--date", default=None, type=click.DateTime(formats=["%Y-%m-%d"]),
              help="Processing date of the file names and DATE keyword (default: when the version was written).")
@click.option("--overwrite", is_flag=True, help="Replace files that exist.")
def export_calibration_command(repository: str, name: str, version: int | None, bands: tuple[int, ...],
                               output: str, date: _dt.datetime | None, overwrite: bool) -> None:
    """Export a calibration product NAME of REPOSITORY in the IRSA archive format.

    One FITS file per detector (gain_factors: one YAML file), named as the archive's
    with v<N> the repository version; the VERSION keyword holds the sphx version, as in
    the archive. Prints the files written.
    """
    from .io import open_repository

    try:
        repo = open_repository(repository)
        paths = export_calibration(repo, name, output, version=version, bands=bands or None, date=date,
                                   overwrite=overwrite)
    except (SphxError, FileExistsError) as e:
        _fail(e)
    for path in paths:
        click.echo(str(path))


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
