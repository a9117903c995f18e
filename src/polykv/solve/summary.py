"""What a solved plan amounts to: policy counts, budget spread, and its predicted loss against the best uniform plan.

The uniform reference is the best (policy, grid budget) used on every layer whose cost fits the same total, scored
with the same option table (same metric and aggregation); constraints such as pins do not apply to it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import fsum
from statistics import median

from polykv.plan import Plan
from polykv.solve.aggregate import OptionTable


@dataclass(frozen=True)
class UniformOption:
    policy: str
    budget: int
    loss: float


@dataclass(frozen=True)
class PlanSummary:
    average_budget: float
    total_budget: int
    used_budget: int
    unit: str
    policy_counts: dict[str, int]
    budget_min: int
    budget_median: float
    budget_max: int
    predicted_loss: float | None
    best_uniform: UniformOption | None

    @property
    def gain(self) -> float | None:
        """Relative loss reduction against the best uniform plan (0.25 = 25 % lower), when both are known."""
        if self.predicted_loss is None or self.best_uniform is None or self.best_uniform.loss <= 0:
            return None
        return 1.0 - self.predicted_loss / self.best_uniform.loss


def _loss_lookup(table: OptionTable) -> dict[tuple[int, str, int], float]:
    f = table.frame
    return dict(
        zip(
            zip(f["layer"].tolist(), f["policy"].tolist(), f["budget"].tolist(), strict=True),
            f["loss"].tolist(),
            strict=True,
        )
    )


def best_uniform(table: OptionTable, capacity: int, policies: tuple[str, ...] | None = None) -> UniformOption | None:
    """Least-loss uniform (policy, grid budget) whose cost fits `capacity`; None if none fits."""
    cm = table.cost_model
    lookup = _loss_lookup(table)
    best: UniformOption | None = None
    for policy in policies or table.policies:
        for budget in table.grid:
            eff = [cm.effective(layer, budget) for layer in range(cm.num_layers)]
            if sum(cm.cost(layer, b) for layer, b in enumerate(eff)) > capacity:
                break
            losses = [lookup.get((layer, policy, b)) for layer, b in enumerate(eff)]
            if any(x is None for x in losses):
                continue
            total = fsum(losses)
            if best is None or total < best.loss:
                best = UniformOption(policy, budget, total)
    return best


def summarize(plan: Plan, table: OptionTable | None = None) -> PlanSummary:
    """Summary of `plan`; the uniform comparison needs the option table it was solved from."""
    budgets = [lp.budget for lp in plan.layers]
    uniform = best_uniform(table, plan.total_budget) if table is not None else None
    return PlanSummary(
        average_budget=plan.average_budget,
        total_budget=plan.total_budget,
        used_budget=plan.used_budget,
        unit=plan.budget_unit,
        policy_counts=dict(sorted(Counter(lp.policy for lp in plan.layers).items(), key=lambda kv: (-kv[1], kv[0]))),
        budget_min=min(budgets),
        budget_median=float(median(budgets)),
        budget_max=max(budgets),
        predicted_loss=plan.predicted_loss,
        best_uniform=uniform,
    )
