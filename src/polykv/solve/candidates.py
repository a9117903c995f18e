"""The plans the guard judges at one average budget: the solved plan, floor blends and every uniform policy.

A floor blend re-solves the same problem with every layer held to at least `F x` the average budget (on top of any
user bounds): F = 0 is the free plan, F = 1 a uniform allocation with per-layer policies, the fractions between
trade the solver's reallocation against the protection of every layer. Uniform candidates are the baselines a plan
must beat, what a user would pick instead for the same memory: each allowed policy at the average budget on every
layer (16 bits), and, from a calibration with KV precision, each allowed policy at each calibrated width below 16
bits with the most tokens per layer whose bytes fit the same total (`uniform:POLICY@Bb`).
"""

from __future__ import annotations

from collections.abc import Mapping
from math import fsum

from polykv.errors import InfeasibleError
from polykv.plan import LayerPlan, Plan, schema_version_for
from polykv.precision import FULL_PRECISION
from polykv.solve.aggregate import OptionTable
from polykv.solve.constraints import SolveOptions
from polykv.solve.problem import build_candidates
from polykv.solve.runner import allocation_plan, base_provenance, solve_plan

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


def quantized_budget(table: OptionTable, budget: int, bits: int) -> int | None:
    """The most tokens per layer (sliding layers capped) whose cost at `bits` fits the uniform 16-bit plan's at
    `budget` (`CostModel.total`); None when not even one token per layer fits (a scale and zero point per group
    can cost more than the 16-bit token they replace)."""
    cm = table.cost_model
    capacity = cm.total(budget)

    def fits(tokens: int) -> bool:
        return sum(cm.cost(layer, tokens, bits) for layer in range(cm.num_layers)) <= capacity

    if not fits(1):
        return None
    low, high = 1, capacity + 1  # a token costs more than a byte at any width, so `high` fits only if every layer caps
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def quantized_uniform(
    table: OptionTable, policy: str, budget: int, bits: int, calibration: Mapping | None = None
) -> Plan | None:
    """`policy` on every layer at `bits` with `quantized_budget` tokens: the uniform plan at that width for the bytes
    of the uniform 16-bit plan at `budget` (None when none fits)."""
    tokens = quantized_budget(table, budget, bits)
    if tokens is None:
        return None
    cm = table.cost_model
    params = table.params(policy)
    layers = []
    for layer in range(cm.num_layers):
        held = cm.effective(layer, tokens)
        loss = table.predicted_loss(layer, policy, held, bits)
        layers.append(LayerPlan(layer, policy, held, dict(params), loss, bits))
    losses = [lp.predicted_loss for lp in layers]
    described = {"allocation": "uniform", "policy": policy, "bits": bits}
    return Plan(
        schema_version=schema_version_for(layers),
        model=table.model,
        fingerprint=table.fingerprint,
        average_budget=float(budget),
        total_budget=cm.total(budget),
        budget_unit=cm.unit,
        layers=layers,
        predicted_loss=None if any(x is None for x in losses) else fsum(losses),
        provenance=base_provenance(table, calibration, "uniform", described),
    )


def guard_candidates(
    table: OptionTable,
    budget: int,
    solved: Plan,
    options: SolveOptions = SolveOptions(),
    calibration: Mapping | None = None,
    floors: tuple[float, ...] = FLOORS,
) -> dict[str, Plan]:
    """Name -> plan at `budget`: `solved`, `floor:F` for each fraction in `floors`, `uniform:POLICY` for each policy
    (when the table has 16-bit options) and `uniform:POLICY@Bb` for each policy and calibrated width B below 16.

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
    if not unconstrained:
        return out
    policies = uniform_policies(table, options)
    for bits in table.bits:
        for policy in policies:
            if bits == FULL_PRECISION:
                out[f"uniform:{policy}"] = allocation_plan(table, "uniform", policy, budget, calibration=calibration)
            elif (plan := quantized_uniform(table, policy, budget, bits, calibration)) is not None:
                out[f"uniform:{policy}@{bits}b"] = plan
    return out
