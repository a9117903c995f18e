"""Plan refinement on the measured whole-model loss: the objective, the moves, the search, and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_loaded, write_samples
from polykv.attention import polykv_attention
from polykv.calibrate.sample import prepare
from polykv.compat import with_cache
from polykv.data import load_samples
from polykv.models import fingerprint
from polykv.plan import Plan, uniform_plan
from polykv.policies import make_policy
from polykv.refine import Objective, neighbours, prepare_samples, refine_plan
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
        ("snapkv", 16), ("snapkv", 64), ("streaming", 32), ("h2o", 32), ("knorm", 32)]
    assert neighbours(("h2o", 8), GRID, POLICIES)[0] == ("h2o", 16)  # nothing below the grid
    assert ("snapkv", 1024) not in neighbours(("snapkv", 512), GRID, POLICIES)  # nothing above it


def test_objective_equals_a_direct_measurement_per_plan(setup):
    """Rows of one shared-prefix batch give each plan's own answer KL, as a single compressed cache does."""
    loaded, samples = setup
    model = loaded.model
    plans = [[("full", 512)] * 3, [("streaming", 16), ("snapkv", 32), ("h2o", 8)], [("knorm", 8)] * 3]
    got = Objective(model, samples, max_rows=2)(plans)  # 2 rows per batch: the third plan is its own batch
    assert got[0] == pytest.approx(0.0, abs=1e-6)
    for plan, value in zip(plans[1:], got[1:]):
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
    assert all(b < a for a, b in zip(losses, losses[1:]))  # each accepted round strictly lowers it
    assert len(result.moves) == len(losses) - 1 >= 1  # streaming@16 everywhere is far from the best plan
    plan = result.plan
    plan.validate()
    assert plan.used_budget <= plan.total_budget == start.total_budget
    final = Objective(loaded.model, samples)([[(l.policy, l.budget) for l in plan.layers]])[0]
    assert final == pytest.approx(losses[-1], rel=1e-4)  # batch composition changes rounding only
    assert plan.provenance["refine"]["measured_loss"][0] == pytest.approx(losses[0], rel=1e-5)
    assert plan.predicted_loss is None  # the solver's prediction no longer describes these layers


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
    res = runner.invoke(app, ["refine", "--plans", str(tmp_path), "--samples", "1", "--rounds", "1",
                              "--out", str(tmp_path / "r"), "--data", str(root / "calibration_data" / "default.jsonl")])
    assert res.exit_code == 0, res.output
    plan = Plan.load(tmp_path / "r" / "avg512.json")
    assert plan.average_budget == 512 and plan.used_budget <= plan.total_budget
    assert plan.provenance["refine"]["samples"] == 1 and "loss before" in res.output
    shown = runner.invoke(app, ["plan", "show", str(tmp_path / "r" / "avg512.json")])
    assert shown.exit_code == 0 and "refined (polykv refine)" in shown.output
