"""Which loss should the guard judge plans by? Measured on a development split, never on a reported workload.

The guard of `polykv solve` picks, at each budget, one of several candidate plans (the solved plan, floor blends,
every uniform policy) by a whole-model loss on a few held-out samples. This script measures, for one calibration:

1. `measure`: every candidate's per-sample losses on the held-out samples (answer KL to the full cache and the rise
   of the answer's NLL, on the gold answer and on the full cache's own greedy answer, and the share of that own
   answer the candidate's greedy decoding misses), with what the full cache itself does on each sample (its gold
   NLL, whether its greedy first token is the gold one), to `losses.json`; the non-uniform candidates are written as
   plan directories so `polykv eval` can score them (uniform candidates are eval's own `uniform:POLICY` methods);
   `--extra NAME:DIR` adds plans made elsewhere (DIR/avg<budget>.json) as candidates;
2. `analyze`: given that eval of the candidates on the development instances, which candidate each objective would
   have the guard keep, and that candidate's task score next to the best uniform policy's and the best candidate's.

    python benchmarks/guard_objectives.py measure -c CAL --guard-data FILE --samples 16 --budgets 64,128 --out DIR \
        [--extra NAME:DIR,...]
    polykv eval --model M --tasks DEV --budgets 64,128 --methods "$(cat DIR/methods.txt)" --out DIR/eval
    python benchmarks/guard_objectives.py analyze DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from polykv.guard import MARGIN, choices, distinct, held_out, judge  # noqa: E402

#: Objectives compared: name -> (loss, restrict to samples the full cache knows, per-sample normalisation).
OBJECTIVES = {
    "kl": ("kl", False, False),
    "nll": ("nll", False, False),
    "kl-known": ("kl", True, False),
    "nll-known": ("nll", True, False),
    "kl-relative": ("kl", False, True),
    "nll-relative": ("nll", False, True),
    "own-kl": ("own_kl", False, False),
    "own-nll": ("own_nll", False, False),
    "own-miss": ("own_miss", False, False),
    "miss": ("miss", False, False),
}
KNOWN_P = 0.5  # a sample is "known" when the full cache gives the gold answer a mean token probability >= this


def method(name: str) -> str:
    """The `polykv eval` method name of a candidate: its own for a uniform policy, else plan-<name>."""
    return name if name.startswith("uniform:") else "plan-" + name.replace(":", "_")


def measure(args: argparse.Namespace) -> int:

    from polykv.answer_loss import Objective, prepare_samples
    from polykv.data import load_samples
    from polykv.models import load_model
    from polykv.plan import Plan
    from polykv.solve.candidates import guard_candidates
    from polykv.solve.inputs import read_metadata
    from polykv.solve.runner import SolveRequest, load_table, plans_for

    budgets = tuple(int(b) for b in args.budgets.split(","))
    request = SolveRequest(args.calibration, budgets)
    table, provenance = load_table(request)
    solved = plans_for(request, table, provenance)
    frontier = [
        guard_candidates(table, b, p, request.options, provenance) for b, p in zip(budgets, solved, strict=True)
    ]
    for spec in filter(None, args.extra.split(",")):
        name, folder = spec.split(":", 1)
        for b, cands in zip(budgets, frontier, strict=True):
            cands[name] = Plan.load(Path(folder) / f"avg{b}.json")
    out: Path = args.out
    methods = ["full", "uniform:*"]
    for name in frontier[0]:
        if name.startswith("uniform:"):
            continue
        folder = out / f"cand-{name.replace(':', '_')}"
        for b, cands in zip(budgets, frontier, strict=True):
            cands[name].save(folder / f"avg{b}.json")
        methods.append(f"{method(name)}:{folder}")
    (out / "methods.txt").write_text(",".join(methods))

    meta = read_metadata(args.calibration)
    items = held_out(load_samples(args.guard_data), meta.get("sample_ids", []), args.samples, str(args.guard_data))
    loaded = load_model(meta["model"])
    max_context = (meta.get("settings") or {}).get("max_context")
    samples = prepare_samples(loaded, items, max_context, on_sample=lambda i: print(f"prepared {i + 1}", flush=True))
    objective = Objective(loaded.model, samples)
    own = Objective(loaded.model, prepare_samples(loaded, items, max_context, own_answers=True))
    record: dict = {"samples": [], "budgets": {}}
    for item, s in zip(items, samples, strict=True):
        first = int(s.capture.last_logits[0].argmax()) == int(s.answer_in[0, 0])
        record["samples"].append({"id": item.id, "category": item.category, "full_nll": s.full_nll, "first": first})
    for b, cands in zip(budgets, frontier, strict=True):
        pool = distinct(cands)
        losses = objective.per_sample_losses([choices(p) for p in pool.values()])
        own_losses = own.per_sample_losses([choices(p) for p in pool.values()])
        losses.update({f"own_{k}": v for k, v in own_losses.items()})
        column = {tuple(choices(p)): i for i, p in enumerate(pool.values())}
        idx = [column[tuple(choices(cands[n]))] for n in cands]
        record["budgets"][str(b)] = {"names": list(cands), **{k: v[:, idx].tolist() for k, v in losses.items()}}
        print(f"measured {b}", flush=True)
    (out / "losses.json").write_text(json.dumps(record, indent=1))
    return 0


def objective_matrix(record: dict, budget: str, objective: str) -> np.ndarray:
    loss, known_only, relative = OBJECTIVES[objective]
    m = np.asarray(record["budgets"][budget][loss], dtype=np.float64)
    if known_only:
        known = np.array([np.exp(-s["full_nll"]) >= KNOWN_P for s in record["samples"]])
        if known.any():
            m = m[known]
    if relative:
        scale = np.median(np.abs(m), axis=1, keepdims=True)
        m = m / np.where(scale > 0, scale, 1.0)
    return m


def dev_scores(eval_dir: Path) -> dict[tuple[str, int], float]:
    """(method, budget) -> mean task score over the development tasks (each task weighted equally)."""
    import pandas as pd

    done = eval_dir / "results.parquet"
    df = pd.read_parquet(done if done.exists() else eval_dir / "results.partial.parquet")
    print(f"development scores on {df['instance_id'].nunique()} instances")
    per_task = df.groupby(["method", "budget", "task"])["score"].mean().reset_index()
    return {(m, int(b)): float(s) for (m, b), s in per_task.groupby(["method", "budget"])["score"].mean().items()}


def distinct_names(record: dict, budget: str) -> list[str]:
    """The candidates with distinct losses (a candidate equal to an earlier one shares its measurement)."""
    entry, seen, out = record["budgets"][budget], set(), []
    for i, name in enumerate(entry["names"]):
        key = tuple(np.round(np.asarray(entry["kl"])[:, i], 12))
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def analyze(args: argparse.Namespace) -> int:
    from scipy.stats import spearmanr

    record = json.loads((args.out / "losses.json").read_text())
    scores = dev_scores(args.eval or args.out / "eval")
    known = sum(np.exp(-s["full_nll"]) >= KNOWN_P for s in record["samples"])
    print(f"{len(record['samples'])} guard samples, {known} known to the full cache (p >= {KNOWN_P})")
    print("| objective | budget | chosen | dev score | best uniform (score) | best candidate (score) | rank corr. |")
    print("|---|---|---|---|---|---|---|")
    for objective in OBJECTIVES:
        for budget, entry in record["budgets"].items():
            names = entry["names"]
            verdict = judge(objective_matrix(record, budget, objective), names, margin=args.margin)

            def score(name: str, b: int = int(budget)) -> float:
                return scores.get((method(name), b), float("nan"))

            uniform = max((n for n in names if n.startswith("uniform:")), key=score)
            best = max(names, key=score)
            # Spearman correlation of -loss with the score over the distinct candidates: 1 = the same order
            loss = dict(zip(names, objective_matrix(record, budget, objective).mean(0), strict=True))
            rows = [n for n in distinct_names(record, budget) if not np.isnan(score(n))]
            corr = spearmanr([-loss[n] for n in rows], [score(n) for n in rows]).statistic
            print(
                f"| {objective} | {budget} | {verdict.chosen} | {score(verdict.chosen):.1f} | "
                f"{uniform} ({score(uniform):.1f}) | {best} ({score(best):.1f}) | {corr:+.2f} |"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("-c", "--calibration", type=Path, required=True)
    m.add_argument("--guard-data", type=Path, required=True)
    m.add_argument("--samples", type=int, default=16)
    m.add_argument("--budgets", default="64,128")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--extra", default="", help="NAME:DIR,... plans made elsewhere to add as candidates")
    a = sub.add_parser("analyze")
    a.add_argument("out", type=Path)
    a.add_argument("--eval", type=Path, default=None, help="the eval of the candidates (default: OUT/eval)")
    a.add_argument("--margin", type=float, default=MARGIN)
    args = ap.parse_args(argv)
    return measure(args) if args.cmd == "measure" else analyze(args)


if __name__ == "__main__":
    raise SystemExit(main())
