"""The same multiple-choice knapsack as an integer linear programme, solved by HiGHS (scipy.optimize.milp).

Binary x[l,k] = "layer l takes option k":  min sum f x  s.t.  sum_k x[l,k] = 1 per layer,  sum c x <= C.
It cross-checks the DP and carries constraints the DP does not: at most K distinct groups (policies) among the
chosen options, via binary y[p] with  sum_{k in p} x[l,k] <= y[p]  per layer and  sum_p y[p] <= K.
Options in group -1 (e.g. a pinned `full`) do not count towards K.

Numerics: costs are divided by their gcd; losses are shifted per layer to start at 0 and scaled to a maximum of
1e4 so that HiGHS's absolute gap tolerance (1e-6) is negligible; the relative gap is 0. The solution is rounded and
re-checked in exact integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from polykv.errors import InfeasibleError, SolveError
from polykv.solve.mckp import cost_gcd, pareto_indices

OBJECTIVE_SCALE = 1e4


def _undominated(costs: np.ndarray, losses: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Options not dominated by another of the same group (all options form one group without groups)."""
    if groups is None:
        return np.sort(pareto_indices(costs, losses))
    keep = [
        np.nonzero(groups == gr)[0][pareto_indices(costs[groups == gr], losses[groups == gr])]
        for gr in np.unique(groups)
    ]
    return np.sort(np.concatenate(keep))


def solve_ilp(
    costs: Sequence[np.ndarray],
    losses: Sequence[np.ndarray],
    capacity: int,
    groups: Sequence[np.ndarray] | None = None,
    max_groups: int | None = None,
    time_limit: float | None = None,
) -> list[int]:
    """Optimal option index per layer; InfeasibleError when no choice fits (including the group limit)."""
    if len(costs) != len(losses) or any(len(c) != len(f) for c, f in zip(costs, losses, strict=True)):
        raise SolveError("costs and losses must have the same shape per layer")
    if any(len(c) == 0 for c in costs):
        raise InfeasibleError(f"layer {next(i for i, c in enumerate(costs) if len(c) == 0)} has no option")
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    losses = [np.asarray(f, dtype=np.float64) for f in losses]
    if max_groups is not None and groups is None:
        raise SolveError("max_groups needs the group of every option")
    full_groups = [np.asarray(x, dtype=np.int64) for x in groups] if max_groups is not None else None
    # dominated options (within a group when groups count) never help: solve on the rest, map indices back
    index = [
        _undominated(c, f, None if full_groups is None else gr)
        for c, f, gr in zip(costs, losses, full_groups or [None] * len(costs), strict=True)
    ]
    picks = _solve(
        [c[i] for c, i in zip(costs, index, strict=True)],
        [f[i] for f, i in zip(losses, index, strict=True)],
        capacity,
        None if full_groups is None else [gr[i] for gr, i in zip(full_groups, index, strict=True)],
        max_groups,
        time_limit,
    )
    return [int(i[k]) for i, k in zip(index, picks, strict=True)]


def _solve(
    costs: list[np.ndarray],
    losses: list[np.ndarray],
    capacity: int,
    groups: list[np.ndarray] | None,
    max_groups: int | None,
    time_limit: float | None,
) -> list[int]:
    g = cost_gcd(costs)
    cap = capacity // g
    if sum(int(c.min()) for c in costs) // g > cap:
        raise InfeasibleError(f"the cheapest options cost more than the capacity {capacity}")

    sizes = np.array([len(c) for c in costs])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_x = int(sizes.sum())
    unit = np.concatenate(costs) // g
    shifted = np.concatenate([f - f.min() for f in losses])
    scale = shifted.max() / OBJECTIVE_SCALE if shifted.max() > 0 else 1.0
    objective = shifted / scale

    rows, cols, vals, lo, hi = [], [], [], [], []

    def add_row(c: np.ndarray, v: np.ndarray, lower: float, upper: float) -> None:
        rows.append(np.full(len(c), len(lo)))
        cols.append(c)
        vals.append(v)
        lo.append(lower)
        hi.append(upper)

    for layer in range(len(costs)):
        add_row(np.arange(starts[layer], starts[layer] + sizes[layer]), np.ones(sizes[layer]), 1, 1)
    add_row(np.arange(n_x), unit.astype(np.float64), -np.inf, cap)

    n_y = 0
    if max_groups is not None:
        gid = np.concatenate([np.asarray(x, dtype=np.int64) for x in groups])
        labels = sorted(set(gid.tolist()) - {-1})
        n_y = len(labels)
        for p, label in enumerate(labels):
            for layer in range(len(costs)):
                sel = np.nonzero(gid[starts[layer] : starts[layer] + sizes[layer]] == label)[0] + starts[layer]
                if len(sel):
                    add_row(np.append(sel, n_x + p), np.append(np.ones(len(sel)), -1.0), -np.inf, 0)
        add_row(np.arange(n_x, n_x + n_y), np.ones(n_y), -np.inf, max_groups)

    n = n_x + n_y
    a = coo_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lo), n)).tocsr()
    options = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = time_limit
    res = milp(
        np.concatenate([objective, np.zeros(n_y)]),
        constraints=LinearConstraint(a, np.array(lo, dtype=float), np.array(hi, dtype=float)),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options=options,
    )
    if res.status == 2:
        raise InfeasibleError("no choice of options satisfies the budget and the constraints")
    if res.x is None or res.status != 0:
        raise SolveError(f"the ILP solver stopped without an optimal plan ({res.message}); retry or use --solver dp")
    x = np.round(res.x[:n_x]).astype(np.int64)
    picks = []
    for layer in range(len(costs)):
        seg = x[starts[layer] : starts[layer] + sizes[layer]]
        if seg.sum() != 1:
            raise SolveError(f"the ILP solution is not integral on layer {layer}; retry with --solver dp")
        picks.append(int(np.argmax(seg)))
    if sum(int(c[k]) for c, k in zip(costs, picks, strict=True)) > capacity:
        raise SolveError("the ILP solution exceeds the budget after rounding; retry with --solver dp")
    if max_groups is not None:
        used = {int(gr[k]) for gr, k in zip(groups, picks, strict=True)} - {-1}
        if len(used) > max_groups:
            raise SolveError("the ILP solution uses too many policies after rounding; retry")
    return picks
