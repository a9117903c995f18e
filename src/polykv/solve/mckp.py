"""Exact multiple-choice knapsack by dynamic programming over integer cost units.

Problem: layers l = 0..L-1 each have options k with integer cost c[l][k] >= 0 and real loss f[l][k]; pick exactly
one option per layer to minimise sum f subject to sum c <= capacity.

Method (exact, integer arithmetic on costs):
1. divide every cost and the capacity by the gcd of all costs (capacity rounded down: a sum of multiples of g is
   <= C iff it is <= g * floor(C / g));
2. per layer, drop dominated options (another option costs no more and loses no more), which never changes the
   optimum and leaves at most one option per distinct cost;
3. subtract each layer's cheapest cost (the capacity too) so the table only spans the slack;
4. best[w] = least loss with exactly w slack units used, layer by layer, recording each layer's choice;
5. take the best w (the cheapest among exact ties) and walk the choices back.
Time O(L x K' x W) with K' kept options per layer and W slack units (numpy-vectorised over W); memory L x W.
Ties between equal losses go to the cheaper option, then to the earlier option in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

import numpy as np

from polykv.errors import InfeasibleError, SolveError


def cost_gcd(costs: Sequence[np.ndarray]) -> int:
    """gcd of all costs (1 when all are zero)."""
    g = 0
    for c in costs:
        g = gcd(g, int(np.gcd.reduce(np.asarray(c, dtype=np.int64))) if len(c) else 0)
    return g or 1


def pareto_indices(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Indices of undominated options, by increasing cost (strictly decreasing loss); ties keep the earliest."""
    order = np.lexsort((np.arange(len(costs)), losses, costs))
    keep, best = [], np.inf
    for i in order:
        if losses[i] < best:
            keep.append(i)
            best = losses[i]
    return np.array(keep, dtype=np.int64)


def dp_state_size(costs: Sequence[np.ndarray], capacity: int) -> int:
    """L x W: the size of the DP table (to decide whether the DP is practical)."""
    g = cost_gcd(costs)
    base = sum(int(np.min(c)) for c in costs) // g
    span = sum(int(np.max(c) - np.min(c)) for c in costs) // g
    return len(costs) * (max(0, min(capacity // g - base, span)) + 1)


def solve_dp(costs: Sequence[np.ndarray], losses: Sequence[np.ndarray], capacity: int) -> list[int]:
    """Optimal option index per layer; InfeasibleError if even the cheapest options exceed `capacity`."""
    if len(costs) != len(losses) or any(len(c) != len(f) for c, f in zip(costs, losses, strict=True)):
        raise SolveError("costs and losses must have the same shape per layer")
    if any(len(c) == 0 for c in costs):
        raise InfeasibleError(f"layer {next(i for i, c in enumerate(costs) if len(c) == 0)} has no option")
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    losses = [np.asarray(f, dtype=np.float64) for f in losses]
    if any((c < 0).any() for c in costs) or any(not np.isfinite(f).all() for f in losses):
        raise SolveError("costs must be >= 0 and losses finite")
    g = cost_gcd(costs)
    units = [c // g for c in costs]
    base = sum(int(u.min()) for u in units)
    slack = capacity // g - base
    if slack < 0:
        raise InfeasibleError(f"the cheapest options cost {base * g}, over the capacity {capacity}")
    width = min(slack, sum(int(u.max() - u.min()) for u in units)) + 1

    kept = []
    best = np.full(width, np.inf)
    best[0] = 0.0
    choice_dtype = np.int16 if max(len(c) for c in costs) < 2**15 else np.int32
    choices = np.empty((len(costs), width), dtype=choice_dtype)
    for layer, (u, f) in enumerate(zip(units, losses, strict=True)):
        idx = pareto_indices(u, f)
        kept.append(idx)
        shift = u[idx] - u.min()
        new = np.full(width, np.inf)
        ch = choices[layer]
        ch.fill(-1)
        for j, (d, loss) in enumerate(zip(shift, f[idx], strict=True)):
            if d >= width:
                break
            cand = best[: width - d] + loss
            seg = new[d:]
            better = cand < seg
            seg[better] = cand[better]
            ch[d:][better] = j
        best = new

    w = int(np.argmin(best))
    if not np.isfinite(best[w]):
        raise SolveError("the DP found no finite solution (internal error)")
    picks = [0] * len(costs)
    for layer in range(len(costs) - 1, -1, -1):
        j = int(choices[layer, w])
        i = int(kept[layer][j])
        picks[layer] = i
        w -= int(units[layer][i] - units[layer].min())
    return picks


def solve_dp_groups(
    costs: Sequence[np.ndarray],
    losses: Sequence[np.ndarray],
    capacity: int,
    groups: Sequence[np.ndarray],
    max_groups: int,
) -> list[int]:
    """Optimum with at most `max_groups` distinct groups (policies) among the picks; group -1 never counts.

    Exact by enumeration: the optimum uses some set of <= K groups, so it is the best DP over every K-subset of the
    groups (a subset may leave some unused). Cost: C(G, K) DPs, so use it when that is small (see subset_count).
    """
    from itertools import combinations
    from math import fsum

    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    labels = sorted(set(np.concatenate(groups).tolist()) - {-1})
    best: tuple[float, list[int]] | None = None
    for subset in combinations(labels, min(max_groups, len(labels))):
        allowed = [np.nonzero(np.isin(g, subset) | (g == -1))[0] for g in groups]
        if any(len(a) == 0 for a in allowed):
            continue
        try:
            picks = solve_dp(
                [np.asarray(c)[a] for c, a in zip(costs, allowed, strict=True)],
                [np.asarray(f)[a] for f, a in zip(losses, allowed, strict=True)],
                capacity,
            )
        except InfeasibleError:
            continue
        picks = [int(a[k]) for a, k in zip(allowed, picks, strict=True)]
        total = fsum(float(f[k]) for f, k in zip(losses, picks, strict=True))
        if best is None or total < best[0]:
            best = (total, picks)
    if best is None:
        raise InfeasibleError(f"no choice with at most {max_groups} policies fits the capacity {capacity}")
    return best[1]


def subset_count(groups: Sequence[np.ndarray], max_groups: int) -> int:
    """How many DPs solve_dp_groups would run."""
    from math import comb

    labels = set(np.concatenate([np.asarray(g) for g in groups]).tolist()) - {-1}
    return comb(len(labels), min(max_groups, len(labels)))
