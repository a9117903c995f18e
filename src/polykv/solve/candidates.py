"""The plans the guard judges at one average budget: the solved plan, floor blends and every uniform policy.

A floor blend re-solves the same problem with every layer held to at least `F x` the average budget (on top of any
user bounds): F = 0 is the free plan, F = 1 a uniform allocation with per-layer policies, the fractions between
trade the solver's reallocation against the protection of every layer. Uniform candidates are the baselines a plan
must beat: each allowed policy at the average budget on every layer.
"""

from __future__ import annotations

from collections.abc import Mapping

from polykv.errors import InfeasibleError
from polykv.plan import Plan
from polykv.solve.aggregate import OptionTable
from polykv.solve.constraints import SolveOptions
from polykv.solve.problem import build_candidates
from polykv.solve.runner import allocation_plan, solve_plan

SOLVED = "solved"
#: Fractions of the average budget used as every layer's floor in the blend candidates (`floor:F`).
FLOORS = (0.25, 0.5)


def with_floor(options: SolveOptions, num_layers: int, floor: int) -> SolveOptions:
    """`options` with every layer's minimum budget raised to at least `floor` (pins keep their own budget)."""
    merged = {
        layer: max(floor, options.min_budget.get(layer, 0)) for layer in range(num_layers) if layer not in options.pins
    }
    merged = {
        layer: min(b, options.max_budget[layer]) if layer in options.max_budget else b for layer, b in merged.items()
    }
    return SolveOptions(**{**options.__dict__, "min_budget": merged})


def uniform_policies(table: OptionTable, options: SolveOptions) -> list[str]:
    """The policies a uniform candidate may use: the calibrated ones the solve allows, `full` excluded."""
    allowed = options.policies if options.policies is not None else table.policies
    return [p for p in sorted(allowed) if p != "full"]


def guard_candidates(
    table: OptionTable,
    budget: int,
    solved: Plan,
    options: SolveOptions = SolveOptions(),
    calibration: Mapping | None = None,
    floors: tuple[float, ...] = FLOORS,
) -> dict[str, Plan]:
    """Name -> plan at `budget`: `solved`, `floor:F` for each fraction in `floors`, `uniform:POLICY` for each policy.

    Floor blends that the constraints make infeasible are left out; uniform candidates are offered only when no
    constraint (pins, bounds, policy count) restricts the plan, since a uniform plan would ignore them."""
    out: dict[str, Plan] = {SOLVED: solved}
    n = table.num_layers
    for fraction in floors:
        floor = max(1, int(fraction * budget))
        try:
            opts = with_floor(options, n, floor)
            out[f"floor:{fraction:g}"] = solve_plan(table, budget, opts, calibration, build_candidates(table, opts))
        except InfeasibleError:
            continue
    unconstrained = not (options.pins or options.min_budget or options.max_budget or options.max_policies)
    if unconstrained:
        for policy in uniform_policies(table, options):
            out[f"uniform:{policy}"] = allocation_plan(table, "uniform", policy, budget, calibration=calibration)
    return out
