"""`make plans` regenerates the checked-in plans from plans/recipe.json: the recipe, the commands it gives and what
the checked-in plans record about themselves must agree."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from polykv.solve.aggregate import Aggregation

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plans_build", ROOT / "plans" / "build.py")
plans_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plans_build)


def _solves(recipe: dict) -> dict[str, dict[int, dict]]:
    """{plan dir: {budget: aggregate}} from the recipe's solve command lines."""
    written: dict[str, dict[int, dict]] = {}
    for cmd in plans_build.commands(recipe):
        if cmd[1] != "solve":
            continue
        opts = dict(zip(cmd[2::2], cmd[3::2], strict=False))
        for b in opts["--budgets"].split(","):
            written.setdefault(opts["--out"], {})[int(b)] = Aggregation.parse(opts["--aggregate"]).describe()
    return written


def test_commands_group_budgets_by_aggregate_after_calibrating():
    recipe = {"m-a": {"samples": 4, "budgets": {"256": "quantile:0.9", "64": "quantile:0.9", "128": "mean"}}}
    cmds = plans_build.commands(recipe, "polykv")
    assert cmds[0] == ["polykv", "calibrate", "--model", "m-a", "--samples", "4", "--out", "runs/m-a/calibration"]
    assert [c[1] for c in cmds] == ["calibrate", "solve", "solve"]
    assert _solves(recipe) == {
        "plans/m-a": {
            64: {"statistic": "quantile", "q": 0.9},
            128: {"statistic": "mean"},
            256: {"statistic": "quantile", "q": 0.9},
        }
    }
    assert all("--no-guard" not in c for c in cmds)  # the checked-in plans are guarded


def test_bad_recipe_is_refused(tmp_path):
    bad = tmp_path / "recipe.json"
    bad.write_text(json.dumps({"m": {"samples": 0, "budgets": {"64": "mean"}}}))
    with pytest.raises(SystemExit, match="needs an integer 'samples' >= 1"):
        plans_build.load_recipe(bad)


def test_checked_in_plans_match_the_recipe():
    solves = _solves(plans_build.load_recipe())
    assert solves
    for out, budgets in solves.items():
        for budget, agg in budgets.items():
            plan = json.loads((ROOT / out / f"avg{budget}.json").read_text())
            prov = plan["provenance"]  # a solved plan, a floor blend or a uniform plan: the guard decides
            assert prov["options"]["aggregate"] == agg, f"{out}/avg{budget}.json"
            assert "guard" in prov, f"{out}/avg{budget}.json was not guarded"


def test_make_plans_runs_the_recipe():
    text = subprocess.run(
        ["make", "-n", "--no-print-directory", "plans"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert "plans/build.py" in text
