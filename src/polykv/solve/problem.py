"""The knapsack instance: per layer, the (policy, budget, bits, cost, loss) options the constraints allow.

`full` is never an ordinary option (it keeps the whole context, so it is not cheap whatever its calibrated loss):
it only appears on layers pinned to it, at loss 0, 16 bits and a cost of `full_cost` tokens (default: the largest
budget of the calibration grid), capped at window - 1 on sliding layers. With a calibration of several bit widths
each (policy, budget, bits) is an option costing its bytes (`polykv.precision`); pins and budget bounds constrain
the policy and the tokens, never the bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polykv.errors import InfeasibleError, SolveError
from polykv.precision import FULL_PRECISION
from polykv.solve.aggregate import OptionTable
from polykv.solve.constraints import SolveOptions


@dataclass(frozen=True, eq=False)
class Candidates:
    """Per-layer arrays of allowed options; `group` is the policy's index in `policies` (-1 for a full pin)."""

    policies: tuple[str, ...]
    policy: list[np.ndarray]
    budget: list[np.ndarray]
    bits: list[np.ndarray]
    cost: list[np.ndarray]
    loss: list[np.ndarray]
    group: list[np.ndarray]
    full_cost: int

    @property
    def num_layers(self) -> int:
        return len(self.cost)

    def min_cost(self) -> int:
        return sum(int(c.min()) for c in self.cost)


def build_candidates(table: OptionTable, options: SolveOptions) -> Candidates:
    """Apply policy subset, pins, per-layer bounds and the `full` rule to the option table."""
    cm = table.cost_model
    n = table.num_layers
    calibrated = table.policies
    for layer in [*options.pins, *options.min_budget, *options.max_budget]:
        if not 0 <= layer < n:
            raise SolveError(f"layer {layer} is outside 0..{n - 1} for {table.model}")
    allowed = set(calibrated)
    if options.policies is not None:
        unknown = sorted(set(options.policies) - set(calibrated))
        if unknown:
            raise SolveError(
                f"--policies names {', '.join(unknown)}, not calibrated "
                f"(calibrated: {', '.join(calibrated)}); pick among those"
            )
        allowed = set(options.policies)
    for layer, pin in sorted(options.pins.items()):
        if pin.policy != "full" and pin.policy not in calibrated:
            raise SolveError(
                f"--pin {layer}:{pin.policy}: policy {pin.policy} was not calibrated "
                f"(calibrated: {', '.join(calibrated)}, or full)"
            )
    full_cost = options.full_cost or max(table.grid)
    policies = tuple(sorted(set(calibrated)))
    gid = {p: i for i, p in enumerate(policies)}

    frame = table.frame
    by_layer = dict(tuple(frame.groupby("layer", sort=True)))
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("policy", "budget", "bits", "cost", "loss", "group")}
    for layer in range(n):
        pin = options.pins.get(layer)
        if pin is not None and pin.policy == "full":
            b = cm.effective(layer, full_cost)
            rows = {"policy": ["full"], "budget": [b], "bits": [FULL_PRECISION], "loss": [0.0]}
        else:
            g = by_layer.get(layer)
            if g is None:
                raise InfeasibleError(
                    f"layer {layer} has no calibrated option; calibrate it or pass --allow-missing "
                    "only when every layer keeps some option"
                )
            keep = g["policy"].isin([pin.policy] if pin else allowed).to_numpy()
            budgets = g["budget"].to_numpy()
            if pin is not None and pin.budget is not None:
                keep = keep & (budgets == cm.effective(layer, pin.budget))
            else:
                lo = options.min_budget.get(layer)
                hi = options.max_budget.get(layer)
                if lo is not None:
                    keep = keep & (budgets >= cm.effective(layer, lo))
                if hi is not None:
                    keep = keep & (budgets <= hi)
            if not keep.any():
                raise InfeasibleError(_no_option_message(layer, table, options))
            g = g[keep]
            rows = {k: g[k].tolist() for k in ("policy", "budget", "bits", "loss")}
        out["policy"].append(np.array(rows["policy"], dtype=object))
        out["budget"].append(np.array(rows["budget"], dtype=np.int64))
        out["bits"].append(np.array(rows["bits"], dtype=np.int64))
        cost = [cm.cost(layer, b, q) for b, q in zip(rows["budget"], rows["bits"], strict=True)]
        out["cost"].append(np.array(cost, dtype=np.int64))
        out["loss"].append(np.array(rows["loss"], dtype=np.float64))
        out["group"].append(np.array([gid.get(p, -1) if p != "full" else -1 for p in rows["policy"]], dtype=np.int64))
    return Candidates(
        policies, out["policy"], out["budget"], out["bits"], out["cost"], out["loss"], out["group"], full_cost
    )


def _no_option_message(layer: int, table: OptionTable, options: SolveOptions) -> str:
    have = table.frame[table.frame["layer"] == layer]
    pin = options.pins.get(layer)
    grid = sorted(set(have["budget"].tolist()))
    what = (
        f"pin {pin.describe()}"
        if pin
        else f"policies {', '.join(sorted(options.policies)) if options.policies else 'any'}, budget in "
        f"[{options.min_budget.get(layer, '-')}, {options.max_budget.get(layer, '-')}]"
    )
    return (
        f"no calibrated option on layer {layer} satisfies {what} (its budgets: {grid}); "
        "relax the constraint or calibrate that option"
    )


def infeasible_message(
    cands: Candidates, capacity: int, unit: str, average_budget: float, options: SolveOptions
) -> str:
    """Why even the cheapest allowed choice does not fit, and what to change."""
    cheapest = cands.min_cost()
    pinned = [f"{layer}:{p.describe()}" for layer, p in sorted(options.pins.items())]
    hints = ["raise the budget"]
    if any(p.policy == "full" for p in options.pins.values()):
        hints.append("lower --full-cost")
    if options.min_budget:
        hints.append("lower --min-budget")
    if pinned:
        hints.append("pin fewer layers")
    return (
        f"average budget {average_budget:g} allows {capacity} {unit} but the cheapest allowed plan costs "
        f"{cheapest} {unit}" + (f" (pins {', '.join(pinned)})" if pinned else "") + f"; {' or '.join(hints)}"
    )
