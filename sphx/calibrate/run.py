"""Run a calibration solver on a repository and store its products as new versions.

A solver reads the images of the selection, reduces them on the current Dask scheduler
and returns products for the bands it solved. Each product is stored as the next
version of its family: the solved bands replace those of the version the run started
from (``calibrations`` pins, default the latest), and the other bands are carried over
unchanged, so a Level 2 recipe can be pointed at the new version for every detector.
The provenance record names the solver, its config, the input levels and images, the
calibration versions used, which bands were solved and which were carried over.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
import pydantic
import xarray as xr

from ..errors import CalibrationError, CalibrationNotFoundError
from ..io.repository import Repository, open_repository
from .inputs import open_inputs

__all__ = ["SOLVERS", "Solver", "SolverReport", "merge_bands", "run_solver"]


@dataclass(frozen=True)
class Solver:
    """One calibration solver.

    Attributes
    ----------
    name
        Key in recipes (``solver: dark_flat``).
    module
        The paper's module name.
    config
        Its pydantic config model.
    reads
        Pixel variable -> level.
    calibrations
        Products read (alternatives as ``"a|b"``: the first one present).
    tables
        Repository tables the solver's tasks read (checked before anything runs).
    writes
        Product families written.
    solve
        ``solve(repo, inputs, config, calibrations=...) -> {product: Dataset}`` (lazy).
    extra
        Per-image variables read with the pixels (WCS, FINAST...).
    batch_field
        The config field giving the images the solver works on together, read as one
        chunk per variable (:func:`~sphx.calibrate.inputs.open_inputs` ``batch``); None:
        one image per chunk.
    """

    name: str
    module: str
    config: type[pydantic.BaseModel]
    reads: Mapping[str, str]
    calibrations: tuple[str, ...]
    tables: tuple[str, ...]
    writes: tuple[str, ...]
    solve: Callable[..., dict[str, xr.Dataset]]
    extra: tuple[str, ...] = ()
    batch_field: str | None = None

    def read_batch(self, config: pydantic.BaseModel) -> int | None:
        """Images per read chunk under ``config``."""
        return getattr(config, self.batch_field) if self.batch_field else None

    def make_config(self, config: pydantic.BaseModel | Mapping[str, Any] | None) -> pydantic.BaseModel:
        """The solver's config from a model or a mapping; unknown keys raise CalibrationError."""
        if isinstance(config, self.config):
            return config
        try:
            return self.config(**dict(config or {}))
        except pydantic.ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise CalibrationError(f"{self.name} config: {problems} (known keys: "
                                   f"{', '.join(self.config.model_fields)})") from None


SOLVERS: dict[str, Solver] = {}


def register_solver(solver: Solver) -> Solver:
    SOLVERS[solver.name] = solver
    return solver


def get_solver(name: str) -> Solver:
    _load_solvers()
    try:
        return SOLVERS[name]
    except KeyError:
        raise CalibrationError(f"unknown calibration solver {name!r}; solvers: {', '.join(sorted(SOLVERS))}") from None


def _load_solvers() -> None:
    from . import abs_gain, dark_flat, psf  # noqa: F401  (they register themselves)


@dataclass
class SolverReport:
    """What :func:`run_solver` did."""

    solver: str
    versions: dict[str, int] = field(default_factory=dict)
    images: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def __str__(self) -> str:
        made = ", ".join(f"{n} v{v}" for n, v in self.versions.items())
        used = ", ".join(f"band {b}: {n}" for b, n in self.images.items())
        return f"{self.solver}: {made} from {used} image(s) in {self.elapsed:.1f} s"


def resolve_calibrations(repo: Repository, names: tuple[str, ...], pins: Mapping[str, int | str]) -> dict[str, int]:
    """Versions of the products a solver reads (alternatives ``a|b``: the first held)."""
    out: dict[str, int] = {}
    for entry in names:
        options = entry.split("|")
        for name in options:
            versions = repo.calibration_versions(name)
            if versions:
                wanted = pins.get(name, "latest")
                version = versions[-1] if wanted == "latest" else int(wanted)
                if version not in versions:
                    raise CalibrationNotFoundError(f"calibration {name!r} has no version {version} (versions {versions})")
                out[name] = version
                break
        else:
            raise CalibrationNotFoundError(
                f"the solver needs calibration product {' or '.join(repr(o) for o in options)}, which "
                f"{repo.location} does not hold")
    return out


def merge_bands(new: xr.Dataset, previous: xr.Dataset | None) -> tuple[xr.Dataset, list[int]]:
    """``new``'s bands, plus the bands of ``previous`` that ``new`` lacks (carried over)."""
    if previous is None:
        return new, []
    carried = [int(b) for b in previous["band"].values if int(b) not in set(new["band"].values.tolist())]
    if not carried:
        return new, []
    old = previous.sel(band=carried)[[v for v in new.data_vars if v in previous]]
    merged = xr.concat([new, old.astype({v: new[v].dtype for v in old.data_vars})], dim="band",
                       data_vars="minimal", coords="minimal", compat="override", join="outer")
    merged = merged.sortby("band")
    for v in new.data_vars:
        merged[v].attrs = new[v].attrs
    merged.attrs = new.attrs
    return merged, carried


def run_solver(
    repository: Repository | str,
    solver: str,
    config: pydantic.BaseModel | Mapping[str, Any] | None = None,
    *,
    select: Mapping[str, Any] | None = None,
    calibrations: Mapping[str, int | str] | None = None,
    provenance: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> SolverReport:
    """Solve for calibration products on the current Dask scheduler and store them.

    Parameters
    ----------
    repository
        Repository holding the input levels, tables and calibration products.
    solver
        A registered solver: ``dark_flat``, ``abs_gain`` or ``psf``.
    config
        The solver's config model or a mapping of its fields (unknown keys are errors).
    select
        ``bands``, ``obs``, ``start``, ``end``: which images to use.
    calibrations
        Version pins of the products read (default the latest).
    provenance
        Extra provenance (the recipe that ran it).
    log
        Receives one-line messages; default stderr.

    Returns
    -------
    SolverReport
    """
    t0 = time.monotonic()
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    repo = repository if isinstance(repository, Repository) else open_repository(repository)
    spec = get_solver(solver)
    config = spec.make_config(config)
    pins = dict(calibrations or {})
    used = resolve_calibrations(repo, ("spectral_wcs", *spec.calibrations), pins)
    calib = {name: repo.open_calibration(name, version) for name, version in used.items()}
    missing = [t for t in spec.tables if t not in repo.tables()]
    if missing:
        raise CalibrationError(f"{solver} reads table(s) {missing}, which {repo.location} does not hold")
    inputs = open_inputs(repo, spec.reads, spectral_wcs=calib["spectral_wcs"], select=select, extra=spec.extra,
                         batch=spec.read_batch(config))
    say(f"{spec.module}: {sum(inputs.n_images().values())} image(s) of band(s) {inputs.bands}")
    products = spec.solve(repo, inputs, config, calibrations=calib)
    # one pass over the images for every product of the solver
    products = dict(zip(products, dask.compute(*products.values()), strict=True))
    report = SolverReport(solver, images=inputs.n_images())
    for name, ds in products.items():
        previous_version = pins.get(name, "latest")
        try:
            previous = repo.open_calibration(name, previous_version)
        except CalibrationNotFoundError:
            previous, previous_version = None, None
        merged, carried = merge_bands(ds, previous)
        record = {
            "solver": solver, "module": spec.module, "config": config.model_dump(mode="json"),
            "inputs": inputs.provenance(), "calibrations": used, "tables": list(spec.tables),
            "bands_solved": inputs.bands, "bands_carried": carried,
            "carried_from": None if previous is None else (previous.attrs.get("sphx_version") or previous_version),
            **dict(provenance or {}),
        }
        report.versions[name] = repo.write_calibration(name, merged, provenance=record)
        say(f"  {name} v{report.versions[name]} (bands solved {inputs.bands}" +
            (f", carried over {carried})" if carried else ")"))
    report.elapsed = time.monotonic() - t0
    return report
