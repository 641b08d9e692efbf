"""Steps, recipes and where they run."""

from .compute import ComputeSpec, compute_context, load_profiles, resolve_compute
from .recipe import Recipe, check_recipe, load_recipe
from .runner import RunReport, run_recipe
from .step import Step, StepConfig, get_step, register_step, steps

__all__ = [
    "ComputeSpec",
    "Recipe",
    "RunReport",
    "Step",
    "StepConfig",
    "check_recipe",
    "compute_context",
    "get_step",
    "load_profiles",
    "load_recipe",
    "register_step",
    "resolve_compute",
    "run_recipe",
    "steps",
]
