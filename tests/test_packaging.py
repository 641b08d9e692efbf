"""The repository's own contracts: dependency lists agree, the quickstart is what CI runs."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    pip_side = {}
    for spec in [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]:
        r = Requirement(spec)
        pip_side[r.name.lower()] = str(r.specifier)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_side = {}
    pip_entries = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    for dep in [*env["dependencies"], *pip_entries]:
        if not isinstance(dep, str) or dep in ("pip",) or dep.startswith(("python=", "-e")):
            continue
        r = Requirement(dep)
        conda_side[r.name.lower()] = str(r.specifier)
    assert conda_side == pip_side
    assert "python=3.11" in env["dependencies"]
    assert project["requires-python"] == ">=3.11"


def _quickstart():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^#+\s*Quick\s*start.*?```[^\n]*\n(.*?)```", text, re.DOTALL | re.IGNORECASE | re.MULTILINE)
    assert m, "README has no Quickstart code block"
    return [line.strip() for line in m.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    commands = _quickstart()
    assert len(commands) == 2
    demo, tests = commands
    assert "pip install" in demo and "sphx demo" in demo
    assert "pip install" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]


def test_recipes_ship_inside_the_package():
    import sphx

    shipped = {p.name for p in (Path(sphx.__file__).parent / "recipes").glob("*.yaml")}
    assert shipped == {p.name for p in (ROOT / "recipes").glob("*.yaml")} and shipped
    assert "recipes/*.yaml" in _pyproject()["tool"]["setuptools"]["package-data"]["sphx"]
