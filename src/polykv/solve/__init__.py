"""Offline solver: calibration curves -> per-layer (policy, budget[, bits]) plan under a total KV budget.

Pipeline: `inputs.load_calibration` (read DIR) -> `aggregate.aggregate` (one loss per layer x policy x budget x bits) ->
`problem.build_candidates` (apply constraints) -> `mckp.solve_dp` / `ilp.solve_ilp` (exact multiple-choice
knapsack) -> `runner.solve_plan` (a `polykv.plan.Plan`). `allocations` gives the uniform and PyramidKV baselines,
`summary` compares a plan with the best uniform one. Nothing here imports torch.
"""

from polykv.solve.aggregate import Aggregation, OptionTable, aggregate
from polykv.solve.constraints import Pin, SolveOptions, parse_budgets, parse_layer_values, parse_pins, parse_weights
from polykv.solve.inputs import Calibration, load_calibration
from polykv.solve.runner import (
    SolveRequest,
    allocation_plan,
    plan_paths,
    run_request,
    solve_frontier,
    solve_plan,
    write_plans,
)
from polykv.solve.summary import PlanSummary, best_uniform, summarize

__all__ = [
    "Aggregation",
    "OptionTable",
    "aggregate",
    "Pin",
    "SolveOptions",
    "parse_budgets",
    "parse_layer_values",
    "parse_pins",
    "parse_weights",
    "Calibration",
    "load_calibration",
    "SolveRequest",
    "allocation_plan",
    "plan_paths",
    "run_request",
    "solve_frontier",
    "solve_plan",
    "write_plans",
    "PlanSummary",
    "best_uniform",
    "summarize",
]
