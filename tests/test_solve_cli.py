"""CLI tests for `polykv solve` and `polykv plan validate|show|diff` on a throwaway Typer app."""

from __future__ import annotations

import json

import pytest
import typer
from test_solve import bits_curves, make_fingerprint, synthetic_curves, write_calibration
from typer.testing import CliRunner

from polykv.plan import Plan
from polykv_cli import plan_cmd, solve_cmd

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    solve_cmd.register(app)
    plan_cmd.register(app)
    return app


@pytest.fixture(scope="module")
def cal(tmp_path_factory):
    return write_calibration(tmp_path_factory.mktemp("cal"))


def invoke(app, *args):
    """Run the app; `solve` on these synthetic calibrations (no model to load) runs without the guard."""
    if args and args[0] == "solve" and not any(str(a).startswith("--guard") for a in args):
        args = (*args, "--no-guard")
    return runner.invoke(app, [str(a) for a in args])


def test_solve_single_budget_writes_plan_and_summary(app, cal, tmp_path):
    path = tmp_path / "p.json"
    r = invoke(app, "solve", "--calibration", cal, "--budget", 64, "--out", path, "--pin", "0:full", "--cross-check")
    assert r.exit_code == 0, r.output
    plan = Plan.load(path)
    assert plan.layers[0].policy == "full" and plan.used_budget <= plan.total_budget
    assert "best uniform" in r.output and str(path) in r.output
    again = tmp_path / "q.json"
    invoke(app, "solve", "--calibration", cal, "--budget", 64, "--out", again, "--pin", "0:full", "--cross-check")
    assert path.read_bytes() == again.read_bytes()


def test_solve_frontier_into_directory(app, cal, tmp_path):
    r = invoke(
        app,
        "solve",
        "-c",
        cal,
        "--budgets",
        "32,64,128",
        "--out",
        tmp_path / "frontier",
        "--policies",
        "snapkv,h2o",
        "--max-policies",
        "1",
    )
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "frontier").iterdir())
    assert names == ["avg128.json", "avg32.json", "avg64.json"]
    for name in names:
        plan = Plan.load(tmp_path / "frontier" / name)
        assert len({lp.policy for lp in plan.layers}) == 1


def test_solve_default_out_and_baselines(app, cal, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke(app, "solve", "-c", cal, "--budget", 32).exit_code == 0
    assert (tmp_path / "plans" / "test--model" / "avg32.json").exists()
    r = invoke(app, "solve", "-c", cal, "--budget", 32, "--uniform", "h2o")
    assert r.exit_code == 0, r.output
    uni = Plan.load(tmp_path / "plans" / "test--model" / "uniform-h2o" / "avg32.json")
    assert {(lp.policy, lp.budget) for lp in uni.layers} == {("h2o", 32)}
    r = invoke(app, "solve", "-c", cal, "--budgets", "32,64", "--allocation", "pyramid")
    assert r.exit_code == 0, r.output
    pyr = Plan.load(tmp_path / "plans" / "test--model" / "pyramid-snapkv" / "avg64.json")
    assert pyr.layers[0].budget > pyr.layers[-1].budget and pyr.used_budget == 64 * 4
    assert pyr.layers[0].params == {"window": 8, "kernel": 5, "pooling": "avg"}  # completed with the defaults


@pytest.mark.parametrize(
    "args, match",
    [
        (("--budget", 16, "--pin", "0:full", "--pin", "1:full"), "cheapest allowed plan"),
        (("--budget", 16, "--budgets", "16,32"), "exactly one of"),
        (("--budget", 16, "--pin", "9:full"), "outside 0..3"),
        (("--budget", 16, "--metric", "nope"), "metric 'nope'"),
        (("--budget", 16, "--uniform", "h2o", "--pin", "0:full"), "apply to solved plans"),
    ],
)
def test_solve_errors_are_one_red_line(app, cal, tmp_path, args, match):
    r = invoke(app, "solve", "-c", cal, "--out", tmp_path / "x.json", *args)
    assert r.exit_code == 2
    assert match in r.output and "Traceback" not in r.output


def test_solve_rejects_other_models_curves(app, tmp_path):
    other = make_fingerprint(num_layers=4, model_type="qwen2")
    write_calibration(tmp_path / "cal", make_fingerprint(), synthetic_curves(other, model="other/model"))
    r = invoke(app, "solve", "-c", tmp_path / "cal", "--budget", 32, "--out", tmp_path / "p.json")
    assert r.exit_code == 2 and "another model" in r.output


def test_plan_validate_show_diff(app, cal, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert invoke(app, "solve", "-c", cal, "--budget", 32, "-o", a).exit_code == 0
    assert invoke(app, "solve", "-c", cal, "--budget", 32, "--uniform", "snapkv", "-o", b).exit_code == 0
    r = invoke(app, "plan", "validate", a, b)
    assert r.exit_code == 0 and [line[:3] for line in r.output.splitlines()] == ["ok ", "ok "]
    bad = tmp_path / "bad.json"
    data = json.loads(a.read_text())
    data["layers"][0]["budget"] = 10_000
    bad.write_text(json.dumps(data))
    r = invoke(app, "plan", "validate", a, bad)
    assert r.exit_code == 2 and "over total_budget" in r.output
    r = invoke(app, "plan", "show", a)
    assert r.exit_code == 0 and "█" in r.output and "test/model" in r.output
    assert invoke(app, "plan", "diff", a, a).exit_code == 0
    r = invoke(app, "plan", "diff", a, b)
    assert r.exit_code == 1 and "layers that differ" in r.output
    r = invoke(app, "plan", "show", tmp_path / "missing.json")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_solve_with_bits_then_show_and_diff_them(app, tmp_path):
    from dataclasses import replace

    fp = make_fingerprint(num_layers=4)
    cal = write_calibration(tmp_path / "cal", fp, bits_curves(fp, model="test/model"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    r = invoke(app, "solve", "-c", cal, "--budget", 16, "-o", a)
    assert r.exit_code == 0, r.output
    plan = Plan.load(a)
    assert plan.schema_version == 2 and {lp.bits for lp in plan.layers} - {16}
    r = invoke(app, "plan", "show", a)
    assert r.exit_code == 0 and "bits" in r.output and "bytes" in r.output
    rows = [[cell.strip() for cell in line.split("│")] for line in r.output.splitlines() if "│" in line]
    assert [int(row[4]) for row in rows] == [lp.bits for lp in plan.layers]  # layer, type, policy, budget, bits
    k = next(i for i, lp in enumerate(plan.layers) if lp.bits != 2)
    plan.layers[k] = replace(plan.layers[k], bits=2)  # fewer bytes, so still within the budget
    plan.save(b)
    r = invoke(app, "plan", "diff", a, b)
    assert r.exit_code == 1 and f"{plan.layers[k].policy}@{plan.layers[k].budget}/2b" in r.output


def test_plan_show_has_no_bits_column_for_16_bit_plans(app, cal, tmp_path):
    a = tmp_path / "a.json"
    assert invoke(app, "solve", "-c", cal, "--budget", 32, "-o", a).exit_code == 0
    header = next(line for line in invoke(app, "plan", "show", a).output.splitlines() if "policy" in line)
    assert "bits" not in header and "budget" in header


def test_solve_reports_the_cross_check(app, cal, tmp_path):
    r = invoke(app, "solve", "-c", cal, "--budgets", "32,64", "--out", tmp_path / "on")
    assert r.exit_code == 0, r.output
    assert "cross-check: the DP and the ILP agree" in r.output
    assert Plan.load(tmp_path / "on" / "avg32.json").provenance["cross_check"] == {"ran": True, "agreed": True}
    r = invoke(app, "solve", "-c", cal, "--budget", 32, "--out", tmp_path / "off.json", "--no-cross-check")
    assert r.exit_code == 0 and "cross-check: off" in r.output
    assert Plan.load(tmp_path / "off.json").provenance["cross_check"]["ran"] is False
    r = invoke(app, "solve", "-c", cal, "--budget", 32, "--out", tmp_path / "uniform.json", "--uniform", "snapkv")
    assert r.exit_code == 0 and "cross-check" not in r.output
