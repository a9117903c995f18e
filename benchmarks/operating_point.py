"""Plans from sensitivities measured around the operating point, not around the full cache (development split).

`polykv solve` prices each layer's options with only that layer compressed. At a tight budget every layer is
compressed at once, and a layer that looks cheap to cut alone can be the one that still reads a needle the others
lost. Here each layer's options are priced with every other layer compressed at the target budget:

1. start from the uniform policy with the lowest measured whole-model loss on the search samples at the budget;
2. measure every move of one layer within `--reach` grid budgets (any policy) with the rest at that start
   (`polykv.refine.neighbours`), as rows of shared-prefix batches;
3. combine the moves with the solver's knapsack under the same total budget, measure the combination, and keep it
   only if it also lowers the loss on held-out samples (`polykv.refine.refine_plan`, `--rounds` such rounds).

The plans are written as OUT/<name>/avg<budget>.json for `polykv eval`, with a summary in OUT/summary.json.

    python benchmarks/operating_point.py -c CAL --search FILE --held-out FILE --budgets 64,128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--calibration", type=Path, required=True, help="the calibration (model, max context)")
    ap.add_argument("--search", type=Path, required=True, help="JSONL the moves are measured on")
    ap.add_argument("--held-out", type=Path, required=True, help="JSONL that only judges each round")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--held-out-samples", type=int, default=8)
    ap.add_argument("--budgets", default="64,128")
    ap.add_argument("--reach", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--caution", type=float, default=1.0)
    ap.add_argument("--name", default="op")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from polykv.answer_loss import prepare_samples
    from polykv.calibrate import round_robin
    from polykv.calibrate.runner import budget_grid
    from polykv.data import load_samples
    from polykv.models import fingerprint, load_model
    from polykv.plan import uniform_plan
    from polykv.policies import policy_names
    from polykv.refine import best_uniform, refine_plan
    from polykv.solve.inputs import read_metadata

    budgets = tuple(int(b) for b in args.budgets.split(","))
    meta = read_metadata(args.calibration)
    max_context = (meta.get("settings") or {}).get("max_context") or 4096
    loaded = load_model(meta["model"])
    search = prepare_samples(loaded, round_robin(load_samples(args.search))[: args.samples], max_context)
    held = prepare_samples(loaded, round_robin(load_samples(args.held_out))[: args.held_out_samples], max_context)
    policies = [p for p in policy_names() if p != "full"]
    grid = budget_grid(max_context, None)
    fp = fingerprint(loaded.model.config)
    summary: dict = {"settings": vars(args), "budgets": {}}
    for budget in budgets:
        started = time.perf_counter()
        like = uniform_plan(meta["model"], fp, policies[0], budget)
        start, measured = best_uniform(loaded.model, search, like, policies)
        ranked = sorted(measured.items(), key=lambda x: x[1])
        print(f"avg {budget}: uniform losses " + ", ".join(f"{p} {v:.4f}" for p, v in ranked), flush=True)
        result = refine_plan(
            loaded.model,
            search,
            start,
            grid,
            policies,
            args.rounds,
            log=lambda m: print(m, flush=True),
            held_out=held,
            caution=args.caution,
            reach=args.reach,
        )
        target = args.out / args.name / f"avg{budget}.json"
        result.plan.save(target)
        summary["budgets"][str(budget)] = {
            "start": ranked[0][0],
            "uniform_losses": {p: round(float(v), 5) for p, v in ranked},
            "losses": result.losses,
            "held_out": result.held_out,
            "rejected": result.rejected,
            "moves": result.moves,
            "seconds": round(time.perf_counter() - started),
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"wrote {target}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
