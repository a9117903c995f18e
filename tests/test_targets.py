"""`polykv solve --target`: plans each engine runs natively, optimal against a brute force over every such plan."""

from __future__ import annotations

import itertools
import json
from math import fsum

import pytest
from test_solve import make_fingerprint, synthetic_curves, write_calibration
from typer.testing import CliRunner

from polykv.engines import layout, problems_for
from polykv.errors import InfeasibleError, SolveError
from polykv.plan import SCHEMA_VERSION, LayerPlan, Plan
from polykv.solve import Pin, SolveOptions, aggregate
from polykv.solve.targets import Target, solve_target

BUDGETS = (16, 32, 64)
REF = 256


def window_table(fp: dict, sinks: int = 0, seed: int = 0):
    curves = synthetic_curves(fp, samples=2, policies=("snapkv", "window"), budgets=BUDGETS, seed=seed)
    return aggregate(curves, fp, "test/model", policy_params={"window": {"window": 0, "sinks": sinks}})


def brute_force(table, target: Target, average_budget: int) -> float | None:
    """The least summed loss over every full/window plan the engine runs (`polykv.engines`) within the budget."""
    cm, fp = table.cost_model, table.fingerprint
    sinks = table.params("window").get("sinks", 0)
    frame = table.frame[table.frame["policy"] == "window"]
    per_layer = []
    for layer in range(table.num_layers):
        rows = frame[frame["layer"] == layer]
        opts = [("full", cm.effective(layer, target.reference_context), 0.0)]
        opts += [("window", int(b), float(loss)) for b, loss in zip(rows["budget"], rows["loss"], strict=True)]
        per_layer.append(opts)
    best = None
    for combo in itertools.product(*per_layer):
        layers = [
            LayerPlan(i, p, b, {} if p == "full" else {"window": b - sinks, "sinks": sinks})
            for i, (p, b, _) in enumerate(combo)
        ]
        plan = Plan(SCHEMA_VERSION, "m", fp, average_budget, cm.total(average_budget), cm.unit, layers, None)
        if plan.used_budget > plan.total_budget or problems_for(target.engine, plan):
            continue
        windows, _ = layout(plan)
        if target.engine == "trtllm" and len({w.window for w in windows}) > target.max_windows:
            continue  # full layers (None) count as one pool, a layer's own window as another
        loss = fsum(x for _, _, x in combo)
        best = loss if best is None else min(best, loss)
    return best


CASES = [
    ("hf", make_fingerprint(num_layers=4, model_type="qwen2"), 0),
    ("vllm", make_fingerprint(num_layers=4, model_type="qwen3"), 0),
    ("trtllm", make_fingerprint(num_layers=4, model_type="llama"), 0),
    ("trtllm", make_fingerprint(num_layers=4, model_type="llama"), 4),
    ("llamacpp", make_fingerprint(num_layers=5, model_type="gemma3_text", sliding=[0, 1], window=40), 0),
    ("hf", make_fingerprint(num_layers=5, model_type="gemma3_text", sliding=[0, 1, 3], window=64), 0),
    ("trtllm", make_fingerprint(num_layers=5, model_type="gemma3_text", sliding=[0, 1, 3], window=64), 0),
]


@pytest.mark.parametrize("engine,fp,sinks", CASES, ids=[f"{e}-{f['model_type']}-s{s}" for e, f, s in CASES])
@pytest.mark.parametrize("budget", [20, 48, 90])
def test_target_plan_is_runnable_and_optimal(engine, fp, sinks, budget):
    table = window_table(fp, sinks)
    target = Target(engine, REF, max_windows=2)
    want = brute_force(table, target, budget)
    if want is None:
        with pytest.raises(InfeasibleError, match="no plan"):
            solve_target(table, budget, target)
        return
    plan = solve_target(table, budget, target)
    plan.validate()
    assert problems_for(engine, plan) == []
    assert plan.used_budget <= plan.total_budget
    assert plan.target == target.describe()
    assert plan.predicted_loss == pytest.approx(want, rel=1e-9, abs=1e-12)
    if engine == "trtllm":
        assert len({w.window for w in layout(plan)[0]}) <= 2
    for lp in plan.layers:
        assert lp.policy in ("full", "window")
        if lp.policy == "window":
            assert lp.params == {"window": lp.budget - sinks, "sinks": sinks}


def test_target_plans_round_trip_and_old_plans_have_no_target(tmp_path):
    table = window_table(make_fingerprint(num_layers=4, model_type="qwen2"))
    plan = solve_target(table, 48, Target("hf", REF))
    plan.save(tmp_path / "p.json")
    loaded = Plan.load(tmp_path / "p.json")
    assert loaded.target == {"engine": "hf", "reference_context": REF, "max_windows": None}
    assert loaded.to_json() == plan.to_json()
    loaded.target = None  # a plan without a target writes no `target` key (older plans keep their bytes)
    assert "target" not in json.loads(loaded.to_json())


def test_full_layers_cost_the_reference_context_and_pins_hold():
    table = window_table(make_fingerprint(num_layers=4, model_type="qwen2"))
    plan = solve_target(table, 100, Target("hf", REF), SolveOptions(pins={0: Pin("full")}))
    assert plan.layers[0].policy == "full" and plan.layers[0].budget == REF
    with pytest.raises(InfeasibleError):
        solve_target(table, 40, Target("hf", REF), SolveOptions(pins={0: Pin("full"), 1: Pin("full")}))


def test_what_an_engine_cannot_run_is_refused_in_one_line():
    qwen = window_table(make_fingerprint(num_layers=4, model_type="qwen2"))
    with pytest.raises(SolveError, match="llama.cpp runs no sliding window from GGUF metadata for qwen2"):
        solve_target(qwen, 48, Target("llamacpp", REF))
    with pytest.raises(SolveError, match="measured window with 4 sinks; vllm has none"):
        solve_target(window_table(make_fingerprint(model_type="qwen2"), sinks=4), 48, Target("vllm", REF))
    with pytest.raises(SolveError, match="drop --policies"):
        solve_target(qwen, 48, Target("hf", REF), SolveOptions(policies=("window",)))
    with pytest.raises(SolveError, match="pins to full or window only"):
        solve_target(qwen, 48, Target("hf", REF), SolveOptions(pins={1: Pin("snapkv")}))
    with pytest.raises(SolveError, match="unknown --target 'sglang'"):
        Target("sglang", REF)
    fp = make_fingerprint(num_layers=4, model_type="qwen2")
    no_window = aggregate(synthetic_curves(fp, samples=2, budgets=BUDGETS), fp, "test/model")
    with pytest.raises(SolveError, match="no `window` curves"):
        solve_target(no_window, 48, Target("hf", REF))


def test_solve_cli_writes_target_plans(tmp_path):
    from polykv_cli.main import app

    fp = make_fingerprint(num_layers=4, model_type="qwen2")
    cal = write_calibration(
        tmp_path / "cal",
        fp,
        policies=("snapkv", "window"),
        budgets=BUDGETS,
        settings_={"policy_params": {"window": {"window": 0, "sinks": 0}}},
    )
    args = ["solve", "-c", str(cal), "--budgets", "32,48", "--target", "trtllm", "--reference-context", "512"]
    result = CliRunner().invoke(app, [*args, "--max-windows", "2", "--out", str(tmp_path / "plans")])
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "plans" / "avg48.json")
    assert plan.target == {"engine": "trtllm", "reference_context": 512, "max_windows": 2}
    bad = CliRunner().invoke(app, ["solve", "-c", str(cal), "--budget", "32", "--target", "hf", "--no-guard"])
    assert bad.exit_code == 2 and "--target needs --reference-context" in bad.output


def test_engines_read_a_window_layer_as_the_policy_runs_it():
    from polykv.engines import span
    from polykv.policies import make_policy

    for budget, params in ((8, {}), (8, {"sinks": 2}), (8, {"window": 6, "sinks": 2}), (5, {"window": 5})):
        assert span("window", budget, params) == make_policy("window", params).attention_span(budget)


def test_a_target_plan_edited_past_what_its_engine_runs_does_not_load():
    from polykv.errors import PlanError

    plan = solve_target(window_table(make_fingerprint(num_layers=4, model_type="qwen2")), 48, Target("hf", REF))
    d = json.loads(plan.to_json())
    Plan.from_dict(d)
    d["layers"][1].update(policy="snapkv", params={})
    with pytest.raises(PlanError, match="names target hf but layer 1 uses snapkv"):
        Plan.from_dict(d)
    d["target"]["engine"] = "trtllm"
    d["target"]["max_windows"] = 1
    d["layers"][1].update(policy="window", budget=16, params={"window": 16, "sinks": 0})
    d["layers"][2].update(policy="window", budget=32, params={"window": 32, "sinks": 0})
    d.pop("used_budget")
    with pytest.raises(PlanError, match="distinct attention windows, over max_windows 1"):
        Plan.from_dict(d)
