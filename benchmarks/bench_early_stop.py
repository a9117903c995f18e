"""Decode time with and without stopping rows whose score is settled, on the first instances of each shipped task.

For each instance: one capture, the default configurations compressed from it (full, every uniform policy, pyramid,
the checked-in plans at budgets 64-512), then the same shared-prefix decode twice, in alternating order per repeat:
decoding every row to EOS / max_new_tokens, and stopping rows once `evaluate.tasks.settled` holds. Reports seconds,
decode steps and generated tokens of both, and checks that every configuration's score is the same both ways.
Run: python benchmarks/bench_early_stop.py [--model smollm2-135m] [--per-task 1] [--tasks a,b] [--threads 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-task", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tasks", default=None, help="comma list of shipped tasks (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from polykv.capture import capture
    from polykv.evaluate.engine import Job, settled_stop
    from polykv.evaluate.methods import parse_methods
    from polykv.evaluate.suite import load_default_suite
    from polykv.evaluate.tasks import score
    from polykv.generation import decode_text, eos_ids, greedy
    from polykv.models import fingerprint, load_model
    from polykv.prompts import encode
    from polykv.shared_prefix import shared_batch

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    fp = fingerprint(model.config)
    methods = parse_methods("full,uniform:*,pyramid,plan", Path("plans") / args.model)
    jobs = [Job(m.name, b, m.settings(b, fp)) for m in methods for b in m.budgets([64, 128, 256, 512])]
    seen: dict[str, int] = {}
    instances = []
    wanted = set(args.tasks.split(",")) if args.tasks else None
    for inst in load_default_suite():
        if wanted and inst.task not in wanted:
            continue
        seen[inst.task] = seen.get(inst.task, 0) + 1
        if seen[inst.task] <= args.per_task:
            instances.append(inst)
    eos = eos_ids(tok, model)
    rows_out = []
    for inst in instances:
        prompt = encode(tok, inst.context, inst.question, max_tokens=4096)
        cap = capture(model, prompt.ids, window=64, cumulative=True)
        comp = [cap.compress(j.settings or [None] * cap.num_layers) for j in jobs]
        new = inst.max_new_tokens or 24
        first = cap.last_logits.expand(len(comp), -1)
        secs = {"full decode": [], "early stop": []}
        result = {}
        for rep in range(args.repeats):
            order = ["full decode", "early stop"] if rep % 2 == 0 else ["early stop", "full decode"]
            for name in order:
                t = time.perf_counter()
                toks = greedy(model, shared_batch(cap.cache, comp, new), first, new, eos,
                              stop=settled_stop(tok, inst) if name == "early stop" else None)
                secs[name].append(time.perf_counter() - t)
                result[name] = toks
        texts = {k: decode_text(tok, v, eos) for k, v in result.items()}
        scores = {k: [score(inst.metric, t, inst.answers) for t in v] for k, v in texts.items()}
        generated = {k: sum(len(tok(t, add_special_tokens=False).input_ids) for t in v) for k, v in texts.items()}
        rows_out.append((inst.id, inst.metric, prompt.length, min(secs["full decode"]), min(secs["early stop"]),
                         result["full decode"].shape[1], result["early stop"].shape[1],
                         generated["full decode"], generated["early stop"],
                         sum(a == b for a, b in zip(scores["full decode"], scores["early stop"])), len(jobs)))
    load = os.getloadavg()[0]
    print("## Early stop in the eval decode (benchmarks/bench_early_stop.py)")
    print(f"- command: `{shlex.join([sys.executable.split('/')[-1]] + sys.argv)}`; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, 1-min load {load:.1f} on {os.cpu_count()} cores; model {args.model}; "
          f"{len(jobs)} configurations per instance; seconds: best of {args.repeats}")
    print("\n| instance | metric | prompt tokens | decode s, full | decode s, early stop | steps | tokens generated "
          "| same scores |\n|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]} -> {r[6]} | {r[7]} -> {r[8]} "
              f"| {r[9]}/{r[10]} |")
    full, early = sum(r[3] for r in rows_out), sum(r[4] for r in rows_out)
    print(f"| **total** | | | **{full:.2f}** | **{early:.2f}** | | {sum(r[7] for r in rows_out)} -> "
          f"{sum(r[8] for r in rows_out)} | {sum(r[9] for r in rows_out)}/{sum(r[10] for r in rows_out)} |")


if __name__ == "__main__":
    main()
