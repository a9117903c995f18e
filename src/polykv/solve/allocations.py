"""Named budget allocations that need no solving: uniform and a PyramidKV-style linear ramp.

PyramidKV (Cai et al., 2024) gives the top layer B/beta tokens and the bottom layer 2B - B/beta, linearly in between,
so the budgets sum to B x L. Here the ramp is a *profile* r_l (mean 1) scaled by s so that the plan's cost fills the
same total as the uniform plan: with equal layers and no sliding ones, s = B exactly as in PyramidKV; with sliding
layers (capped at window - 1) or unequal KV geometry the largest s that fits is used, so the freed budget of the
capped layers flows to the others. Budgets are whole tokens >= 1: floors, then one extra token for the layers with
the largest remainders while the total allows (so equal layers sum to exactly B x L).
"""

from __future__ import annotations

import numpy as np

from polykv.errors import SolveError
from polykv.plan import CostModel

ALLOCATIONS = ("uniform", "pyramid")
DEFAULT_PYRAMID_BETA = 20.0


def uniform_budgets(cm: CostModel, average_budget: int) -> list[int]:
    """The average budget on every layer (sliding layers capped at window - 1)."""
    return [cm.effective(layer, average_budget) for layer in range(cm.num_layers)]


def pyramid_profile(num_layers: int, beta: float = DEFAULT_PYRAMID_BETA) -> np.ndarray:
    """Relative budgets, decreasing linearly with depth from 2 - 1/beta to 1/beta (mean 1)."""
    if beta < 1:
        raise SolveError(f"pyramid beta must be >= 1 (top layer gets B/beta), got {beta}")
    if num_layers == 1:
        return np.ones(1)
    top = 1.0 / beta
    return np.linspace(2.0 - top, top, num_layers)


def fit_profile(cm: CostModel, average_budget: int, profile: np.ndarray) -> list[int]:
    """Whole-token budgets proportional to `profile` (capped per layer) whose cost fills cm.total(average)."""
    total = cm.total(average_budget)
    per_token = np.array(cm.per_token, dtype=np.float64)
    caps = np.array([np.inf if c is None else c for c in cm.caps])

    def used(scale: float) -> float:
        return float((per_token * np.minimum(scale * profile, caps)).sum())

    lo, hi = 0.0, float(max(average_budget, 1))
    while used(hi) < total and used(2 * hi) > used(hi):
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(mid) <= total else (lo, mid)
    exact = np.minimum(lo * profile, caps)
    budgets = np.maximum(np.floor(exact), 1).astype(np.int64)
    cost = lambda: int(sum(cm.cost(layer, int(b)) for layer, b in enumerate(budgets)))  # noqa: E731
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    progress = True
    while progress:
        progress = False
        for layer in order:
            if budgets[layer] < caps[layer] and cost() + cm.per_token[layer] <= total:
                budgets[layer] += 1
                progress = True
        order = np.argsort(-exact, kind="stable")
    while cost() > total and budgets.max() > 1:  # only when the >= 1 floor pushed tiny budgets over
        budgets[int(np.argmax(budgets))] -= 1
    return [int(b) for b in budgets]


def pyramid_budgets(cm: CostModel, average_budget: int, beta: float = DEFAULT_PYRAMID_BETA) -> list[int]:
    """PyramidKV-style budgets: decreasing linearly with depth, filling the uniform plan's total."""
    return fit_profile(cm, average_budget, pyramid_profile(cm.num_layers, beta))
