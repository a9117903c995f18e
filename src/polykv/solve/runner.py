"""Solve one budget or a whole frontier of budgets into plans (or build a named allocation), and write them.

Solver choice (`solver="auto"`): the DP (exact, fast) unless its table would be huge, then the ILP; with
`max_policies`, the DP over every K-subset of policies when there are few subsets, else the ILP. `dp` and `ilp`
force one. The other solver then checks the optimum: always with `cross_check=True` (a disagreement is an error),
never with False, and by default (None) when the problem is small enough for that to be cheap (a disagreement is
recorded, and the first solver's plan kept). Plans record the solver that produced them, whether the cross-check
ran and agreed, and every option, never a path or a time, so the same inputs give byte-identical files.

KV precision: from a calibration with bit widths below 16 (`OptionTable.precision`) the budget is bytes (the uniform
16-bit plan's at the average budget) and each layer also gets its bits; a plan with a layer below 16 bits is written
as schema_version 2, one whose layers all stay at 16 bits as schema_version 1 in that format's unit (the same
bound: 16-bit bytes are tokens times a per-layer constant). Allocations are 16-bit plans.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import fsum
from pathlib import Path

from polykv.errors import InfeasibleError, SolveError
from polykv.plan import SCHEMA_VERSION, CostModel, LayerPlan, Plan, polykv_version, schema_version_for
from polykv.solve.aggregate import Aggregation, OptionTable, aggregate
from polykv.solve.allocations import ALLOCATIONS, DEFAULT_PYRAMID_BETA, pyramid_budgets, uniform_budgets
from polykv.solve.constraints import SolveOptions
from polykv.solve.ilp import solve_ilp
from polykv.solve.inputs import load_calibration
from polykv.solve.mckp import dp_state_size, solve_dp, solve_dp_groups, subset_count
from polykv.solve.problem import Candidates, build_candidates, infeasible_message

MAX_DP_STATES = 20_000_000
MAX_DP_SUBSETS = 100
#: The default cross-check runs when the problem has at most this many options (all layers) and the DP at most this
#: many table cells (states x K-subsets), where each extra solve takes about a second or less. Measured on 2 busy
#: CPU cores: the shipped calibrations (1,728-2,160 options, <= 57k cells) took 0.02-0.07 s by ILP and 0.1-0.5 s by
#: ILP with --max-policies; synthetic curves took 0.4-1.4 s for the latter at 1,728 options but 3-7 s at 2,592 and
#: 5-17 s at 3,456; the DP takes about 0.05 s per million cells (0.5 s for 8 subsets of 371k, 31 s for 358M).
CROSS_CHECK_MAX_OPTIONS = 2_500
CROSS_CHECK_MAX_DP_CELLS = 4_000_000


def _run_solver(name: str, cands: Candidates, capacity: int, max_policies: int | None) -> list[int]:
    if name == "ilp":
        return solve_ilp(cands.cost, cands.loss, capacity, cands.group, max_policies)
    if max_policies is not None:
        return solve_dp_groups(cands.cost, cands.loss, capacity, cands.group, max_policies)
    return solve_dp(cands.cost, cands.loss, capacity)


def _pick_solver(cands: Candidates, capacity: int, options: SolveOptions, max_policies: int | None) -> str:
    if options.solver != "auto":
        return options.solver
    if max_policies is not None:
        return "dp" if subset_count(cands.group, max_policies) <= MAX_DP_SUBSETS else "ilp"
    return "dp" if dp_state_size(cands.cost, capacity) <= MAX_DP_STATES else "ilp"


def _total_loss(cands: Candidates, picks: list[int]) -> float:
    return fsum(float(f[k]) for f, k in zip(cands.loss, picks, strict=False))


def cheap_to_cross_check(cands: Candidates, capacity: int, max_policies: int | None) -> bool:
    """Whether solving with both the DP and the ILP is cheap here (the thresholds above)."""
    cells = dp_state_size(cands.cost, capacity) * (subset_count(cands.group, max_policies) if max_policies else 1)
    return sum(len(c) for c in cands.cost) <= CROSS_CHECK_MAX_OPTIONS and cells <= CROSS_CHECK_MAX_DP_CELLS


def solve_choice(cands: Candidates, capacity: int, options: SolveOptions) -> tuple[list[int], str, dict]:
    """Optimal option index per layer, the name of the solver that found it, and the cross-check's record
    {"ran": bool, "agreed": bool or None} (see the module doc)."""
    used = {int(g) for gr in cands.group for g in gr} - {-1}
    max_policies = (
        options.max_policies if options.max_policies is not None and options.max_policies < len(used) else None
    )
    name = _pick_solver(cands, capacity, options, max_policies)
    picks = _run_solver(name, cands, capacity, max_policies)
    forced = options.cross_check is True
    if not (forced or (options.cross_check is None and cheap_to_cross_check(cands, capacity, max_policies))):
        return picks, name, {"ran": False, "agreed": None}
    try:
        other = _run_solver("ilp" if name == "dp" else "dp", cands, capacity, max_policies)
    except SolveError:
        if forced:
            raise
        return picks, name, {"ran": True, "agreed": False}
    a, b = _total_loss(cands, picks), _total_loss(cands, other)
    spread = fsum(float(f.max() - f.min()) for f in cands.loss)
    agreed = abs(a - b) <= 1e-8 * max(abs(a), abs(b), spread) + 1e-12
    if forced and not agreed:
        raise SolveError(f"the DP and the ILP disagree (losses {a!r} vs {b!r}); please report this instance")
    return picks, name, {"ran": True, "agreed": agreed}


def base_provenance(table: OptionTable, calibration: Mapping | None, solver: str, options: dict) -> dict:
    """What every written plan records about how it was made: version, solver, calibration and solve options."""
    return {
        "polykv_version": polykv_version(),
        "solver": solver,
        **(dict(calibration) if calibration else {}),
        "options": {
            "metric": table.metric,
            "aggregate": table.aggregation.describe(),
            "allow_missing": table.allow_missing,
            **options,
        },
    }


def solve_plan(
    table: OptionTable,
    average_budget: int,
    options: SolveOptions = SolveOptions(),
    calibration: Mapping | None = None,
    candidates: Candidates | None = None,
) -> Plan:
    """The least-loss plan whose cost fits the total of `average_budget` under `options`.

    `calibration` is the calibration part of the provenance (see Calibration.provenance); `candidates` lets a
    frontier build the per-layer options once.
    """
    if average_budget < 1:
        raise SolveError(f"the average budget must be >= 1 token, got {average_budget}")
    cm = table.cost_model
    cands = candidates or build_candidates(table, options)
    capacity = cm.total(average_budget)
    if cands.min_cost() > capacity:
        raise InfeasibleError(infeasible_message(cands, capacity, cm.unit, average_budget, options))
    try:
        picks, solver, check = solve_choice(cands, capacity, options)
    except InfeasibleError as exc:
        raise InfeasibleError(
            f"average budget {average_budget}: {exc}; relax --max-policies or the pins, or raise the budget"
        ) from None
    layers = []
    for layer, k in enumerate(picks):
        policy = str(cands.policy[layer][k])
        layers.append(
            LayerPlan(
                layer,
                policy,
                int(cands.budget[layer][k]),
                {} if policy == "full" else table.params(policy),
                float(cands.loss[layer][k]),
                int(cands.bits[layer][k]),
            )
        )
    described = {**options.describe(), "full_cost": cands.full_cost}
    if table.precision:
        described["bits"] = list(table.bits)
    version = schema_version_for(layers)
    written = cm if version != SCHEMA_VERSION else CostModel.for_fingerprint(table.fingerprint)
    return Plan(
        schema_version=version,
        model=table.model,
        fingerprint=table.fingerprint,
        average_budget=float(average_budget),
        total_budget=written.total(average_budget),
        budget_unit=written.unit,
        layers=layers,
        predicted_loss=_total_loss(cands, picks),
        provenance={**base_provenance(table, calibration, solver, described), "cross_check": check},
    )


def solve_frontier(
    table: OptionTable,
    budgets: tuple[int, ...] | list[int],
    options: SolveOptions = SolveOptions(),
    calibration: Mapping | None = None,
) -> list[Plan]:
    """One plan per average budget (the loss/budget frontier), sharing the per-layer options."""
    cands = build_candidates(table, options)
    return [solve_plan(table, b, options, calibration, cands) for b in budgets]


def allocation_plan(
    table: OptionTable,
    allocation: str,
    policy: str,
    average_budget: int,
    beta: float = DEFAULT_PYRAMID_BETA,
    calibration: Mapping | None = None,
) -> Plan:
    """A named allocation (`uniform` or `pyramid`) of `policy`, scored with the table where it can be."""
    if allocation not in ALLOCATIONS:
        raise SolveError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if average_budget < 1:
        raise SolveError(f"the average budget must be >= 1 token, got {average_budget}")
    table = table.full_precision()
    cm = table.cost_model
    if allocation == "uniform":
        budgets = uniform_budgets(cm, average_budget)
        described: dict = {"allocation": "uniform", "policy": policy}
    else:
        budgets = pyramid_budgets(cm, average_budget, beta)
        described = {"allocation": "pyramid", "policy": policy, "beta": beta}
    params = {} if policy == "full" else table.params(policy)
    losses = [table.predicted_loss(layer, policy, b) for layer, b in enumerate(budgets)]
    layers = [
        LayerPlan(layer, policy, b, dict(params), loss)
        for layer, (b, loss) in enumerate(zip(budgets, losses, strict=False))
    ]
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=table.model,
        fingerprint=table.fingerprint,
        average_budget=float(average_budget),
        total_budget=cm.total(average_budget),
        budget_unit=cm.unit,
        layers=layers,
        predicted_loss=None if any(x is None for x in losses) else fsum(losses),
        provenance=base_provenance(table, calibration, allocation, described),
    )


@dataclass(frozen=True)
class SolveRequest:
    """Everything `polykv solve` needs: where the calibration is, which budgets, how to aggregate and constrain."""

    calibration: Path
    budgets: tuple[int, ...]
    metric: str | None = None
    aggregate: str = "mean"
    category_weights: Mapping[str, float] | None = None
    allow_missing: bool = False
    allocation: str | None = None
    allocation_policy: str = "snapkv"
    pyramid_beta: float = DEFAULT_PYRAMID_BETA
    options: SolveOptions = field(default_factory=SolveOptions)


def load_table(request: SolveRequest) -> tuple[OptionTable, dict]:
    """Load the calibration directory and aggregate it; returns the table and its provenance."""
    cal = load_calibration(request.calibration)
    table = aggregate(
        cal.curves,
        cal.fingerprint,
        cal.model,
        request.metric,
        Aggregation.parse(request.aggregate, request.category_weights),
        request.allow_missing,
        cal.policy_params(),
    )
    return table, cal.provenance()


def plans_for(request: SolveRequest, table: OptionTable, calibration: Mapping | None = None) -> list[Plan]:
    """Plans for every requested budget: solved under request.options, or the named allocation."""
    if request.allocation is None:
        return solve_frontier(table, request.budgets, request.options, calibration)
    if request.options != SolveOptions():
        raise SolveError(
            f"constraints (pins, bounds, policies, solver) apply to solved plans, not to the "
            f"{request.allocation} allocation; drop them or drop the allocation"
        )
    return [
        allocation_plan(table, request.allocation, request.allocation_policy, b, request.pyramid_beta, calibration)
        for b in request.budgets
    ]


def run_request(request: SolveRequest) -> tuple[OptionTable, list[Plan]]:
    """Load, aggregate and solve (or allocate) every requested budget."""
    table, provenance = load_table(request)
    return table, plans_for(request, table, provenance)


def model_slug(model: str) -> str:
    """A file-system-safe name for a model id (`org/name` -> `org--name`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.replace("/", "--")).strip("_") or "model"


def plan_paths(
    model: str, budgets: tuple[int, ...], out: Path | None, allocation: str | None = None, policy: str | None = None
) -> list[Path]:
    """Where plans go: `--out` (a file for one budget, else a directory) or plans/<model>[/<allocation>-<policy>]/,
    as avg<budget>.json."""
    if out is not None and len(budgets) == 1 and not out.is_dir():
        return [out]
    if out is not None and out.exists() and not out.is_dir():
        raise SolveError(f"--out {out} is a file; with several budgets --out must be a directory")
    folder = out if out is not None else Path("plans") / model_slug(model)
    if out is None and allocation is not None:
        folder = folder / f"{allocation}-{policy}"
    return [folder / f"avg{b}.json" for b in budgets]


def write_plans(plans: list[Plan], paths: list[Path]) -> None:
    if len(plans) != len(paths):
        raise SolveError("one path per plan is needed")
    for plan, path in zip(plans, paths, strict=False):
        plan.save(path)
