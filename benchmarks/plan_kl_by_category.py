"""Whole-model answer KL of plans, per calibration sample and category: does a plan that lowers the mean lower it
where the eval suite's gap is (retrieval), or elsewhere?

Each plan is measured exactly as `polykv refine` measures it (`polykv.answer_loss.Objective`: every layer compressed,
mean KL(full || plan) over the teacher-forced answer), on the shipped calibration samples in round-robin order
(the first 16 are what `calibrate --samples 16` and `refine --samples 16` use, the next 8 refine's held-out ones).
Prints a Markdown table: one row per category, one column per plan (mean over that category's samples).
Run: python benchmarks/plan_kl_by_category.py --model smollm2-135m PLAN.json [PLAN.json ...] [--samples 24]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="+", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--max-context", type=int, default=4096)
    args = ap.parse_args()

    from polykv.answer_loss import Objective, prepare_samples
    from polykv.calibrate import default_data_path, round_robin
    from polykv.data import load_samples
    from polykv.models import load_model
    from polykv.plan import Plan

    items = round_robin(load_samples(default_data_path()))[: args.samples]
    loaded = load_model(args.model)
    prepared = prepare_samples(
        loaded, items, args.max_context, on_sample=lambda i: print(f"prepared {i + 1}/{len(items)}", file=sys.stderr)
    )
    plans = [Plan.load(p) for p in args.plans]
    per = Objective(loaded.model, prepared).per_sample(
        [[(layer.policy, layer.budget) for layer in p.layers] for p in plans]
    )
    print(f"command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`\n")
    print("| category | samples | " + " | ".join(p.parent.name + "/" + p.name for p in args.plans) + " |")
    print("|---|---|" + "---|" * len(plans))
    cats = sorted({it.category for it in items})
    for cat in cats + ["all"]:
        rows = [i for i, it in enumerate(items) if cat in ("all", it.category)]
        means = per[rows].mean(0)
        print(f"| {cat} | {len(rows)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
