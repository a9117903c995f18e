"""Which layers does a plan lose an answer in? Write variants of a plan with groups of layers kept whole.

A diagnostic, not a plan: each variant keeps the named layers uncompressed (policy `full`), so it uses more than the
plan's total budget (its `total_budget` is raised to what it uses, which a solver never emits). Evaluate the
variants on the instances the plan fails, next to the plan and the full cache:

    python benchmarks/layer_ablation.py --plan plans/smollm2-135m/avg256.json --out runs/ablate \
        --group read=7,14,15,17,18,20-23 --group early=0-6 --each 0-29
    polykv eval --model smollm2-135m --tasks <failing instances> --budgets 256 --methods "$(cat runs/ablate/methods)"

If no single layer, nor any group, restores the answer, the loss is spread over many layers: the per-layer
(additive) losses the solver adds up cannot see it (BENCHMARKS.md, "Where multikey answers are lost at 256").
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


def layers_of(spec: str) -> list[int]:
    """'7,14-16' -> [7, 14, 15, 16]."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def whole(plan: dict, layers: list[int], budget: int) -> dict:
    """The plan with `layers` uncompressed (`budget` >= the prompt); totals follow what it now uses."""
    out = copy.deepcopy(plan)
    for i in layers:
        out["layers"][i].update(policy="full", params={}, budget=budget)
    out["used_budget"] = sum(layer["budget"] for layer in out["layers"])
    out["total_budget"] = max(out["total_budget"], out["used_budget"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--group", action="append", default=[], help="NAME=LAYERS, e.g. read=7,14-15")
    ap.add_argument("--whole", type=int, default=4096, help="budget written for a whole layer (>= the prompts)")
    ap.add_argument("--each", default="", help="also one variant per layer in LAYERS, e.g. 0-29")
    args = ap.parse_args()
    plan = json.loads(args.plan.read_text())
    groups = dict(g.split("=", 1) for g in args.group)
    groups |= {f"L{i:02d}": str(i) for i in (layers_of(args.each) if args.each else [])}
    args.out.mkdir(parents=True, exist_ok=True)
    methods = ["full", f"plan-base:{args.plan}"]
    for name, spec in groups.items():
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(whole(plan, layers_of(spec), args.whole)))
        methods.append(f"plan-{name.replace('_', '')}:{path}")
    (args.out / "methods").write_text(",".join(methods) + "\n")
    print(f"{len(groups)} variants in {args.out}; methods list in {args.out / 'methods'}")


if __name__ == "__main__":
    main()
