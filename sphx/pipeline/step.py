"""Steps: the pipeline's modules as registered, declared, lazy functions on the cube.

A module is a pure function ``f(ds, *, calib, config, instrument) -> ds`` that builds a
Dask graph and computes nothing. :func:`register_step` declares, next to the function,
what a recipe needs to check its wiring before anything runs: the variables it reads
(and their units), the variables it writes, the calibration products it needs and the
pixel frame it works on. The declaration returns a plain function that library users
call directly::

    l1 = convert_to_engineering_units(raw, calib={"gain_factors": gains})

Configs are pydantic models with ``extra="forbid"``: an unknown key is an error that
names the key and the keys the step knows.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import xarray as xr

from .. import __version__
from ..errors import CalibrationError, ConfigError, StepError, UnknownStepError
from ..instrument import SPHEREX, SPHEREX_SMALL, Instrument
from ..levels import same_unit

__all__ = ["Step", "StepConfig", "get_step", "instrument_of", "register_step", "steps"]

Frame = Literal["any", "raw", "active"]

# Modules whose import registers the built-in steps, in pipeline order.
_BUILTIN = (
    "sphx.level1.association",
    "sphx.level1.coarse_astrometry",
    "sphx.level1.engineering_units",
    "sphx.level1.preamp",
    "sphx.level1.sur",
    "sphx.quality",
    "sphx.level1.quality",
    "sphx.level2.nonlinearity",
    "sphx.level2.variance",
    "sphx.level2.persistence",
    "sphx.level2.reference_pixels",
    "sphx.level2.bad_pixels",
    "sphx.level2.photometric",
    "sphx.level2.query_catalog",
    "sphx.level2.fine_astrometry",
    "sphx.level2.sso",
    "sphx.level2.source_mask",
    "sphx.level2.outliers",
    "sphx.level2.zodi",
    "sphx.level2.quality",
)
_REGISTRY: dict[str, Step] = {}
_loaded = False


class StepConfig(pydantic.BaseModel):
    """Base of step configurations: typed, defaulted, frozen, no unknown keys."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def instrument_of(ds: xr.Dataset) -> Instrument:
    """The instrument a cube was made for (recorded by :func:`sphx.cube.make_cube`)."""
    d = ds.attrs.get("instrument")
    if isinstance(d, Mapping):
        return Instrument.from_dict(d)
    n = ds.sizes.get("x")
    for inst in (SPHEREX, SPHEREX_SMALL):
        if n in (inst.n_active, inst.n_raw):
            return inst
    raise StepError("the cube does not say which instrument it follows; pass instrument=...")


@dataclass(frozen=True)
class Step:
    """A registered pipeline module and its declarations.

    Attributes
    ----------
    name
        Registry name used in recipes.
    module
        The pipeline paper's module name (written to the cube's history).
    func
        The implementation, ``func(ds, *, calib, config, instrument) -> ds``.
    config
        Its configuration model.
    reads
        Variables it needs, with the units they must have (None: any).
    writes
        Variables it always produces, with their units (None: not declared).
    converts
        Variables whose units it changes when they are present, with the new units.
    removes
        Variables it drops.
    calibrations
        Calibration products it needs.
    tables
        Repository tables it reads, each ``True`` when required (``False``: used when
        present); passed to the function as ``tables={name: pyarrow.Table}``.
    lazy_tables
        Those of ``tables`` it receives as a ``pyarrow.dataset.Dataset``, to read only
        the parts it needs (the reference catalogue); the others are read whole.
    makes_tables
        Tables it puts into the cube as variables, ``{name: split}`` with
        ``split(ds) -> (ds without them, {key: pyarrow.Table})``; a runner writes each
        piece as table ``name`` under its key and drops the variables from the level.
    state
        Name of the scan state it continues (``None`` for none): the function receives the
        previous state as ``state=`` (an ``xarray.Dataset`` or ``None`` at the start)
        and returns the new one in ``state_variables`` of its output, which a runner
        stores as the next version of that state and drops from the level.
    state_variables
        The output variables that hold the new state.
    reports
        Tables derived from the written level, ``{table name: f(level, tables)}`` with
        ``tables`` the repository tables the stage reads; ``f`` returns a pyarrow Table,
        or ``{key: pyarrow.Table}`` for one piece per key. A runner writes them after
        the level.
    frame
        Pixel frame it works on: ``"raw"`` (reference border present), ``"active"`` or ``"any"``.
    output_frame
        Frame of its output when it changes it.
    """

    name: str
    module: str
    func: Callable[..., xr.Dataset]
    config: type[StepConfig]
    reads: Mapping[str, str | None] = field(default_factory=dict)
    writes: Mapping[str, str | None] = field(default_factory=dict)
    converts: Mapping[str, str] = field(default_factory=dict)
    removes: tuple[str, ...] = ()
    calibrations: tuple[str, ...] = ()
    tables: Mapping[str, bool] = field(default_factory=dict)
    lazy_tables: tuple[str, ...] = ()
    makes_tables: Mapping[str, Callable[[xr.Dataset], Any]] = field(default_factory=dict)
    state: str | None = None
    state_variables: tuple[str, ...] = ()
    reports: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    frame: Frame = "any"
    output_frame: Frame | None = None

    def make_config(self, config: StepConfig | Mapping[str, Any] | None = None, **options: Any) -> StepConfig:
        """Validate a configuration; raises :class:`~sphx.errors.ConfigError` naming bad keys."""
        if isinstance(config, self.config) and not options:
            return config
        values = {**(config.model_dump() if isinstance(config, StepConfig) else dict(config or {})), **options}
        try:
            return self.config(**values)
        except pydantic.ValidationError as e:
            raise ConfigError(self.describe_errors(e)) from None

    def describe_errors(self, error: pydantic.ValidationError, prefix: str = "") -> str:
        known = ", ".join(self.config.model_fields) or "none"
        lines = []
        for err in error.errors():
            key = prefix + ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                hint = difflib.get_close_matches(str(err["loc"][-1]), list(self.config.model_fields), n=1)
                lines.append(f"{key}: unknown config key for step {self.name!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known keys: {known}")
            else:
                lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        return "; ".join(lines)

    def __call__(
        self,
        ds: xr.Dataset,
        *,
        calib: Mapping[str, xr.Dataset] | None = None,
        config: StepConfig | Mapping[str, Any] | None = None,
        instrument: Instrument | None = None,
        tables: Mapping[str, Any] | None = None,
        state: xr.Dataset | None = None,
        **options: Any,
    ) -> xr.Dataset:
        cfg = self.make_config(config, **options)
        calib = dict(calib or {})
        missing = [c for c in self.calibrations if c not in calib]
        if missing:
            raise CalibrationError(f"step {self.name!r} needs calibration product(s) {missing}; pass calib={{...}}")
        tables = {k: v if k in self.lazy_tables or not hasattr(v, "to_table") else v.to_table()
                  for k, v in (tables or {}).items() if k in self.tables}
        missing = [t for t, required in self.tables.items() if required and t not in tables]
        if missing:
            raise StepError(f"step {self.name!r} needs table(s) {missing}; pass tables={{...}}")
        for var, units in self.reads.items():
            if var not in ds.variables:
                raise StepError(f"step {self.name!r} needs variable {var}, which the cube does not have")
            if units is not None and not same_unit(ds[var].attrs.get("units"), units):
                raise StepError(
                    f"step {self.name!r} needs {var} in {units!r}, but the cube has {ds[var].attrs.get('units')!r}"
                )
        extra: dict[str, Any] = {}
        if self.tables:
            extra["tables"] = tables
        if self.state is not None:
            extra["state"] = state
        out = self.func(ds, calib=calib, config=cfg, instrument=instrument or instrument_of(ds), **extra)
        history = [*ds.attrs.get("history", []), f"{self.module}, sphx {self.name} {__version__}"]
        for c in self.calibrations:
            version = calib[c].attrs.get("sphx_version")
            history.append(f"[CALIB] {c} " + (f"v{version}" if version is not None else "(not from a repository)"))
        out.attrs = {**ds.attrs, **out.attrs, "history": history}
        return out


def register_step(
    name: str,
    *,
    module: str,
    config: type[StepConfig] = StepConfig,
    reads: Mapping[str, str | None] | None = None,
    writes: Mapping[str, str | None] | None = None,
    converts: Mapping[str, str] | None = None,
    removes: tuple[str, ...] = (),
    calibrations: tuple[str, ...] = (),
    tables: Mapping[str, bool] | None = None,
    lazy_tables: tuple[str, ...] = (),
    makes_tables: Mapping[str, Callable[[xr.Dataset], Any]] | None = None,
    state: str | None = None,
    state_variables: tuple[str, ...] = (),
    reports: Mapping[str, Callable[..., Any]] | None = None,
    frame: Frame = "any",
    output_frame: Frame | None = None,
) -> Callable[[Callable[..., xr.Dataset]], Callable[..., xr.Dataset]]:
    """Declare a function as pipeline step ``name``; see :class:`Step` for the fields."""

    def decorate(func: Callable[..., xr.Dataset]) -> Callable[..., xr.Dataset]:
        step = Step(name, module, func, config, dict(reads or {}), dict(writes or {}), dict(converts or {}),
                    tuple(removes), tuple(calibrations), dict(tables or {}), tuple(lazy_tables),
                    dict(makes_tables or {}), state, tuple(state_variables),
                    dict(reports or {}), frame, output_frame)
        if name in _REGISTRY and _REGISTRY[name].func.__qualname__ != func.__qualname__:
            raise ValueError(f"step name {name!r} is already registered by {_REGISTRY[name].func.__module__}")
        _REGISTRY[name] = step

        @functools.wraps(func)
        def run(ds: xr.Dataset, *, calib: Mapping[str, xr.Dataset] | None = None,
                config: StepConfig | Mapping[str, Any] | None = None, instrument: Instrument | None = None,
                tables: Mapping[str, Any] | None = None, state: xr.Dataset | None = None,
                **options: Any) -> xr.Dataset:
            return step(ds, calib=calib, config=config, instrument=instrument, tables=tables, state=state,
                        **options)

        run.step = step  # type: ignore[attr-defined]
        return run

    return decorate


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _BUILTIN:
        importlib.import_module(mod)
    for ep in importlib.metadata.entry_points(group="sphx.steps"):
        ep.load()
    _loaded = True


def steps() -> dict[str, Step]:
    """All registered steps, built-in and from ``sphx.steps`` entry points."""
    _load()
    return dict(_REGISTRY)


def get_step(name: str) -> Step:
    """The step called ``name``; :class:`~sphx.errors.UnknownStepError` suggests close names."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        raise UnknownStepError(
            f"unknown step {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; registered steps: {', '.join(_REGISTRY)}"
        ) from None
