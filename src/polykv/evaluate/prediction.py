"""Does the calibration predict the measured scores? Predicted loss of each evaluated configuration vs its score.

A configuration's predicted loss is what the solver minimises: the sum over layers of the calibration's aggregated
loss of that layer's (policy, budget, bits) (linear between grid budgets; the solver's default metric and mean
over samples). The check reports Spearman rank correlations with the measured average score: over every compressed
(method, budget) point, within each budget across methods (does the calibration rank the methods right?), and
along each plan method's frontier (does less predicted loss mean a higher score?).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from polykv.evaluate.methods import parse_methods
from polykv.evaluate.scores import task_scores
from polykv.solve.aggregate import aggregate
from polykv.solve.inputs import load_calibration


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rho = float(spearmanr(xs, ys).statistic)
    return None if math.isnan(rho) else round(rho, 4)


def predicted_losses(info: dict, calibration: Path) -> pd.DataFrame:
    """(method, budget, predicted_loss) for every compressed method x budget the evaluation ran."""
    cal = load_calibration(calibration)
    table = aggregate(cal.curves, cal.fingerprint, cal.model, allow_missing=True, policy_params=cal.policy_params())
    budgets = sorted(int(b) for b in info["budgets"])
    rows = []
    for method in parse_methods(info["methods"], None):
        for budget in method.budgets(budgets):
            if budget is None:
                continue
            settings = method.settings(budget, cal.fingerprint)
            losses = [table.predicted_loss(i, s.policy.name, s.budget, s.bits) for i, s in enumerate(settings)]
            if any(x is None for x in losses):  # a budget outside the calibrated grid: no prediction
                continue
            rows.append({"method": method.name, "budget": budget, "predicted_loss": sum(losses)})
    return pd.DataFrame(rows, columns=["method", "budget", "predicted_loss"]).assign(metric=table.metric)


def prediction_check(results: pd.DataFrame, info: dict, calibration: Path) -> dict:
    """Spearman correlations of predicted loss vs measured average score (see the module docstring)."""
    pred = predicted_losses(info, calibration)
    avg = task_scores(results)
    avg = avg[avg.task == "average"][["method", "budget", "score"]]
    both = pred.merge(avg, on=["method", "budget"])
    per_budget = {}
    for budget, g in both.groupby("budget"):
        per_budget[str(int(budget))] = {"methods": len(g), "spearman": _spearman(list(g.predicted_loss), list(g.score))}
    plans = {}
    for name, g in both[both.method.str.match(r"^plan(-|$)")].groupby("method"):
        plans[name] = {"points": len(g), "spearman": _spearman(list(g.predicted_loss), list(g.score))}
    return {
        "metric": str(pred.metric.iloc[0]) if len(pred) else None,
        "points": len(both),
        "spearman_all": _spearman(list(both.predicted_loss), list(both.score)),
        "per_budget": per_budget,
        "plans": plans,
        "predicted": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            for r in both.drop(columns="metric").to_dict("records")
        ],
    }
