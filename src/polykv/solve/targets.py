"""`polykv solve --target ENGINE`: plans a serving engine runs natively, every layer full or a window.

What each engine can express is in `polykv.engines`. The budget is KV memory at a stated reference context length:
a full layer costs `reference_context` tokens, a window layer its budget, window + sinks (in the plan's unit, bytes
when layers differ). Window options come from the calibration's `window` curves, calibrated with window 0 (so the
window is the budget minus the calibrated sinks):
- hf, vllm, and llamacpp on an architecture with one bool per layer: one window W shared by every window layer, no
  sinks. For each calibrated W, the exact full-or-window choice per layer (a knapsack of two options a layer); the
  W with the least total loss wins.
- llamacpp on an architecture that reads one period (Gemma 3): every (period, W) pair is tried.
- trtllm: each layer full or a window at any calibrated budget, with at most `max_windows` distinct engine windows
  (a full layer's counts as one; each is a memory pool) and the calibrated sinks on every window layer: the
  multiple-choice knapsack with a limit on distinct groups, exact (DP over subsets of groups, or the ILP).
A layer with its own sliding window (Gemma) stays windowed: full there means its own window, which only trtllm can
state beside other windows, and then only without sinks. Options below 16 bits are left out: the engines quantise
the whole cache or nothing, so target plans are 16-bit (schema_version 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import fsum

import numpy as np

from polykv.engines import LLAMACPP_SWA, TARGETS, gguf_arch, period_pattern
from polykv.errors import InfeasibleError, SolveError
from polykv.plan import SCHEMA_VERSION, LayerPlan, Plan
from polykv.solve.aggregate import OptionTable
from polykv.solve.constraints import SolveOptions
from polykv.solve.ilp import solve_ilp
from polykv.solve.mckp import solve_dp, solve_dp_groups, subset_count
from polykv.solve.runner import base_provenance

MAX_DP_SUBSETS = 100


@dataclass(frozen=True)
class Target:
    """The engine a plan is solved for, the context length its budget is stated at, and (trtllm) the pool limit."""

    engine: str
    reference_context: int
    max_windows: int = 4

    def __post_init__(self) -> None:
        if self.engine not in TARGETS:
            raise SolveError(f"unknown --target {self.engine!r}; use one of {', '.join(TARGETS)}")
        if self.reference_context < 1:
            raise SolveError(f"--reference-context must be >= 1 token, got {self.reference_context}")
        if self.max_windows < 1:
            raise SolveError(f"--max-windows must be >= 1, got {self.max_windows}")

    def describe(self) -> dict:
        """As recorded in a plan's `target`."""
        return {
            "engine": self.engine,
            "reference_context": self.reference_context,
            "max_windows": self.max_windows if self.engine == "trtllm" else None,
        }


@dataclass(frozen=True)
class Choice:
    """One option of one layer: full (budget = what it is charged) or a window at `budget` = window + sinks;
    `pool` is the engine window it runs at: window + sinks, the layer's own window for `full` on a layer that has
    one, or -1 for full attention."""

    full: bool
    budget: int
    cost: int
    loss: float
    pool: int


def _check_options(options: SolveOptions) -> None:
    if options.policies is not None or options.max_policies is not None or options.full_cost is not None:
        raise SolveError(
            "--target picks full or window layers itself; drop --policies, --max-policies and --full-cost "
            "(--reference-context sets what a full layer costs)"
        )
    bad = [f"{layer}:{p.policy}" for layer, p in sorted(options.pins.items()) if p.policy not in ("full", "window")]
    if bad:
        raise SolveError(f"--target accepts pins to full or window only, got {', '.join(bad)}")


def _window_losses(table: OptionTable, sinks: int) -> list[dict[int, float]]:
    """Per layer, budget -> loss of the calibrated `window` options."""
    frame = table.frame[table.frame["policy"] == "window"]
    if frame.empty:
        raise SolveError(
            "the calibration has no `window` curves; calibrate with window among --policies (it is by default)"
        )
    out: list[dict[int, float]] = [{} for _ in range(table.num_layers)]
    for layer, budget, loss in zip(frame["layer"], frame["budget"], frame["loss"], strict=True):
        if int(budget) > sinks:
            out[int(layer)][int(budget)] = float(loss)
    return out


def _choices(
    table: OptionTable, target: Target, options: SolveOptions, losses: list[dict[int, float]], sinks: int
) -> list[list[Choice]]:
    """Every option each layer may take for `target`, after pins and budget bounds."""
    cm = table.cost_model
    out = []
    for layer in range(table.num_layers):
        pin = options.pins.get(layer)
        own = cm.caps[layer] is not None  # the layer has its own sliding window
        lo, hi = options.min_budget.get(layer, 1), options.max_budget.get(layer)
        full_ok = not own or sinks == 0
        row = []
        if full_ok and (pin is None or pin.policy == "full"):
            budget = cm.effective(layer, target.reference_context)
            pool = table.fingerprint["sliding_window"] if own else -1
            row.append(Choice(True, budget, cm.cost(layer, budget), 0.0, pool))
        if pin is None or pin.policy == "window":
            for budget, loss in sorted(losses[layer].items()):
                if budget >= cm.effective(layer, lo) and (hi is None or budget <= hi):
                    if pin is None or pin.budget is None or budget == pin.budget:
                        row.append(Choice(False, budget, cm.cost(layer, budget), loss, budget))
        if not row:
            what = f"pin {pin.describe()}" if pin else f"budget in [{lo}, {hi or '-'}]"
            raise InfeasibleError(f"layer {layer} has no option {target.engine} can run with {what}")
        out.append(row)
    return out


def _solve(rows: list[list[Choice]], capacity: int, solver: str) -> list[int] | None:
    """The least-loss pick per layer within `capacity` (None when nothing fits)."""
    costs = [np.array([c.cost for c in row], dtype=np.int64) for row in rows]
    losses = [np.array([c.loss for c in row], dtype=np.float64) for row in rows]
    try:
        return solve_ilp(costs, losses, capacity) if solver == "ilp" else solve_dp(costs, losses, capacity)
    except InfeasibleError:
        return None


def _total(rows: list[list[Choice]], picks: list[int]) -> tuple[float, int]:
    return fsum(rows[i][k].loss for i, k in enumerate(picks)), sum(rows[i][k].cost for i, k in enumerate(picks))


def _shared_window(rows: list[list[Choice]], capacity: int, solver: str, periodic: bool) -> list[Choice] | None:
    """hf / vllm / llamacpp: one window for every windowed layer (a layer's own window counts, so `full` there needs
    the same); with `periodic`, the windowed layers are those of one llama.cpp period. The least loss (then the
    least cost) over every candidate window."""
    windows = sorted({c.pool for row in rows for c in row if c.pool != -1})
    best: tuple[float, int, list[Choice]] | None = None
    for window in windows:
        allowed = [[c for c in row if c.pool in (-1, window)] for row in rows]
        if periodic:
            for period in range(len(rows) + 1):
                slides = period_pattern(period, len(rows))
                picked = [
                    next((c for c in row if (c.pool == window) == s), None)
                    for row, s in zip(allowed, slides, strict=True)
                ]
                if any(c is None for c in picked):
                    continue
                loss, cost = fsum(c.loss for c in picked), sum(c.cost for c in picked)
                if cost <= capacity and (best is None or (loss, cost) < best[:2]):
                    best = (loss, cost, picked)
            continue
        if any(not row for row in allowed):
            continue
        picks = _solve(allowed, capacity, solver)
        if picks is not None:
            loss, cost = _total(allowed, picks)
            if best is None or (loss, cost) < best[:2]:
                best = (loss, cost, [allowed[i][k] for i, k in enumerate(picks)])
    return None if best is None else best[2]


def _pooled(rows: list[list[Choice]], capacity: int, solver: str, max_windows: int) -> tuple[list[Choice] | None, str]:
    """trtllm: per layer any option, at most `max_windows` distinct engine windows (full counts as one); the picks
    and the solver that found them."""
    values = sorted({c.pool for row in rows for c in row})
    gid = {v: i for i, v in enumerate(values)}
    costs = [np.array([c.cost for c in row], dtype=np.int64) for row in rows]
    losses = [np.array([c.loss for c in row], dtype=np.float64) for row in rows]
    groups = [np.array([gid[c.pool] for c in row], dtype=np.int64) for row in rows]
    limited = len(values) > max_windows
    if solver == "auto":
        solver = "ilp" if limited and subset_count(groups, max_windows) > MAX_DP_SUBSETS else "dp"
    try:
        if solver == "ilp":
            picks = solve_ilp(costs, losses, capacity, groups if limited else None, max_windows if limited else None)
        elif limited:
            picks = solve_dp_groups(costs, losses, capacity, groups, max_windows)
        else:
            picks = solve_dp(costs, losses, capacity)
    except InfeasibleError:
        return None, solver
    return [rows[i][k] for i, k in enumerate(picks)], solver


def solve_target(
    table: OptionTable,
    average_budget: int,
    target: Target,
    options: SolveOptions = SolveOptions(),
    calibration: Mapping | None = None,
) -> Plan:
    """The least-loss plan `target` runs natively whose KV memory at the reference context fits `average_budget`."""
    if average_budget < 1:
        raise SolveError(f"the average budget must be >= 1 token, got {average_budget}")
    _check_options(options)
    table = table.full_precision()  # engines run every layer at one precision: the 16-bit options
    params = table.params("window")
    sinks = int(params.get("sinks", 0))
    if params.get("window", 0):
        raise SolveError("the calibration measured window with a fixed window; calibrate it with window 0")
    if sinks and target.engine != "trtllm":
        raise SolveError(f"the calibration measured window with {sinks} sinks; {target.engine} has none")
    arch = gguf_arch(table.fingerprint["model_type"])
    if target.engine == "llamacpp" and arch not in LLAMACPP_SWA:
        raise SolveError(
            f"llama.cpp runs no sliding window from GGUF metadata for {arch} (it does for {', '.join(LLAMACPP_SWA)})"
        )
    cm = table.cost_model
    capacity = cm.total(average_budget)
    rows = _choices(table, target, options, _window_losses(table, sinks), sinks)
    solver = "ilp" if options.solver == "ilp" else "dp"
    periodic = target.engine == "llamacpp" and LLAMACPP_SWA.get(arch) == "period"
    if target.engine == "trtllm":
        picked, solver = _pooled(rows, capacity, options.solver, target.max_windows)
    else:
        picked = _shared_window(rows, capacity, solver, periodic)
        solver = "enumeration" if periodic else solver
    if picked is None:
        raise InfeasibleError(
            f"average budget {average_budget} allows {capacity} {cm.unit} at reference context "
            f"{target.reference_context}, but no plan {target.engine} runs fits; raise the budget, lower "
            "--reference-context or relax the pins and bounds"
        )
    layers = [
        LayerPlan(i, "full", c.budget, {}, 0.0)
        if c.full
        else LayerPlan(i, "window", c.budget, {"window": c.budget - sinks, "sinks": sinks}, c.loss)
        for i, c in enumerate(picked)
    ]
    described = {**options.describe(), "target": target.describe()}
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=table.model,
        fingerprint=table.fingerprint,
        average_budget=float(average_budget),
        total_budget=capacity,
        budget_unit=cm.unit,
        layers=layers,
        predicted_loss=fsum(c.loss for c in picked),
        provenance=base_provenance(table, calibration, solver, described),
        target=target.describe(),
    )
