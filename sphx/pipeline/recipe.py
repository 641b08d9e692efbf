"""Recipes: YAML files naming the steps, their configs, inputs, outputs and selection.

.. code-block:: yaml

    recipe: quicklook                   # name (required)
    description: first look at raw data
    select:                             # optional, applies to every stage's input
      bands: [1, 2, 3]
      obs: [2025W51_1A_0684_1]          # observation ids or keys
      start: 60800.0                    # MJD range (inclusive)
      end: 60900.0
    calibrations:                       # optional pins; default the latest version
      gain_factors: 2
    stages:
      - input: raw                      # a level in the repository or written earlier
        steps:
          - convert_to_engineering_units
          - step: image_statistics
            config: {bad: [NONFUNC, HOT]}
        output: quicklook               # level written
      - kind: level3                    # Level 3: photometry per image, catalogs per tile
        input: quicklook
        config: {variability_threshold: 5}   # sphx.level3.run.Level3Config
      - kind: calibration               # a calibration solver (sphx.calibrate)
        solver: dark_flat               # dark_flat or abs_gain
        config: {clip: 5}               # the solver's config model

Where it runs (local cluster, scheduler address, SLURM) is not part of a recipe; see
:mod:`sphx.pipeline.compute`. :func:`check_recipe` verifies the wiring against a
repository without reading pixel data: every step exists and its config keys are known,
each stage's input level exists (or an earlier stage writes it), the variables each step
reads are there in the right units and pixel frame, calibration products exist, and the
output matches its level. Each error names the file and the key.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from ..errors import CalibrationError, ConfigError, RecipeError, UnknownStepError
from ..io.levelstore import var_kind
from ..io.repository import Repository
from ..levels import get_level, same_unit
from .step import Step, StepConfig, get_step

__all__ = ["Recipe", "Selection", "Stage", "StepUse", "check_recipe", "load_recipe"]

_TOP = ("recipe", "description", "select", "calibrations", "stages")
_STAGE = ("name", "kind", "input", "steps", "output")
_LEVEL3_STAGE = ("name", "kind", "input", "config")
_CALIBRATION_STAGE = ("name", "kind", "solver", "config")
# A level3 stage runs these paper modules (sphx.level3.run); it writes tables and HATS
# catalogs, not a level.
LEVEL3_MODULES = ("estimate_diffuse_background", "perform_forced_photometry", "create_primary_catalog",
                  "create_secondary_catalog_and_estimate_variability", "create_high_reliability_catalog")
LEVEL3_CALIBRATIONS = ("average_psf", "solid_angle_pixel_map", "spectral_wcs")
_SELECT = ("bands", "obs", "start", "end")


@dataclass(frozen=True)
class StepUse:
    """One step of a stage with its validated config; ``key`` locates it in the file."""

    step: Step
    config: StepConfig
    key: str


@dataclass(frozen=True)
class Stage:
    """One stage: steps on the cube (``kind="images"``, writes ``output``), Level 3
    (``kind="level3"``: photometry and catalogs configured by ``level3``), or a
    calibration solver (``kind="calibration"``: ``solver`` with its config in ``level3``'s
    place, ``calibration``)."""

    name: str
    input: str
    steps: tuple[StepUse, ...]
    output: str
    key: str
    kind: str = "images"
    level3: Any = None
    solver: str = ""
    calibration: Any = None


@dataclass(frozen=True)
class Selection:
    bands: tuple[int, ...] | None = None
    obs: tuple[int | str, ...] | None = None
    start: float | None = None
    end: float | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {"bands": self.bands, "obs": self.obs, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe."""

    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    select: Selection = field(default_factory=Selection)
    calibrations: Mapping[str, int | str] = field(default_factory=dict)
    file: str | None = None
    sha256: str | None = None
    source: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def identity(self) -> dict[str, Any]:
        """What provenance records about the recipe."""
        return {"name": self.name, "file": self.file, "sha256": self.sha256}


def _err(msg: str, file: str | None, key: str | None) -> RecipeError:
    return RecipeError(msg, file=file, key=key)


def _unknown_keys(d: Mapping[str, Any], allowed: Sequence[str], file: str | None, prefix: str) -> None:
    for k in d:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            raise _err(f"unknown key {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                       + f"; expected one of {', '.join(allowed)}", file, f"{prefix}{k}")


def _level_name(value: Any, file: str | None, key: str) -> str:
    try:
        get_level(str(value))
    except KeyError as e:
        raise _err(str(e.args[0]), file, key) from None
    if not isinstance(value, str):
        raise _err(f"a level name must be a string, got {value!r}", file, key)
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, file: str | None) -> None:
    """Apply one ``a.b.0.c=value`` override (list indices allowed)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, p in enumerate(parts[:-1]):
        nxt: Any
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise _err(f"override {dotted!r}: no list entry {p}", file, ".".join(parts[: i + 1]))
            nxt = node[int(p)]
        elif isinstance(node, dict):
            nxt = node.setdefault(p, {})
        else:
            raise _err(f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping or list", file, dotted)
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise _err(f"override {dotted!r}: no list entry {last}", file, dotted)
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any], *, overrides: Sequence[str] = ()) -> Recipe:
    """Parse and validate a recipe (file path or mapping) without touching any repository.

    Parameters
    ----------
    source
        Path of a YAML file, or the recipe as a mapping.
    overrides
        ``dotted.key=value`` strings applied before validation; values are parsed as YAML
        (``stages.0.steps.1.config.bad=[HOT]``).

    Raises
    ------
    RecipeError
        Naming the file and the key of the first problem.
    """
    file = None
    digest = None
    if isinstance(source, Mapping):
        tree = dict(source)
    else:
        file = os.fspath(source)
        path = Path(file)
        if not path.is_file():
            raise _err("recipe file not found", file, None)
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        try:
            tree = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise _err(f"not valid YAML: {e}", file, None) from None
        if not isinstance(tree, dict):
            raise _err("a recipe must be a YAML mapping at the top level", file, None)
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy, plain types
    for item in overrides:
        if "=" not in item:
            raise _err(f"override {item!r} must look like key=value", file, None)
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(value), file)

    _unknown_keys(tree, _TOP, file, "")
    name = tree.get("recipe")
    if not isinstance(name, str) or not name:
        raise _err("missing recipe name (a string)", file, "recipe")

    select = _parse_select(tree.get("select") or {}, file)
    calibrations = tree.get("calibrations") or {}
    if not isinstance(calibrations, dict):
        raise _err("calibrations must map product names to versions", file, "calibrations")
    for k, v in calibrations.items():
        if not (v == "latest" or (isinstance(v, int) and v > 0)):
            raise _err(f"version must be a positive integer or 'latest', got {v!r}", file, f"calibrations.{k}")

    stages_in = tree.get("stages")
    if not isinstance(stages_in, list) or not stages_in:
        raise _err("a recipe needs a non-empty list of stages", file, "stages")
    stages = tuple(_parse_stage(s, i, file) for i, s in enumerate(stages_in))
    return Recipe(name, stages, str(tree.get("description") or ""), select, dict(calibrations), file, digest, tree)


def _parse_select(sel: Any, file: str | None) -> Selection:
    if not isinstance(sel, dict):
        raise _err("select must be a mapping", file, "select")
    _unknown_keys(sel, _SELECT, file, "select.")
    bands = sel.get("bands")
    if bands is not None and (not isinstance(bands, list) or not all(isinstance(b, int) for b in bands)):
        raise _err(f"bands must be a list of detector numbers, got {bands!r}", file, "select.bands")
    obs = sel.get("obs")
    if obs is not None and not isinstance(obs, list):
        raise _err(f"obs must be a list of observation ids or keys, got {obs!r}", file, "select.obs")
    for k in ("start", "end"):
        if sel.get(k) is not None and not isinstance(sel[k], (int, float)):
            raise _err(f"{k} must be an MJD number, got {sel[k]!r}", file, f"select.{k}")
    return Selection(tuple(bands) if bands else None, tuple(obs) if obs else None, sel.get("start"), sel.get("end"))


def _parse_level3_stage(stage: dict[str, Any], i: int, file: str | None) -> Stage:
    from ..level3.run import Level3Config

    key = f"stages[{i}]"
    _unknown_keys(stage, _LEVEL3_STAGE, file, f"{key}.")
    if "input" not in stage:
        raise _err("missing input level", file, f"{key}.input")
    cfg = stage.get("config") or {}
    if not isinstance(cfg, dict):
        raise _err("config must be a mapping", file, f"{key}.config")
    try:
        config = Level3Config(**cfg)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise _err(f"level3 config: {problems} (known keys: {', '.join(Level3Config.model_fields)})",
                   file, f"{key}.config") from None
    return Stage(str(stage.get("name") or f"stage{i}"), _level_name(stage["input"], file, f"{key}.input"), (),
                 "", key, kind="level3", level3=config)


def _parse_calibration_stage(stage: dict[str, Any], i: int, file: str | None) -> Stage:
    from ..calibrate.run import get_solver

    key = f"stages[{i}]"
    _unknown_keys(stage, _CALIBRATION_STAGE, file, f"{key}.")
    try:
        solver = get_solver(str(stage.get("solver")))
    except CalibrationError as e:
        raise _err(str(e), file, f"{key}.solver") from None
    cfg = stage.get("config") or {}
    if not isinstance(cfg, dict):
        raise _err("config must be a mapping", file, f"{key}.config")
    try:
        config = solver.make_config(cfg)
    except CalibrationError as e:
        raise _err(str(e), file, f"{key}.config") from None
    levels = sorted(set(solver.reads.values()))
    return Stage(str(stage.get("name") or f"stage{i}"), levels[-1], (), "", key, kind="calibration",
                 solver=solver.name, calibration=config)


def _parse_stage(stage: Any, i: int, file: str | None) -> Stage:
    key = f"stages[{i}]"
    if not isinstance(stage, dict):
        raise _err("a stage must be a mapping with input, steps and output", file, key)
    kind = stage.get("kind", "images")
    if kind == "level3":
        return _parse_level3_stage(stage, i, file)
    if kind == "calibration":
        return _parse_calibration_stage(stage, i, file)
    if kind != "images":
        raise _err(f"unknown stage kind {kind!r} (kinds: images, level3, calibration)", file, f"{key}.kind")
    _unknown_keys(stage, _STAGE, file, f"{key}.")
    for k in ("input", "output"):
        if k not in stage:
            raise _err(f"missing {k} level", file, f"{key}.{k}")
    steps_in = stage.get("steps")
    if not isinstance(steps_in, list) or not steps_in:
        raise _err("a stage needs a non-empty list of steps", file, f"{key}.steps")
    uses = []
    for j, entry in enumerate(steps_in):
        skey = f"{key}.steps[{j}]"
        if isinstance(entry, str):
            name, cfg = entry, {}
        elif isinstance(entry, dict):
            _unknown_keys(entry, ("step", "config"), file, f"{skey}.")
            name, cfg = entry.get("step"), entry.get("config") or {}
            if not isinstance(cfg, dict):
                raise _err("config must be a mapping", file, f"{skey}.config")
        else:
            raise _err("a step is a name or a mapping with 'step' and 'config'", file, skey)
        try:
            step = get_step(str(name))
        except UnknownStepError as e:
            raise _err(str(e), file, f"{skey}.step" if isinstance(entry, dict) else skey) from None
        try:
            config = step.config(**cfg)
        except pydantic.ValidationError as e:
            raise _err(step.describe_errors(e), file, f"{skey}.config") from None
        except ConfigError as e:
            raise _err(str(e), file, f"{skey}.config") from None
        uses.append(StepUse(step, config, skey))
    return Stage(
        str(stage.get("name") or f"stage{i}"),
        _level_name(stage["input"], file, f"{key}.input"),
        tuple(uses),
        _level_name(stage["output"], file, f"{key}.output"),
        key,
    )


# ---------------------------------------------------------------------- wiring --
@dataclass
class _Frame:
    """What flows between steps: variables with units, and whether the border is present."""

    units: dict[str, str | None]
    raw_frame: bool | None


def _stored_frame(repo: Repository, level: str) -> _Frame:
    schema = repo.level_schema(level)
    units = {n: s["units"] for n, s in schema.items() if var_kind(s["dims"]) in ("image", "cell")}
    return _Frame(units, repo.level_summary(level)["reference_pixels"])


def check_recipe(recipe: Recipe, repo: Repository) -> list[dict[str, Any]]:
    """Verify a recipe's wiring against a repository; return the resolved plan.

    Returns
    -------
    list of dict
        Per stage: input (and whether it is stored or written earlier), steps with their
        configs, calibration versions, output level.
    """
    file = recipe.file
    unknown = sorted(set(recipe.select.bands or ()) - set(repo.instrument.band_numbers))
    if unknown:
        raise _err(f"band(s) {unknown} are not detectors of instrument {repo.instrument.name!r} "
                   f"(bands {list(repo.instrument.band_numbers)})", file, "select.bands")
    produced: dict[str, _Frame] = {}
    plan = []
    for stage in recipe.stages:
        if stage.kind == "level3":
            plan.append(_check_level3(stage, repo, produced, recipe))
            continue
        if stage.kind == "calibration":
            plan.append(_check_calibration(stage, repo, produced, recipe))
            continue
        if stage.input in produced:
            frame, source = _Frame(dict(produced[stage.input].units), produced[stage.input].raw_frame), "earlier stage"
        elif repo.has_level(stage.input):
            frame, source = _stored_frame(repo, stage.input), "repository"
        else:
            raise _err(
                f"input level {stage.input!r} is not in repository {repo.location} (levels: "
                f"{', '.join(repo.levels()) or 'none'}) and no earlier stage writes it",
                file, f"{stage.key}.input",
            )
        steps_plan = []
        for use in stage.steps:
            step = use.step
            for var, units in step.reads.items():
                if var not in frame.units:
                    raise _err(f"step {step.name!r} reads {var}, which level {stage.input!r} does not provide "
                               "at this point", file, use.key)
                if units is not None and not same_unit(frame.units[var], units):
                    raise _err(f"step {step.name!r} needs {var} in {units!r}, but it is in "
                               f"{frame.units[var]!r} at this point", file, use.key)
            if step.frame != "any" and frame.raw_frame is not None and frame.raw_frame != (step.frame == "raw"):
                have = "raw frame (reference border present)" if frame.raw_frame else "active frame"
                raise _err(f"step {step.name!r} works on the {step.frame} frame, but the cube is at the {have}",
                           file, use.key)
            used = {}
            for product in step.calibrations:
                available = repo.calibration_versions(product)
                wanted = recipe.calibrations.get(product, "latest")
                if not available:
                    raise _err(f"step {step.name!r} needs calibration product {product!r}, which repository "
                               f"{repo.location} does not hold", file, use.key)
                version = available[-1] if wanted == "latest" else int(wanted)
                if version not in available:
                    raise _err(f"calibration {product!r} has no version {version} (versions {available})",
                               file, f"calibrations.{product}")
                used[product] = version
            held = set(repo.tables())
            for table, required in step.tables.items():
                if required and table not in held:
                    raise _err(f"step {step.name!r} reads table {table!r}, which repository {repo.location} "
                               f"does not hold (tables: {', '.join(sorted(held)) or 'none'})", file, use.key)
            for var in step.removes:
                frame.units.pop(var, None)
            for var, units in step.converts.items():
                if var in frame.units:
                    frame.units[var] = units
            frame.units.update(step.writes)
            if step.output_frame is not None:
                frame.raw_frame = step.output_frame == "raw"
            steps_plan.append({"step": step.name, "config": use.config.model_dump(), "calibrations": used})
        out_level = get_level(stage.output)
        if not out_level.custom:
            for var, units in out_level.variables.items():
                if var not in frame.units:
                    raise _err(f"level {stage.output!r} needs {var}, which this stage does not produce",
                               file, f"{stage.key}.output")
                if units and not same_unit(frame.units[var], units):
                    raise _err(f"level {stage.output!r} stores {var} in {units!r}, but this stage produces "
                               f"{frame.units[var]!r}", file, f"{stage.key}.output")
            if frame.raw_frame is not None and frame.raw_frame != out_level.reference_pixels:
                raise _err(f"level {stage.output!r} stores the "
                           f"{'raw' if out_level.reference_pixels else 'active'} frame, but this stage ends at "
                           f"the {'raw' if frame.raw_frame else 'active'} frame", file, f"{stage.key}.output")
        elif stage.output not in produced and repo.has_level(stage.output):
            stored = _stored_frame(repo, stage.output).units
            for var, units in frame.units.items():
                if var in stored and units and stored[var] and not same_unit(units, stored[var]):
                    raise _err(f"level {stage.output!r} stores {var} in {stored[var]!r}, but this stage "
                               f"produces {units!r}", file, f"{stage.key}.output")
        produced[stage.output] = frame
        plan.append({"stage": stage.name, "input": stage.input, "source": source, "steps": steps_plan,
                     "output": stage.output})
    return plan


def _check_level3(stage: Stage, repo: Repository, produced: Mapping[str, _Frame], recipe: Recipe) -> dict[str, Any]:
    """A level3 stage needs its input level (with IMAGE, VARIANCE, FLAGS, ZODI), the
    reference catalogue and the calibration products of forced photometry."""
    file = recipe.file
    if stage.input in produced:
        have, source = set(produced[stage.input].units), "earlier stage"
    elif repo.has_level(stage.input):
        have, source = set(repo.level_schema(stage.input)), "repository"
    else:
        raise _err(f"input level {stage.input!r} is not in repository {repo.location} "
                   f"(levels: {', '.join(repo.levels()) or 'none'})", file, f"{stage.key}.input")
    missing = [v for v in ("IMAGE", "VARIANCE", "FLAGS", "ZODI") if v not in have]
    if missing:
        raise _err(f"level 3 needs {', '.join(missing)}, which level {stage.input!r} does not provide",
                   file, f"{stage.key}.input")
    if "refcat" not in repo.tables():
        raise _err(f"level 3 needs the reference catalogue (table 'refcat') in {repo.location}", file, stage.key)
    versions = {}
    for name in LEVEL3_CALIBRATIONS:
        found = repo.calibration_versions(name)
        if not found:
            raise _err(f"level 3 needs calibration product {name!r}, which {repo.location} does not hold",
                       file, stage.key)
        versions[name] = found[-1]
    config = stage.level3.model_dump(mode="json")
    steps = [{"step": m, "config": config if i == 0 else {}, "calibrations": versions if i == 1 else {}}
             for i, m in enumerate(LEVEL3_MODULES)]
    return {"stage": stage.name, "input": stage.input, "source": source, "steps": steps,
            "output": "tables l3a_photometry, l3_primary, l3_secondary, l3_high_reliability; HATS catalogs"}


def _check_calibration(stage: Stage, repo: Repository, produced: Mapping[str, _Frame], recipe: Recipe) -> dict[str, Any]:
    """A calibration stage needs the levels and variables its solver reads, its tables and
    the calibration products it starts from."""
    from ..calibrate.run import get_solver, resolve_calibrations

    file = recipe.file
    solver = get_solver(stage.solver)
    for var, level in solver.reads.items():
        if level in produced:
            have = set(produced[level].units)
        elif repo.has_level(level):
            have = set(repo.level_schema(level))
        else:
            raise _err(f"solver {solver.name!r} reads level {level!r}, which is not in repository {repo.location} "
                       f"(levels: {', '.join(repo.levels()) or 'none'}) and no earlier stage writes it",
                       file, f"{stage.key}.solver")
        if var not in have:
            raise _err(f"solver {solver.name!r} reads {var} of level {level!r}, which it does not hold",
                       file, f"{stage.key}.solver")
    missing = [t for t in solver.tables if t not in repo.tables()]
    if missing:
        raise _err(f"solver {solver.name!r} reads table(s) {missing}, which {repo.location} does not hold",
                   file, stage.key)
    try:
        versions = resolve_calibrations(repo, ("spectral_wcs", *solver.calibrations), recipe.calibrations)
    except CalibrationError as e:
        raise _err(str(e), file, stage.key) from None
    steps = [{"step": solver.name, "config": stage.calibration.model_dump(mode="json"), "calibrations": versions}]
    return {"stage": stage.name, "input": ", ".join(f"{v} {lv}" for v, lv in solver.reads.items()),
            "source": "repository", "steps": steps, "output": "calibration products " + ", ".join(solver.writes)}
