"""Plan refinement on the measured whole-model loss: the objective, the moves, the search, and the CLI."""

from __future__ import annotations

import itertools
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_loaded, write_samples
from typer.testing import CliRunner

from polykv.answer_loss import Objective, prepare_samples
from polykv.attention import polykv_attention
from polykv.compat import with_cache
from polykv.data import load_samples
from polykv.models import fingerprint
from polykv.plan import Plan, uniform_plan
from polykv.policies import make_policy
from polykv.refine import best_uniform, neighbours, refine_plan
from polykv.settings import LayerSetting
from polykv_cli.main import app

POLICIES = ["streaming", "snapkv", "h2o", "knorm"]
GRID = [8, 16, 32, 64, 128, 512]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("refine") / "data.jsonl"
    write_samples(path, n=2, length=400)
    loaded = tiny_loaded()
    return loaded, prepare_samples(loaded, load_samples(path), 512)


def test_neighbours_are_one_budget_step_or_another_policy():
    assert neighbours(("snapkv", 32), GRID, POLICIES) == [
        ("snapkv", 16),
        ("snapkv", 64),
        ("streaming", 32),
        ("h2o", 32),
        ("knorm", 32),
    ]
    assert neighbours(("h2o", 8), GRID, POLICIES)[0] == ("h2o", 16)  # nothing below the grid
    assert ("snapkv", 1024) not in neighbours(("snapkv", 512), GRID, POLICIES)  # nothing above it


def test_a_wider_reach_prices_every_policy_at_nearby_budgets():
    moves = neighbours(("snapkv", 32), GRID, POLICIES, reach=2)
    assert [m for m in moves if m[0] == "snapkv"] == [("snapkv", 8), ("snapkv", 16), ("snapkv", 64), ("snapkv", 128)]
    assert [m for m in moves if m[0] == "h2o"] == [("h2o", 16), ("h2o", 32), ("h2o", 64)]
    assert ("snapkv", 32) not in moves and len(moves) == len(set(moves)) == 4 + 3 * 3
    assert neighbours(("snapkv", 32), GRID, POLICIES, reach=1) == neighbours(("snapkv", 32), GRID, POLICIES)


def test_refine_refuses_a_plan_with_layers_below_16_bits_before_measuring():
    from polykv.errors import PlanError
    from polykv.plan import CostModel, LayerPlan, schema_version_for

    fp = {
        "model_type": "llama",
        "num_layers": 2,
        "num_kv_heads": [1, 1],
        "head_dim": [16, 16],
        "layer_types": ["full_attention"] * 2,
        "sliding_window": None,
    }
    cm = CostModel.for_fingerprint(fp, precision=True)
    layers = [LayerPlan(0, "snapkv", 16, {}, None, 4), LayerPlan(1, "snapkv", 16, {})]
    plan = Plan(schema_version_for(layers), "m", fp, 16.0, cm.total(16), cm.unit, layers, None)
    with pytest.raises(PlanError, match=r"layers \[0\] are below 16 bits"):
        refine_plan(None, [], plan, GRID, POLICIES)  # no model needed: refused before any measurement


def test_objective_equals_a_direct_measurement_per_plan(setup):
    """Rows of one shared-prefix batch give each plan's own answer KL, as a single compressed cache does."""
    loaded, samples = setup
    model = loaded.model
    plans = [[("full", 512)] * 3, [("streaming", 16), ("snapkv", 32), ("h2o", 8)], [("knorm", 8)] * 3]
    got = Objective(model, samples, max_rows=2)(plans)  # 2 rows per batch: the third plan is its own batch
    assert got[0] == pytest.approx(0.0, abs=1e-6)
    for plan, value in zip(plans[1:], got[1:], strict=True):
        want = 0.0
        for sample in samples:
            cache = sample.capture.compress([LayerSetting(make_policy(p), b) for p, b in plan])
            with torch.no_grad(), polykv_attention(model):
                logits = model(input_ids=sample.answer_in, **with_cache(model, cache), use_cache=True).logits
            lp = torch.log_softmax(logits[0].float(), -1)
            full = sample.full_logprobs
            want += float((full.exp() * (full - lp)).sum(-1).mean()) / len(samples)
        assert value == pytest.approx(want, rel=1e-4, abs=1e-6) and value > 0


def test_refine_never_raises_the_measured_loss_and_stays_within_budget(setup):
    loaded, samples = setup
    fp = fingerprint(loaded.model.config)
    start = uniform_plan("tiny", fp, "streaming", 16)
    result = refine_plan(loaded.model, samples, start, GRID, POLICIES, rounds=3, min_gain=0.0)
    losses = result.losses
    assert all(b < a for a, b in itertools.pairwise(losses))  # each accepted round strictly lowers it
    assert len(result.moves) == len(losses) - 1 >= 1  # streaming@16 everywhere is far from the best plan
    plan = result.plan
    plan.validate()
    assert plan.used_budget <= plan.total_budget == start.total_budget
    final = Objective(loaded.model, samples)([[(layer.policy, layer.budget) for layer in plan.layers]])[0]
    assert final == pytest.approx(losses[-1], rel=1e-4)  # batch composition changes rounding only
    assert plan.provenance["refine"]["measured_loss"][0] == pytest.approx(losses[0], rel=1e-5)
    assert plan.predicted_loss is None  # the solver's prediction no longer describes these layers


def test_a_search_from_the_best_uniform_plan_with_a_wide_reach(setup):
    """The start is the uniform policy of lowest measured loss; a reach-2 round prices every policy at nearby budgets
    with the rest at that start, and the result never measures worse than the start."""
    loaded, samples = setup
    fp = fingerprint(loaded.model.config)
    start, measured = best_uniform(loaded.model, samples, uniform_plan("tiny", fp, "snapkv", 32), POLICIES)
    assert set(measured) == set(POLICIES) and measured[start.layers[0].policy] == min(measured.values())
    assert {layer.budget for layer in start.layers} == {32} and start.total_budget == uniform_plan(
        "tiny", fp, "knorm", 32
    ).total_budget
    result = refine_plan(loaded.model, samples, start, GRID, POLICIES, rounds=1, min_gain=0.0, caution=0.0, reach=2)
    assert result.losses[-1] <= result.losses[0] == pytest.approx(measured[start.layers[0].policy], rel=1e-4)
    assert result.plan.used_budget <= start.total_budget
    refine = result.plan.provenance["refine"]
    assert refine["reach"] == 2 and refine["start"] == f"uniform:{start.layers[0].policy}"
    per_round = len(start.layers) * len(neighbours((start.layers[0].policy, 32), GRID, POLICIES, 2))
    assert refine["plans_measured"] >= per_round  # every wide move was measured


def test_held_out_samples_equal_to_the_search_samples_change_nothing(setup):
    """Held-out loss that tracks the search loss falls with every accepted round: the same search, same plan."""
    loaded, samples = setup
    start = uniform_plan("tiny", fingerprint(loaded.model.config), "streaming", 16)
    plain = refine_plan(loaded.model, samples, start, GRID, POLICIES, rounds=2, min_gain=0.0)
    checked = refine_plan(loaded.model, samples, start, GRID, POLICIES, rounds=2, min_gain=0.0, held_out=samples)
    assert checked.plan.layers == plain.plan.layers and len(checked.moves) == len(plain.moves) >= 1
    assert checked.held_out == pytest.approx(checked.losses, rel=1e-4) and not checked.rejected
    assert checked.plan.provenance["refine"]["held_out"]["samples"] == len(samples)


class Scripted:
    """Stands in for `Objective`: per-sample losses from `search(plan)`, held-out losses from `judge(plan)`."""

    def __init__(self, search, judge, held_out):
        self.search, self.judge, self.held_out = search, judge, held_out

    def __call__(self, model, which, max_rows=48):
        scripted = self

        class One:
            evaluated = 0

            def per_sample(self, plans):
                return np.stack([scripted.search(p) for p in plans], axis=1)

            def __call__(self, plans):
                if which is scripted.held_out:
                    return np.array([scripted.judge(p) for p in plans])
                return self.per_sample(plans).mean(0)

        return One()


def _cost(plan):  # a tie-breaker: every budget step away from 16 costs a little
    return 0.001 * sum(b != 16 for _, b in plan)


def test_a_round_that_does_not_lower_the_held_out_loss_is_turned_down_and_the_search_stops(setup, monkeypatch):
    loaded, samples = setup
    held_out = [object()]
    judged = iter([1.0, 0.8])  # the start, then round 1's finalist; every later finalist is judged 0.9
    # the search loss falls every round: snapkv everywhere, and 2 more tokens for layer 0 per round
    scripted = Scripted(
        lambda plan: np.full(3, sum(p != "snapkv" for p, _ in plan) + 1 - 0.01 * plan[0][1]),
        lambda plan: next(judged, 0.9),
        held_out,
    )
    monkeypatch.setattr("polykv.refine.Objective", scripted)
    start = uniform_plan("tiny", fingerprint(loaded.model.config), "streaming", 16)
    fine = list(range(2, 66, 2))
    assert refine_plan(loaded.model, samples, start, fine, POLICIES, rounds=3, min_gain=0.0).losses == pytest.approx(
        [3.84, 0.84, 0.82, 0.80]
    )  # without held-out samples: three rounds (policies first, then budgets)
    judged = iter([1.0, 0.8])
    result = refine_plan(loaded.model, samples, start, fine, POLICIES, rounds=5, min_gain=0.0, held_out=held_out)
    assert result.held_out == [1.0, 0.8] and len(result.moves) == 1
    assert result.rejected and all(r[0] == 2 and r[2] == 0.9 for r in result.rejected)  # round 2: turned down
    kept = [(layer.policy, layer.budget) for layer in result.plan.layers]
    assert scripted.search(kept).mean() == result.losses[1]  # round 1's plan
    refine = result.plan.provenance["refine"]
    assert refine["rounds"] == 1 and refine["held_out"]["loss"] == [1.0, 0.8]
    assert len(refine["held_out"]["rejected"]) == len(result.rejected)
    assert result.plan.predicted_loss is None  # layers changed: the solver's prediction no longer applies
    solved = replace(start, predicted_loss=0.5)
    stuck = refine_plan(loaded.model, samples, solved, fine, POLICIES, rounds=5, min_gain=0.0, held_out=held_out)
    assert not stuck.moves and stuck.plan.layers == start.layers  # every finalist judged 0.9, start 0.9: no move
    assert stuck.plan.predicted_loss == 0.5 and stuck.plan.provenance["refine"]["rounds"] == 0


def test_caution_keeps_a_move_that_helps_one_sample_only_out_of_the_plan(setup, monkeypatch):
    """Layer 0 on snapkv helps sample 0 by 3 and hurts the two others by 0.5 (mean -0.67, standard error 1.17);
    layer 1 on h2o helps every sample by 0.3. With caution the lopsided move is left out; without, it is taken."""
    loaded, samples = setup

    def search(plan):
        loss = np.full(3, 1.0 + _cost(plan))
        if plan[0][0] == "snapkv":
            loss += np.array([-3.0, 0.5, 0.5])
        if plan[1][0] == "h2o":
            loss -= 0.3
        return loss

    monkeypatch.setattr("polykv.refine.Objective", Scripted(search, None, None))
    start = uniform_plan("tiny", fingerprint(loaded.model.config), "streaming", 16)
    bold = refine_plan(loaded.model, samples, start, GRID, POLICIES, rounds=1, min_gain=0.0, caution=0.0).plan
    careful = refine_plan(loaded.model, samples, start, GRID, POLICIES, rounds=1, min_gain=0.0, caution=1.0).plan
    assert (bold.layers[0].policy, bold.layers[1].policy) == ("snapkv", "h2o")
    assert (careful.layers[0].policy, careful.layers[1].policy) == ("streaming", "h2o")
    assert careful.provenance["refine"]["caution"] == 1.0


@pytest.mark.bundled
def test_refine_cli_on_bundled_model(tmp_path, monkeypatch):
    """`polykv refine` on SmolLM2 with one sample and one round: a valid plan for the same budget, a table, and
    clear errors for a missing budget."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    shutil.copy(root / "plans" / "smollm2-135m" / "avg512.json", tmp_path / "avg512.json")
    runner = CliRunner()
    bad = runner.invoke(app, ["refine", "--plans", str(tmp_path), "--budgets", "300", "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "no plan in" in bad.output and "512" in bad.output
    data = str(root / "calibration_data" / "default.jsonl")
    many = runner.invoke(
        app,
        [
            "refine",
            "--plans",
            str(tmp_path),
            "--samples",
            "30",
            "--holdout",
            "8",
            "--out",
            str(tmp_path / "r"),
            "--data",
            data,
        ],
    )
    assert many.exit_code == 2 and "holds 32 samples" in many.output and not (tmp_path / "r").exists()
    for flags, says in ((["--start", "best"], "use plan or uniform"), (["--reach", "0"], "--reach must be")):
        bad = runner.invoke(app, ["refine", "--plans", str(tmp_path), "--out", str(tmp_path / "r"), *flags])
        assert bad.exit_code == 2 and says in bad.output and not (tmp_path / "r").exists(), bad.output
    res = runner.invoke(
        app,
        [
            "refine",
            "--plans",
            str(tmp_path),
            "--samples",
            "1",
            "--holdout",
            "1",
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--data",
            data,
        ],
    )
    assert res.exit_code == 0, res.output
    plan = Plan.load(tmp_path / "r" / "avg512.json")
    assert plan.average_budget == 512 and plan.used_budget <= plan.total_budget
    assert plan.provenance["refine"]["samples"] == 1 and "held-out" in res.output and "1 held out" in res.output
    assert plan.provenance["refine"]["held_out"]["samples"] == 1
    shown = runner.invoke(app, ["plan", "show", str(tmp_path / "r" / "avg512.json")])
    assert shown.exit_code == 0 and "refined (polykv refine)" in shown.output and "held-out KL" in shown.output
