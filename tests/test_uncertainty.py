"""Paired, task-stratified bootstrap intervals for plan vs best uniform (hand-computable cases)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from polykv.evaluate.report import markdown, summary
from polykv.evaluate.uncertainty import paired_interval


def _rows(scores: dict[str, dict[str, list[float]]], budget: int = 64) -> pd.DataFrame:
    """scores[method][task] = per-instance scores; `full` rows get no budget, as the engine writes them."""
    rows = []
    for method, by_task in scores.items():
        for task, values in by_task.items():
            for k, s in enumerate(values):
                rows.append(
                    {
                        "instance_id": f"{task}-{k}",
                        "task": task,
                        "method": method,
                        "budget": None if method == "full" else budget,
                        "score": float(s),
                    }
                )
    return pd.DataFrame(rows)


def test_identical_methods_differ_by_exactly_zero():
    df = _rows({"plan": {"a": [0, 100, 100, 0]}, "uniform:x": {"a": [0, 100, 100, 0]}})
    iv = paired_interval(df, "plan", "uniform:x", 64)
    assert iv.diff == 0 and iv.diff_ci == (0, 0) and iv.gap_ci is None


def test_a_constant_difference_has_no_width_and_pairing_ignores_instance_noise():
    # instance difficulty varies a lot, but the plan is ahead by exactly 10 on every instance: paired => [10, 10]
    base = [0, 90, 30, 60, 10, 80]
    df = _rows({"plan": {"a": [b + 10 for b in base]}, "uniform:x": {"a": base}, "full": {"a": [b + 20 for b in base]}})
    iv = paired_interval(df, "plan", "uniform:x", 64)
    assert iv.diff == pytest.approx(10) and iv.diff_ci == (pytest.approx(10), pytest.approx(10))
    assert iv.gap_ci == (pytest.approx(0.5), pytest.approx(0.5)) and iv.gap_draws == 2000


def test_tasks_weigh_the_same_and_keep_their_sizes_in_every_draw():
    # task a: 4 instances, plan +100 on all; task b: 1 instance, plan -100. Every draw of b is that one instance,
    # every draw of a is +100, so the task-weighted difference is (100 - 100) / 2 = 0 in every draw.
    df = _rows({"plan": {"a": [100] * 4, "b": [0]}, "uniform:x": {"a": [0] * 4, "b": [100]}})
    iv = paired_interval(df, "plan", "uniform:x", 64)
    assert iv.diff == 0 and iv.diff_ci == (0, 0)


def test_interval_matches_a_direct_resampling_and_holds_the_point():
    plan = [100, 0, 100, 100, 0, 100, 0, 100]
    uni = [0, 0, 100, 0, 0, 100, 100, 0]
    df = _rows({"plan": {"a": plan}, "uniform:x": {"a": uni}})
    iv = paired_interval(df, "plan", "uniform:x", 64, draws=4000, seed=3)
    d = np.array(plan, float) - np.array(uni, float)
    rng = np.random.default_rng(7)
    direct = d[rng.integers(0, len(d), size=(4000, len(d)))].mean(1)
    lo, hi = np.percentile(direct, [2.5, 97.5])
    assert iv.diff == pytest.approx(d.mean())
    assert iv.diff_ci[0] < iv.diff < iv.diff_ci[1]
    assert iv.diff_ci[0] == pytest.approx(lo, abs=13) and iv.diff_ci[1] == pytest.approx(hi, abs=13)


def test_only_instances_both_methods_scored_are_paired():
    df = _rows({"plan": {"a": [100, 100, 0]}, "uniform:x": {"a": [0, 100]}})
    iv = paired_interval(df, "plan", "uniform:x", 64)
    assert iv.diff == pytest.approx(50)  # instance a-2 has no uniform score and is left out


def test_summary_and_report_carry_the_interval_and_drop_it_with_the_gap():
    df = _rows({"full": {"a": [100, 100, 100, 0]}, "plan": {"a": [100, 100, 0, 0]}, "uniform:x": {"a": [100, 0, 0, 0]}})
    summ = summary(df, "m")
    iv = summ["budgets"]["64"]["plans"]["plan"]["vs_best_uniform"]
    assert iv["diff"] == pytest.approx(25) and iv["diff_ci95"][0] <= 25 <= iv["diff_ci95"][1]
    assert iv["gap_recovery_ci95"] is not None
    text = markdown(df, {}, summ)
    assert "plan - best (95 % CI)" in text and "+25.00 [" in text
    no_gap = _rows({"full": {"a": [0, 0]}, "plan": {"a": [100, 0]}, "uniform:x": {"a": [100, 0]}})
    assert summary(no_gap, "m")["budgets"]["64"]["plans"]["plan"]["vs_best_uniform"]["gap_recovery_ci95"] is None
