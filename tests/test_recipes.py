from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from sphx import load_recipe, run_recipe
from sphx.cli import main
from sphx.errors import RecipeError
from sphx.pipeline import check_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUICKLOOK = RECIPES / "quicklook.yaml"


def write(tmp_path, tree, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return path


def base():
    return yaml.safe_load(QUICKLOOK.read_text())


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.sha256


def test_dry_run_prints_the_plan_and_runs_nothing(repo_with_raw):
    report = run_recipe(QUICKLOOK, repo_with_raw, dry_run=True)
    assert report.dry_run and not repo_with_raw.has_level("quicklook")
    text = str(report)
    assert "stage 0 (quicklook): raw [repository] -> quicklook" in text
    assert "convert_to_engineering_units [calibrations: gain_factors v1]" in text


def test_recipe_runs_on_local_threads(repo_with_raw, truth):
    report = run_recipe(QUICKLOOK, repo_with_raw, profile="threads", log=lambda s: None)
    assert report.writes[0].written == 9
    ql = repo_with_raw.open_level("quicklook")
    np.testing.assert_allclose(ql["stat_median"].mean("obs").values, truth.sky, rtol=2e-3)
    record = repo_with_raw.image_provenance("quicklook", band=1, obs="2025W51_1A_0684_2")
    assert record["recipe"]["name"] == "quicklook" and record["recipe"]["sha256"] == load_recipe(QUICKLOOK).sha256
    assert [s["step"] for s in record["steps"]] == ["convert_to_engineering_units", "remove_reference_pixels",
                                                    "image_statistics"]
    assert record["calibrations"] == {"gain_factors": 1} and record["versions"]["sphx"] == "0.1.0"
    assert ql.attrs["history"][0].startswith("Convert to Engineering Units")
    again = run_recipe(QUICKLOOK, repo_with_raw, profile="threads", log=lambda s: None)
    assert again.writes[0].written == 0 and again.writes[0].skipped == 9


def test_overrides(repo_with_raw):
    recipe = load_recipe(QUICKLOOK, overrides=["stages.0.steps.2.config.bad=[HOT]", "select.bands=[2]"])
    assert recipe.stages[0].steps[2].config.bad == ("HOT",) and recipe.select.bands == (2,)
    run_recipe(recipe, repo_with_raw, profile="synchronous", log=lambda s: None)
    assert repo_with_raw.open_level("quicklook")["band"].values.tolist() == [2]


# --- bad recipes: one test per kind, each naming the file and the key --------------------
def assert_recipe_error(exc, path, key, text):
    assert exc.value.file == str(path)
    assert exc.value.key == key
    assert text in str(exc.value)
    assert str(exc.value).startswith(f"{path}: {key}: " if key else f"{path}: ")


def test_unknown_step(tmp_path):
    tree = base()
    tree["stages"][0]["steps"][0] = "convert_to_engineering_unit"
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert_recipe_error(e, path, "stages[0].steps[0]",
                        "unknown step 'convert_to_engineering_unit' (did you mean 'convert_to_engineering_units'?)")


def test_unknown_config_key(tmp_path):
    tree = base()
    tree["stages"][0]["steps"][2]["config"] = {"bda": ["HOT"]}
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert_recipe_error(e, path, "stages[0].steps[2].config", "bda: unknown config key for step 'image_statistics'")


def test_bad_config_value(tmp_path):
    tree = base()
    tree["stages"][0]["steps"][2]["config"] = {"bad": ["WARM"]}
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert_recipe_error(e, path, "stages[0].steps[2].config", "unknown FLAGS bit 'WARM'")


def test_unknown_top_level_key(tmp_path):
    tree = base() | {"stagess": []}
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert_recipe_error(e, path, "stagess", "unknown key 'stagess' (did you mean 'stages'?)")


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "recipe: x\nstages: [\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert_recipe_error(e, path, None, "not valid YAML")


def test_missing_input_level(tmp_path, repo_with_raw):
    tree = base()
    tree["stages"][0]["input"] = "l1"
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        run_recipe(path, repo_with_raw, dry_run=True)
    assert_recipe_error(e, path, "stages[0].input", "input level 'l1' is not in repository")
    assert "levels: raw" in str(e.value)


def test_units_wiring(tmp_path, repo_with_raw):
    tree = base()
    tree["stages"][0]["steps"].insert(1, "convert_to_engineering_units")
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        run_recipe(path, repo_with_raw, dry_run=True)
    assert_recipe_error(e, path, "stages[0].steps[1]",
                        "needs IMAGE in 'adu / s', but it is in 'electron / s' at this point")


def test_output_level_mismatch(tmp_path, repo_with_raw):
    tree = base()
    tree["stages"][0]["output"] = "l1"  # l1 keeps the reference border
    path = write(tmp_path, tree)
    with pytest.raises(RecipeError) as e:
        run_recipe(path, repo_with_raw, dry_run=True)
    assert_recipe_error(e, path, "stages[0].output", "level 'l1' stores the raw frame")


def test_missing_calibration(tmp_path, repo, raw):
    repo.write_level("raw", raw)
    with pytest.raises(RecipeError) as e:
        run_recipe(QUICKLOOK, repo, dry_run=True)
    assert_recipe_error(e, QUICKLOOK, "stages[0].steps[0]", "needs calibration product 'gain_factors'")


def test_pinned_calibration_version_must_exist(tmp_path, repo_with_raw):
    path = write(tmp_path, base() | {"calibrations": {"gain_factors": 4}})
    with pytest.raises(RecipeError) as e:
        run_recipe(path, repo_with_raw, dry_run=True)
    assert_recipe_error(e, path, "calibrations.gain_factors", "has no version 4 (versions [1])")


def test_bad_override(tmp_path):
    with pytest.raises(RecipeError, match="no list entry 7"):
        load_recipe(QUICKLOOK, overrides=["stages.7.input=raw"])
    with pytest.raises(RecipeError, match=r"stages\.0\.steps\.0 is not a mapping or list"):
        load_recipe(QUICKLOOK, overrides=["stages.0.steps.0.config.x=1"])


# --- the command line ----------------------------------------------------------------------
def test_cli_dry_run_and_errors(repo_with_raw, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["run", "quicklook", "--repo", repo_with_raw.location, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "convert_to_engineering_units" in result.output
    tree = base()
    tree["stages"][0]["steps"][0] = "nope"
    bad = write(tmp_path, tree)
    result = runner.invoke(main, ["run", str(bad), "--repo", repo_with_raw.location])
    assert result.exit_code == 2 and f"error: {bad}: stages[0].steps[0]: unknown step 'nope'" in result.output
    result = runner.invoke(main, ["run", "quicklook", "--repo", repo_with_raw.location, "--profile", "warp"])
    assert result.exit_code == 2 and "unknown compute profile 'warp'" in result.output


def test_cli_info_and_steps(repo_with_raw):
    runner = CliRunner()
    result = runner.invoke(main, ["info", repo_with_raw.location])
    assert result.exit_code == 0 and "level raw: 3 observation(s)" in result.output
    assert "calibration gain_factors: versions [1]" in result.output
    result = runner.invoke(main, ["steps"])
    assert "image_statistics: Perform Data Quality Assessment" in result.output


def test_check_recipe_returns_resolved_versions(repo_with_raw):
    plan = check_recipe(load_recipe(QUICKLOOK), repo_with_raw)
    assert plan[0]["steps"][0]["calibrations"] == {"gain_factors": 1}


def test_progress_is_shown(repo_with_raw, capsys):
    updates = []
    run_recipe(QUICKLOOK, repo_with_raw, profile="threads", progress=lambda done, total: updates.append((done, total)),
               log=lambda s: None)
    assert updates[-1] == (9, 9) and [d for d, _ in updates] == sorted(d for d, _ in updates)
    repo_with_raw.write_level("raw", repo_with_raw.open_level("raw"), overwrite=True, progress=True)
    bar = capsys.readouterr().err
    assert "raw: images [" in bar and "9/9" in bar


def test_unknown_band_in_selection(tmp_path, repo_with_raw):
    path = write(tmp_path, base() | {"select": {"bands": [2, 7]}})
    with pytest.raises(RecipeError) as e:
        run_recipe(path, repo_with_raw, dry_run=True)
    assert_recipe_error(e, path, "select.bands", "band(s) [7] are not detectors of instrument 'SPHEREx-small'")
