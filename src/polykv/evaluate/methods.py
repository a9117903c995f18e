"""Evaluation methods: how each compares at a given average budget.

- `full`: no compression (budget-independent, run once per instance);
- `uniform:<policy>`: one policy, the same budget on every layer;
- `pyramid`: PyramidKV-style allocation (budgets falling linearly with depth, same total) with SnapKV scoring;
- `quant:<bits>` (8, 4 or 2): the whole context kept, every layer's keys and values stored at that precision
  (`polykv.quantize`): uniform quantisation instead of eviction (budget-independent, run once per instance);
- `hf-quant:<bits>` (4 or 2): the external anchor for `quant:<bits>`: plain `model.generate` over transformers' own
  `QuantizedCache` (quanto backend), outside PolyKV's cache (`hf_quantized`; budget-independent);
- `plan:<path>`: a plan file (used at its own average budget) or a directory of plans (for each budget, the plan
  whose `average_budget` equals it); `plan-<name>:<path>` adds further plans under their own names (e.g. plans
  solved from another calibration), each with its own gap recovery.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from polykv.errors import InputError
from polykv.evaluate.hf_quantized import HF_QUANT_BITS, require_backend
from polykv.plan import CostModel, Plan
from polykv.policies import make_policy, policy_names
from polykv.precision import FULL_PRECISION, SUPPORTED_BITS
from polykv.settings import LayerSetting, capped, from_plan


@dataclass(frozen=True)
class Method:
    """One compared method; `settings(budget)` gives its per-layer settings (None: keep everything)."""

    name: str
    kind: str  # full | quant | hf-quant | uniform | pyramid | plan
    policy: str | None = None
    bits: int = FULL_PRECISION  # kind == quant or hf-quant
    plans: tuple[tuple[int, str], ...] = ()  # (average budget, plan path) for kind == plan
    source: str | None = None  # the plan file or directory it came from (kind == plan)

    @property
    def spec(self) -> str:
        """The method as `parse_methods` reads it, with plan sources explicit (stored in an evaluation's info)."""
        if self.kind == "plan":
            return f"{self.name}:{self.source}"
        return self.name

    def budgets(self, requested: list[int]) -> list[int | None]:
        if self.kind in ("full", "quant", "hf-quant"):
            return [None]
        if self.kind == "plan":
            have = {b for b, _ in self.plans}
            return [b for b in requested if b in have]
        return list(requested)

    def plan_for(self, budget: int) -> Plan:
        path = dict(self.plans)[budget]
        return Plan.load(path)

    def settings(self, budget: int | None, fingerprint: dict) -> list[LayerSetting] | None:
        """Per-layer settings at `budget`, each budget as its layer holds it (window - 1 at most on sliding layers,
        as in plans), so that methods at one budget compare at the memory they really use."""
        n = fingerprint["num_layers"]
        if self.kind == "hf-quant":
            raise ValueError("hf-quant runs outside PolyKV's cache: it has no layer settings (see hf_quantized)")
        if self.kind == "full":
            return None
        if self.kind == "quant":
            return [LayerSetting(make_policy("full"), 1, self.bits)] * n
        if self.kind == "uniform":
            policy = make_policy(self.policy)
            return capped([LayerSetting(policy, budget)] * n, fingerprint)
        if self.kind == "pyramid":
            from polykv.solve.allocations import pyramid_budgets

            policy = make_policy("snapkv")
            return [
                LayerSetting(policy, max(1, b)) for b in pyramid_budgets(CostModel.for_fingerprint(fingerprint), budget)
            ]
        return capped(from_plan(self.plan_for(budget), n, fingerprint), fingerprint)


def plan_files(path: Path) -> list[tuple[int, str]]:
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    found = []
    for f in files:
        try:
            avg = json.loads(f.read_text()).get("average_budget")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise InputError(f"plan {f} is not a plan JSON ({exc}); pass a plan file or a directory of plans") from exc
        if avg is not None and float(avg).is_integer():
            found.append((int(avg), str(f)))
    return found


#: the widths of `quant:<bits>` (16 would be `full`)
QUANT_BITS = tuple(b for b in SUPPORTED_BITS if b != FULL_PRECISION)

#: `plan`, `plan:PATH`, `plan-NAME:PATH` (NAME: letters, digits, `_` and `.`)
PLAN_METHOD = re.compile(r"(?P<name>plan(?:-[A-Za-z0-9_.]+)?)(?::(?P<path>.+))?")


def require_backends(methods: list[Method]) -> None:
    """Raise a one-line `InputError` when a method's optional backend is not installed: checked before a run starts,
    not at its first instance."""
    if any(m.kind == "hf-quant" for m in methods):
        require_backend()


def width_method(item: str, kind: str, widths: tuple[int, ...], what: str, note: str, sep: str = ", ") -> Method:
    """`KIND:BITS` as a budget-independent method at that precision; a width outside `widths` is one clear line."""
    width = item.split(":", 1)[1]
    if width not in {str(b) for b in widths}:
        allowed = sep.join(f"{kind}:{b}" for b in widths)
        raise InputError(f"unknown method {item!r}; {what} takes {allowed}{' ' + note if note else ''}")
    return Method(item, kind, bits=int(width))


def parse_methods(spec: str, default_plans: Path | None) -> list[Method]:
    """`full,quant:4,uniform:snapkv,...,pyramid,plan:DIR,plan-NAME:DIR`; `uniform:*` = every registered policy but
    full."""
    methods: list[Method] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "full":
            methods.append(Method("full", "full"))
        elif item == "pyramid":
            methods.append(Method("pyramid", "pyramid"))
        elif item.startswith("quant:"):
            methods.append(width_method(item, "quant", QUANT_BITS, "quantising the whole cache", "(16 bits: full)"))
        elif item.startswith("hf-quant:"):
            methods.append(width_method(item, "hf-quant", HF_QUANT_BITS, "transformers' quanto KV cache", "", " or "))
        elif item.startswith("uniform:"):
            names = [p for p in policy_names() if p != "full"] if item == "uniform:*" else [item.split(":", 1)[1]]
            for name in names:
                if name not in policy_names():
                    raise InputError(f"unknown policy in method {item!r}; known: {', '.join(policy_names())}")
                methods.append(Method(f"uniform:{name}", "uniform", policy=name))
        elif (named := PLAN_METHOD.fullmatch(item)) is not None:
            name, path = named.group("name"), named.group("path")
            target = Path(path) if path else default_plans
            if target is None or not target.exists():
                raise InputError(f"plan source {target} does not exist; pass {name}:PATH with a plan file or directory")
            plans = plan_files(target)
            if not plans:
                raise InputError(f"no plans with an integer average_budget in {target}")
            methods.append(Method(name, "plan", plans=tuple(plans), source=str(target)))
        else:
            raise InputError(
                f"unknown method {item!r}; use full, quant:<bits>, hf-quant:<bits>, uniform:<policy>, uniform:*, "
                "pyramid, plan:<path> or plan-<name>:<path> (name: letters, digits, _ and .)"
            )
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"a method is listed twice in {spec!r}")
    return methods
