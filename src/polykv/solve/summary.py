"""What a solved plan amounts to: policy counts, budget spread, and its predicted loss against the best uniform plan.

The uniform reference is the best (policy, grid budget, bits) used on every layer whose cost fits the same total,
scored with the same option table (same metric and aggregation); constraints such as pins do not apply to it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import fsum
from statistics import median

from polykv.plan import Plan
from polykv.precision import FULL_PRECISION
from polykv.solve.aggregate import OptionTable


@dataclass(frozen=True)
class UniformOption:
    policy: str
    budget: int
    loss: float
    bits: int = FULL_PRECISION


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


def _loss_lookup(table: OptionTable) -> dict[tuple[int, str, int, int], float]:
    f = table.frame
    return dict(
        zip(
            zip(f["layer"].tolist(), f["policy"].tolist(), f["budget"].tolist(), f["bits"].tolist(), strict=True),
            f["loss"].tolist(),
            strict=True,
        )
    )


def best_uniform(table: OptionTable, capacity: int, policies: tuple[str, ...] | None = None) -> UniformOption | None:
    """Least-loss uniform (policy, grid budget, bits) whose cost (in the table's unit) fits `capacity`; None if none
    fits."""
    cm = table.cost_model
    lookup = _loss_lookup(table)
    best: UniformOption | None = None
    for policy in policies or table.policies:
        for bits in table.bits:
            for budget in table.grid:
                eff = [cm.effective(layer, budget) for layer in range(cm.num_layers)]
                if sum(cm.cost(layer, b, bits) for layer, b in enumerate(eff)) > capacity:
                    break
                losses = [lookup.get((layer, policy, b, bits)) for layer, b in enumerate(eff)]
                if any(x is None for x in losses):
                    continue
                total = fsum(losses)
                if best is None or total < best.loss:
                    best = UniformOption(policy, budget, total, bits)
    return best


def summarize(plan: Plan, table: OptionTable | None = None) -> PlanSummary:
    """Summary of `plan`; the uniform comparison needs the option table it was solved from."""
    budgets = [lp.budget for lp in plan.layers]
    uniform = None
    if table is not None:
        cm = table.cost_model  # a 16-bit plan solved from a table with bits states its total in another unit
        capacity = plan.total_budget if plan.budget_unit == cm.unit else cm.total(plan.average_budget)
        uniform = best_uniform(table, capacity)
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
