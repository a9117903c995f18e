"""Solver tests: aggregation rules, DP = ILP = brute force, constraints, allocations, frontier, determinism.

`write_calibration` makes a synthetic calibration directory (metadata.json + curves/ Parquet) with plausible
curves (loss falling with budget); test_solve_cli.py reuses it.
"""

from __future__ import annotations

import itertools
import json
from math import fsum
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polykv.errors import CalibrationError, InfeasibleError, InputError, SolveError
from polykv.plan import CostModel, Plan, fingerprint_hash
from polykv.policy_params import param_defaults
from polykv.precision import kv_bytes
from polykv.solve import (
    Aggregation,
    Pin,
    SolveOptions,
    SolveRequest,
    aggregate,
    allocation_plan,
    best_uniform,
    load_calibration,
    parse_budgets,
    parse_layer_values,
    parse_pins,
    run_request,
    solve_frontier,
    solve_plan,
    summarize,
)
from polykv.solve.allocations import pyramid_budgets, pyramid_profile
from polykv.solve.ilp import solve_ilp
from polykv.solve.mckp import solve_dp, solve_dp_groups

POLICIES = ("snapkv", "h2o", "streaming")
BUDGETS = (16, 32, 64, 128)


def make_fingerprint(
    num_layers: int = 4,
    kv_heads: list[int] | None = None,
    head_dim: list[int] | None = None,
    sliding: list[int] = (),
    window: int | None = None,
    model_type: str = "llama",
) -> dict:
    return {
        "model_type": model_type,
        "num_layers": num_layers,
        "num_kv_heads": kv_heads or [2] * num_layers,
        "head_dim": head_dim or [16] * num_layers,
        "layer_types": ["sliding_attention" if i in sliding else "full_attention" for i in range(num_layers)],
        "sliding_window": window if sliding else None,
    }


def synthetic_curves(
    fp: dict,
    model: str = "test/model",
    policies=POLICIES,
    budgets=BUDGETS,
    samples: int = 4,
    categories=("qa", "code"),
    metrics=("proxy_err", "e2e_dnll"),
    seed: int = 0,
    with_full: bool = True,
) -> pd.DataFrame:
    """Tidy curves: loss = scale(layer, policy) x difficulty(sample) x exp(-budget / tau(layer, policy))."""
    rng = np.random.default_rng(seed)
    n = fp["num_layers"]
    scale = rng.uniform(0.1, 2.0, size=(n, len(policies)))
    tau = rng.uniform(10, 200, size=(n, len(policies)))
    difficulty = rng.uniform(0.5, 1.5, size=samples)
    rows = []
    for metric in metrics:
        for s in range(samples):
            for layer in range(n):
                for p, policy in enumerate(policies):
                    for b in budgets:
                        value = scale[layer, p] * difficulty[s] * np.exp(-b / tau[layer, p])
                        rows.append((f"s{s}", categories[s % len(categories)], layer, policy, b, metric, value))
                if with_full:
                    rows += [(f"s{s}", categories[s % len(categories)], layer, "full", b, metric, 0.0) for b in budgets]
    df = pd.DataFrame(rows, columns=["sample_id", "category", "layer", "policy", "budget", "metric", "value"])
    df.insert(0, "model", model)
    df.insert(1, "fingerprint", fingerprint_hash(fp))
    df.insert(5, "head", pd.array([None] * len(df), dtype="Int32"))
    return df.astype({"layer": "int32", "budget": "int32"})


def write_calibration(
    path: Path,
    fp: dict | None = None,
    curves: pd.DataFrame | None = None,
    model: str = "test/model",
    settings_: dict | None = None,
    parts: int = 2,
    **kw,
) -> Path:
    """A calibration directory as `polykv calibrate` writes it (metadata.json + curves/part-*.parquet)."""
    fp = fp or make_fingerprint()
    curves = synthetic_curves(fp, model, **kw) if curves is None else curves
    (path / "curves").mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(curves)), parts)):
        curves.iloc[chunk].to_parquet(path / "curves" / f"part-{i}.parquet", index=False)
    meta = {
        "model": model,
        "fingerprint": fp,
        "fingerprint_hash": fingerprint_hash(fp),
        "data_hash": "d" * 16,
        "polykv_version": "0.1.0",
        "settings": settings_ or {"policy_params": {"snapkv": {"window": 8}}},
    }
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def brute_force(costs, losses, capacity, groups=None, max_groups=None):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        if sum(int(c[k]) for c, k in zip(costs, combo, strict=True)) > capacity:
            continue
        if max_groups is not None and len({int(g[k]) for g, k in zip(groups, combo, strict=True)} - {-1}) > max_groups:
            continue
        total = fsum(float(f[k]) for f, k in zip(losses, combo, strict=True))
        best = total if best is None else min(best, total)
    return best


def objective(losses, picks):
    return fsum(float(f[k]) for f, k in zip(losses, picks, strict=True))


@st.composite
def instances(draw, groups: bool = False):
    layers = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 4)) for _ in range(layers)]
    unit = draw(st.sampled_from([1, 3, 16]))
    costs = [np.array([draw(st.integers(0, 8)) * unit for _ in range(k)]) for k in sizes]
    losses = [np.array([draw(st.floats(-1, 1, allow_nan=False, width=32)) for _ in range(k)]) for k in sizes]
    capacity = draw(st.integers(0, 8 * unit * layers))
    gr = [np.array([draw(st.integers(-1, 2)) for _ in range(k)]) for k in sizes] if groups else None
    return costs, losses, capacity, gr


def _close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


# --- solvers ---------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_dp_equals_ilp_equals_brute_force(inst):
    costs, losses, capacity, _ = inst
    expected = brute_force(costs, losses, capacity)
    for solver in (solve_dp, solve_ilp):
        if expected is None:
            with pytest.raises(InfeasibleError):
                solver(costs, losses, capacity)
            continue
        picks = solver(costs, losses, capacity)
        assert sum(int(c[k]) for c, k in zip(costs, picks, strict=True)) <= capacity
        assert _close(objective(losses, picks), expected)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(groups=True), st.integers(1, 2))
def test_max_groups_dp_equals_ilp_equals_brute_force(inst, k):
    costs, losses, capacity, groups = inst
    expected = brute_force(costs, losses, capacity, groups, k)
    for solver in (solve_dp_groups, solve_ilp):
        if expected is None:
            with pytest.raises(InfeasibleError):
                solver(costs, losses, capacity, groups, k)
            continue
        picks = solver(costs, losses, capacity, groups, k)
        assert sum(int(c[i]) for c, i in zip(costs, picks, strict=True)) <= capacity
        assert len({int(g[i]) for g, i in zip(groups, picks, strict=True)} - {-1}) <= k
        assert _close(objective(losses, picks), expected)


def test_dp_uses_the_budget_exactly_when_it_pays():
    costs = [np.array([1, 2, 3])] * 3
    losses = [np.array([3.0, 2.0, 1.0])] * 3
    picks = solve_dp(costs, losses, 7)
    assert sum(int(costs[0][k]) for k in picks) == 7
    assert objective(losses, picks) == 5.0


# --- aggregation -----------------------------------------------------------------------------------------------------


def test_aggregate_mean_quantile_and_category_weights():
    fp = make_fingerprint(num_layers=1)
    rows = [("a", "qa", 1.0), ("b", "qa", 2.0), ("c", "qa", 3.0), ("d", "code", 10.0)]
    curves = pd.DataFrame(
        {
            "model": "m",
            "fingerprint": fingerprint_hash(fp),
            "sample_id": [r[0] for r in rows],
            "category": [r[1] for r in rows],
            "layer": 0,
            "head": None,
            "policy": "snapkv",
            "budget": 8,
            "metric": "proxy_err",
            "value": [r[2] for r in rows],
        }
    )
    loss = lambda agg: float(aggregate(curves, fp, "m", aggregation=agg).frame["loss"].iloc[0])  # noqa: E731
    assert loss(Aggregation.parse("mean")) == pytest.approx(4.0)
    assert loss(Aggregation.parse("max")) == 10.0
    assert loss(Aggregation.parse("quantile:0.5")) == 2.0
    assert loss(Aggregation.parse("mean", {"qa": 1, "code": 1})) == pytest.approx((2.0 + 10.0) / 2)
    assert loss(Aggregation.parse("mean", {"code": 0})) == pytest.approx(2.0)
    assert loss(Aggregation.parse("quantile:0.4", {"qa": 1, "code": 1})) == 3.0
    assert loss(Aggregation.parse("quantile:0.6", {"qa": 1, "code": 1})) == 10.0
    with pytest.raises(CalibrationError, match="not in the calibration"):
        loss(Aggregation.parse("mean", {"math": 1}))
    with pytest.raises(CalibrationError, match="quantile"):
        Aggregation.parse("quantile:2")


def test_aggregate_picks_metric_and_ignores_full():
    fp = make_fingerprint()
    table = aggregate(synthetic_curves(fp), fp, "m")
    assert table.metric == "e2e_dnll"
    assert "full" not in table.policies
    assert len(table.frame) == 4 * len(POLICIES) * len(BUDGETS)
    assert aggregate(synthetic_curves(fp, metrics=("proxy_err",)), fp, "m").metric == "proxy_err"
    assert aggregate(synthetic_curves(fp, metrics=("proxy_err", "e2e_dnll", "e2e_kl")), fp, "m").metric == "e2e_kl"
    with pytest.raises(CalibrationError, match="e2e_kl"):
        aggregate(synthetic_curves(fp), fp, "m", metric="e2e_kl")


def test_missing_options_are_named_unless_allowed():
    fp = make_fingerprint()
    curves = synthetic_curves(fp)
    gone = (curves["layer"] == 2) & (curves["policy"] == "h2o") & (curves["budget"] == 64)
    with pytest.raises(CalibrationError, match=r"layer 2 h2o@64 \(4 of 4 samples\)"):
        aggregate(curves[~gone], fp, "m")
    table = aggregate(curves[~gone], fp, "m", allow_missing=True)
    assert not ((table.frame["layer"] == 2) & (table.frame["policy"] == "h2o") & (table.frame["budget"] == 64)).any()
    partial = curves[~(gone & (curves["sample_id"] == "s1"))]
    row = aggregate(partial, fp, "m", allow_missing=True).frame.query("layer == 2 and policy == 'h2o' and budget == 64")
    assert int(row["samples"].iloc[0]) == 3


def test_nan_losses_are_an_error():
    fp = make_fingerprint()
    curves = synthetic_curves(fp)
    where = curves.index[(curves["metric"] == "e2e_dnll") & (curves["policy"] == "h2o")][5]
    curves.loc[where, "value"] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        aggregate(curves, fp, "m")


def test_per_head_rows_are_averaged_when_no_whole_layer_rows():
    fp = make_fingerprint(num_layers=1)
    base = dict(
        model="m",
        fingerprint=fingerprint_hash(fp),
        sample_id="a",
        category="qa",
        layer=0,
        policy="snapkv",
        budget=8,
        metric="proxy_err",
    )
    curves = pd.DataFrame([{**base, "head": 0, "value": 1.0}, {**base, "head": 1, "value": 3.0}])
    assert float(aggregate(curves, fp, "m").frame["loss"].iloc[0]) == 2.0


def test_sliding_layers_collapse_above_window():
    fp = make_fingerprint(num_layers=3, sliding=[0, 1], window=48)
    table = aggregate(synthetic_curves(fp), fp, "m")
    sliding = table.frame[table.frame["layer"] == 0]
    assert sorted(set(sliding["budget"])) == [16, 32, 47]  # a window of 48 holds at most 47 past tokens
    assert sorted(set(table.frame[table.frame["layer"] == 2]["budget"])) == list(BUDGETS)
    # budgets above the first one past the window need not be calibrated on sliding layers
    curves = synthetic_curves(fp)
    aggregate(curves[~((curves["layer"] < 2) & (curves["budget"] == 128))], fp, "m")


# --- calibration directory -------------------------------------------------------------------------------------------


def test_parquet_from_another_model_is_rejected(tmp_path):
    fp = make_fingerprint()
    other = make_fingerprint(num_layers=4, model_type="qwen2")
    curves = synthetic_curves(other, model="other/model")
    write_calibration(tmp_path, fp, curves)
    with pytest.raises(
        CalibrationError, match=r"other/model.*" + fingerprint_hash(other) + ".*" + fingerprint_hash(fp)
    ):
        load_calibration(tmp_path)


def test_calibration_dir_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nope")
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(CalibrationError, match="metadata.json is missing"):
        load_calibration(tmp_path / "x")


# --- plans from the solver -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table():
    fp = make_fingerprint(num_layers=6)
    return aggregate(synthetic_curves(fp, samples=3), fp, "test/model", policy_params={"snapkv": {"window": 8}})


def test_solve_plan_respects_budget_and_beats_uniform(table):
    plan = solve_plan(table, 32)
    assert plan.budget_unit == "tokens" and plan.total_budget == 32 * 6
    assert sum(lp.budget for lp in plan.layers) <= plan.total_budget
    uniform = best_uniform(table, plan.total_budget)
    assert plan.predicted_loss <= uniform.loss + 1e-12
    assert plan.predicted_loss == pytest.approx(sum(lp.predicted_loss for lp in plan.layers))
    calibrated = {"snapkv": {"window": 8}}  # the calibration's params, completed with the defaults in the plan
    assert all(lp.params == {**param_defaults(lp.policy), **calibrated.get(lp.policy, {})} for lp in plan.layers)
    Plan.from_dict(json.loads(plan.to_json()))
    s = summarize(plan, table)
    assert sum(s.policy_counts.values()) == 6 and s.gain is not None and s.gain >= 0


def test_solver_choices_agree_and_cross_check(table):
    dp = solve_plan(table, 40, SolveOptions(solver="dp", cross_check=True))
    ilp = solve_plan(table, 40, SolveOptions(solver="ilp"))
    assert dp.provenance["solver"] == "dp" and ilp.provenance["solver"] == "ilp"
    assert dp.predicted_loss == pytest.approx(ilp.predicted_loss, rel=1e-9)


def test_cross_check_runs_by_default_when_cheap_and_is_recorded(table, monkeypatch):
    """Default (None): both solvers on a small problem; the plan records whether the check ran and agreed."""
    import polykv.solve.runner as runner

    assert SolveOptions().cross_check is None
    assert solve_plan(table, 40).provenance["cross_check"] == {"ran": True, "agreed": True}
    assert solve_plan(table, 40, SolveOptions(max_policies=1)).provenance["cross_check"]["ran"]
    off = solve_plan(table, 40, SolveOptions(cross_check=False))
    assert off.provenance["cross_check"] == {"ran": False, "agreed": None}
    monkeypatch.setattr(runner, "CROSS_CHECK_MAX_OPTIONS", 10)  # now "too large to be cheap"
    assert solve_plan(table, 40).provenance["cross_check"] == {"ran": False, "agreed": None}
    forced = solve_plan(table, 40, SolveOptions(cross_check=True))
    assert forced.provenance["cross_check"] == {"ran": True, "agreed": True}


def test_cross_check_disagreement_is_recorded_by_default_and_fatal_when_asked(table, monkeypatch):
    import polykv.solve.runner as runner

    monkeypatch.setattr(runner, "solve_ilp", lambda costs, *args: [0] * len(costs))  # a wrong "optimum"
    plan = solve_plan(table, 40)
    assert plan.provenance["solver"] == "dp" and plan.provenance["cross_check"] == {"ran": True, "agreed": False}
    with pytest.raises(SolveError, match="disagree"):
        solve_plan(table, 40, SolveOptions(cross_check=True))


def test_constraints_pins_bounds_policies(table):
    opts = SolveOptions(
        policies=("h2o",),
        pins={0: Pin("full"), 1: Pin("snapkv", 16)},
        min_budget={2: 64},
        max_budget={3: 16},
        full_cost=128,
    )
    plan = solve_plan(table, 64, opts)
    layers = plan.layers
    assert (layers[0].policy, layers[0].budget, layers[0].predicted_loss, layers[0].params) == ("full", 128, 0.0, {})
    assert (layers[1].policy, layers[1].budget) == ("snapkv", 16)
    assert layers[2].budget >= 64 and layers[3].budget <= 16
    assert all(lp.policy == "h2o" for lp in layers[2:])
    assert plan.used_budget <= plan.total_budget
    assert plan.provenance["options"]["pins"] == {"0": "full", "1": "snapkv:16"}


def test_max_policies(table):
    free = solve_plan(table, 48)
    one = solve_plan(table, 48, SolveOptions(max_policies=1, cross_check=True))
    assert len({lp.policy for lp in one.layers}) == 1
    assert one.predicted_loss >= free.predicted_loss - 1e-12
    pinned = solve_plan(table, 48, SolveOptions(max_policies=1, pins={0: Pin("full")}, full_cost=64))
    assert len({lp.policy for lp in pinned.layers} - {"full"}) == 1


def test_infeasible_constraints_give_clear_errors(table):
    with pytest.raises(InfeasibleError, match="cheapest allowed plan costs .*lower --full-cost"):
        solve_plan(table, 16, SolveOptions(pins={0: Pin("full"), 1: Pin("full")}))
    with pytest.raises(InfeasibleError, match="layer 2"):
        solve_plan(table, 64, SolveOptions(min_budget={2: 256}))
    with pytest.raises(InfeasibleError, match="layer 1"):
        solve_plan(table, 64, SolveOptions(pins={1: Pin("snapkv", 100)}))
    with pytest.raises(SolveError, match="not calibrated"):
        solve_plan(table, 64, SolveOptions(policies=("tova",)))
    with pytest.raises(SolveError, match="min-budget exceeds"):
        SolveOptions(min_budget={0: 64}, max_budget={0: 32})
    with pytest.raises(InfeasibleError, match="max-policies"):
        solve_plan(table, 16, SolveOptions(max_policies=1, pins={0: Pin("snapkv", 16), 1: Pin("h2o", 16)}))


def test_full_is_never_chosen_unless_pinned(table):
    for budget in (16, 64, 128):
        assert all(lp.policy != "full" for lp in solve_plan(table, budget).layers)


def test_frontier_one_plan_per_budget_and_monotone(table):
    plans = solve_frontier(table, (16, 32, 64, 128))
    assert [p.average_budget for p in plans] == [16, 32, 64, 128]
    losses = [p.predicted_loss for p in plans]
    assert losses == sorted(losses, reverse=True)


def test_byte_constraint_with_unequal_layers_and_sliding_window():
    fp = make_fingerprint(num_layers=4, kv_heads=[1, 1, 4, 4], head_dim=[32, 32, 16, 16], sliding=[0, 2], window=32)
    table = aggregate(synthetic_curves(fp), fp, "m")
    cm = CostModel.for_fingerprint(fp)
    assert cm.unit == "bytes" and cm.per_token == (128, 128, 256, 256)
    for avg in (16, 48, 128):
        plan = solve_plan(table, avg, SolveOptions(cross_check=True))
        assert plan.total_budget == sum(cm.per_token[layer] * min(avg, cm.caps[layer] or avg) for layer in range(4))
        assert plan.used_budget <= plan.total_budget
        assert plan.layers[0].budget <= 32 and plan.layers[2].budget <= 32
        Plan.from_dict(json.loads(plan.to_json()))


@st.composite
def fingerprints(draw):
    n = draw(st.integers(1, 5))
    sliding = [i for i in range(n) if draw(st.booleans())] if draw(st.booleans()) else []
    return make_fingerprint(
        num_layers=n,
        kv_heads=[draw(st.sampled_from([1, 2, 4])) for _ in range(n)],
        head_dim=[draw(st.sampled_from([16, 32])) for _ in range(n)],
        sliding=sliding,
        window=draw(st.sampled_from([16, 40, 100])),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fingerprints(), st.integers(16, 200), st.integers(0, 3))
def test_plans_fit_exactly_and_beat_uniform(fp, avg, seed):
    table = aggregate(synthetic_curves(fp, samples=2, seed=seed), fp, "m")
    plan = solve_plan(table, avg, SolveOptions(cross_check=True))
    cm = table.cost_model
    assert plan.used_budget == sum(cm.cost(lp.layer, lp.budget) for lp in plan.layers) <= plan.total_budget
    assert plan.total_budget == cm.total(avg)
    assert all(lp.budget <= (cm.caps[lp.layer] or lp.budget) for lp in plan.layers)
    uniform = best_uniform(table, plan.total_budget)
    if uniform is not None:
        assert plan.predicted_loss <= uniform.loss + 1e-9
    if avg in BUDGETS:
        for policy in POLICIES:
            assert plan.predicted_loss <= allocation_plan(table, "uniform", policy, avg).predicted_loss + 1e-9


# --- allocations -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,avg", [(1, 64), (6, 32), (32, 128), (7, 5)])
def test_pyramid_decreases_and_sums_to_total(layers, avg):
    cm = CostModel.for_fingerprint(make_fingerprint(num_layers=layers))
    budgets = pyramid_budgets(cm, avg)
    assert sum(budgets) == avg * layers
    assert budgets == sorted(budgets, reverse=True) or max(budgets) - min(budgets) <= 1
    assert min(budgets) >= 1
    assert pyramid_profile(layers).mean() == pytest.approx(1.0)


def test_pyramid_with_sliding_layers_fits_bytes():
    fp = make_fingerprint(num_layers=6, sliding=[0, 1, 3, 4], window=16)
    cm = CostModel.for_fingerprint(fp)
    budgets = pyramid_budgets(cm, 64)
    assert all(budgets[layer] <= 16 for layer in (0, 1, 3, 4))
    assert sum(cm.cost(layer, b) for layer, b in enumerate(budgets)) <= cm.total(64)
    assert cm.total(64) - sum(cm.cost(layer, b) for layer, b in enumerate(budgets)) < max(cm.per_token)
    assert budgets[2] > pyramid_budgets(CostModel.for_fingerprint(make_fingerprint(num_layers=6)), 64)[2]


def test_allocation_plans_scored_from_table(table):
    uni = allocation_plan(table, "uniform", "snapkv", 64)
    assert {lp.budget for lp in uni.layers} == {64} and uni.provenance["solver"] == "uniform"
    assert uni.predicted_loss == pytest.approx(sum(table.predicted_loss(layer, "snapkv", 64) for layer in range(6)))
    pyr = allocation_plan(table, "pyramid", "snapkv", 32)
    assert pyr.used_budget <= pyr.total_budget and pyr.provenance["options"]["beta"] == 20.0
    assert pyr.layers[0].budget > pyr.layers[-1].budget


# --- parsing ---------------------------------------------------------------------------------------------------------


def test_parsers():
    assert parse_pins(["0:full", "2-3:snapkv:64"], 4) == {0: Pin("full"), 2: Pin("snapkv", 64), 3: Pin("snapkv", 64)}
    assert parse_layer_values(["32", "1:64"], 3, "--min-budget") == {0: 32, 1: 64, 2: 32}
    for bad in (
        lambda: parse_pins(["9:full"], 4),
        lambda: parse_pins(["x"], 4),
        lambda: parse_layer_values(["0:-1"], 2, "--max-budget"),
    ):
        with pytest.raises(SolveError):
            bad()


def test_parse_budgets_sorts_and_names_the_bad_item():
    assert parse_budgets("64, 128") == (64, 128)
    assert parse_budgets("256,64,128,") == (64, 128, 256)
    for text, needle in (
        ("64,128,64", "lists 64 more than once"),
        ("64,x8", "'x8' is not a whole number"),
        ("64,0", "'0' is not positive"),
        ("64,-8", "'-8' is not positive"),
        ("1.5", "'1.5' is not a whole number"),
        (" , ", "needs a comma-separated list"),
    ):
        with pytest.raises(InputError, match=needle):
            parse_budgets(text)
    with pytest.raises(InputError, match="--lengths: 'a'"):
        parse_budgets("a", "--lengths")


# --- end to end ------------------------------------------------------------------------------------------------------


def test_same_inputs_give_byte_identical_plans(tmp_path):
    cal = write_calibration(tmp_path / "cal")
    texts = []
    for _ in range(2):
        table, plans = run_request(SolveRequest(cal, (64, 128), options=SolveOptions(pins={0: Pin("full")})))
        texts.append([p.to_json() for p in plans])
    assert texts[0] == texts[1]
    prov = json.loads(texts[0][0])["provenance"]
    assert prov["calibration_data_hash"] == "d" * 16 and len(prov["parquet_hash"]) == 16
    assert load_calibration(cal).parquet_hash == prov["parquet_hash"]


# --- KV precision ----------------------------------------------------------------------------------------------------

# Plans solved before calibrations could carry bits (same curves, same options): (average budget, constrained?) ->
# per-layer policy@budget, used and total budget. A calibration without bits must still give exactly these.
GOLDEN_FINGERPRINTS = {
    "tokens": make_fingerprint(num_layers=6),
    "bytes": make_fingerprint(
        num_layers=4, kv_heads=[1, 1, 4, 4], head_dim=[32, 32, 16, 16], sliding=[0, 2], window=32
    ),
}
GOLDEN = {
    ("tokens", 24, False): ("streaming@16 snapkv@16 h2o@64 streaming@16 h2o@16 snapkv@16", 144, 144),
    ("tokens", 24, True): ("full@64 streaming@16 streaming@16 streaming@16 streaming@16 streaming@16", 144, 144),
    ("tokens", 40, False): ("streaming@32 snapkv@16 h2o@128 streaming@16 h2o@16 snapkv@32", 240, 240),
    ("tokens", 40, True): ("full@64 streaming@64 streaming@16 streaming@16 streaming@64 streaming@16", 240, 240),
    ("tokens", 100, False): ("streaming@64 snapkv@64 h2o@128 streaming@64 h2o@128 streaming@128", 576, 600),
    ("tokens", 100, True): ("full@64 streaming@128 streaming@128 streaming@16 streaming@128 streaming@128", 592, 600),
    ("bytes", 24, False): ("h2o@31 snapkv@16 streaming@31 streaming@16", 18048, 18432),
    ("bytes", 24, True): ("full@31 snapkv@16 snapkv@16 snapkv@32", 18304, 18432),
    ("bytes", 40, False): ("h2o@31 snapkv@64 streaming@31 streaming@16", 24192, 27264),
    ("bytes", 40, True): ("full@31 streaming@64 streaming@31 streaming@16", 24192, 27264),
    ("bytes", 100, False): ("h2o@31 snapkv@128 streaming@31 streaming@64", 44672, 50304),
    ("bytes", 100, True): ("full@31 streaming@128 streaming@31 streaming@64", 44672, 50304),
}
CONSTRAINED = SolveOptions(max_policies=1, pins={0: Pin("full")}, full_cost=64)


def bits_curves(fp: dict, bits=(16, 8, 4, 2), seed: int = 0, **kw) -> pd.DataFrame:
    """`synthetic_curves` at every width of `bits` (a `bits` column): below 16 bits each layer adds its own error,
    growing as the width shrinks (0 at 16, 1/7 at 8, 3/7 at 4, 1 at 2, times up to 0.5), so no width wins everywhere."""
    base = synthetic_curves(fp, seed=seed, **kw)
    error = np.random.default_rng(seed + 1).uniform(0.0, 0.5, size=fp["num_layers"])
    parts = []
    for q in bits:
        part = base.assign(bits=q)
        evicting = (part["policy"] != "full").to_numpy()
        added = error[part["layer"].to_numpy()] * (16 / q - 1) / 7
        part["value"] = part["value"].to_numpy() + np.where(evicting, added, 0.0)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def describe_layers(plan: Plan) -> str:
    return " ".join(f"{lp.policy}@{lp.budget}" for lp in plan.layers)


@pytest.mark.parametrize("key", sorted(GOLDEN, key=str))
def test_calibration_without_bits_gives_the_plans_it_gave_before(key):
    name, avg, constrained = key
    fp = GOLDEN_FINGERPRINTS[name]
    table = aggregate(synthetic_curves(fp, samples=3), fp, "test/model", policy_params={"snapkv": {"window": 8}})
    plan = solve_plan(table, avg, CONSTRAINED if constrained else SolveOptions())
    assert (describe_layers(plan), plan.used_budget, plan.total_budget) == GOLDEN[key]
    assert plan.schema_version == 1 and '"bits"' not in plan.to_json()
    assert not table.precision and table.bits == (16,)


def test_a_bits_column_of_16_only_changes_nothing():
    fp = GOLDEN_FINGERPRINTS["bytes"]
    curves = synthetic_curves(fp, samples=3)
    plain = aggregate(curves, fp, "m")
    sixteen = aggregate(curves.assign(bits=16), fp, "m")
    nulls = aggregate(curves.assign(bits=pd.array([None] * len(curves), dtype="Int32")), fp, "m")
    for other in (sixteen, nulls):
        pd.testing.assert_frame_equal(plain.frame, other.frame)
        for avg in (24, 100):
            assert solve_plan(plain, avg).to_json() == solve_plan(other, avg).to_json()


def _brute_force_plan(table, fp: dict, avg: int) -> float | None:
    """Least total loss over every (policy, budget, bits) per layer whose bytes fit the uniform 16-bit plan's,
    priced here from the storage layout directly (`kv_bytes`), not through the solver's cost model."""
    window = fp["sliding_window"]
    caps = [window - 1 if "sliding" in t and window else None for t in fp["layer_types"]]
    capacity = sum(
        kv_bytes(min(avg, c) if c else avg, h, d, 16)
        for h, d, c in zip(fp["num_kv_heads"], fp["head_dim"], caps, strict=True)
    )
    options = []
    for layer, g in table.frame.groupby("layer", sort=True):
        h, d = fp["num_kv_heads"][layer], fp["head_dim"][layer]
        options.append([(kv_bytes(int(r.budget), h, d, int(r.bits)), float(r.loss)) for r in g.itertuples()])
    best = None
    for combo in itertools.product(*options):
        if sum(c for c, _ in combo) <= capacity:
            total = fsum(f for _, f in combo)
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize(
    "fp",
    [
        make_fingerprint(num_layers=3),
        make_fingerprint(num_layers=3, kv_heads=[1, 2, 4], head_dim=[32, 16, 16], sliding=[1], window=24),
    ],
    ids=["equal-layers", "unequal-sliding"],
)
@pytest.mark.parametrize("avg", [3, 5, 8, 20, 40, 70])
def test_solver_with_bits_equals_brute_force(fp, avg):
    table = aggregate(bits_curves(fp, bits=(16, 4, 2), policies=("snapkv", "h2o"), budgets=(16, 32, 64)), fp, "m")
    assert table.precision and table.bits == (16, 4, 2) and table.cost_model.unit == "bytes"
    expected = _brute_force_plan(table, fp, avg)
    for solver in ("dp", "ilp"):
        options = SolveOptions(solver=solver, cross_check=True)
        if expected is None:
            with pytest.raises(InfeasibleError, match="bytes but the cheapest allowed plan costs"):
                solve_plan(table, avg, options)
            continue
        plan = solve_plan(table, avg, options)
        assert _close(plan.predicted_loss, expected)
        priced = [
            kv_bytes(lp.budget, fp["num_kv_heads"][lp.layer], fp["head_dim"][lp.layer], lp.bits) for lp in plan.layers
        ]
        if plan.schema_version == 2:
            assert plan.budget_unit == "bytes" and plan.used_budget == sum(priced) <= plan.total_budget
        else:  # every layer at 16 bits: written in the version-1 unit of its fingerprint
            assert {lp.bits for lp in plan.layers} == {16} and sum(priced) <= table.cost_model.total(avg)
        assert Plan.from_dict(json.loads(plan.to_json())).to_json() == plan.to_json()


def test_precision_plans_mix_bits_and_beat_every_uniform_option(tmp_path):
    fp = make_fingerprint(num_layers=6)
    table = aggregate(bits_curves(fp, samples=3), fp, "m", policy_params={"snapkv": {"window": 8}})
    plans = solve_frontier(table, (16, 32))
    assert {lp.bits for plan in plans for lp in plan.layers} > {16}
    for plan in plans:
        assert plan.schema_version == 2 and plan.budget_unit == "bytes"
        assert plan.total_budget == 6 * 128 * plan.average_budget  # the uniform 16-bit plan's bytes
        assert plan.provenance["options"]["bits"] == [16, 8, 4, 2]
        assert all(
            lp.predicted_loss == table.predicted_loss(lp.layer, lp.policy, lp.budget, lp.bits) for lp in plan.layers
        )
        uniform = summarize(plan, table).best_uniform
        assert uniform is not None and plan.predicted_loss <= uniform.loss + 1e-12
        path = tmp_path / f"avg{plan.average_budget:g}.json"
        plan.save(path)
        assert Plan.load(path).to_json() == plan.to_json()
    # 4 bits buy more tokens than 16 for the same bytes, so some layer keeps more than the average
    assert max(lp.budget for lp in plans[0].layers) > 16


def test_bits_that_never_pay_give_the_16_bit_plan_as_version_1():
    fp = make_fingerprint(num_layers=6)
    curves = synthetic_curves(fp, samples=3)
    lossy = bits_curves(fp, bits=(16, 4), samples=3)
    lossy.loc[lossy["bits"] == 4, "value"] += 100.0  # quantising costs far more than any eviction saves
    plain, precise = aggregate(curves, fp, "m"), aggregate(lossy, fp, "m")
    for avg in (24, 64):
        a, b = solve_plan(plain, avg), solve_plan(precise, avg)
        assert b.schema_version == 1 and b.budget_unit == "tokens" and b.total_budget == 6 * avg
        assert describe_layers(a) == describe_layers(b) and b.used_budget == a.used_budget


def test_allocations_and_targets_from_a_precision_table_are_16_bit():
    fp = make_fingerprint(num_layers=4)
    table = aggregate(bits_curves(fp, policies=("snapkv", "window"), budgets=(16, 32, 64)), fp, "m")
    uniform = allocation_plan(table, "uniform", "snapkv", 32)
    assert uniform.schema_version == 1 and uniform.budget_unit == "tokens" and uniform.predicted_loss is not None
    from polykv.solve.targets import Target, solve_target

    target = solve_target(table, 32, Target("hf", 128))
    assert target.schema_version == 1 and {lp.bits for lp in target.layers} == {16}


def test_curves_with_unsupported_bits_or_missing_widths_give_one_line():
    fp = make_fingerprint(num_layers=2)
    curves = bits_curves(fp, bits=(16, 4))
    bad = curves.assign(bits=np.where(curves["bits"] == 4, 3, 16))
    with pytest.raises(CalibrationError, match="bits column holds 3; KV precision must be 16, 8, 4 or 2") as exc:
        aggregate(bad, fp, "m")
    assert "\n" not in str(exc.value)
    gap = (curves["layer"] == 1) & (curves["policy"] == "h2o") & (curves["budget"] == 32) & (curves["bits"] == 4)
    with pytest.raises(CalibrationError, match=r"layer 1 h2o@32 at 4 bits \(4 of 4 samples\)"):
        aggregate(curves[~gap], fp, "m")
    assert (
        not aggregate(curves[~gap], fp, "m", allow_missing=True)
        .frame.query("layer == 1 and policy == 'h2o' and budget == 32 and bits == 4")
        .size
    )


def test_byte_budget_below_the_cheapest_option_is_one_line():
    fp = make_fingerprint(num_layers=4)
    table = aggregate(bits_curves(fp, bits=(16, 2)), fp, "m")
    cheapest = 4 * kv_bytes(16, 2, 16, 2)
    with pytest.raises(InfeasibleError) as exc:
        solve_plan(table, 1)
    assert str(exc.value) == (
        f"average budget 1 allows {4 * 128} bytes but the cheapest allowed plan costs {cheapest} bytes; "
        "raise the budget"
    )
