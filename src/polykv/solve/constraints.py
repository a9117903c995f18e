"""Constraints a solve can carry, and the parsers that turn CLI strings into them.

- policies: the solver may only use these (pins may name others);
- pins: `L:POLICY` (the solver picks the budget) or `L:POLICY:BUDGET` (fixed); `L` may be a range `A-B`;
  `L:full` keeps the whole context on that layer and charges `full_cost` tokens (default: the largest grid budget);
- min_budget / max_budget per layer (`N` for every layer, `L:N` or `A-B:N` for some; later specs win); on a sliding
  layer a minimum above its cap (window - 1) means "the cap";
- max_policies: at most K distinct policies in the plan (`full` pins do not count).

`parse_budgets` is also the one parser of every command's `--budgets` list (calibrate, solve, refine, eval).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from polykv.errors import InputError, SolveError

SOLVERS = ("auto", "dp", "ilp")


@dataclass(frozen=True)
class Pin:
    """A layer forced to `policy`, and to `budget` tokens when given."""

    policy: str
    budget: int | None = None

    def describe(self) -> str:
        return self.policy if self.budget is None else f"{self.policy}:{self.budget}"


@dataclass(frozen=True)
class SolveOptions:
    """Everything that restricts the per-layer choice, beyond the total budget."""

    policies: tuple[str, ...] | None = None
    pins: Mapping[int, Pin] = field(default_factory=dict)
    min_budget: Mapping[int, int] = field(default_factory=dict)
    max_budget: Mapping[int, int] = field(default_factory=dict)
    max_policies: int | None = None
    full_cost: int | None = None
    solver: str = "auto"
    #: run the other solver too and compare: always (True), never (False), or when cheap (None, see solve.runner)
    cross_check: bool | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise SolveError(f"unknown solver {self.solver!r}; use one of {', '.join(SOLVERS)}")
        if self.max_policies is not None and self.max_policies < 1:
            raise SolveError(f"--max-policies must be >= 1, got {self.max_policies}")
        if self.full_cost is not None and self.full_cost < 1:
            raise SolveError(f"--full-cost must be >= 1 token, got {self.full_cost}")
        for name, bounds in (("min", self.min_budget), ("max", self.max_budget)):
            bad = {layer: b for layer, b in bounds.items() if b < 1}
            if bad:
                raise SolveError(f"--{name}-budget must be >= 1 token, got {bad}")
        clash = {
            layer: (self.min_budget[layer], self.max_budget[layer])
            for layer in self.min_budget
            if layer in self.max_budget and self.min_budget[layer] > self.max_budget[layer]
        }
        if clash:
            raise SolveError(f"--min-budget exceeds --max-budget on layer(s) {clash}; relax one of them")

    def describe(self) -> dict:
        """The constraints as recorded in a plan's provenance (JSON-ready, deterministic)."""
        return {
            "policies": sorted(self.policies) if self.policies is not None else None,
            "pins": {str(layer): p.describe() for layer, p in sorted(self.pins.items())},
            "min_budget": {str(layer): b for layer, b in sorted(self.min_budget.items())},
            "max_budget": {str(layer): b for layer, b in sorted(self.max_budget.items())},
            "max_policies": self.max_policies,
            "full_cost": self.full_cost,
            "solver": self.solver,
            "cross_check": self.cross_check,
        }


def _layers(spec: str, num_layers: int, what: str) -> range:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", spec.strip())
    if not m:
        raise SolveError(f"{what}: {spec!r} is not a layer or a range A-B")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if first > last or last >= num_layers:
        raise SolveError(f"{what}: layers {spec} are outside 0..{num_layers - 1}")
    return range(first, last + 1)


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SolveError(f"{what}: {text!r} is not a whole number of tokens") from None
    if value < 1:
        raise SolveError(f"{what}: budgets must be >= 1 token, got {value}")
    return value


def parse_pins(specs: Iterable[str], num_layers: int) -> dict[int, Pin]:
    """`L:POLICY` / `L:POLICY:BUDGET` / `A-B:POLICY[:BUDGET]` -> {layer: Pin}; later specs win."""
    pins: dict[int, Pin] = {}
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise SolveError(f"--pin {spec!r} must look like LAYER:POLICY or LAYER:POLICY:BUDGET, e.g. --pin 0:full")
        budget = _positive_int(parts[2], f"--pin {spec}") if len(parts) == 3 else None
        for layer in _layers(parts[0], num_layers, f"--pin {spec}"):
            pins[layer] = Pin(parts[1], budget)
    return pins


def parse_layer_values(specs: Iterable[str], num_layers: int, what: str) -> dict[int, int]:
    """`N` (every layer), `L:N` or `A-B:N` -> {layer: N}; later specs win."""
    out: dict[int, int] = {}
    for spec in specs:
        layers, _, value = spec.rpartition(":")
        rng = _layers(layers, num_layers, f"{what} {spec}") if layers else range(num_layers)
        n = _positive_int(value, f"{what} {spec}")
        out.update({layer: n for layer in rng})
    return out


def parse_budgets(text: str, option: str = "--budgets") -> tuple[int, ...]:
    """`64,128,256` -> (64, 128, 256): the integer list of every command's `--budgets` (or another `option`).

    One rule everywhere: items are comma-separated whole numbers >= 1 (spaces allowed) and come back sorted; an
    empty list, a bad item or a repeated item is an error naming it (a repeat is more likely a typo than intent).
    """
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise InputError(f"{option} needs a comma-separated list of whole numbers, e.g. {option} 64,128,256")
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise InputError(f"{option}: {item!r} is not a whole number; pass e.g. {option} 64,128,256") from None
        if value < 1:
            raise InputError(f"{option}: {item!r} is not positive; every item must be >= 1")
        values.append(value)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise InputError(
            f"{option} {text.strip()} lists {', '.join(map(str, repeated))} more than once; list each once"
        )
    return tuple(sorted(values))


def parse_weights(text: str | None) -> dict[str, float] | None:
    """`qa=2,code=0.5` -> {"qa": 2.0, "code": 0.5}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SolveError(f"--category-weights item {item!r} must look like CATEGORY=WEIGHT, e.g. qa=2")
    return out
